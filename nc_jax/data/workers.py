"""Reading batches of a source, here or in grain worker processes that end with the process that started them.

``Reader`` is grain's random-access source (element s = batch s of a table of record indices); ``iterate`` walks
it in order from any batch, decoding in ``worker_count`` processes (0: in this process).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Iterator, Optional

import jax
import numpy as np

from nc_jax.data.transform import Transform

# Audit hook (tests, debugging a sharding): when set to PATH, every batch read appends one JSON line
# {"tag": what ('statistics', 'train:EPOCH', 'eval:SPLIT'), "step": batch, "records": [source indices]} to
# PATH.PROCESS_INDEX, grain workers included: what each process actually read.
READ_LOG_ENV = "NC_JAX_STREAM_READ_LOG"


class Reader:
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


def iterate(reader: Reader, start: int, worker_count: int, prefetch: int = 2, threads: int = 0) -> Iterator:
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


__all__ = ["PARENT_POLL_SECONDS", "READ_LOG_ENV", "Reader", "iterate"]
