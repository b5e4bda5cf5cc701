"""The paper's preprocessing: balanced subsampling, padding, standardisation; no augmentation."""

from __future__ import annotations

from typing import Optional

import numpy as np

STANDARDIZATIONS = ("global", "channel", "pixel", "none")


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
  """Sorted indices of ``per_class`` examples of every class, drawn without replacement with ``seed``."""
  counts = np.bincount(labels, minlength=num_classes)
  if (counts < per_class).any():
    short = {c: int(counts[c]) for c in np.flatnonzero(counts < per_class)}
    raise ValueError(f"per_class={per_class} is more than some classes hold (class: count) {short}; "
                     f"the smallest class has {counts.min()}")
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(num_classes)]
  return np.sort(np.concatenate(chosen))


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
