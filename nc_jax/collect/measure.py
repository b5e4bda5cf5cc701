"""``collect``: Neural Collapse of any model's features over any batches, in resumable streaming passes.

The passes are ``nc_jax.metrics.engine``'s (the same steps streamed training measures with):

  pass 1  class means        mu_c = (1/n_c) sum_{y_i = c} h_i           (``engine.means_step``)
  between                    M = mu - mu_G = U S V^T                       (``engine.geometry_of``)
  pass 2  deviations         d_i = h_i - mu_{y_i}: sum ||d_i||^2, sum ||S^-1 V^T d_i||^2, NCC / network
                             decisions, loss sums, per class               (``engine.deviations_step``)
  pass 3  held-out data      the test set's deviations from the *training* means (the ``*_test`` keys)

then ``engine.finalize`` / ``engine.transfer`` and the later metrics the class statistics determine
(``statistics.further_keys``). What is collect's own: the accumulator file that makes every pass resumable
(``accumulator_files``), the merge of several processes' sums in process order, nc.json and
class_stats.npz as a checked pair (``outputs``) and the progress line (``progress``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import metrics as nc_metrics
from nc_jax import multihost
from nc_jax.collect import accumulator_files, outputs
from nc_jax.collect.batches import as_batches, digest_arrays, padded
from nc_jax.collect.errors import CollectError, warn as default_warn
from nc_jax.collect.progress import Progress
from nc_jax.collect.statistics import further_keys, per_class_statistics
from nc_jax.metrics import engine, streaming
from nc_jax.metrics.options import NCOptions

# Test-only: "PASS:BATCHES" makes the process SIGKILL itself after that many of its batches of pass PASS.
KILL_ENV = "NC_JAX_COLLECT_KILL_AFTER"
# The conventions the accumulators' fingerprint has named since format 1 (their JSON must not change, so a
# file written before resumes); the others (rcond) join it only when set.
FINGERPRINT_CONVENTIONS = ("global_mean", "solver", "divide_nc1_by_classes", "std_ddof", "self_duality_squared",
                           "ncc_use_bias")
PASS_LABELS = {"means": "pass 1/{n} class means", "main": "pass 2/{n} deviations",
               "heldout": "pass 3/{n} held-out deviations"}


def OutputLock(out_dir: pathlib.Path):  # noqa: N802  (used as a class: ``with OutputLock(DIR):``)
  """An exclusive ``flock`` on DIR/lock while a measurement writes DIR (released by the kernel if it dies):
  ``nc_jax.training.workdir.Lock`` with this command's words."""
  from nc_jax.training import workdir as workdir_lib

  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  return workdir_lib.Lock(out_dir, what="measurement", flag="--out", error=CollectError)


def _agreed_resume_point(pass_index: int, position: int) -> tuple[int, int]:
  """Every process resumes in the earliest pass any of them is in; those further on have finished it (-1)."""
  earliest = int(multihost.gather(np.asarray(pass_index, np.int32)).min())
  return (pass_index, position) if earliest == pass_index else (earliest, -1)


def _kill_point() -> Optional[tuple[int, int]]:
  """(pass, batches) from ``KILL_ENV``, or None."""
  value = os.environ.get(KILL_ENV)
  if not value:
    return None
  pass_index, _, batches = value.partition(":")
  return int(pass_index), int(batches)


def _plain(value):
  from nc_jax import records
  return records.plain(np.asarray(value))


def local_shardings(batch_size: Optional[int]):
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
  return functools.reduce(jax.jit(merge), multihost.per_process(local))


# ----------------------------------------------------------------------------
# Checking the inputs.
# ----------------------------------------------------------------------------


def options_of(options: Optional[NCOptions], conventions: dict) -> NCOptions:
  """``options`` (default ``NCOptions()``) with the keyword face's ``conventions`` (global_mean=..., ...) applied."""
  names = {field.name for field in dataclasses.fields(NCOptions)}
  unknown = sorted(set(conventions) - names)
  if unknown:
    raise TypeError(f"collect() got unexpected keyword arguments {unknown}; the conventions are "
                    f"{', '.join(sorted(names))}")
  if options is not None and not isinstance(options, NCOptions):
    raise CollectError(f"options must be an nc_jax.metrics.NCOptions, got {type(options).__name__}", 2)
  try:
    options = (options or NCOptions()).replace(**conventions)
  except ValueError as error:
    raise CollectError(str(error), 2) from None
  if options.min_count is not None:
    raise CollectError(f"min_count={options.min_count}: collect measures every class (class_stats.npz and the "
                       "later metrics have no filtered form); leave it None", 2)
  return options


def _check_arguments(num_classes, checkpoint_every, out_dir) -> None:
  """One CollectError line for a bad num_classes, checkpoint_every or out_dir."""
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
    raise CollectError(f"num_classes must be an int >= 2, got {num_classes!r}")
  if not isinstance(checkpoint_every, (int, np.integer)) or isinstance(checkpoint_every, bool):
    raise CollectError(f"checkpoint_every must be an int >= 0 (0: no checkpoints), got {checkpoint_every!r}", 2)
  if checkpoint_every < 0:
    raise CollectError(f"checkpoint_every = {checkpoint_every}: must be >= 0 (0: no checkpoints)", 2)
  if isinstance(out_dir, str) and not out_dir.strip():  # pathlib would read '' as the current folder
    raise CollectError("out_dir is empty: pass the folder for nc.json and class_stats.npz, or None to write nothing",
                       2)
  if out_dir is not None and pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
    raise CollectError(f"out_dir {out_dir} is a file, not a directory; choose another out_dir", 2)


def _sources(batches, test_batches, batch_size):
  """(main, heldout or None): this process's ``Batches`` of the training data and of the held-out data."""
  index, count = jax.process_index(), jax.process_count()
  if isinstance(batches, str) or (hasattr(batches, "train_inputs") and hasattr(batches, "test_labels")):
    if isinstance(batches, str):
      from nc_jax import data
      batches = data.load(batches)
    if test_batches is None:
      test_batches = as_batches(batches, batch_size, split="test", process_index=index, process_count=count)
  main = as_batches(batches, batch_size, split="train", process_index=index, process_count=count)
  heldout = None if test_batches is None else as_batches(test_batches, batch_size, split="test",
                                                         process_index=index, process_count=count)
  for name, source in (("batches", main), ("test_batches", heldout)):
    if source is not None and source.num_local == 0:
      raise CollectError(f"{name}: process {index} of {count} has no batch to read "
                         "(fewer batches than processes); use a smaller batch size")
  return main, heldout


def _feature_spec(apply_fn, params, main, num_classes: int, loss_fn) -> tuple[int, np.dtype]:
  """(p, accumulator dtype) of ``apply_fn``'s features on the first batch; CollectError for outputs that are not
  (logits (B, C), features (B, p) or (B, ...)) floating point."""
  first_inputs, first_labels = next(main.read(0))
  first_inputs, _, _ = padded(first_inputs, first_labels, main.pad_to)
  shapes = jax.eval_shape(apply_fn, params, first_inputs)
  if not isinstance(shapes, (tuple, list)) or len(shapes) != 2 or not all(
      hasattr(s, "shape") and len(s.shape) >= 1 for s in shapes):
    raise CollectError("apply_fn(params, inputs) must return (logits (B, C), features (B, p) or (B, ...)), got "
                       + str(jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)))
  logits_shape, features_shape = shapes
  if len(features_shape.shape) == 1:
    raise CollectError(f"apply_fn's features have shape {tuple(features_shape.shape)} for a batch of "
                       f"{len(first_inputs)}: one number per example, not a feature vector; return features of "
                       "shape (batch, p) (features[:, None] for p = 1)")
  if features_shape.shape[0] != len(first_inputs) or not jnp.issubdtype(features_shape.dtype, jnp.floating):
    raise CollectError(f"apply_fn's features have shape {tuple(features_shape.shape)} and dtype "
                       f"{features_shape.dtype} for a batch of {len(first_inputs)}; they must be floating point, "
                       "(B, p) or (B, ...)")
  if loss_fn is not None and tuple(logits_shape.shape[1:]) != (num_classes,):
    raise CollectError(f"apply_fn's logits have shape {logits_shape.shape}, not (B, {num_classes}); "
                       "the loss and accuracy need them")
  return math.prod(features_shape.shape[1:]), engine.accumulator_dtype(features_shape.dtype)


def _classifier(weights, bias, feature_dim: int, dtype, num_classes: int):
  """(W, b) as jax arrays, checked against (C, p) and (C,); (None, None) without W."""
  if weights is None:
    if bias is not None:
      raise CollectError("bias without weights: pass the classifier's W too, or neither")
    return None, None
  weights = jnp.asarray(weights)
  bias = None if bias is None else jnp.asarray(bias)
  nc_metrics.check_shapes(jnp.zeros((1, feature_dim), dtype), jnp.zeros((1,), jnp.int32), num_classes, weights, bias)
  return weights, bias


def _template(num_classes: int, feature_dim: int, dtype, weights, bias, heldout: bool) -> dict:
  """Zero accumulators of every pass (numpy), by name: 'means', 'main' and, with held-out data, 'heldout'."""
  start_means = streaming.init_class_means(num_classes, feature_dim, dtype)
  shapes = jax.eval_shape(lambda: engine.init_deviation_pass(
      streaming.finalize_class_means(start_means, weights, bias)))
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
  template = {"means": jax.tree_util.tree_map(np.asarray, start_means), "main": zeros(shapes)}
  if heldout:
    template["heldout"] = zeros(shapes)
  return template


def _fingerprint(template: dict, params, classifier: tuple, main, heldout, *, loss: bool, options: NCOptions,
                 extra: str) -> str:
  """sha256 of everything that determines the accumulators: C, p and dtype (of ``template``'s class means), the
  params, W and b (``classifier``), the data, the options, the process layout (format 1's JSON, unchanged: a
  file written by an earlier version of this code resumes)."""
  (num_classes, feature_dim), dtype = template["means"].means.shape, template["means"].means.dtype
  weights, bias = classifier
  conventions = {name: getattr(options, name) for name in FINGERPRINT_CONVENTIONS}
  if options.rcond is not None:
    conventions["rcond"] = options.rcond
  digest = json.dumps({
      "format": accumulator_files.FORMAT, "num_classes": num_classes, "feature_dim": feature_dim,
      "dtype": str(dtype),
      "params": digest_arrays(*jax.tree_util.tree_leaves(jax.device_get(params))),
      "weights": None if weights is None else digest_arrays(weights, np.zeros(0) if bias is None else bias),
      "data": main.digest, "heldout": None if heldout is None else heldout.digest, "pad_to": main.pad_to,
      "loss": loss, "options": conventions, "processes": [jax.process_index(), jax.process_count()],
      "local_devices": len(jax.local_devices()) if local_shardings(main.pad_to)[0] else 1,
      "extra": extra}, sort_keys=True)
  return hashlib.sha256(digest.encode()).hexdigest()


# ----------------------------------------------------------------------------
# The passes.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """One measurement's host state: the accumulators of every pass (``state``, numpy, by pass name), where they
  are saved and how often, the progress line and this process's device placement."""

  template: dict
  state: dict
  path: Optional[pathlib.Path]
  fingerprint: str
  checkpoint_every: int
  progress: Progress
  replicated: Optional[jax.sharding.Sharding]
  sharded: Optional[jax.sharding.Sharding]
  kill: Optional[tuple[int, int]]

  def save(self, pass_now: int, done: int) -> None:
    """The accumulators, to resume in pass ``pass_now`` after ``done`` of its batches (with checkpoints on)."""
    if self.path is not None and self.checkpoint_every:
      meta = {"format": accumulator_files.FORMAT, "fingerprint": self.fingerprint, "pass": pass_now,
              "position": done}
      accumulator_files.save_accumulators(self.path, self.state, meta)

  def place(self, tree):
    """``tree`` replicated over the local devices (unchanged on one device)."""
    return tree if self.replicated is None else jax.device_put(tree, self.replicated)


def _resume(out_dir: Optional[pathlib.Path], template: dict, fingerprint: str, warn) -> tuple:
  """(accumulator path or None, saved state or None, pass, batches done in it), agreed by every process; removes
  the temporary files of a writer killed before its rename (the lock is held: they are ours)."""
  if out_dir is None:
    return (None, None, *_agreed_resume_point(0, 0))
  out_dir.mkdir(parents=True, exist_ok=True)
  path = accumulator_files.accumulator_path(out_dir)
  process_zero = jax.process_index() == 0
  for name in [path.name] + ([outputs.NC_FILE, outputs.STATS_FILE] if process_zero else []):
    for stale in out_dir.glob(f".{name}.tmp*"):
      stale.unlink(missing_ok=True)
  problem = outputs.mismatch(out_dir) if process_zero else None
  if problem is not None:
    warn(f"{problem}; measuring again rewrites both")
  state, pass_index, position = accumulator_files.resume_point(path, template, fingerprint, warn)
  return (path, state, *_agreed_resume_point(pass_index, position))


def _run_pass(run: _Run, index: int, key: str, source, start: int, step: Callable, *leading) -> None:
  """Pass ``index`` (accumulators ``key``) over ``source`` from its batch ``start``: run.state[key] <- the step
  over each padded batch (sharded over the local devices when they divide it), saved every
  ``checkpoint_every`` batches and at the end."""
  local = jax.device_put(run.state[key] if start else run.template[key], run.replicated)  # from 0: redone
  for done, (inputs, labels) in enumerate(source.read(start), start + 1):
    batch = padded(inputs, labels, source.pad_to)
    items = int(np.sum(batch[2]))
    if run.sharded is not None and len(batch[1]) % len(run.sharded.mesh.devices.flat) == 0:
      batch = jax.device_put(batch, run.sharded)
    local = step(local, *leading, *batch)
    if run.progress.live:  # honest items/s: the step runs asynchronously otherwise
      jax.block_until_ready(local)
    run.progress.advance(items)
    if run.checkpoint_every and done % run.checkpoint_every == 0:
      run.state[key] = jax.device_get(local)
      run.save(index, done)
    if run.kill == (index, done):
      os.kill(os.getpid(), signal.SIGKILL)
  run.state[key] = jax.device_get(local)
  run.progress.end_pass()
  run.save(index + 1, 0)


def _run_passes(run: _Run, sources: dict, resume_at: tuple[int, int], apply_fn, params, weights, bias, loss_fn,
                options: NCOptions) -> tuple[dict, streaming.ClassGeometry]:
  """Every pass from ``resume_at`` = (pass, position; -1: that pass is done) on; returns the states merged over
  the processes, by pass name, and the geometry of the training means."""
  pass_index, position = resume_at
  params = run.place(params)
  steps = {"means": engine.means_step(apply_fn), "main": engine.deviations_step(apply_fn, loss_fn, options)}
  steps["heldout"] = steps["main"]
  geometry, merged = None, {}
  for index, (key, source) in enumerate(sources.items()):
    if index > pass_index or (index == pass_index and position >= 0):
      start = position if index == pass_index else 0
      run.progress.start(PASS_LABELS[key].format(n=len(sources)), start, source.num_local)
      leading = (params,) if key == "means" else (geometry, params)
      _run_pass(run, index, key, source, start, steps[key], *leading)
    merge = streaming.merge_class_means if key == "means" else engine.merge_deviation_pass
    merged[key] = merge_across_processes(run.state[key], merge)
    if key == "means":
      geometry = run.place(engine.geometry_of(merged["means"], weights, bias, options))
  return merged, geometry


# ----------------------------------------------------------------------------
# After the passes.
# ----------------------------------------------------------------------------


def _check_counts(merged: dict, path: Optional[pathlib.Path]) -> None:
  """CollectError (and the accumulators removed) when pass 1 and pass 2 saw other per-class counts."""
  first, second = (np.asarray(jax.device_get(counts)) for counts in (merged["means"].counts,
                                                                      merged["main"].nc.counts))
  if not np.array_equal(first, second):
    if path is not None and path.exists():
      path.unlink()  # built from inconsistent reads: a rerun must measure from the start
    raise CollectError(
        f"batches gave {int(first.sum())} labelled samples in pass 1 (class means) but {int(second.sum())} in "
        "pass 2 (deviations), or other per-class counts: every read must yield the same data (a callable must "
        "return a fresh iterator over it, without random drops or sampling)")


def _metrics(merged: dict, geometry, options: NCOptions, loss_names: tuple[str, str], loss: bool) -> dict:
  """``neural_collapse``'s keys, the later metrics, the ``*_test`` keys and the loss keys."""
  main = merged["main"]
  result = dict(engine.finalize(main, geometry, options))
  result |= engine.jitted(further_keys, options=options)(main.nc, geometry)
  if "heldout" in merged:
    result |= engine.transfer(merged["heldout"], geometry, options)
  if loss:
    for key, name in zip(("main", "heldout"), loss_names):
      if key in merged:
        result |= engine.loss_keys(merged[key].loss, name)
  return result


def _finish(result: dict, merged: dict, geometry, options: NCOptions, out_dir: Optional[pathlib.Path],
            path: Optional[pathlib.Path]) -> dict:
  """``result`` stamped with the outputs' digests and written as nc.json + class_stats.npz (process 0), the
  accumulators removed: a rerun measures again (bit for bit the same). Without ``out_dir``, ``result``."""
  if out_dir is None:
    return result
  payload = outputs.stats_payload(per_class_statistics(geometry, merged["main"].nc, options.global_mean))
  result = outputs.stamped(result, payload)  # on every process: each returns what nc.json holds
  if jax.process_index() == 0:
    outputs.write_outputs(out_dir, result, payload)
  if path.exists():
    path.unlink()
  return result


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
    options: Optional[NCOptions] = None,
    warn: Callable[[str], None] = default_warn,
    **conventions,
) -> dict:
  """Neural Collapse of ``apply_fn``'s features over ``batches``, in streaming passes; returns the metrics.

  Args:
    apply_fn: (params, inputs (B, ...)) -> (logits (B, C), features (B, p) or (B, ...), flattened to p;
      not (B,): p = 1 is (B, 1)), e.g. ``lambda v, x: model.apply(v, x, train=False)``; jitted here.
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
    options: the metric conventions (``nc_jax.metrics.NCOptions``; min_count must stay None).
    **conventions: the keyword face of ``options`` (global_mean=..., solver=..., divide_nc1_by_classes=...,
      std_ddof=..., self_duality_squared=..., ncc_use_bias=..., rcond=...), as for ``neural_collapse``.

  Returns:
    {key: Python scalar}: every key of ``neural_collapse`` (and the ``*_test`` ones), the loss keys, ``info``,
    ``nc_options`` (``outputs.OPTIONS_KEY``: the conventions measured with, as a dict of NCOptions' fields)
    and, with ``out_dir``, ``class_stats_sha256`` (the digest of class_stats.npz) and ``sha256`` (that of
    every other key, ``outputs.own_digest``): what nc.json holds.
  """
  options = options_of(options, conventions)
  info = {outputs.OPTIONS_KEY: dataclasses.asdict(options), **(info or {})}
  _check_arguments(num_classes, checkpoint_every, out_dir)
  main, heldout = _sources(batches, test_batches, batch_size)
  feature_dim, dtype = _feature_spec(apply_fn, params, main, num_classes, loss_fn)
  weights, bias = _classifier(weights, bias, feature_dim, dtype, num_classes)
  template = _template(num_classes, feature_dim, dtype, weights, bias, heldout is not None)
  key = _fingerprint(template, params, (weights, bias), main, heldout, loss=loss_fn is not None, options=options,
                     extra=fingerprint)
  process_zero = jax.process_index() == 0
  out_dir = None if out_dir is None else pathlib.Path(out_dir)
  with OutputLock(out_dir) if out_dir is not None and process_zero else contextlib.nullcontext():
    path, state, *resume_at = _resume(out_dir, template, key, warn)
    live = (sys.stderr.isatty() if progress is None else progress) and process_zero
    run = _Run(template, dict(template if state is None else state), path, key, checkpoint_every,
               Progress(live=live, quiet=quiet or not process_zero), *local_shardings(main.pad_to), _kill_point())
    sources = {"means": main, "main": main} | ({} if heldout is None else {"heldout": heldout})
    merged, geometry = _run_passes(run, sources, tuple(resume_at), apply_fn, params, weights, bias, loss_fn, options)
    _check_counts(merged, path)
    result = {k: _plain(v) for k, v in (dict(info or {}) | _metrics(merged, geometry, options, loss_names,
                                                                   loss_fn is not None)).items()}
    problems = {k: v for k, v in result.items()
                if k.split("_test")[0] in nc_metrics.DIAGNOSTIC_KEYS and isinstance(v, int) and v > 0}
    if problems and process_zero:
      warn(f"invalid input {problems}; the metrics it affects are NaN")
    result = _finish(result, merged, geometry, options, out_dir, path)
    run.progress.summary(out_dir if out_dir is not None else "(not written)")
    return result
