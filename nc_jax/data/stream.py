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
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np

from nc_jax.data import device, preprocess, sources

IMAGENET_RESIZE, IMAGENET_CROP = 256, 224  # shorter side, then centre crop (px)
PIPELINES = ("auto", "memory", "stream")
# Full sizes (train examples, test examples, input shape after padding/cropping) for the 'auto' choice.
FULL_SIZES = {"mnist": (60_000, 10_000, (32, 32, 1)), "fashion_mnist": (60_000, 10_000, (32, 32, 1)),
              "cifar10": (50_000, 10_000, (32, 32, 3)), "cifar100": (50_000, 10_000, (32, 32, 3)),
              "svhn_cropped": (73_257, 26_032, (32, 32, 3)), "stl10": (5_000, 8_000, (96, 96, 3)),
              "imagenet2012": (1_281_167, 50_000, (224, 224, 3))}
DEVICE_MEMORY_FRACTION = 0.25  # of one device's memory, the most the replicated data may take under 'auto'
# Audit hook (tests, debugging a sharding): when set to PATH, every batch read appends one JSON line
# {"tag": what ('statistics', 'train:EPOCH', 'eval:SPLIT'), "step": batch, "records": [source indices]} to
# PATH.PROCESS_INDEX, grain workers included: what each process actually read.
READ_LOG_ENV = "NC_JAX_STREAM_READ_LOG"


LABELS_CACHE_PREFIX = "nc_jax-labels-"  # + SPLIT-STAMP-DIGEST.npy next to a tfds split's files


class StreamError(ValueError):
  """Streamed input that cannot be read as asked: a corrupt record, a batch the processes cannot split."""


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _labels_digest(labels: np.ndarray) -> str:
  """The first 16 hex digits of the sha256 of (N,) int32 labels' little-endian bytes and N."""
  return hashlib.sha256(f"{len(labels)}:".encode() + np.asarray(labels, "<i4").tobytes()).hexdigest()[:16]


def _not_prepared(name: str, data_dir: Optional[str], error: BaseException) -> FileNotFoundError:
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  manual = " --manual_dir DIR_WITH_ILSVRC2012_TARS" if name == "imagenet2012" else ""
  build = f"`tfds build {name} --file_format=array_record --data_dir DIR{manual}`"
  how = (f"`python -m nc_jax.prepare {name} --data_dir DIR{manual}` (what tfds's {build} does, plus checks)"
         if name in sources.TFDS_DATASETS else f"{build} (needs tensorflow)")
  return FileNotFoundError(
      f"tfds dataset {name!r} is not prepared as ArrayRecord in {where} ({type(error).__name__}: "
      f"{str(error).splitlines()[0] if str(error) else ''}). Prepare it on a machine with internet: {how}, "
      "then pass data_dir=DIR (--config.data_dir=DIR), copying DIR here if it was prepared elsewhere")


# ------------------------------------------------------------------ sources
class ArraySource:
  """Random access over arrays in memory: record i = (inputs[i], labels[i])."""

  def __init__(self, inputs: np.ndarray, labels: np.ndarray):
    self.inputs, self._labels = inputs, np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    return [(self.inputs[i], int(self._labels[i])) for i in indices]

  def labels(self) -> np.ndarray:
    return self._labels


class TfdsSource:
  """One split of a prepared tfds dataset through ``tfds.data_source`` (ArrayRecord, no TensorFlow).

  Records are tfds examples {'image': (H, W, C) uint8 decoded by tfds, 'label': int}. Picklable (grain workers
  reopen it by name). ``read`` names the file and the record's index in it when a record cannot be read.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = self._open()

  def _open(self, **kwargs):
    import tensorflow_datasets as tfds  # heavy: only imported when used
    try:
      return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False, **kwargs)
    except Exception as error:  # tfds raises several types for a missing dataset
      raise _not_prepared(self.name, self.data_dir, error) from None

  def __getstate__(self):
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()

  def __len__(self) -> int:
    return len(self._source)

  def locate(self, index: int) -> str:
    """'FILE, record K' holding global record ``index`` of the split (from the split's shard lengths)."""
    try:
      info = self._source.dataset_info.splits[self.split]
      ends = np.cumsum(info.shard_lengths)
      shard = bisect.bisect_right(list(ends), index)
      return f"{info.filepaths[shard]}, record {index - (ends[shard - 1] if shard else 0)}"
    except Exception:  # mock data and unusual splits have no shard table
      return f"{self.name} split {self.split!r} (data_dir {self.data_dir}), record {index}"

  def _record(self, index: int, record) -> tuple[np.ndarray, int]:
    image = np.asarray(record["image"])
    if image.ndim == 2:
      image = image[..., None]
    return image, int(record["label"])

  def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    indices = [int(i) for i in indices]
    try:
      records = self._source.__getitems__(indices)
      return [self._record(i, r) for i, r in zip(indices, records)]
    except Exception:  # find the record that fails and name it
      out = []
      for i in indices:
        try:
          out.append(self._record(i, self._source[i]))
        except Exception as error:
          raise self.damaged(error, f"corrupt record in {self.locate(i)} ({self.split} index {i})") from None
      return out

  def damaged(self, error: BaseException, where: str = "") -> StreamError:
    """The one-line error for files of this split that cannot be read: the dataset's folder and the command that
    rebuilds it (``sources.damaged``), as a StreamError."""
    folder = getattr(getattr(self._source, "dataset_info", None), "data_dir", None) or self.data_dir
    return StreamError(str(sources.damaged(self.name, self.data_dir, folder, error, where)))

  def _labels_cache(self) -> Optional[tuple[pathlib.Path, str]]:
    """(folder, stem) of the split's label cache next to its files, or None for mock data.

    The cache is FOLDER/STEM-DIGEST.npy: STEM = nc_jax-labels-SPLIT-STAMP, STAMP the first 16 hex digits of
    the sha256 of the files' names, sizes and mtimes (a rebuilt dataset gets a new stem), DIGEST those of the
    sha256 of the labels themselves (``_labels_digest``), so an edited or truncated cache is never trusted.
    """
    try:
      paths = [pathlib.Path(str(path)) for path in self._source.dataset_info.splits[self.split].filepaths]
      stamp = "|".join(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in paths)
    except Exception:
      return None
    return paths[0].parent, f"{LABELS_CACHE_PREFIX}{self.split}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"

  def _cached_labels(self, folder: pathlib.Path, stem: str, warn: Callable[[str], None]) -> Optional[np.ndarray]:
    """The labels of a cache file that is whole and of these files, or None; every other label cache of the
    split (edited, truncated, of files since rebuilt, of an older format) is named in a warning and removed."""
    found = None
    for path in sorted(folder.glob(f"{LABELS_CACHE_PREFIX}{self.split}-*.npy")):
      if ".tmp" in path.suffixes:
        continue
      problem = (None if path.name.startswith(f"{stem}-")
                 else "out of date (of the dataset's files before they changed, or of an older format)")
      if problem is None:
        try:
          cached = np.load(path, allow_pickle=False)
          if cached.dtype != np.int32 or cached.shape != (len(self),):
            problem = f"damaged (holds {cached.dtype} {cached.shape}, not int32 ({len(self)},))"
          elif path.name != f"{stem}-{_labels_digest(cached)}.npy":
            problem = "damaged (its labels do not match the digest in its name: edited since it was written)"
          else:
            found = cached
            continue
        except (OSError, ValueError, EOFError) as error:  # a truncated .npy raises any of these
          problem = f"damaged (unreadable: {' '.join(str(error).split())[:80]})"
      try:
        path.unlink()
        done = "removed it"
      except OSError as error:  # e.g. a read-only data folder: left, and never trusted (its name never matches)
        done = f"it cannot be removed ({error.strerror or error}), so it is ignored"
      warn(f"label cache {path} is {problem}; {done} and read the labels from the dataset again")
    return found

  def labels(self, chunk: int = 512, warn: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """(len,) int32 labels, read with the images left encoded (``SkipDecoding``) where tfds can, ``chunk``
    records at a time (512 ImageNet JPEGs are ~56 MB; host memory stays bounded whatever the set's size).

    ImageNet's 1.28 M records take one pass; the result is cached next to the files when that folder is
    writable (``_labels_cache``), so later runs read 5 MB instead. A cache is used only when its labels match
    the digest in its name and its stem matches the files; any other is named in a one-line warning
    (``warn``, default stderr), removed and rebuilt.
    """
    warn = warn or _warn
    cache = self._labels_cache()
    if cache is not None:
      cached = self._cached_labels(*cache, warn)
      if cached is not None:
        return cached
    out = self._read_labels(chunk)
    if cache is not None:
      folder, stem = cache
      temporary = folder / f"{stem}.{os.getpid()}.tmp.npy"
      try:
        np.save(temporary, out)
        temporary.replace(folder / f"{stem}-{_labels_digest(out)}.npy")
      except OSError:  # a read-only data folder (or a full disk): no cache
        try:
          temporary.unlink(missing_ok=True)
        except OSError:
          pass
    return out

  def _read_labels(self, chunk: int) -> np.ndarray:
    import tensorflow_datasets as tfds
    try:
      source = self._open(decoders={"image": tfds.decode.SkipDecoding()})
      source[0]
    except Exception:  # mock data need TensorFlow for that; decode fully
      source = self._source
    out = np.empty(len(source), np.int32)
    for start in range(0, len(source), chunk):
      indices = list(range(start, min(start + chunk, len(source))))
      try:
        out[start:start + len(indices)] = [int(r["label"]) for r in source.__getitems__(indices)]
      except Exception:
        out[start:start + len(indices)] = [label for _, label in self.read(indices)]
    return out


# ----------------------------------------------------------- preprocessing
@dataclasses.dataclass(frozen=True)
class Transform:
  """Stored image (H, W, C) uint8 -> standardised float32, as the in-memory path.

  geometry: ImageNet (resize and crop set): shorter side -> ``resize`` px (PIL bilinear, antialiased), centre
  ``crop`` x ``crop``; otherwise zero padding to ``pad_to`` (``preprocess.pad_images``), or as stored.
  Then ``preprocess.standardize``: (x * scale - mean) / std in float32, scale = 1/255 for uint8.
  """

  pad_to: Optional[int] = None
  resize: Optional[int] = None
  crop: Optional[int] = None
  mean: Any = 0.0
  std: Any = 1.0
  scale: Optional[float] = 1.0 / 255.0

  def geometry(self, image: np.ndarray, pad: bool = True) -> np.ndarray:
    if self.resize:
      image = resize_and_crop(image, self.resize, self.crop or self.resize)
    elif self.pad_to and pad and image.ndim == 3:
      image = preprocess.pad_images(image[None], self.pad_to)[0]
    return image

  def batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """(b, S, S, C) float32 from b stored images."""
    stacked = np.stack([self.geometry(image) for image in images])
    return preprocess.standardize(stacked, np.asarray(self.mean), np.asarray(self.std), self.scale)


def resize_and_crop(image: np.ndarray, shorter: int, crop: int) -> np.ndarray:
  """(H, W, C) uint8 -> (crop, crop, C): shorter side to ``shorter`` px (bilinear, antialiased), centre crop.

  Single-channel images are repeated to 3 channels (ImageNet holds a few grayscale JPEGs).
  """
  from PIL import Image

  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  height, width = image.shape[:2]
  long = int(shorter * max(height, width) / min(height, width))  # torchvision's rounding of the long side
  size = (shorter, long) if width <= height else (long, shorter)  # PIL: (width, height)
  resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
  top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
  return resized[top:top + crop, left:left + crop]


def encode_image(image: np.ndarray, format: str = "PNG", quality: int = 90) -> bytes:
  """PNG or JPEG bytes of an (H, W, C) uint8 image (PIL), for writing ArrayRecord datasets without TensorFlow."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format=format, **({"quality": quality} if format == "JPEG" else {}))
  return buffer.getvalue()


class Moments:
  """Streaming training statistics, the same kinds and numbers as ``preprocess.statistics``.

  uint8 images: exact int64 sums S = sum x and Q = sum x^2 per position; mean = S / (n 255),
  std = sqrt(n Q - S^2) / (n 255) in exact integers, so any batching, order or process split gives the same
  float64 result. Other dtypes: Chan et al.'s merge of per-batch (count, mean, centred M2) in float64.
  Reduced over 'global' (one scalar), 'channel' (C,), 'pixel' (H, W, C); 'none' is (0, 1).
  """

  def __init__(self, kind: str):
    if kind not in preprocess.STANDARDIZATIONS:
      raise ValueError(f"unknown standardization {kind!r}; choose one of {preprocess.STANDARDIZATIONS}")
    self.kind, self.count, self.sums = kind, 0, None

  def _axes(self, ndim: int):
    return {"global": tuple(range(ndim)), "channel": tuple(range(ndim - 1)), "pixel": (0,)}[self.kind]

  def update(self, batch: np.ndarray) -> None:
    """Adds a batch (b, ...) of stored values (uint8, or float)."""
    if self.kind == "none":
      return
    if batch.dtype == np.uint8:
      wide = batch.astype(np.int64)
      sums = (wide.sum(0), (wide * wide).sum(0))
      self.sums = sums if self.sums is None else (self.sums[0] + sums[0], self.sums[1] + sums[1])
      self.count += len(batch)
      return
    values = batch.astype(np.float64)
    axes = self._axes(values.ndim)
    count = values.size // np.prod([values.shape[a] for a in range(values.ndim) if a not in axes], dtype=int)
    mean = values.mean(axis=axes)
    m2 = ((values - mean) ** 2).sum(axis=axes)
    if self.sums is None:
      self.count, self.sums = count, (mean, m2)
      return
    total = self.count + count
    delta = mean - self.sums[0]
    self.sums = (self.sums[0] + delta * count / total, self.sums[1] + m2 + delta**2 * self.count * count / total)
    self.count = total

  def state(self) -> tuple:
    return self.count, self.sums

  def merge(self, other: "Moments") -> None:
    if other.sums is None:
      return
    if self.sums is None or other.sums[0].dtype == np.int64:
      self.sums = other.sums if self.sums is None else (self.sums[0] + other.sums[0], self.sums[1] + other.sums[1])
      self.count += other.count
      return
    total = self.count + other.count
    delta = other.sums[0] - self.sums[0]
    self.sums = (self.sums[0] + delta * other.count / total,
                 self.sums[1] + other.sums[1] + delta**2 * self.count * other.count / total)
    self.count = total

  def finalize(self, scale: Optional[float] = 1.0 / 255.0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as ``preprocess.statistics`` of the values x * scale (std 0 -> 1)."""
    if self.kind == "none":
      return np.zeros(()), np.ones(())
    if self.sums is None:
      raise ValueError("no training data were seen: the statistics are undefined")
    if self.sums[0].dtype == np.int64:
      if scale not in (None, 1.0 / 255.0):
        raise ValueError(f"uint8 statistics are of x / 255 (or x); scale {scale} is not supported")
      unit = 255 if scale else 1
      positions = self.sums[0].shape
      reduce = {"global": tuple(range(len(positions))), "channel": tuple(range(len(positions) - 1)),
                "pixel": ()}[self.kind]
      s, q = (np.asarray(x.sum(axis=reduce), object) for x in self.sums)  # int64 totals: no overflow below 3e13 px
      n = self.count * int(np.prod([positions[a] for a in reduce], dtype=np.int64))
      # Python integers from here: n Q and S^2 exceed int64 for ImageNet; one rounding each.
      mean = np.vectorize(lambda a: int(a) / (n * unit), otypes=[np.float64])(s)
      variance = np.vectorize(lambda a, b: (n * int(b) - int(a) ** 2) / (n * n * unit * unit),
                              otypes=[np.float64])(s, q)
      std = np.sqrt(variance)
    else:
      mean, m2 = self.sums
      mean, std = mean * (scale or 1.0), np.sqrt(m2 / self.count) * (scale or 1.0)
    return np.asarray(mean, np.float64), np.where(std > 0, std, 1.0)


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


def _sources(name: str, source: str, data_dir: Optional[str], seed: int, synthetic_options: dict):
  """(train source, test source, num_classes) for any dataset nc_jax.data.load knows."""
  if source == "tfds" and name in sources.TFDS_DATASETS:
    num_classes, test_split = sources.TFDS_DATASETS[name]
    return TfdsSource(name, "train", data_dir), TfdsSource(name, test_split, data_dir), num_classes
  if source == "tfds" and name not in ("mnist1d", "synthetic"):  # any prepared tfds image dataset with a label
    train = TfdsSource(name, "train", data_dir)
    info = train._source.dataset_info
    test_split = "test" if "test" in info.splits else "validation"
    return train, TfdsSource(name, test_split, data_dir), int(info.features["label"].num_classes)
  from nc_jax.data import _raw  # the in-memory loaders' raw arrays (IDX, generated)
  raw = _raw(name, source, data_dir, seed, synthetic_options)
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
  worker_count: grain worker processes for that pass (0: in this process).
  """
  from nc_jax.data import PAPER_PER_CLASS

  train_source, test_source, num_classes = _sources(name, source, data_dir, seed, synthetic_options)
  labels = train_source.labels()
  if per_class == "paper":
    per_class = PAPER_PER_CLASS.get(name) or int(np.bincount(labels, minlength=num_classes).min())
  indices = preprocess.training_subset(labels, num_classes, per_class, seed, imbalance, imbalance_ratio,
                                       minority_classes)
  true_labels = labels[indices].astype(np.int32)
  train_labels = (preprocess.shuffle_labels(true_labels, random_label_fraction, seed) if random_label_fraction
                  else true_labels)
  first, _ = train_source.read([int(indices[0])])[0]
  if image_size is None and name == "imagenet2012":
    image_size = (IMAGENET_RESIZE, IMAGENET_CROP)
  size = pad_to
  if pad_to == "auto":
    size = 32 if first.ndim == 3 and first.shape[:2] == (28, 28) else None
  scale = 1.0 / 255.0 if first.dtype == np.uint8 else None
  geometry = Transform(pad_to=size if first.ndim == 3 else None, resize=image_size and image_size[0],
                       crop=image_size and image_size[1], scale=scale)

  moments = Moments(standardization)
  rows = _block(len(indices), process_index, process_count)
  reader = _Reader(train_source, indices[rows], None, geometry, batch_size, pad=standardization == "pixel",
                   tag="statistics")
  for stored, _ in _iterate(reader, 0, worker_count):
    moments.update(stored)
  moments = _sum_over_processes(moments) if (process_count or jax.process_count()) > 1 else moments
  mean, std = moments.finalize(scale)
  transform = dataclasses.replace(geometry, mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))
  return StreamedDataset(
      name=name, train_source=train_source, test_source=test_source, train_indices=indices,
      train_labels=train_labels.astype(np.int32), train_true_labels=true_labels,
      test_labels=test_source.labels().astype(np.int32), num_classes=num_classes, transform=transform,
      input_shape=transform.batch([first]).shape[1:], mean=np.asarray(mean, np.float32),
      std=np.asarray(std, np.float32))


def _block(num_examples: int, process_index: Optional[int], process_count: Optional[int]) -> slice:
  """Process p's contiguous 1/P block of ``num_examples`` (for the statistics pass)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return slice(num_examples * index // count, num_examples * (index + 1) // count)


def _sum_over_processes(moments: Moments) -> Moments:
  from jax.experimental import multihost_utils
  if moments.sums is None or moments.sums[0].dtype != np.int64:
    raise StreamError("statistics over several processes need uint8 images (exact sums)")
  gathered = multihost_utils.process_allgather(
      {"count": np.asarray(moments.count, np.int64), "s": moments.sums[0], "q": moments.sums[1]})
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
  """
  if requested not in PIPELINES:
    raise ValueError(f"unknown input_pipeline {requested!r}; choose one of {PIPELINES}")
  if requested != "auto":
    return requested
  if name not in FULL_SIZES:
    return "memory"
  train, test, shape = FULL_SIZES[name]
  if isinstance(per_class, int) or (isinstance(per_class, str) and per_class.isdigit()):
    train = min(train, int(per_class) * (num_classes or sources.TFDS_DATASETS[name][0]))
  elif per_class == "paper":
    from nc_jax.data import PAPER_PER_CLASS
    train = min(train, PAPER_PER_CLASS[name] * sources.TFDS_DATASETS[name][0])
  needed = (train + test) * int(np.prod(shape)) * 4
  limit = DEVICE_MEMORY_FRACTION * (memory_bytes or device_memory_bytes())
  return "stream" if needed > limit else "memory"


def materialise(data: StreamedDataset, split: str, batch_size: int = 256) -> np.ndarray:
  """(N, ...) float32 standardised inputs of 'train' (the subset) or 'test', read whole (small sets only)."""
  count = len(data.train_indices) if split == "train" else len(data.test_labels)
  parts = [inputs for inputs, _, _ in eval_batches(data, split, batch_size, process_index=0, process_count=1)]
  return np.concatenate(parts)[:count]


def whole_batches(data: StreamedDataset, split: str, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``nc_jax.collect``'s split of a set: whole batches k = p, p + P, ... of [k B, (k + 1) B) in set order
  (process p of P), from this process's ``start``-th on; (b, ...) float32, (b,) int32, the last one short."""
  count = len(data.train_indices) if split == "train" else len(data.test_labels)
  records, labels, source = ((data.train_indices, data.train_labels, data.train_source) if split == "train"
                             else (np.arange(count), data.test_labels, data.test_source))
  for k in range(process_index, -(-count // batch_size), process_count)[start:]:
    rows = slice(k * batch_size, (k + 1) * batch_size)
    yield data.transform.batch([image for image, _ in source.read(records[rows])]), labels[rows]


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


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """(N,) ``device.epoch_permutation(seed, epoch, N)``, computed on the host CPU (the in-memory path's order)."""
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    return np.asarray(jax.device_get(device.epoch_permutation(seed, epoch, num_examples)))


class _Reader:
  """grain source: element s = (stored or standardised images (b, ...), labels (b,)) of batch s of a table."""

  def __init__(self, source, indices: np.ndarray, labels: Optional[np.ndarray], transform: Transform,
               batch_size: int, *, pad: bool = True, standardize: bool = False, rows: Optional[slice] = None,
               tag: str = ""):
    self.source, self.transform, self.standardize, self.pad = source, transform, standardize, pad
    self.tag, log = tag, os.environ.get(READ_LOG_ENV)
    self.log = f"{log}.{jax.process_index()}" if log else None  # fixed here: a grain worker's process index is 0
    self.batch_size, self.rows = batch_size, rows
    self.indices = np.asarray(indices)
    self.labels = None if labels is None else np.asarray(labels)
    self.steps = -(-len(self.indices) // batch_size) if self.indices.ndim == 1 else len(self.indices)

  def __len__(self) -> int:
    return self.steps

  def __getitem__(self, step: int):
    chosen = self.indices[step] if self.indices.ndim == 2 else self.indices[step * self.batch_size:
                                                                              (step + 1) * self.batch_size]
    records = self.source.read(chosen)
    if self.log:
      with open(self.log, "a") as log:
        log.write(json.dumps({"tag": self.tag, "step": int(step), "records": [int(i) for i in chosen]}) + "\n")
    labels = (np.asarray([label for _, label in records], np.int32) if self.labels is None
              else self.labels[step] if self.labels.ndim == 2 else self.labels[step * self.batch_size:
                                                                                (step + 1) * self.batch_size])
    if self.standardize:
      return self.transform.batch([image for image, _ in records]), labels
    return np.stack([self.transform.geometry(image, pad=self.pad) for image, _ in records]), labels


def _flags_parsed() -> None:
  """grain's worker processes read absl flags; a library caller may not have parsed any."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


PARENT_POLL_SECONDS = 0.5  # how often a grain worker checks that the process that started it is alive


def _die_with_parent(parent: int, worker_index: int = 0, worker_count: int = 0) -> None:
  """grain worker initialiser (``mp_prefetch``'s ``worker_init_fn``, with ``parent`` = the trainer's pid):
  ends this worker within ``PARENT_POLL_SECONDS`` of its parent dying.

  A killed trainer (kill -9, the OOM killer) cannot stop its workers, and grain's workers wait forever to
  hand over a batch nobody will take (each holding its decoded batches, ~260 MB for ImageNet), keeping the
  multiprocessing resource tracker alive too. A daemon thread polls ``os.getppid()``: when the parent dies
  the worker is re-parented (to init or a subreaper) and exits at once. (Linux's PR_SET_PDEATHSIG would be
  immediate, but it fires when the *thread* that started the worker ends, and grain starts workers from
  short-lived threads.)
  """
  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)  # nothing to save: the batches were for the dead parent

  threading.Thread(target=watch, name="nc_jax-parent-watch", daemon=True).start()


def _iterate(reader: _Reader, start: int, worker_count: int, prefetch: int = 2, threads: int = 0) -> Iterator:
  """Elements start.. of ``reader`` in order: grain, decoding in ``worker_count`` processes (0: here), each of
  which exits when this process dies (``_die_with_parent``)."""
  import grain

  if worker_count == 0 and threads == 0:
    return (reader[step] for step in range(start, len(reader)))  # here, one batch at a time, nothing read ahead
  dataset = grain.MapDataset.source(reader)[start:]
  stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=prefetch))
  if worker_count:
    _flags_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                             per_worker_buffer_size=prefetch),
                                worker_init_fn=functools.partial(_die_with_parent, os.getpid()))
  return iter(stream)


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
    reader = _Reader(self.data.train_source, self.data.train_indices[positions], self.data.train_labels[positions],
                     self.data.transform, positions.shape[1], standardize=True, tag=f"train:{epoch}")
    return _iterate(reader, start_step, self.worker_count, self.prefetch, self.threads)

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
  indices, mask = device.padded_batches(len(data.train_indices) if split == "train" else len(data.test_labels),
                                        batch_size)
  if split == "train":
    records, labels = data.train_indices[indices], data.train_labels[indices]
    source = data.train_source
  else:
    records, labels, source = indices, data.test_labels[indices], data.test_source
  count = jax.process_count() if process_count is None else process_count
  rows = process_rows(batch_size, jax.process_index() if process_index is None else process_index, count)
  rows = mesh_rows(mesh, batch_size) if mesh is not None else rows
  reader = _Reader(source, records[:, rows], labels[:, rows], data.transform, rows.stop - rows.start,
                   standardize=True, tag=f"eval:{split}")
  sharding = None if mesh is None else device.batch_sharding(mesh)
  for step, (inputs, batch_labels) in enumerate(_iterate(reader, 0, worker_count)):
    parts = (inputs, batch_labels, mask[step, rows])
    if sharding is None:
      yield parts
    else:
      yield tuple(jax.make_array_from_process_local_data(sharding, x, (batch_size, *x.shape[1:])) for x in parts)


__all__ = ["ArraySource", "DEVICE_MEMORY_FRACTION", "FULL_SIZES", "IMAGENET_CROP", "IMAGENET_RESIZE", "Moments",
           "PIPELINES", "READ_LOG_ENV", "StreamError", "StreamedDataset", "TfdsSource", "Transform", "TrainStream",
           "choose_pipeline", "device_memory_bytes", "encode_image", "epoch_order", "eval_batches", "materialise",
           "mesh_rows", "open_dataset", "process_rows", "resize_and_crop", "whole_batches"]
