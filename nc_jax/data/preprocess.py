"""The paper's preprocessing: balanced subsampling, padding, standardisation; no augmentation."""

from __future__ import annotations

from typing import Optional

import numpy as np

from nc_jax.names import IMBALANCES, STANDARDIZATIONS


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
  """Sorted indices of ``per_class`` examples of every class, drawn without replacement with ``seed``."""
  counts = np.bincount(labels, minlength=num_classes)
  if (counts < per_class).any():
    short = {int(c): int(counts[c]) for c in np.flatnonzero(counts < per_class)}
    raise ValueError(f"per_class={per_class} is more than some classes hold (class: count) {short}; "
                     f"the smallest class has {counts.min()}")
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)]
  return np.sort(np.concatenate(chosen))



def imbalanced_counts(per_class: int, num_classes: int, kind: str, ratio: float,
                      minority_classes: int = 0) -> np.ndarray:
  """Examples kept per class (C,) when class sizes are made unequal, from ``per_class`` in the largest class.

  'step' (Fang et al. 2021, minority collapse; Buda et al. 2018): the last ``minority_classes`` classes
  (0 = C // 2) keep round(per_class / ratio), the others per_class. 'exponential' (Cui et al. 2019):
  class c keeps round(per_class * ratio^(-c / (C - 1))), from per_class down to per_class / ratio.
  'none' keeps per_class of every class. Every class keeps at least one example.
  """
  if kind not in IMBALANCES:
    raise ValueError(f"imbalance={kind!r}: choose one of {IMBALANCES}")
  if kind == "none" or ratio == 1:
    return np.full(num_classes, per_class)
  if kind == "step":
    minority = minority_classes or num_classes // 2
    if minority >= num_classes:
      raise ValueError(f"minority_classes={minority_classes}: must be fewer than the {num_classes} classes")
    counts = np.full(num_classes, per_class)
    counts[num_classes - minority:] = round(per_class / ratio)
  else:
    counts = np.rint(per_class * ratio ** (-np.arange(num_classes) / (num_classes - 1))).astype(int)
  return np.maximum(counts, 1)


def imbalanced_subset(labels: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
  """Sorted indices keeping the first counts[c] of class c's examples in a seeded shuffle (nested: a larger
  count keeps a superset, so runs at different ratios share their examples)."""
  rng = np.random.default_rng(seed)
  chosen = []
  for c, count in enumerate(counts):
    members = np.flatnonzero(labels == c)
    if len(members) < count:
      raise ValueError(f"per_class asks for {count} examples of class {c}, which holds {len(members)}: "
                       "lower per_class")
    chosen.append(rng.permutation(members)[:count])
  return np.sort(np.concatenate(chosen))


def training_subset(labels: np.ndarray, num_classes: int, per_class: Optional[int], seed: int,
                    imbalance: str = "none", imbalance_ratio: float = 1.0, minority_classes: int = 0) -> np.ndarray:
  """Sorted indices (N,) of the training examples a run keeps: all (per_class None), ``balanced_subset``, or
  ``imbalanced_subset`` of ``imbalanced_counts``. Both input paths (in memory and streamed) call this."""
  if imbalance != "none" and per_class is None:
    raise ValueError(f"imbalance={imbalance!r} needs per_class (the largest class's count), not None")
  if per_class is None:
    return np.arange(len(labels))
  if imbalance == "none" or imbalance_ratio == 1:
    return balanced_subset(labels, int(per_class), num_classes, seed)
  counts = imbalanced_counts(int(per_class), num_classes, imbalance, imbalance_ratio, minority_classes)
  return imbalanced_subset(labels, counts, seed)


def shuffle_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Labels with a ``fraction`` of them (chosen with ``seed``) permuted among themselves (Zhang et al. 2017's
  partially random labels); class counts are unchanged. Some permuted labels land on their own class."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"random_label_fraction={fraction}: must be in [0, 1]")
  rng = np.random.default_rng([seed, 1])  # its own stream: independent of the subsample's draw
  chosen = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
  shuffled = labels.copy()
  shuffled[chosen] = labels[rng.permutation(chosen)]
  return shuffled


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads (N, H, W, C) images symmetrically to (N, size, size, C) (MNIST 28 -> 32)."""
  height, width = images.shape[1:3]
  if height > size or width > size:
    raise ValueError(f"cannot pad {height}x{width} images to {size}x{size}")
  top, left = (size - height) // 2, (size - width) // 2
  return np.pad(images, ((0, 0), (top, size - height - top), (left, size - width - left), (0, 0)))


def statistics(inputs: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) over the training inputs: one scalar ('global'), per channel, or per pixel."""
  if kind not in STANDARDIZATIONS:
    raise ValueError(f"unknown standardization {kind!r}; choose one of {STANDARDIZATIONS}")
  inputs = inputs.astype(np.float64)
  if kind == "none":
    return np.zeros(()), np.ones(())
  axes = {"global": None, "channel": tuple(range(inputs.ndim - 1)), "pixel": 0}[kind]
  mean, std = inputs.mean(axis=axes), inputs.std(axis=axes)
  return mean, np.where(std > 0, std, 1.0)  # constant pixels (padding) map to 0


def standardize(inputs: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: Optional[float]) -> np.ndarray:
  """(inputs * scale - mean) / std as float32; ``scale`` = 1/255 for uint8 images."""
  values = inputs.astype(np.float32) * (scale or 1.0)
  return ((values - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32)
