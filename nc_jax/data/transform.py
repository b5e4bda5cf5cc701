"""Stored image -> standardised float32 (``Transform``: padding or ImageNet's resize and crop, then scaling),
and the streaming training statistics it standardises with (``Moments``), equal to ``preprocess.statistics``.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Optional, Sequence

import numpy as np

from nc_jax.data import preprocess

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


__all__ = ["Moments", "Transform", "encode_image", "resize_and_crop"]
