"""IDX files (LeCun's MNIST format, also Fashion-MNIST's), gzip-compressed or not.

Format: magic = 0x00 0x00 <type code> <ndim>, then ndim big-endian uint32 sizes,
then the data, row-major, big-endian. Type 0x08 is uint8 (all MNIST-family files).
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: pathlib.Path | str) -> np.ndarray:
  """The array stored in one IDX file (``.gz`` or plain); ValueError if it is corrupt or truncated."""
  path = pathlib.Path(path)
  try:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  except (OSError, EOFError, gzip.BadGzipFile) as error:
    raise ValueError(f"cannot read IDX file {path}: {error} (truncated or corrupt; reinstall or re-download it)") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"IDX file {path} is truncated inside its header")
  shape = tuple(int(n) for n in np.frombuffer(raw[4:header], ">u4"))
  dtype = np.dtype(_DTYPES[raw[2]])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(f"IDX file {path} holds {len(raw)} bytes but its header {shape} needs {expected}: truncated or corrupt")
  return np.frombuffer(raw[header:], dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: pathlib.Path | str, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) as an IDX file, gzip-compressed if the name ends in .gz (for tests)."""
  array = np.ascontiguousarray(array, np.uint8)
  raw = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
  path = pathlib.Path(path)
  path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for candidate in (directory / f"{stem}.gz", directory / stem):
    if candidate.exists():
      return candidate
  raise FileNotFoundError(
      f"no {stem}[.gz] in {directory}. For Fashion-MNIST on Debian/Ubuntu: "
      "`apt-get install dataset-fashion-mnist` puts it in /usr/share/datasets/fashion-mnist; "
      "or set data_dir to a folder holding the four IDX files")


def load_split(directory: pathlib.Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 28, 28) uint8, labels (N,) int32) of 'train' or 'test' from an IDX folder."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(
        f"data directory {directory} does not exist. For Fashion-MNIST: `apt-get install dataset-fashion-mnist` "
        "(files in /usr/share/datasets/fashion-mnist), or point data_dir at the four IDX files")
  images_stem, labels_stem = SPLIT_FILES[split]
  images, labels = read_idx(_find(directory, images_stem)), read_idx(_find(directory, labels_stem))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"IDX files in {directory} disagree: images {images.shape}, labels {labels.shape}")
  return images, labels.astype(np.int32)
