"""This process's share of a re-readable stream of (inputs, labels) batches, readable from any position.

A measurement reads its data twice (class means, then deviations) and a resume reads it again from the
middle, so every source becomes a ``Batches``: ``read(start)`` gives a fresh iterator from this process's
``start``-th batch on. Process i of P takes batches k = i, i + P, ...; a short last batch is padded with
masked rows (``padded``) so one compiled step serves every batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Callable, Iterator, Optional

import numpy as np

from nc_jax.collect.errors import CollectError


@dataclasses.dataclass
class Batches:
  """A re-readable sequence of (inputs (B, ...), labels (B,)) batches, split over processes.

  Attributes:
    read: start -> iterator over this process's batches from its ``start``-th one on.
    num_local: how many batches this process reads (None if the stream has no length).
    num_items: examples over all processes (None if unknown).
    digest: sha256 of what identifies the data (labels, first batch), for the fingerprint.
    pad_to: batches shorter than this are padded (masked rows) to it, so one compiled step serves all.
  """

  read: Callable[[int], Iterator[tuple[np.ndarray, np.ndarray]]]
  num_local: Optional[int]
  num_items: Optional[int]
  digest: str
  pad_to: Optional[int] = None


def digest_arrays(*arrays) -> str:
  """sha256 (hex) of the arrays' dtypes, shapes and bytes, in order."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f"{array.dtype}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()


def array_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> Batches:
  """Batches of in-memory arrays in order, [k B, (k+1) B); process i takes batches k = i, i + P, ...

  The last batch is padded to B (masked), as ``nc_jax.training.step.forward_all`` pads it; B is at most N
  (a larger one would only pad: memory follows the data, not the requested size).
  """
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  if len(inputs) != len(labels):
    raise CollectError(f"inputs have {len(inputs)} rows but labels {len(labels)}")
  if batch_size < 1:
    raise CollectError(f"batch_size = {batch_size}: must be at least 1", 2)
  batch_size = min(batch_size, max(len(labels), 1))
  total = -(-len(labels) // batch_size)
  mine = list(range(process_index, total, process_count))

  def read(start: int):
    for k in mine[start:]:
      yield inputs[k * batch_size:(k + 1) * batch_size], labels[k * batch_size:(k + 1) * batch_size]

  digest = digest_arrays(labels, inputs[:batch_size], np.asarray([len(inputs), batch_size]))
  return Batches(read, len(mine), len(labels), digest, pad_to=batch_size)


def streamed_batches(data, split: str, batch_size: int, *, process_index: int = 0, process_count: int = 1) -> Batches:
  """Batches of a split of an ``nc_jax.data.stream.StreamedDataset`` (a set that is not loaded whole: ImageNet),
  read and preprocessed batch by batch in set order, split over processes as ``array_batches`` splits arrays."""
  from nc_jax.data import stream

  labels = data.train_labels if split == "train" else data.test_labels
  batch_size = min(batch_size, max(len(labels), 1))  # as array_batches: no batch larger than the split
  mine = len(range(process_index, -(-len(labels) // batch_size), process_count))
  read = lambda start: stream.whole_batches(data, split, batch_size, process_index=process_index,
                                            process_count=process_count, start=start)
  return Batches(read, mine, len(labels), digest_arrays(labels, np.asarray([len(labels), batch_size])),
                 pad_to=batch_size)


def iterable_batches(batches, *, process_index: int = 0, process_count: int = 1,
                     pad_to: Optional[int] = None) -> Batches:
  """Batches from a re-iterable (list, tuple, an object with __iter__ returning a fresh iterator each
  time) or a callable returning a fresh iterator; process i takes batches k = i, i + P, ..."""
  if callable(batches) and not hasattr(batches, "__iter__"):
    fresh = batches
  elif hasattr(batches, "__iter__") and iter(batches) is not batches:
    fresh = lambda: iter(batches)
  else:
    raise CollectError("batches must be re-iterable (a list, or an object whose __iter__ returns a fresh iterator) "
                       "or a callable returning a fresh iterator: a pass reads them twice, a resume again")

  def read(start: int):
    mine = itertools.islice(iter(fresh()), process_index, None, process_count)
    for batch in itertools.islice(mine, start, None):
      if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CollectError(f"each batch must be an (inputs, labels) pair, got a {type(batch).__name__}"
                           + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
      inputs, labels = batch
      yield np.asarray(inputs), np.asarray(labels)

  try:
    total = len(batches)
  except TypeError:
    total = None
  first = next(read(0), None)
  if first is None:
    raise CollectError("batches yield nothing on this process" + (f" (process {process_index} of {process_count})"
                                                                  if process_count > 1 else ""))
  num_local = None if total is None else len(range(process_index, total, process_count))
  return Batches(read, num_local, None, digest_arrays(*first, np.asarray([-1 if total is None else total])), pad_to)


def as_batches(batches, batch_size: Optional[int] = None, *, split: str = "train", process_index: int = 0,
               process_count: int = 1) -> Batches:
  """``Batches`` from a ``Batches``, a dataset of either kind (``nc_jax.data.Dataset`` or
  ``nc_jax.data.stream.StreamedDataset``: its ``split``), a dataset name for ``nc_jax.data.load``, a (inputs,
  labels) pair of arrays, or a re-iterable / callable of batches."""
  if isinstance(batches, Batches):
    return batches
  if isinstance(batches, str):
    from nc_jax import data
    batches = data.load(batches)
  streamed = getattr(batches, "streamed", None)  # a dataset says its kind (nc_jax.data.DatasetProtocol)
  if streamed is True:
    return streamed_batches(batches, split, batch_size or 512, process_index=process_index,
                            process_count=process_count)
  if streamed is False:
    inputs, labels = ((batches.train_inputs, batches.train_labels) if split == "train"
                      else (batches.test_inputs, batches.test_labels))
    return array_batches(inputs, labels, batch_size or 512, process_index=process_index, process_count=process_count)
  if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(a, np.ndarray) for a in batches):
    return array_batches(*batches, batch_size or 512, process_index=process_index, process_count=process_count)
  return iterable_batches(batches, process_index=process_index, process_count=process_count, pad_to=batch_size)


def padded(inputs: np.ndarray, labels: np.ndarray, pad_to: Optional[int]):
  """(inputs, labels, mask) with rows repeated from the first up to ``pad_to`` rows and masked out."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise CollectError(f"a batch's labels must be integers of shape (B,), got {labels.dtype} of shape "
                       f"{labels.shape}; yield (inputs (B, ...), labels (B,) int) pairs")
  if inputs.ndim < 1 or len(inputs) != len(labels):
    raise CollectError(f"a batch has inputs of shape {inputs.shape} but {len(labels)} labels; "
                       "yield (inputs (B, ...), labels (B,)) pairs with B rows each")
  size = len(labels)
  mask = np.ones((size,), bool)
  if pad_to is None or size >= pad_to or size == 0:
    return inputs, labels, mask
  extra = pad_to - size
  inputs = np.concatenate([inputs, np.repeat(inputs[:1], extra, axis=0)])
  labels = np.concatenate([labels, np.repeat(labels[:1], extra)])
  return inputs, labels, np.concatenate([mask, np.zeros((extra,), bool)])

