"""python -m nc_jax.collect --workdir RUN --out DIR [--split both|train|test] [--epoch E] [--batch_size B]
                          [--checkpoint_every N] [--progress] [--coordinator_address HOST:PORT --num_processes P
                          --process_id I]

Measures Neural Collapse of a trained model without training it, in staged passes
over the data with the streaming accumulators of ``nc_jax.metrics.streaming``:

  pass 1  class means        mu_c = (1/n_c) sum_{y_i = c} h_i           (``update_class_means``)
  between                    M = mu - mu_G = U S V^T                       (``finalize_class_means``)
  pass 2  deviations         d_i = h_i - mu_{y_i}: sum ||d_i||^2, sum ||S^-1 V^T d_i||^2, NCC / network
                             decisions, per class                          (``update_deviations``)
  pass 3  held-out data      the test set's deviations from the *training* means (the ``*_test`` keys)

then ``nc_jax.metrics.finalize_collapse`` / ``finalize_transfer``. Each update is one jitted
function of (state, batch); memory is O(C p) whatever N is. h are the features the
model's ``apply_fn(params, x) -> (logits, features)`` returns (B, p) in eval mode.

Resumable: every ``checkpoint_every`` batches (and at every pass boundary) the pass,
the number of this process's batches done and every accumulator (a pytree of
arrays) go to ``DIR/accumulators.npz`` atomically (temporary file, fsync, rename),
with a sha256 of the arrays and a fingerprint of what is measured (model params, W,
b, data, batch size, options, process layout). A rerun resumes mid-pass and writes
the same nc.json, bit for bit; a damaged file (truncated, flipped bit) is moved to
``DIR/corrupt/`` with a warning and the measurement restarts; a file of another
measurement is refused, naming it.

Multi-process (``jax.distributed``): process i reads every P-th batch starting at i,
keeps its own accumulator file, and at the end of each pass the per-process states
are gathered (``process_allgather``) and folded with ``merge_class_means`` /
``merge_deviations`` in process order, so the result does not depend on timing. Within a
process, a batch is split over the local devices (a 'data' mesh) when they divide its size.

--split both (default) measures the training set as the paper (and ``nc_jax.train``) does plus the
test set's ``*_test`` keys against the training means; train: the training set only; test: the test
set's own collapse (its own class means, keys without suffix). One measurement per DIR at a time
(an flock on DIR/lock); in a multi-process run each process keeps DIR/accumulators.I-of-P.npz.

Outputs (process 0, atomically): ``DIR/nc.json`` (every key ``neural_collapse``
returns, as in metrics.jsonl, the ``*_test`` keys, the later metrics of
``nc_jax.metrics.further`` that the class statistics determine (``further_keys``),
train/test loss and accuracy when a loss is known, and epoch, step, num_samples,
checkpoint) and
``DIR/class_stats.npz`` (per-class counts, means, variances, centred-mean norms, W
row norms).

Exit codes: 0 done, 1 refused or failed (one line on stderr), 2 bad command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import metrics as nc_metrics
from nc_jax.metrics import streaming

NC_FILE = "nc.json"
STATS_FILE = "class_stats.npz"
CORRUPT_DIR = "corrupt"
FORMAT = "nc_jax.collect/1"
# Test-only: "PASS:BATCHES" makes the process SIGKILL itself after that many of its batches of pass PASS.
KILL_ENV = "NC_JAX_COLLECT_KILL_AFTER"
SPLITS = ("both", "train", "test")


class CollectError(ValueError):
  """A measurement that cannot be done as asked; ``code`` is the exit status (2: the command line's fault)."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


# ----------------------------------------------------------------------------
# Batches: this process's share of a re-readable stream, from any position.
# ----------------------------------------------------------------------------


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


def _digest_arrays(*arrays) -> str:
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f"{array.dtype}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()


def array_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int, *, process_index: int = 0,
                  process_count: int = 1) -> Batches:
  """Batches of in-memory arrays in order, [k B, (k+1) B); process i takes batches k = i, i + P, ...

  The last batch is padded to B (masked), as ``nc_jax.training.step.forward_all`` pads it.
  """
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  if len(inputs) != len(labels):
    raise CollectError(f"inputs have {len(inputs)} rows but labels {len(labels)}")
  if batch_size < 1:
    raise CollectError(f"batch_size = {batch_size}: must be at least 1", 2)
  total = -(-len(labels) // batch_size)
  mine = list(range(process_index, total, process_count))

  def read(start: int):
    for k in mine[start:]:
      yield inputs[k * batch_size:(k + 1) * batch_size], labels[k * batch_size:(k + 1) * batch_size]

  digest = _digest_arrays(labels, inputs[:batch_size], np.asarray([len(inputs), batch_size]))
  return Batches(read, len(mine), len(labels), digest, pad_to=batch_size)


def streamed_batches(data, split: str, batch_size: int, *, process_index: int = 0, process_count: int = 1) -> Batches:
  """Batches of a split of an ``nc_jax.data.stream.StreamedDataset`` (a set that is not loaded whole: ImageNet),
  read and preprocessed batch by batch in set order, split over processes as ``array_batches`` splits arrays."""
  from nc_jax.data import stream

  labels = data.train_labels if split == "train" else data.test_labels
  mine = len(range(process_index, -(-len(labels) // batch_size), process_count))
  read = lambda start: stream.whole_batches(data, split, batch_size, process_index=process_index,
                                            process_count=process_count, start=start)
  return Batches(read, mine, len(labels), _digest_arrays(labels, np.asarray([len(labels), batch_size])),
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
  return Batches(read, num_local, None, _digest_arrays(*first, np.asarray([-1 if total is None else total])), pad_to)


def as_batches(batches, batch_size: Optional[int] = None, *, split: str = "train", process_index: int = 0,
               process_count: int = 1) -> Batches:
  """``Batches`` from a ``Batches``, an ``nc_jax.data.Dataset`` (its ``split``), a dataset name for
  ``nc_jax.data.load``, a (inputs, labels) pair of arrays, or a re-iterable / callable of batches."""
  if isinstance(batches, Batches):
    return batches
  if isinstance(batches, str):
    from nc_jax import data
    batches = data.load(batches)
  if hasattr(batches, "train_inputs") and hasattr(batches, "test_labels"):  # nc_jax.data.Dataset
    inputs, labels = ((batches.train_inputs, batches.train_labels) if split == "train"
                      else (batches.test_inputs, batches.test_labels))
    return array_batches(inputs, labels, batch_size or 512, process_index=process_index, process_count=process_count)
  if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(a, np.ndarray) for a in batches):
    return array_batches(*batches, batch_size or 512, process_index=process_index, process_count=process_count)
  return iterable_batches(batches, process_index=process_index, process_count=process_count, pad_to=batch_size)


def _padded(inputs: np.ndarray, labels: np.ndarray, pad_to: Optional[int]):
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


# ----------------------------------------------------------------------------
# Accumulators and their jitted updates.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class LossState:
  """Sums over the valid rows: loss_sum = sum_i loss(logits_i, y_i), correct = #{argmax logits_i = y_i}, count."""

  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array


def init_loss() -> LossState:
  return LossState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def merge_loss(a: LossState, b: LossState) -> LossState:
  return jax.tree_util.tree_map(jnp.add, a, b)


@flax.struct.dataclass
class DeviationPass:
  """A deviation pass's state: the NC sums (``DeviationState``) and the loss/accuracy sums."""

  nc: streaming.DeviationState
  loss: LossState


def merge_deviation_pass(a: DeviationPass, b: DeviationPass) -> DeviationPass:
  return DeviationPass(streaming.merge_deviations(a.nc, b.nc), merge_loss(a.loss, b.loss))


@functools.lru_cache(maxsize=16)
def _jitted(function: Callable, **static) -> Callable:
  """``jax.jit(partial(function, **static))``, one per (function, options), so repeated measurements reuse it."""
  return jax.jit(functools.partial(function, **static))


@functools.lru_cache(maxsize=16)
def _means_step(apply_fn):
  """Pass 1, jitted, state donated: (ClassMeansState, params, inputs (B, ...), labels (B,), mask (B,)) ->
  the state with the batch's features h = apply_fn(params, inputs)[1], flattened to (B, p), folded in."""
  def step(state, params, inputs, labels, mask):
    _, features = apply_fn(params, inputs)
    return streaming.update_class_means(state, jnp.reshape(features, (features.shape[0], -1)), labels, mask)
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _deviations_step(apply_fn, loss_fn, ncc_use_bias: bool):
  """Pass 2, jitted, state donated: (DeviationPass, ClassGeometry, params, inputs, labels, mask) -> the state
  with the batch's deviations h_i - mu_{y_i} folded in (``update_deviations``) and, with ``loss_fn``, its
  sum of losses, of argmax(logits_i) = y_i and its count of valid rows."""
  def step(state: DeviationPass, geometry, params, inputs, labels, mask):
    logits, features = apply_fn(params, inputs)
    nc = streaming.update_deviations(state.nc, geometry, jnp.reshape(features, (features.shape[0], -1)), labels,
                                     mask, ncc_use_bias=ncc_use_bias)
    loss = state.loss
    if loss_fn is not None:
      valid = mask & (labels >= 0) & (labels < geometry.means.shape[0])
      losses = jnp.where(valid, loss_fn(logits, jnp.where(valid, labels, 0)), 0.0)
      loss = merge_loss(loss, LossState(jnp.sum(losses, dtype=jnp.float32),
                                        jnp.sum(valid & (jnp.argmax(logits, -1) == labels), dtype=jnp.int32),
                                        jnp.sum(valid, dtype=jnp.int32)))
    return DeviationPass(nc, loss)
  return jax.jit(step, donate_argnums=0)


def _local_shardings(batch_size: Optional[int]):
  """(replicated, batch-sharded) over this process's devices, or (None, None) on one device or for batches
  that do not split evenly: a batch's rows are then spread over every local device (a 1-D 'data' mesh)."""
  from nc_jax.data import device
  devices = jax.local_devices()
  if len(devices) == 1 or not batch_size or batch_size % len(devices):
    return None, None
  mesh = device.data_mesh(devices)
  return device.replicated(mesh), device.batch_sharding(mesh)


def merge_across_processes(local, merge: Callable):
  """The states of every process, folded with ``merge`` in process order 0, 1, ..., P-1 (identity for P = 1)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(jax.device_get(local))
  parts = [jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], gathered) for i in range(jax.process_count())]
  return functools.reduce(jax.jit(merge), parts)


# ----------------------------------------------------------------------------
# The accumulator file.
# ----------------------------------------------------------------------------


def _named_leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _checksum(arrays: dict, meta: dict) -> str:
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  digest.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
  return digest.hexdigest()


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
  """Writes ``payload`` to a temporary file, fsyncs it, renames it over ``path`` and fsyncs the folder."""
  temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(temporary, "wb") as handle:
      handle.write(payload)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(temporary, path)
  finally:
    if temporary.exists():
      temporary.unlink()
  folder = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def save_accumulators(path: pathlib.Path, tree, meta: dict) -> None:
  """``tree``'s leaves (named by their pytree paths) and ``meta`` (JSON, with a sha256 of both) -> ``path``."""
  arrays = _named_leaves(tree)
  meta = {**meta, "sha256": _checksum(arrays, meta)}
  buffer = io.BytesIO()
  np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8), **arrays)
  _write_atomically(path, buffer.getvalue())


class AccumulatorsDamaged(Exception):
  """An accumulator file that cannot be read or fails its checksum."""


def load_accumulators(path: pathlib.Path) -> tuple[dict, dict]:
  """({leaf name: array}, meta) from ``path``; AccumulatorsDamaged if it cannot be read or fails its sha256."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      arrays = {name: stored[name] for name in stored.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
  except Exception as error:  # zipfile, numpy and json raise many types for a damaged file
    raise AccumulatorsDamaged(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
  if not isinstance(meta, dict) or meta.get("sha256") != _checksum(arrays, meta):
    raise AccumulatorsDamaged("its content does not match its sha256 checksum")
  return arrays, meta


def _unflatten_like(template, arrays: dict):
  """``arrays`` (named leaves) as a tree of ``template``'s structure, shapes and dtypes, or None if they differ."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, leaf in paths:
    array = arrays.get(jax.tree_util.keystr(path))
    if array is None or array.shape != tuple(leaf.shape) or array.dtype != leaf.dtype:
      return None
    leaves.append(array)
  if len(arrays) != len(leaves):
    return None
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------
# Progress on stderr.
# ----------------------------------------------------------------------------


class Progress:
  """A '\\r' progress line (pass, batches done/total, items/s, ETA) when ``live``; a summary line at the end."""

  def __init__(self, live: bool, quiet: bool = False, stream=None, every: float = 0.2):
    self.live, self.quiet, self.stream, self.every = live, quiet, stream or sys.stderr, every
    self.started = time.perf_counter()
    self.items_total = self.batches_total = self.passes = 0

  def start(self, name: str, done: int, total: Optional[int]) -> None:
    """A pass begins, with ``done`` of its ``total`` batches already done (a resume)."""
    self.name, self.first, self.done, self.total = name, done, done, total
    self.items, self.pass_started, self.shown = 0, time.perf_counter(), 0.0
    self.passes += 1
    self._show(force=True)

  def advance(self, items: int) -> None:
    self.done += 1
    self.items += items
    self.items_total += items
    self.batches_total += 1
    self._show()

  def _show(self, force: bool = False) -> None:
    if not self.live or self.quiet:
      return
    now = time.perf_counter()
    if not force and now - self.shown < self.every and self.done != self.total:
      return
    self.shown = now
    seconds = max(now - self.pass_started, 1e-9)
    eta = ""
    if self.total is not None and self.done > self.first:
      eta = f"  ETA {(self.total - self.done) * seconds / (self.done - self.first):,.0f}s"
    total = "?" if self.total is None else self.total
    self.stream.write(f"\r{self.name}: {self.done}/{total} batches  {self.items / seconds:,.0f} items/s{eta}\033[K")
    self.stream.flush()

  def end_pass(self) -> None:
    if self.live and not self.quiet:
      self._show(force=True)
      self.stream.write("\n")
      self.stream.flush()

  def summary(self, out_dir) -> None:
    if self.quiet:
      return
    seconds = time.perf_counter() - self.started
    self.stream.write(f"collect: {self.passes} passes, {self.batches_total} batches, {self.items_total:,} items in "
                      f"{seconds:,.1f}s ({self.items_total / max(seconds, 1e-9):,.0f} items/s) -> {out_dir}\n")
    self.stream.flush()


# ----------------------------------------------------------------------------
# The measurement.
# ----------------------------------------------------------------------------


def OutputLock(out_dir: pathlib.Path):  # noqa: N802  (used as a class: ``with OutputLock(DIR):``)
  """An exclusive ``flock`` on DIR/lock while a measurement writes DIR (released by the kernel if it dies):
  ``nc_jax.training.workdir.Lock`` with this command's words."""
  from nc_jax.training import workdir as workdir_lib

  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  return workdir_lib.Lock(out_dir, what="measurement", flag="--out", error=CollectError)


def _accumulator_path(out_dir: pathlib.Path) -> pathlib.Path:
  if jax.process_count() == 1:
    return out_dir / "accumulators.npz"
  return out_dir / f"accumulators.{jax.process_index()}-of-{jax.process_count()}.npz"


def _move_aside(path: pathlib.Path) -> pathlib.Path:
  target = path.parent / CORRUPT_DIR / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  target.parent.mkdir(parents=True, exist_ok=True)
  os.replace(path, target)
  return target


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _resume_point(path: pathlib.Path, template, fingerprint: str, warn) -> tuple[Any, int, int]:
  """(state, pass, batches done in it) from ``path``, or (None, 0, 0) when there is nothing to resume."""
  if not path.exists():
    return None, 0, 0
  try:
    arrays, meta = load_accumulators(path)
  except AccumulatorsDamaged as error:
    warn(f"{path} is damaged ({error}); moved to {_move_aside(path)}, measuring from the start")
    return None, 0, 0
  if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
    raise CollectError(f"{path} holds the accumulators of another measurement (another model, checkpoint, data, "
                       "batch size, options or process layout); delete it or choose another --out")
  state = _unflatten_like(template, arrays)
  if state is None:
    raise CollectError(f"{path} holds accumulators of other shapes than this measurement's; delete it or choose "
                       "another --out")
  return state, int(meta["pass"]), int(meta["position"])


def _agreed_resume_point(pass_index: int, position: int) -> tuple[int, int]:
  """Every process resumes in the earliest pass any of them is in; those further on have finished it (-1)."""
  if jax.process_count() == 1:
    return pass_index, position
  from jax.experimental import multihost_utils
  passes = np.asarray(multihost_utils.process_allgather(np.asarray(pass_index, np.int32)))
  earliest = int(passes.min())
  return (pass_index, position) if earliest == pass_index else (earliest, -1)


def _kill_point() -> Optional[tuple[int, int]]:
  value = os.environ.get(KILL_ENV)
  if not value:
    return None
  pass_index, _, batches = value.partition(":")
  return int(pass_index), int(batches)


def _plain(value):
  from nc_jax import records
  return records.plain(np.asarray(value))


def class_statistics(geometry: streaming.ClassGeometry, state: streaming.DeviationState,
                     global_mean: str = "class_means") -> dict:
  """Per-class statistics in the features' units, from pass 1's geometry and pass 2's sums.

  With delta_c = (1/n_c) sum_{y_i = c} d_i (pass 1's float error, as ``finalize_collapse`` corrects it):
    counts (C,) n_c; means (C, p) mu_c = (mu_c' + delta_c) 2^e;
    variances (C,) (1/n_c) sum ||h_i - mu_c||^2 = (sum ||d_i||^2 / n_c - ||delta_c||^2) 2^(2e);
    centred_mean_norms (C,) ||mu_c - mu_G||; weight_norms (C,) ||w_c|| when W is known.
  """
  counts = np.asarray(state.counts)
  exponent = int(np.asarray(geometry.exponent))
  safe = np.maximum(counts, 1).astype(np.float64)
  correction = np.asarray(state.deviation_sums, np.float64) / safe[:, None]
  scaled_means = np.asarray(geometry.means, np.float64) + correction
  means = np.ldexp(scaled_means, exponent)
  variances = np.maximum(np.asarray(state.deviation_sq, np.float64) / safe - np.sum(correction**2, -1), 0.0)
  weights = counts / max(counts.sum(), 1)
  centre = means.mean(0) if global_mean == "class_means" else weights @ means
  stats = {"counts": counts.astype(np.int64), "means": means.astype(np.float32),
           "variances": np.ldexp(variances, 2 * exponent).astype(np.float32),
           "centred_mean_norms": np.linalg.norm(means - centre, axis=-1).astype(np.float32)}
  if geometry.weights is not None:
    stats["weight_norms"] = np.linalg.norm(np.asarray(geometry.weights, np.float64), axis=-1).astype(np.float32)
  return stats


def further_keys(state: streaming.DeviationState, geometry: streaming.ClassGeometry, *, global_mean: str,
                 ddof: int) -> dict:
  """The later metrics of ``nc_jax.metrics.further`` that pass 2's sums determine (kernel statistics,
  cdnv_k*, equinorm_log_means*, nc1_weak and, with W, nc3_wm_structure and global_logit_*), from the
  corrected means mu_c 2^-e = mu'_c + delta_c and variances V_c 4^-e = sum ||d||^2 / n_c - ||delta_c||^2."""
  counts = state.counts.astype(geometry.means.dtype)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = state.deviation_sums / safe_counts[:, None]
  variances = jnp.maximum(state.deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0) / safe_counts
  ok = (state.invalid_labels == 0) & (state.nonfinite_rows == 0) & jnp.all(state.counts > 0)
  return nc_metrics.further.further_from_statistics(
      geometry.means + correction, variances, counts, geometry.exponent, geometry.weights, geometry.bias, ok=ok,
      global_mean=global_mean, ddof=ddof)


def collect(
    apply_fn: Callable,
    params,
    batches,
    num_classes: int,
    *,
    out_dir=None,
    weights=None,
    bias=None,
    test_batches=None,
    loss_fn: Optional[Callable] = None,
    batch_size: Optional[int] = None,
    checkpoint_every: int = 0,
    progress: Optional[bool] = None,
    quiet: bool = False,
    info: Optional[dict] = None,
    fingerprint: str = "",
    loss_names: tuple[str, str] = ("train", "test"),
    global_mean: str = "class_means",
    solver: str = "svd",
    divide_nc1_by_classes: bool = True,
    std_ddof: int = 1,
    self_duality_squared: bool = True,
    ncc_use_bias: bool = True,
    warn: Callable[[str], None] = _warn,
) -> dict:
  """Neural Collapse of ``apply_fn``'s features over ``batches``, in streaming passes; returns the metrics.

  Args:
    apply_fn: (params, inputs (B, ...)) -> (logits (B, C), features (B, p) or (B, ...), flattened to p),
      e.g. ``lambda v, x: model.apply(v, x, train=False)``; jitted here.
    params: its first argument (any pytree).
    batches: the (training) data: a re-iterable or a callable returning a fresh iterator of
      (inputs, labels) numpy batches, an (inputs, labels) pair of arrays, an ``nc_jax.data.Dataset``
      (its training split; its test split becomes ``test_batches`` unless that is given) or a dataset
      name for ``nc_jax.data.load``.
    num_classes: C.
    out_dir: where nc.json, class_stats.npz and the accumulator checkpoints go (None: nothing is written).
    weights, bias: the classifier W (C, p) and b (C,) (logits = W h + b), or None: then the keys that need
      W (NC2 of W, NC3, NC4, accuracy) are absent.
    test_batches: held-out data as ``batches``: adds the ``*_test`` keys, measured against the training means.
    loss_fn: per-example loss (logits (B, C), labels (B,)) -> (B,); with it the result has
      '<train>_loss' = (1/N) sum_i loss_i and '<train>_acc' = (1/N) #{argmax logits_i = y_i} (and '<test>_...'),
      named by ``loss_names``.
    batch_size: for arrays and datasets, the batch size (default 512); for streams, shorter batches are
      padded (masked) to it so one compiled step serves all.
    checkpoint_every: save the accumulators every this many batches of this process (0: never); they are
      also saved at every pass boundary when > 0.
    progress: the live progress line on stderr (default: when stderr is a TTY); quiet: not even the summary.
    info: extra keys for nc.json (epoch, step, checkpoint, ...).
    fingerprint: anything else that identifies the measurement (mixed into the accumulators' fingerprint).
    global_mean, solver, divide_nc1_by_classes, std_ddof, self_duality_squared, ncc_use_bias: as for
      ``nc_jax.metrics.neural_collapse``.

  Returns:
    {key: Python scalar}: every key of ``neural_collapse`` (and the ``*_test`` ones), the loss keys, ``info``.
  """
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
    raise CollectError(f"num_classes must be an int >= 2, got {num_classes!r}")
  if not isinstance(checkpoint_every, (int, np.integer)) or isinstance(checkpoint_every, bool):
    raise CollectError(f"checkpoint_every must be an int >= 0 (0: no checkpoints), got {checkpoint_every!r}", 2)
  if out_dir is not None and pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
    raise CollectError(f"out_dir {out_dir} is a file, not a directory; choose another out_dir", 2)
  process_index, process_count = jax.process_index(), jax.process_count()
  if isinstance(batches, str) or (hasattr(batches, "train_inputs") and hasattr(batches, "test_labels")):
    if isinstance(batches, str):
      from nc_jax import data
      batches = data.load(batches)
    if test_batches is None:
      test_batches = as_batches(batches, batch_size, split="test", process_index=process_index,
                                process_count=process_count)
  main = as_batches(batches, batch_size, split="train", process_index=process_index, process_count=process_count)
  heldout = None if test_batches is None else as_batches(test_batches, batch_size, split="test",
                                                         process_index=process_index, process_count=process_count)
  for name, source in (("batches", main), ("test_batches", heldout)):
    if source is not None and source.num_local == 0:
      raise CollectError(f"{name}: process {process_index} of {process_count} has no batch to read "
                         "(fewer batches than processes); use a smaller batch size")
  if checkpoint_every < 0:
    raise CollectError(f"checkpoint_every = {checkpoint_every}: must be >= 0 (0: no checkpoints)", 2)

  # ------------------------------------------------------------- shapes
  first_inputs, first_labels = next(main.read(0))
  first_inputs, _, _ = _padded(first_inputs, first_labels, main.pad_to)
  shapes = jax.eval_shape(apply_fn, params, first_inputs)
  if not isinstance(shapes, (tuple, list)) or len(shapes) != 2 or not all(
      hasattr(s, "shape") and len(s.shape) >= 1 for s in shapes):
    raise CollectError("apply_fn(params, inputs) must return (logits (B, C), features (B, p) or (B, ...)), got "
                       + str(jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)))
  logits_shape, features_shape = shapes
  if features_shape.shape[0] != len(first_inputs) or not jnp.issubdtype(features_shape.dtype, jnp.floating):
    raise CollectError(f"apply_fn's features have shape {tuple(features_shape.shape)} and dtype "
                       f"{features_shape.dtype} for a batch of {len(first_inputs)}; they must be floating point, "
                       "(B, p) or (B, ...)")
  feature_dim = math.prod(features_shape.shape[1:])
  dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(features_shape.dtype, jnp.float32))  # bf16 -> f32
  if weights is not None:
    weights = jnp.asarray(weights)
    bias = None if bias is None else jnp.asarray(bias)
    nc_metrics.check_shapes(jnp.zeros((1, feature_dim), dtype), jnp.zeros((1,), jnp.int32), num_classes,
                            weights, bias)
  elif bias is not None:
    raise CollectError("bias without weights: pass the classifier's W too, or neither")
  if loss_fn is not None and tuple(logits_shape.shape[1:]) != (num_classes,):
    raise CollectError(f"apply_fn's logits have shape {logits_shape.shape}, not (B, {num_classes}); "
                       "the loss and accuracy need them")

  start_means = streaming.init_class_means(num_classes, feature_dim, dtype)
  deviation_template = jax.eval_shape(lambda: DeviationPass(streaming.init_deviations(
      streaming.finalize_class_means(start_means, weights, bias)), init_loss()))
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
  template = {"means": jax.tree_util.tree_map(np.asarray, start_means), "main": zeros(deviation_template)}
  if heldout is not None:
    template["heldout"] = zeros(deviation_template)

  options = dict(global_mean=global_mean, solver=solver, divide_nc1_by_classes=divide_nc1_by_classes,
                 std_ddof=std_ddof, self_duality_squared=self_duality_squared, ncc_use_bias=ncc_use_bias)
  digest = json.dumps({
      "format": FORMAT, "num_classes": num_classes, "feature_dim": feature_dim, "dtype": str(dtype),
      "params": _digest_arrays(*jax.tree_util.tree_leaves(jax.device_get(params))),
      "weights": None if weights is None else _digest_arrays(weights, np.zeros(0) if bias is None else bias),
      "data": main.digest, "heldout": None if heldout is None else heldout.digest, "pad_to": main.pad_to,
      "loss": loss_fn is not None, "options": options, "processes": [process_index, process_count],
      "local_devices": len(jax.local_devices()) if _local_shardings(main.pad_to)[0] else 1,
      "extra": fingerprint}, sort_keys=True)
  fingerprint = hashlib.sha256(digest.encode()).hexdigest()

  # ------------------------------------------------------------- resume
  out_dir = None if out_dir is None else pathlib.Path(out_dir)
  with OutputLock(out_dir) if out_dir is not None and process_index == 0 else contextlib.nullcontext():
    path = None
    state, pass_index, position = None, 0, 0
    if out_dir is not None:
      out_dir.mkdir(parents=True, exist_ok=True)
      path = _accumulator_path(out_dir)
      # Temporary files of a writer killed before its rename (never the result; ours to remove: the lock
      # is held, and each process names only its own accumulator file).
      owned = [path.name] + ([NC_FILE, STATS_FILE] if process_index == 0 else [])
      for name in owned:
        for stale in out_dir.glob(f".{name}.tmp*"):
          stale.unlink(missing_ok=True)
      state, pass_index, position = _resume_point(path, template, fingerprint, warn)
    pass_index, position = _agreed_resume_point(pass_index, position)
    state = dict(template if state is None else state)
    log_progress = Progress(live=(sys.stderr.isatty() if progress is None else progress) and process_index == 0,
                            quiet=quiet or process_index != 0)

    def save(pass_now: int, done: int) -> None:
      if path is not None and checkpoint_every:
        save_accumulators(path, state, {"format": FORMAT, "fingerprint": fingerprint, "pass": pass_now,
                                        "position": done})

    # ------------------------------------------------------------- passes
    means_step = _means_step(apply_fn)
    deviations_step = _deviations_step(apply_fn, loss_fn, ncc_use_bias)
    finalize_means = _jitted(streaming.finalize_class_means, global_mean=global_mean, solver=solver)
    passes = [("pass 1/{n} class means", "means", main), ("pass 2/{n} deviations", "main", main)]
    if heldout is not None:
      passes.append(("pass 3/{n} held-out deviations", "heldout", heldout))
    kill = _kill_point()
    replicated, sharded = _local_shardings(main.pad_to)
    place = (lambda tree: tree) if replicated is None else (lambda tree: jax.device_put(tree, replicated))
    params = place(params)
    geometry, merged = None, {}
    for index, (label, key, source) in enumerate(passes):
      if index > pass_index or (index == pass_index and position >= 0):
        start = position if index == pass_index else 0
        local = jax.device_put(state[key] if start else template[key], replicated)  # from 0: earlier work is redone
        log_progress.start(label.format(n=len(passes)), start, source.num_local)
        for done, (inputs, labels) in enumerate(source.read(start), start + 1):
          batch = _padded(inputs, labels, source.pad_to)
          items = int(np.sum(batch[2]))
          if sharded is not None and len(batch[1]) % len(sharded.mesh.devices.flat) == 0:
            batch = jax.device_put(batch, sharded)
          if key == "means":
            local = means_step(local, params, *batch)
          else:
            local = deviations_step(local, geometry, params, *batch)
          if log_progress.live:  # honest items/s: the step runs asynchronously otherwise
            jax.block_until_ready(local)
          log_progress.advance(items)
          if checkpoint_every and done % checkpoint_every == 0:
            state[key] = jax.device_get(local)
            save(index, done)
          if kill == (index, done):
            os.kill(os.getpid(), signal.SIGKILL)
        state[key] = jax.device_get(local)
        log_progress.end_pass()
        save(index + 1, 0)
      merge = streaming.merge_class_means if key == "means" else merge_deviation_pass
      merged[key] = merge_across_processes(state[key], merge)
      if key == "means":
        geometry = place(finalize_means(merged["means"], weights, bias))

    # ------------------------------------------------------------- finalize
    result = dict(info or {})
    main_state = merged["main"]
    first_counts, second_counts = (np.asarray(jax.device_get(counts)) for counts in
                                   (merged["means"].counts, main_state.nc.counts))
    if not np.array_equal(first_counts, second_counts):
      if path is not None and path.exists():
        path.unlink()  # built from inconsistent reads: a rerun must measure from the start
      raise CollectError(
          f"batches gave {int(first_counts.sum())} labelled samples in pass 1 (class means) but "
          f"{int(second_counts.sum())} in pass 2 (deviations), or other per-class counts: every read must yield "
          "the same data (a callable must return a fresh iterator over it, without random drops or sampling)")
    result |= _jitted(nc_metrics.finalize_collapse, global_mean=global_mean, std_ddof=std_ddof,
                      divide_nc1_by_classes=divide_nc1_by_classes,
                      self_duality_squared=self_duality_squared)(main_state.nc, geometry)
    result |= _jitted(further_keys, global_mean=global_mean, ddof=std_ddof)(main_state.nc, geometry)
    if heldout is not None:
      result |= _jitted(nc_metrics.finalize_transfer, divide_nc1_by_classes=divide_nc1_by_classes)(
          merged["heldout"].nc, geometry)
    if loss_fn is not None:
      for key, name in zip(("main", "heldout"), loss_names):
        if key in merged:
          sums = jax.device_get(merged[key].loss)
          count = max(int(sums.count), 1)
          result[f"{name}_loss"] = np.float32(sums.loss_sum) / np.float32(count)
          result[f"{name}_acc"] = np.float32(sums.correct) / np.float32(count)
    result = {key: _plain(value) for key, value in result.items()}
    problems = {k: v for k, v in result.items()
                if k.split("_test")[0] in nc_metrics.DIAGNOSTIC_KEYS and isinstance(v, int) and v > 0}
    if problems and process_index == 0:
      warn(f"invalid input {problems}; the metrics it affects are NaN")

    # ------------------------------------------------------------- outputs
    if out_dir is not None:
      if process_index == 0:
        stats = class_statistics(geometry, main_state.nc, global_mean)
        buffer = io.BytesIO()
        np.savez(buffer, **stats)
        _write_atomically(out_dir / STATS_FILE, buffer.getvalue())
        _write_atomically(out_dir / NC_FILE, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
      if path.exists():
        path.unlink()  # done: a rerun measures again (bit for bit the same)
    log_progress.summary(out_dir if out_dir is not None else "(not written)")
    return result


# ----------------------------------------------------------------------------
# A workdir made by nc_jax.train.
# ----------------------------------------------------------------------------


def _read_workdir_config(workdir: pathlib.Path):
  import ml_collections
  from nc_jax import records
  if not workdir.exists():
    raise CollectError(f"--workdir {workdir} does not exist", 2)
  if not workdir.is_dir():
    raise CollectError(f"--workdir {workdir} is a file, not a run directory", 2)
  path = workdir / records.CONFIG_FILE
  if not path.exists():
    raise CollectError(f"{workdir} has no {records.CONFIG_FILE}: not a run directory of python -m nc_jax.train")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CollectError(f"{path} is damaged (not JSON: {error})") from None


def _check_out_dir(out_dir: pathlib.Path) -> None:
  for parent in [out_dir, *out_dir.parents]:
    if parent.exists():
      if not parent.is_dir():
        raise CollectError(f"--out {out_dir}: {parent} is a file, not a directory; choose another --out", 2)
      if not os.access(parent, os.W_OK | os.X_OK):
        raise CollectError(f"--out {out_dir}: {parent} is not writable; choose another --out")
      return


def restore_workdir(workdir, epoch: Optional[int] = None, *, warn: Callable[[str], None] = _warn):
  """(config, dataset, model, variables, epoch, step, checkpoint path) of a run directory's checkpoint.

  The model and the checkpoint's abstract state are built by ``nc_jax.training.loop``'s own functions
  (``_program``, ``_load_dataset``), so they are exactly the run's; ``variables`` ({'params',
  'batch_stats'}) are this process's numpy copies. ``epoch`` None: the newest checkpoint that is not damaged.
  """
  from nc_jax.data import device
  from nc_jax.training import checkpoints, loop

  workdir = pathlib.Path(workdir).absolute()
  config = _read_workdir_config(workdir)
  directory = workdir / "checkpoints"
  epochs = []
  if directory.is_dir():
    epochs = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not epochs:
    raise CollectError(f"{workdir} has no checkpoint in {directory}: train it first (python -m nc_jax.train "
                       f"--workdir {workdir} ...)")
  if epoch is not None and epoch not in epochs:
    raise CollectError(f"--epoch {epoch}: {workdir} has no checkpoint of epoch {epoch}; it has epochs "
                       f"{', '.join(map(str, epochs))}", 2)
  from nc_jax.data import stream

  pipeline = stream.choose_pipeline(config.input_pipeline, config.dataset, loop._per_class(config))
  dataset = loop._load_dataset(config, pipeline)  # a StreamedDataset where the run streamed
  mesh = device.data_mesh()
  compiled = {k: v for k, v in loop._config_dict(config).items() if k not in loop.RUN_ONLY_KEYS}
  program = loop._program(json.dumps(compiled, sort_keys=True), mesh, dataset.num_classes, dataset.input_shape,
                          max(len(dataset.train_labels) // config.batch_size, 1), len(dataset.train_labels))
  manager = checkpoints.Checkpoints(directory, read_only=True)
  try:
    if epoch is None:
      restored = manager.restore_latest(program.abstract_state, warn=warn)
      if restored is None:
        raise CollectError(f"no good checkpoint in {directory} (epochs {', '.join(map(str, epochs))} are damaged)")
      epoch, state, _ = restored
    else:
      state, _ = manager.restore(epoch, program.abstract_state)
  except checkpoints.CheckpointDamaged as error:
    others = [str(e) for e in epochs if e != epoch]
    raise CollectError(f"checkpoint {directory / str(epoch)} is damaged ({error}); "
                       + (f"choose another --epoch ({', '.join(others)})" if others else "it is the only one")) from None
  except checkpoints.CheckpointMismatch as error:
    raise CollectError(f"{error}; config.json and checkpoints/ of {workdir} are not of the same run") from None
  finally:
    manager.close()
  local = lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
  variables = jax.tree_util.tree_map(local, state.variables)
  return config, dataset, program.model, variables, epoch, int(local(state.step)), directory / str(epoch)


def collect_workdir(workdir, out_dir, *, split: str = "both", epoch: Optional[int] = None,
                    batch_size: Optional[int] = None, checkpoint_every: int = 0, progress: Optional[bool] = None,
                    quiet: bool = False, warn: Callable[[str], None] = _warn) -> dict:
  """NC of a run's checkpoint, measured as ``nc_jax.training.evaluate`` measures it; writes ``out_dir``.

  split: 'both' (default: the training set, the paper's measurement, plus the test set's ``*_test`` keys
  against the training means: metrics.jsonl's keys), 'train', or 'test' (the test set's own collapse, its
  own class means; the keys without suffix). Features are eval-mode (BatchNorm running statistics), W and
  b the head's (``models.classifier_weights``), batches of ``batch_size`` (default the run's
  ``eval_batch_size``) in dataset order, the last one padded and masked, like ``forward_all``.
  """
  from nc_jax import models
  from nc_jax.training import step as step_lib

  if split not in SPLITS:
    raise CollectError(f"--split {split!r}: choose one of {', '.join(SPLITS)}", 2)
  if batch_size is not None and batch_size < 1:
    raise CollectError(f"--batch_size {batch_size}: must be at least 1", 2)
  out_dir = pathlib.Path(out_dir).absolute()
  _check_out_dir(out_dir)
  config, dataset, model, variables, epoch, step, checkpoint = restore_workdir(workdir, epoch, warn=warn)
  batch_size = batch_size or config.eval_batch_size
  apply_fn = lambda v, x: model.apply(v, x, train=False)
  feature_shape = jax.eval_shape(apply_fn, variables, np.zeros((1, *dataset.input_shape), np.float32))[1].shape
  weights, bias = models.classifier_weights(variables["params"], feature_dim=math.prod(feature_shape[1:]),
                                            num_classes=dataset.num_classes)
  index, count = jax.process_index(), jax.process_count()
  if hasattr(dataset, "train_inputs"):
    train = array_batches(dataset.train_inputs, dataset.train_labels, batch_size, process_index=index,
                          process_count=count)
    test = array_batches(dataset.test_inputs, dataset.test_labels, batch_size, process_index=index,
                         process_count=count)
  else:
    train, test = (streamed_batches(dataset, split_name, batch_size, process_index=index, process_count=count)
                   for split_name in ("train", "test"))
  main, heldout = {"both": (train, test), "train": (train, None), "test": (test, None)}[split]
  info = {"workdir": str(pathlib.Path(workdir).absolute()), "checkpoint": str(checkpoint), "epoch": epoch,
          "step": step, "split": split, "batch_size": batch_size}
  config_text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
  return collect(apply_fn, variables, main, dataset.num_classes, out_dir=out_dir, weights=np.asarray(weights),
                 bias=np.asarray(bias), test_batches=heldout, loss_fn=step_lib.loss_function(config.loss),
                 checkpoint_every=checkpoint_every, progress=progress, quiet=quiet, info=info,
                 fingerprint=f"{config_text}|{checkpoint}|{epoch}|{split}",
                 loss_names=("test", "test") if split == "test" else ("train", "test"), warn=warn)


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------


def _flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "A run directory of python -m nc_jax.train (config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "Where nc.json, class_stats.npz and the accumulator checkpoints go.")
  flags.DEFINE_enum("split", "both", list(SPLITS), "both: the training set plus the test set's *_test keys (as "
                    "metrics.jsonl); train; test: the test set's own collapse.")
  flags.DEFINE_integer("epoch", None, "The checkpoint's epoch (default: the newest good one).")
  flags.DEFINE_integer("batch_size", None, "Examples per batch (default: the run's eval_batch_size).")
  flags.DEFINE_integer("checkpoint_every", 50, "Save the accumulators every N batches (0: never).")
  flags.DEFINE_bool("progress", None, "Show the live progress line (default: when stderr is a terminal).")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives backend for multi-process CPU runs.")
  return flags.FLAGS


def _fail(message: str, code: int = 1) -> None:
  # orbax's reads abandoned by a failed restore report themselves at exit ("Exception ignored in ..."), with
  # tracebacks: the failure is this line.
  sys.unraisablehook = lambda unraisable: None
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _one_line(error: BaseException) -> str:
  """An exception's message as one line (the last line of an embedded traceback, else all lines joined)."""
  text = str(error).strip()
  if "Traceback (most recent call last)" in text:
    return text.splitlines()[-1].strip()
  return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def _os_error(error: BaseException):
  """The OSError behind an exception (orbax wraps them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  from absl import flags
  try:
    remaining = FLAGS(argv)
  except flags.Error as error:
    _fail(" ".join(str(error).split()), 2)
  missing = [name for name in ("workdir", "out") if getattr(FLAGS, name) is None]
  if missing:
    _fail(f"{' and '.join('--' + name for name in missing)} must be given: python -m nc_jax.collect "
          "--workdir RUN --out DIR", 2)
  return remaining


def main(argv) -> None:
  from absl import logging

  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}", 2)
  logging.set_verbosity(logging.FATAL)  # orbax logs every restore at INFO
  if FLAGS.coordinator_address or FLAGS.num_processes:
    if None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
      _fail("--coordinator_address, --num_processes and --process_id go together", 2)
    if jax.config.jax_platforms in (None, "", "cpu") and FLAGS.cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    collect_workdir(FLAGS.workdir, FLAGS.out, split=FLAGS.split, epoch=FLAGS.epoch, batch_size=FLAGS.batch_size,
                    checkpoint_every=FLAGS.checkpoint_every, progress=FLAGS.progress)
  except CollectError as error:
    _fail(str(error), error.code)
  except KeyboardInterrupt:
    _fail("interrupted; rerun the same command to resume from the last accumulator checkpoint", 130)
  except Exception as error:  # noqa: BLE001  (one line for the user, as nc_jax.train does)
    os_error = _os_error(error)
    if os_error is not None:
      where = f" ({os_error.filename})" if os_error.filename else ""
      _fail(f"{os_error.strerror or _one_line(os_error)}{where}")
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, ImportError)):
      _fail(_one_line(error))
    raise


class _WithoutClosedLoopTracebacks(io.TextIOBase):
  """stderr without the "RuntimeError: Event loop is closed" tracebacks that orbax's background threads print
  after a failed restore (the failure itself is this command's one line); everything else passes through."""

  def __init__(self, stream):
    self.stream, self.held, self.line = stream, [], ""

  def write(self, text: str) -> int:
    self.line += text
    while "\n" in self.line:
      line, self.line = self.line.split("\n", 1)
      self._line(line + "\n")
    return len(text)

  def _line(self, line: str) -> None:
    if not self.held and not line.startswith("Traceback (most recent call last)"):
      self.stream.write(line)
    elif line.startswith((" ", "Traceback (most recent call last)")):
      self.held.append(line)
    else:  # the exception line ends the traceback
      if not line.startswith("RuntimeError: Event loop is closed"):
        self.stream.write("".join(self.held) + line)
      self.held = []

  def flush(self) -> None:
    if self.line and not self.held:
      self.stream.write(self.line)
      self.line = ""
    self.stream.flush()


if __name__ == "__main__":
  from absl import app
  sys.stderr = _WithoutClosedLoopTracebacks(sys.stderr)
  FLAGS = _flags()
  app.run(main, flags_parser=_parse_flags)
