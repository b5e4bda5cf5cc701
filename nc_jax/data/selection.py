"""Which examples a run trains on, with which labels, and how their inputs are scaled: the one place both input
paths (``nc_jax.data.load``, arrays in memory; ``nc_jax.data.stream.open_dataset``, records read batch by batch)
take these decisions, so they cannot drift apart.

    options = DataOptions(per_class=500, imbalance="step", imbalance_ratio=10.0, random_label_fraction=0.2)
    chosen = select("cifar10", labels, 10, options)      # chosen.indices (N,), chosen.labels (N,), chosen.true_labels

Pure functions of (labels, options, seed): no inputs are read here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np

from nc_jax.data import preprocess

PAPER_PER_CLASS = {"mnist": 5000, "fashion_mnist": 6000, "cifar10": 5000, "cifar100": 500,
                   "svhn_cropped": 4600, "stl10": 500, "imagenet2012": 600}


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """The options that decide a run's examples, labels and scaling (the keyword faces' arguments, as one value).

  per_class: examples kept per class: 'paper' (PAPER_PER_CLASS; for other data the smallest class count), an
    int, or None (every example, unbalanced).
  standardization: 'global', 'channel', 'pixel' or 'none' (``preprocess.statistics``).
  pad_to: image side after zero padding; 'auto' pads 28x28 to 32x32 (the notebook); None keeps sizes.
  seed: of the balanced subsample, the imbalance and the random labels.
  imbalance, imbalance_ratio, minority_classes: unequal class sizes (``preprocess.imbalanced_counts``).
  random_label_fraction: this fraction of the kept training labels is permuted among itself.
  """

  per_class: Union[int, str, None] = "paper"
  standardization: str = "global"
  pad_to: Union[int, str, None] = "auto"
  seed: int = 0
  imbalance: str = "none"
  imbalance_ratio: float = 1.0
  minority_classes: int = 0
  random_label_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class Selection:
  """The chosen training examples: indices (N,) sorted positions in the source's train split, labels (N,)
  int32 after any random-label shuffle, true_labels (N,) int32 before it."""

  indices: np.ndarray
  labels: np.ndarray
  true_labels: np.ndarray


def parsed_per_class(per_class) -> Union[int, str, None]:
  """``per_class`` as an int, 'paper' or None; another string (the command line's '500', 'none') is read by
  ``schema.parse_per_class``, the one parser, which names the key when it is neither."""
  if per_class is None or per_class == "paper" or not isinstance(per_class, str):
    return per_class
  from nc_jax import schema  # here, not at the top: schema may import this package's name tables
  return schema.parse_per_class(per_class)


def per_class_count(name: str, labels: np.ndarray, num_classes: int, per_class) -> Optional[int]:
  """The examples per class that ``per_class`` asks of dataset ``name``: 'paper' -> PAPER_PER_CLASS (else the
  smallest class's count), None -> None (every example), an int (or its digits) -> itself."""
  per_class = parsed_per_class(per_class)
  if per_class == "paper":
    return PAPER_PER_CLASS.get(name) or int(np.bincount(labels, minlength=num_classes).min())
  return per_class


def select(name: str, labels: np.ndarray, num_classes: int, options: DataOptions) -> Selection:
  """The training subset of a source's train labels (N_all,): ``preprocess.training_subset`` of the
  ``per_class_count``, then ``preprocess.shuffle_labels`` of ``random_label_fraction`` of the kept labels."""
  per_class = per_class_count(name, labels, num_classes, options.per_class)
  indices = preprocess.training_subset(labels, num_classes, per_class, options.seed, options.imbalance,
                                       options.imbalance_ratio, options.minority_classes)
  true_labels = np.asarray(labels)[indices].astype(np.int32)
  shuffled = (preprocess.shuffle_labels(true_labels, options.random_label_fraction, options.seed)
              if options.random_label_fraction else true_labels)
  return Selection(indices=indices, labels=shuffled.astype(np.int32), true_labels=true_labels)


def pad_side(pad_to: Union[int, str, None], stored_shape: tuple) -> Optional[int]:
  """The side stored images (H, W, C) are zero-padded to, or None: 'auto' pads 28x28 to 32x32 only; vectors
  (a shape of one axis) are never padded."""
  if len(stored_shape) != 3:
    return None
  if pad_to == "auto":
    return 32 if tuple(stored_shape[:2]) == (28, 28) else None
  return pad_to


def input_scale(dtype) -> Optional[float]:
  """The factor stored values take before standardising: 1/255 for uint8 images (to [0, 1]), else none."""
  return 1.0 / 255.0 if np.dtype(dtype) == np.uint8 else None


__all__ = ["DataOptions", "PAPER_PER_CLASS", "Selection", "input_scale", "pad_side", "parsed_per_class",
           "per_class_count", "select"]
