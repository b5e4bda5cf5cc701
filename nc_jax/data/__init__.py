"""nc_jax.data: the paper's datasets as balanced, standardised arrays.

    dataset = nc_jax.data.load("fashion_mnist", source="idx")        # offline, Debian package
    dataset = nc_jax.data.load("cifar10", data_dir="/data/tfds")      # tfds ArrayRecord, no TensorFlow
    dataset = nc_jax.data.load("mnist1d")                              # generated offline

``load`` returns a ``Dataset`` of numpy arrays; ``nc_jax.data.device`` puts them
on a device mesh and draws the per-epoch batches. ``nc_jax.data.stream`` reads the
same examples in the same batches from random-access sources, each process its own
rows (ImageNet: ``stream.open_dataset("imagenet2012", data_dir=...)``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

from nc_jax.data import preprocess, sources

PAPER_PER_CLASS = {"mnist": 5000, "fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500,
                   "svhn_cropped": 4600, "stl10": 500, "imagenet2012": 600}
DATASETS = tuple(sources.TFDS_DATASETS) + sources.GENERATED_DATASETS
SOURCES = ("tfds", "idx", "generated")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Arrays ready for training.

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


def _sources_of(name: str) -> tuple[str, ...]:
  """The sources that can read dataset ``name`` ('generated' data ignores ``source``)."""
  if name in sources.GENERATED_DATASETS:
    return ("generated",)
  return ("tfds", "idx") if name in sources.IDX_DATASETS else ("tfds",)


def _check_source(name: str, source: str) -> None:
  if source in _sources_of(name) or (name in sources.GENERATED_DATASETS and source in SOURCES):
    return
  if source == "generated":
    why = f"only {' and '.join(sources.GENERATED_DATASETS)} are generated"
  elif source == "idx":
    why = f"'idx' reads MNIST-format files ({', '.join(sources.IDX_DATASETS)}) only"
  else:
    why = (f"unknown source; there are 'tfds' (prepared tfds datasets), 'idx' ({', '.join(sources.IDX_DATASETS)}) "
           f"and 'generated' ({', '.join(sources.GENERATED_DATASETS)})")
  choices = " or ".join(repr(s) for s in _sources_of(name))
  raise ValueError(f"source={source!r} cannot read {name!r}: {why}; for {name} use source={choices}")


def _raw(name: str, source: str, data_dir: Optional[str], seed: int, synthetic_options: dict) -> sources.RawSplits:
  _check_source(name, source)
  if name == "mnist1d":
    return sources.from_mnist1d(seed=synthetic_options.get("mnist1d_seed", 42),
                                num_samples=synthetic_options.get("num_samples", 5000))
  if name == "synthetic":
    return sources.synthetic(seed=seed, **synthetic_options)
  if source == "idx":
    return sources.from_idx(name, data_dir)
  return sources.from_tfds(name, data_dir)


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
  """Loads, balances and standardises a dataset.

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
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  raw = _raw(name, source, data_dir, seed, synthetic_options)
  train_labels = raw.train_labels
  if per_class == "paper":
    per_class = PAPER_PER_CLASS.get(name) or int(np.bincount(train_labels, minlength=raw.num_classes).min())
  indices = preprocess.training_subset(train_labels, raw.num_classes, per_class, seed, imbalance, imbalance_ratio,
                                       minority_classes)
  train_inputs, train_labels = raw.train_inputs[indices], train_labels[indices]
  true_labels = train_labels
  if random_label_fraction:
    train_labels = preprocess.shuffle_labels(train_labels, random_label_fraction, seed)

  is_image = train_inputs.ndim == 4
  scale = 1.0 / 255.0 if train_inputs.dtype == np.uint8 else None
  test_inputs = raw.test_inputs
  mean, std = preprocess.statistics(train_inputs * (scale or 1.0), standardization)
  if is_image:
    size = pad_to
    if pad_to == "auto":
      size = 32 if train_inputs.shape[1:3] == (28, 28) else None
    if size is not None:
      train_inputs, test_inputs = preprocess.pad_images(train_inputs, size), preprocess.pad_images(test_inputs, size)
      if standardization == "pixel":  # per-pixel statistics must match the padded layout
        mean, std = preprocess.statistics(train_inputs * (scale or 1.0), standardization)
  return Dataset(
      name=name,
      train_inputs=preprocess.standardize(train_inputs, mean, std, scale),
      train_labels=train_labels.astype(np.int32),
      train_true_labels=true_labels.astype(np.int32),
      test_inputs=preprocess.standardize(test_inputs, mean, std, scale),
      test_labels=raw.test_labels.astype(np.int32),
      num_classes=raw.num_classes,
      mean=np.asarray(mean, np.float32),
      std=np.asarray(std, np.float32),
      train_indices=indices,
  )


__all__ = ["DATASETS", "Dataset", "PAPER_PER_CLASS", "load"]
