"""Streamed input: global batches read, decoded and preprocessed on the host, each process its own rows.

For data that do not fit on a device (ImageNet: 600 x 1000 crops of 224 x 224 x 3 are 361 GB as float32),
``nc_jax.data.load``'s arrays are replaced by random-access sources read batch by batch with grain:

    data = stream.open_dataset("imagenet2012", data_dir="/data/tfds")       # labels, subset, statistics
    train = stream.TrainStream(data, batch_size=128, seed=0, mesh=device.data_mesh(), worker_count=8)
    for inputs, labels in train.epoch(1): ...                                # jax.Arrays sharded along 'data'
    checkpoint_meta["input"] = train.get_state()                            # {'epoch': e, 'step': s}

Sources: ``tfds.data_source`` over ArrayRecord files (``tfds build NAME --file_format=array_record``; records are
tfds's serialized examples, images as stored: PNG for the small sets, JPEG for ImageNet, decoded by tfds with
PIL in the reading process), or arrays in memory (IDX files, generated data) through ``ArraySource``.

The same examples and the same order as the in-memory path (``nc_jax.data.load`` + ``device.epoch_batches``):
  * the training subset is ``preprocess.training_subset`` of the source's labels with the same seed;
  * epoch e's global batch s (B rows) is subset positions perm_e[s B : (s + 1) B], with
    perm_e = ``device.epoch_permutation(seed, e, N)`` computed on the host CPU (the last partial batch dropped);
  * images are padded (``preprocess.pad_images``) and standardised (``preprocess.standardize``) with training
    statistics from a streaming pass, exact integer sums for uint8 images, so they equal ``preprocess.statistics``
    to float64 rounding (and the float32 values to the bit).
So a streamed run sees bit-identical batches. Process p of P reads rows [p B/P, (p + 1) B/P) of every global
batch (its devices' rows of the 'data' sharding); the sequence does not depend on P or on the device count.
ImageNet's geometry (no augmentation): the shorter side resized to 256 px (PIL bilinear, antialiased), then the
centre 224 x 224 crop, torchvision's evaluation transform Resize(256) + CenterCrop(224) for every split (a
direct 224 x 224 resize would distort aspect ratios; with no augmentation the standard evaluation view is the
natural single view of each image).

The trainer (``input_pipeline='stream'``, or 'auto' for sets that would not fit, ``choose_pipeline``) steps a
jitted train step over ``TrainStream`` batches and saves ``get_state()`` in each checkpoint's metadata;
``eval_batches`` feeds ``nc_jax.training.evaluate.StreamedEvaluator`` (two passes with the metrics' streaming
accumulators).

Modules by job: ``readers`` (the sources and their label cache), ``transform`` (stored image -> standardised
float32, and the streaming statistics), ``workers`` (grain reading), ``selection`` (the subset and labels, shared
with ``nc_jax.data.load``); this one opens a dataset and draws its batches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Optional, Union

import jax
import numpy as np

from nc_jax import multihost
from nc_jax.data import check_split, device, selection, sources
from nc_jax.data.readers import LABELS_CACHE_PREFIX, ArraySource, StreamError, TfdsSource
from nc_jax.data.selection import PAPER_PER_CLASS, DataOptions
from nc_jax.data.transform import Moments, Transform, encode_image, resize_and_crop
from nc_jax.names import INPUT_PIPELINES
from nc_jax.data.workers import READ_LOG_ENV, Reader, iterate

epoch_order = device.epoch_order  # (seed, epoch, N) -> (N,) host permutation: the in-memory path's order

IMAGENET_RESIZE, IMAGENET_CROP = 256, 224  # shorter side, then centre crop (px)
PIPELINES = INPUT_PIPELINES
# Full sizes (train examples, test examples, input shape after padding/cropping) for the 'auto' choice.
FULL_SIZES = {"mnist": (60_000, 10_000, (32, 32, 1)), "fashion_mnist": (60_000, 10_000, (32, 32, 1)),
              "cifar10": (50_000, 10_000, (32, 32, 3)), "cifar100": (50_000, 10_000, (32, 32, 3)),
              "svhn_cropped": (73_257, 26_032, (32, 32, 3)), "stl10": (5_000, 8_000, (96, 96, 3)),
              "imagenet2012": (1_281_167, 50_000, (224, 224, 3))}
DEVICE_MEMORY_FRACTION = 0.25  # of one device's memory, the most the replicated data may take under 'auto'


# ----------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True)
class StreamedDataset:
  """What a streamed run needs; ``nc_jax.data.Dataset``'s fields with sources in place of input arrays.

  train_indices: (N,) chosen records of the train source (sorted, = the in-memory ``train_indices``);
  train_labels (N,) int32 (after any random-label shuffle), train_true_labels (N,), test_labels (M,).
  transform: stored image -> standardised float32 of ``input_shape``; mean, std: its statistics.
  """

  name: str
  train_source: Any
  test_source: Any
  train_indices: np.ndarray
  train_labels: np.ndarray
  train_true_labels: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  transform: Transform
  input_shape: tuple
  mean: np.ndarray
  std: np.ndarray
  streamed = True  # class attribute, not a field: read batch by batch (``data.Dataset.streamed`` is False)


  def num_examples(self, split: str) -> int:
    check_split(split)
    return len(self.train_indices) if split == "train" else len(self.test_labels)

  def train_batches(self, batch_size: int, seed: int, epoch: int, *,
                    start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``data.DatasetProtocol.train_batches``: every row of the global batches, read here (one process)."""
    stream = TrainStream(self, batch_size, seed, process_index=0, process_count=1)
    return stream.local_batches(epoch, start_step)

  def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``data.DatasetProtocol.eval_batches``: every row, read here (the module's ``eval_batches`` splits them)."""
    return eval_batches(self, split, batch_size, process_index=0, process_count=1)


def _sources(name: str, source: str, data_dir: Optional[str], seed: int, synthetic_options: dict):
  """(train source, test source, num_classes) for any dataset nc_jax.data.load knows."""
  if source == "tfds" and name in sources.TFDS_DATASETS:
    num_classes, test_split = sources.TFDS_DATASETS[name]
    return TfdsSource(name, "train", data_dir), TfdsSource(name, test_split, data_dir), num_classes
  if source == "tfds" and name not in sources.GENERATED_DATASETS:  # any prepared tfds image dataset with a label
    train = TfdsSource(name, "train", data_dir)
    info = train._source.dataset_info
    test_split = "test" if "test" in info.splits else "validation"
    return train, TfdsSource(name, test_split, data_dir), int(info.features["label"].num_classes)
  raw = sources.raw_splits(name, source, data_dir, seed, synthetic_options)  # IDX files, generated data
  return (ArraySource(raw.train_inputs, raw.train_labels), ArraySource(raw.test_inputs, raw.test_labels),
          raw.num_classes)


def open_dataset(name: str, *, source: str = "tfds", data_dir: Optional[str] = None,
                 per_class: Union[int, str, None] = "paper", standardization: str = "global",
                 pad_to: Union[int, str, None] = "auto", seed: int = 0, imbalance: str = "none",
                 imbalance_ratio: float = 1.0, minority_classes: int = 0, random_label_fraction: float = 0.0,
                 image_size: Optional[tuple[int, int]] = None, worker_count: int = 0, batch_size: int = 256,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 **synthetic_options) -> StreamedDataset:
  """The streamed counterpart of ``nc_jax.data.load`` (same arguments, same subset, same statistics).

  Reads every training label once (images left encoded where tfds can), picks the subset, then one
  streaming pass over the subset's images computes the statistics: each process reads a 1/P block and the
  exact sums are added over processes. image_size: (resize, crop) px; imagenet2012 defaults to (256, 224).
  worker_count: grain worker processes for that pass (0: in this process); batch_size: its batch.
  """
  options = DataOptions(per_class=per_class, standardization=standardization, pad_to=pad_to, seed=seed,
                        imbalance=imbalance, imbalance_ratio=imbalance_ratio, minority_classes=minority_classes,
                        random_label_fraction=random_label_fraction)
  opened = _sources(name, source, data_dir, seed, synthetic_options)
  return from_sources(name, options, opened, image_size=image_size, worker_count=worker_count,
                      batch_size=batch_size, process_index=process_index, process_count=process_count)


def from_sources(name: str, options: DataOptions, opened: tuple, *, image_size: Optional[tuple[int, int]] = None,
                 worker_count: int = 0, batch_size: int = 256, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> StreamedDataset:
  """``open_dataset`` of opened (train source, test source, num_classes): ``selection.select`` the subset from
  the train labels, fix the geometry from its first image, then the statistics pass (``_statistics``)."""
  train_source, test_source, num_classes = opened
  chosen = selection.select(name, train_source.labels(), num_classes, options)
  first, _ = train_source.read([int(chosen.indices[0])])[0]
  geometry = _geometry(name, first, options.pad_to, image_size)
  mean, std = _statistics(train_source, chosen.indices, geometry, options.standardization, batch_size=batch_size,
                          worker_count=worker_count, process_index=process_index, process_count=process_count)
  transform = dataclasses.replace(geometry, mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
  return StreamedDataset(
      name=name, train_source=train_source, test_source=test_source, train_indices=chosen.indices,
      train_labels=chosen.labels, train_true_labels=chosen.true_labels,
      test_labels=test_source.labels().astype(np.int32), num_classes=num_classes, transform=transform,
      input_shape=transform.batch([first]).shape[1:], mean=transform.mean, std=transform.std)


def _geometry(name: str, first: np.ndarray, pad_to, image_size: Optional[tuple[int, int]]) -> Transform:
  """The ``Transform`` without statistics for stored inputs like ``first``: ImageNet's resize and crop (or
  ``image_size``), else ``selection.pad_side``'s padding; ``selection.input_scale`` of the stored dtype."""
  if image_size is None and name == "imagenet2012":
    image_size = (IMAGENET_RESIZE, IMAGENET_CROP)
  return Transform(pad_to=selection.pad_side(pad_to, first.shape), resize=image_size and image_size[0],
                   crop=image_size and image_size[1], scale=selection.input_scale(first.dtype))


def _statistics(source, indices: np.ndarray, geometry: Transform, kind: str, *, batch_size: int,
                worker_count: int, process_index: Optional[int], process_count: Optional[int]):
  """(mean, std) float64 of the subset ``indices`` of ``source`` as ``preprocess.statistics`` of the stored
  values (padded only for 'pixel', whose statistics must match the padded layout): each process reads its
  ``_block``, and the exact sums are added over processes."""
  moments = Moments(kind)
  rows = _block(len(indices), process_index, process_count)
  reader = Reader(source, indices[rows], None, geometry, batch_size, pad=kind == "pixel", tag="statistics")
  for stored, _ in iterate(reader, 0, worker_count):
    moments.update(stored)
  moments = _sum_over_processes(moments) if (process_count or jax.process_count()) > 1 else moments
  return moments.finalize(geometry.scale)


def _block(num_examples: int, process_index: Optional[int], process_count: Optional[int]) -> slice:
  """Process p's contiguous 1/P block of ``num_examples`` (for the statistics pass)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return slice(num_examples * index // count, num_examples * (index + 1) // count)




def _sum_over_processes(moments: Moments) -> Moments:
  """The exact uint8 sums of every process's ``Moments``, added (``multihost.gather``)."""
  if moments.sums is None or moments.sums[0].dtype != np.int64:
    raise StreamError("statistics over several processes need uint8 images (exact sums)")
  gathered = multihost.gather({"count": np.asarray(moments.count, np.int64), "s": moments.sums[0],
                               "q": moments.sums[1]})
  total = Moments(moments.kind)
  total.count = int(np.sum(gathered["count"]))
  total.sums = (np.sum(gathered["s"], axis=0), np.sum(gathered["q"], axis=0))
  return total


def device_memory_bytes() -> int:
  """One local device's memory (bytes_limit of GPUs/TPUs); on CPU, the host's memory (not divided among fake
  CPU devices, so a test's device count never changes the choice)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_pipeline(requested: str, name: str, per_class, num_classes: Optional[int] = None,
                    memory_bytes: Optional[int] = None) -> str:
  """'memory' or 'stream'. 'auto' streams when the standardised float32 train + test sets, replicated on each
  device by the in-memory path, would exceed DEVICE_MEMORY_FRACTION (1/4) of one device's memory: the other
  3/4 hold the train state, its optimizer copy and XLA's activations (ResNet152 at batch 128 on 224 px needs
  ~40 GB of temporaries: BENCHMARKS.md's cost model). Datasets of unknown size (generated, IDX) stay in memory.
  per_class: as ``load`` takes it ('paper', an int, None; other strings are read by ``schema.parse_per_class``).
  """
  if requested not in PIPELINES:
    raise ValueError(f"unknown input_pipeline {requested!r}; choose one of {PIPELINES}")
  if requested != "auto":
    return requested
  if name not in FULL_SIZES:
    return "memory"
  train, test, shape = FULL_SIZES[name]
  per_class = selection.parsed_per_class(per_class)
  if per_class == "paper":  # the paper's count of the set's own classes
    train = min(train, PAPER_PER_CLASS[name] * sources.TFDS_DATASETS[name][0])
  elif per_class is not None:
    train = min(train, per_class * (num_classes or sources.TFDS_DATASETS[name][0]))
  needed = (train + test) * int(np.prod(shape)) * 4
  limit = DEVICE_MEMORY_FRACTION * (memory_bytes or device_memory_bytes())
  return "stream" if needed > limit else "memory"


def materialise(data: StreamedDataset, split: str, batch_size: int = 256) -> np.ndarray:
  """(N, ...) float32 standardised inputs of 'train' (the subset) or 'test', read whole (small sets only)."""
  parts = [inputs for inputs, _, _ in eval_batches(data, split, batch_size, process_index=0, process_count=1)]
  return np.concatenate(parts)[:data.num_examples(split)]


def whole_batches(data: StreamedDataset, split: str, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``nc_jax.collect``'s split of a set: whole batches k = p, p + P, ... of [k B, (k + 1) B) in set order
  (process p of P), from this process's ``start``-th on; (b, ...) float32, (b,) int32, the last one short."""
  records, labels, source = _split_records(data, split)
  for k in range(process_index, -(-len(labels) // batch_size), process_count)[start:]:
    rows = slice(k * batch_size, (k + 1) * batch_size)
    yield data.transform.batch([image for image, _ in source.read(records[rows])]), labels[rows]


def _split_records(data: StreamedDataset, split: str) -> tuple[np.ndarray, np.ndarray, Any]:
  """(records (n,) in the source, labels (n,), source) of 'train' (the subset) or 'test'."""
  if split == "train":
    return data.train_indices, data.train_labels, data.train_source
  return np.arange(data.num_examples(split)), data.test_labels, data.test_source


# ------------------------------------------------------------------ batches
def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows [p B/P, (p + 1) B/P) of each global batch that process p of P reads."""
  if batch_size % process_count:
    lower, upper = batch_size // process_count * process_count, -(-batch_size // process_count) * process_count
    raise StreamError(f"batch_size {batch_size} cannot be split over {process_count} processes: it must be a "
                      f"multiple of the process count, e.g. {lower or upper} or {upper}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def mesh_rows(mesh, batch_size: int) -> slice:
  """This process's rows of a global batch under ``device.batch_sharding(mesh)`` (must be one contiguous block)."""
  spans = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in
                  device.batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()})
  start, stop = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != stop - start:
    raise StreamError(f"this process's devices hold rows {spans} of the batch, not one block; build the mesh "
                      "with each process's devices next to each other (device.data_mesh() does)")
  return slice(start, stop)


class TrainStream:
  """Global training batches of (seed, epoch), in the in-memory path's order, resumable mid-epoch.

  ``next(stream)`` returns the batch at ``get_state()`` = {'epoch': e, 'step': s} (epochs count from 1, as
  the training loop's) and advances; after the epoch's last full batch the state is (e + 1, 0).
  ``set_state`` (or ``epoch=``, ``step=``) restarts exactly there. With a ``mesh``, batches are jax.Arrays
  (B, ...) / (B,) sharded along 'data', assembled by ``jax.make_array_from_process_local_data`` from this
  process's rows; without one, numpy arrays of the rows ``process_rows(B, process_index, process_count)``.
  """

  def __init__(self, data: StreamedDataset, batch_size: int, seed: int, *, mesh=None,
               process_index: Optional[int] = None, process_count: Optional[int] = None, worker_count: int = 0,
               prefetch: int = 2, threads: int = 0, epoch: int = 1, step: int = 0):
    self.data, self.batch_size, self.seed, self.mesh = data, batch_size, seed, mesh
    self.worker_count, self.prefetch, self.threads = worker_count, prefetch, threads
    self.num_examples = len(data.train_indices)
    self.steps_per_epoch = self.num_examples // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size {batch_size} is larger than the dataset ({self.num_examples} examples)")
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    self.rows = process_rows(batch_size, index, count)
    if mesh is not None:
      self.rows = mesh_rows(mesh, batch_size)
    self.sharding = None if mesh is None else device.batch_sharding(mesh)
    self._epoch, self._step, self._batches = epoch, step, None

  def get_state(self) -> dict:
    return {"epoch": int(self._epoch), "step": int(self._step)}

  def set_state(self, state: dict) -> None:
    self._epoch, self._step, self._batches = int(state["epoch"]), int(state["step"]), None

  def order(self, epoch: int) -> np.ndarray:
    """(steps, B) subset positions of the epoch's full global batches."""
    used = self.steps_per_epoch * self.batch_size
    return epoch_order(self.seed, epoch, self.num_examples)[:used].reshape(self.steps_per_epoch, self.batch_size)

  def local_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's rows (b, ...) float32, (b,) int32 of the epoch's batches start_step.. (numpy)."""
    positions = self.order(epoch)[:, self.rows]
    reader = Reader(self.data.train_source, self.data.train_indices[positions], self.data.train_labels[positions],
                    self.data.transform, positions.shape[1], standardize=True, tag=f"train:{epoch}")
    return iterate(reader, start_step, self.worker_count, self.prefetch, self.threads)

  def _global(self, local: np.ndarray):
    if self.sharding is None:
      return local
    return jax.make_array_from_process_local_data(self.sharding, local, (self.batch_size, *local.shape[1:]))

  def __iter__(self):
    return self

  def __next__(self):
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step, self._batches = self._epoch + 1, 0, None
    if self._batches is None:
      self._batches = self.local_batches(self._epoch, self._step)
    inputs, labels = next(self._batches)
    self._step += 1
    if self._step >= self.steps_per_epoch:
      self._epoch, self._step, self._batches = self._epoch + 1, 0, None
    return self._global(inputs), self._global(labels)

  def epoch(self, epoch: int) -> Iterator:
    """The remaining global batches of ``epoch`` (from the current step if the state is in it, else from 0)."""
    if self.get_state()["epoch"] != epoch:
      self.set_state({"epoch": epoch, "step": 0})
    for _ in range(self._step, self.steps_per_epoch):
      yield next(self)


def eval_batches(data: StreamedDataset, split: str, batch_size: int, *, mesh=None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 worker_count: int = 0) -> Iterator[tuple[Any, Any, Any]]:
  """Every example of 'train' (the subset) or 'test' once, in order: (inputs, labels, mask) per batch of B.

  The last batch is padded with record 0 and mask False, as ``device.padded_batches``; sharded as training.
  """
  records, labels, source = _split_records(data, split)
  indices, mask = device.padded_batches(len(labels), batch_size)
  records, labels = records[indices], labels[indices]
  count = jax.process_count() if process_count is None else process_count
  rows = process_rows(batch_size, jax.process_index() if process_index is None else process_index, count)
  rows = mesh_rows(mesh, batch_size) if mesh is not None else rows
  reader = Reader(source, records[:, rows], labels[:, rows], data.transform, rows.stop - rows.start,
                  standardize=True, tag=f"eval:{split}")
  sharding = None if mesh is None else device.batch_sharding(mesh)
  for step, (inputs, batch_labels) in enumerate(iterate(reader, 0, worker_count)):
    parts = (inputs, batch_labels, mask[step, rows])
    if sharding is None:
      yield parts
    else:
      yield tuple(jax.make_array_from_process_local_data(sharding, x, (batch_size, *x.shape[1:])) for x in parts)


__all__ = ["ArraySource", "DEVICE_MEMORY_FRACTION", "FULL_SIZES", "IMAGENET_CROP", "IMAGENET_RESIZE",
           "LABELS_CACHE_PREFIX", "Moments", "PIPELINES", "READ_LOG_ENV", "StreamError", "StreamedDataset",
           "TfdsSource", "Transform", "TrainStream", "choose_pipeline", "device_memory_bytes", "encode_image",
           "epoch_order", "eval_batches", "from_sources", "materialise", "mesh_rows", "open_dataset",
           "process_rows", "resize_and_crop", "whole_batches"]
