"""nc_jax.data: the paper's datasets as balanced, standardised arrays.

    dataset = nc_jax.data.load("fashion_mnist", source="idx")        # offline, Debian package
    dataset = nc_jax.data.load("cifar10", data_dir="/data/tfds")      # tfds ArrayRecord, no TensorFlow
    dataset = nc_jax.data.load("mnist1d")                              # generated offline

``load`` returns a ``Dataset`` of numpy arrays; ``nc_jax.data.device`` puts them
on a device mesh and draws the per-epoch batches. ``nc_jax.data.stream`` reads the
same examples in the same batches from random-access sources, each process its own
rows (ImageNet: ``stream.open_dataset("imagenet2012", data_dir=...)``). Both kinds satisfy ``DatasetProtocol``
(sizes, classes, statistics, ``streamed``, batches in the (seed, epoch) order); both choose their examples and
labels with ``selection.select``, so the same options give the same examples, labels and statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Protocol, Union, runtime_checkable

import numpy as np

from nc_jax.data import preprocess, selection, sources
from nc_jax.data.selection import PAPER_PER_CLASS, DataOptions
from nc_jax.data.sources import SOURCES
from nc_jax.names import DATASETS


@runtime_checkable
class DatasetProtocol(Protocol):
  """What every dataset offers, in memory (``Dataset``) or streamed (``stream.StreamedDataset``).

  Attributes:
    name: the dataset's name; num_classes: C; input_shape: one standardised input's shape, e.g. (32, 32, 3).
    train_labels: (N,) int32 labels of the training subset (after any random-label shuffle).
    train_true_labels: (N,) int32 before the shuffle; train_indices: (N,) the subset's positions in the source.
    test_labels: (M,) int32.
    mean, std: float32 statistics of the training subset (scalar, (C_in,) or the padded (H, W, C_in)).
    streamed: False in memory (inputs are arrays), True streamed (inputs are read batch by batch).
  """

  name: str
  num_classes: int
  train_labels: np.ndarray
  train_true_labels: np.ndarray
  train_indices: np.ndarray
  test_labels: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  streamed: bool

  @property
  def input_shape(self) -> tuple[int, ...]: ...

  def num_examples(self, split: str) -> int:
    """N for 'train' (the subset), M for 'test'."""

  def train_batches(self, batch_size: int, seed: int, epoch: int, *,
                    start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Epoch ``epoch``'s full global batches from ``start_step`` on: inputs (B, ...) float32, labels (B,) int32;
    batch s holds subset positions perm[s B:(s + 1) B], perm = ``device.epoch_permutation(seed, epoch, N)``
    (``device.epoch_batches``'s order); the last partial batch is dropped."""

  def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every example of 'train' (the subset) or 'test' once, in order: inputs (B, ...), labels (B,), mask (B,);
    the last batch padded with example 0 and mask False (``device.padded_batches``)."""


def check_split(split: str) -> None:
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}: choose 'train' or 'test'")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Arrays ready for training (a ``DatasetProtocol``).

  Attributes:
    train_inputs: (N, H, W, C) float32 images or (N, d) vectors, standardised.
    train_labels: (N,) int32, balanced when ``per_class`` was set.
    test_inputs, test_labels: the test split, standardised with training statistics.
    num_classes: C.
    mean, std: the statistics used (scalar, per channel or per pixel).
    train_indices: (N,) indices of the chosen training examples in the source's train split.
    train_true_labels: (N,) the labels before any random-label shuffle (equal to train_labels without one).
  """

  name: str
  train_inputs: np.ndarray
  train_labels: np.ndarray
  test_inputs: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  train_indices: np.ndarray
  train_true_labels: Optional[np.ndarray] = None
  streamed = False  # class attribute, not a field: the in-memory kind (``stream.StreamedDataset.streamed`` is True)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.train_inputs.shape[1:]

  def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of 'train' (the subset) or 'test'."""
    check_split(split)
    return (self.train_inputs, self.train_labels) if split == "train" else (self.test_inputs, self.test_labels)

  def num_examples(self, split: str) -> int:
    return len(self.split(split)[1])

  def train_batches(self, batch_size: int, seed: int, epoch: int, *,
                    start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``DatasetProtocol.train_batches``: on the host, the batches ``device.epoch_batches`` gathers on device."""
    from nc_jax.data import device  # jax: imported when batches are drawn, not when data are loaded

    steps = len(self.train_labels) // batch_size
    if steps == 0:
      raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(self.train_labels)} examples)")
    order = device.epoch_order(seed, epoch, len(self.train_labels))[:steps * batch_size].reshape(steps, batch_size)
    for rows in order[start_step:]:
      yield self.train_inputs[rows], self.train_labels[rows]

  def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``DatasetProtocol.eval_batches`` of the arrays."""
    from nc_jax.data import device

    inputs, labels = self.split(split)
    indices, mask = device.padded_batches(len(labels), batch_size)
    for rows, real in zip(indices, mask):
      yield inputs[rows], labels[rows], real


def load(
    name: str,
    *,
    source: str = "tfds",
    data_dir: Optional[str] = None,
    per_class: Union[int, str, None] = "paper",
    standardization: str = "global",
    pad_to: Union[int, str, None] = "auto",
    seed: int = 0,
    imbalance: str = "none",
    imbalance_ratio: float = 1.0,
    minority_classes: int = 0,
    random_label_fraction: float = 0.0,
    **synthetic_options,
) -> Dataset:
  """Loads, balances and standardises a dataset (the keyword face of ``load_with``).

  Args:
    name: one of DATASETS.
    source: 'tfds' (paper datasets via ``tfds.data_source``) or 'idx' (MNIST-format
      files, mnist and fashion_mnist only; Fashion-MNIST's default folder is Debian's dataset-fashion-mnist,
      MNIST's must be given). 'mnist1d' and 'synthetic' are generated: any of SOURCES is accepted and ignored.
    data_dir: tfds data_dir, or the IDX folder.
    per_class: training examples kept per class: 'paper' (PAPER_PER_CLASS; for
      generated data the smallest class count), an int, or None (keep all, unbalanced).
    standardization: 'global' (one mean/std, the notebook's), 'channel', 'pixel' or 'none'.
    pad_to: image side after zero padding; 'auto' pads 28x28 to 32x32 (the notebook); None keeps sizes.
    seed: seed of the balanced subsample (and of the synthetic data), the imbalance and the random labels.
    imbalance, imbalance_ratio, minority_classes: unequal class sizes (``preprocess.imbalanced_counts``):
      'step' keeps per_class / ratio of the last ``minority_classes`` (0 = C // 2) classes, 'exponential'
      per_class * ratio^(-c / (C - 1)) of class c; 'none' (the paper) keeps them balanced. Needs a per_class.
    random_label_fraction: this fraction of the (kept) training labels is permuted among itself; the
      test labels stay true. ``train_true_labels`` keeps the originals.
    **synthetic_options: passed to ``sources.synthetic`` / ``sources.from_mnist1d``.
  """
  options = DataOptions(per_class=per_class, standardization=standardization, pad_to=pad_to, seed=seed,
                        imbalance=imbalance, imbalance_ratio=imbalance_ratio, minority_classes=minority_classes,
                        random_label_fraction=random_label_fraction)
  return load_with(name, options, source=source, data_dir=data_dir, **synthetic_options)


def load_with(name: str, options: DataOptions, *, source: str = "tfds", data_dir: Optional[str] = None,
              **synthetic_options) -> Dataset:
  """``load`` with its options as one ``DataOptions``: read the splits whole, ``selection.select`` the
  training examples, pad images, standardise both splits with the subset's statistics."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  raw = sources.raw_splits(name, source, data_dir, options.seed, synthetic_options)
  chosen = selection.select(name, raw.train_labels, raw.num_classes, options)
  train_inputs, test_inputs = raw.train_inputs[chosen.indices], raw.test_inputs
  scale = selection.input_scale(train_inputs.dtype)
  size = selection.pad_side(options.pad_to, train_inputs.shape[1:])
  # statistics of the stored layout, except per-pixel ones, which must match the padded layout
  mean, std = preprocess.statistics(train_inputs * (scale or 1.0), options.standardization)
  if size is not None:
    train_inputs, test_inputs = preprocess.pad_images(train_inputs, size), preprocess.pad_images(test_inputs, size)
    if options.standardization == "pixel":
      mean, std = preprocess.statistics(train_inputs * (scale or 1.0), options.standardization)
  return Dataset(
      name=name, train_inputs=preprocess.standardize(train_inputs, mean, std, scale),
      train_labels=chosen.labels, train_true_labels=chosen.true_labels,
      test_inputs=preprocess.standardize(test_inputs, mean, std, scale),
      test_labels=raw.test_labels.astype(np.int32), num_classes=raw.num_classes,
      mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32), train_indices=chosen.indices)


__all__ = ["DATASETS", "DataOptions", "Dataset", "DatasetProtocol", "PAPER_PER_CLASS", "SOURCES", "load",
           "load_with"]
