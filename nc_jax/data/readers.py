"""Random-access sources of stored examples for streamed input: arrays in memory, or one split of a prepared
tfds dataset read through ``tfds.data_source`` (ArrayRecord files, no TensorFlow), with its labels cached.

A source has ``len``, ``read(indices) -> [(image as stored, label)]`` and ``labels() -> (N,) int32``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import pathlib
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from nc_jax import files
from nc_jax.data import sources

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
      if ".tmp" in path.suffixes:  # an older writer's staging file (files.write_atomically's are hidden)
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
      payload = io.BytesIO()
      np.save(payload, out)
      try:
        files.write_atomically(folder / f"{stem}-{_labels_digest(out)}.npy", payload.getvalue())
      except OSError:  # a read-only data folder (or a full disk): no cache, and not an error
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


__all__ = ["ArraySource", "LABELS_CACHE_PREFIX", "StreamError", "TfdsSource"]
