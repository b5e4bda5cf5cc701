"""``collect``: Neural Collapse of any model's features over any batches, in resumable streaming passes.

  pass 1  class means        mu_c = (1/n_c) sum_{y_i = c} h_i           (``update_class_means``)
  between                    M = mu - mu_G = U S V^T                       (``finalize_class_means``)
  pass 2  deviations         d_i = h_i - mu_{y_i}: sum ||d_i||^2, sum ||S^-1 V^T d_i||^2, NCC / network
                             decisions, per class                          (``update_deviations``)
  pass 3  held-out data      the test set's deviations from the *training* means (the ``*_test`` keys)

then ``nc_jax.metrics.finalize_collapse`` / ``finalize_transfer`` and the later metrics the class
statistics determine (``statistics.further_keys``). Resumable through the accumulator file
(``accumulator_files``); the results go to nc.json and class_stats.npz as a checked pair (``outputs``).
"""

from __future__ import annotations

import contextlib
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
from nc_jax.collect import accumulator_files, outputs, steps
from nc_jax.collect.batches import as_batches, digest_arrays, padded
from nc_jax.collect.errors import CollectError, warn as default_warn
from nc_jax.collect.progress import Progress
from nc_jax.collect.statistics import further_keys, per_class_statistics
from nc_jax.metrics import streaming

# Test-only: "PASS:BATCHES" makes the process SIGKILL itself after that many of its batches of pass PASS.
KILL_ENV = "NC_JAX_COLLECT_KILL_AFTER"


def OutputLock(out_dir: pathlib.Path):  # noqa: N802  (used as a class: ``with OutputLock(DIR):``)
  """An exclusive ``flock`` on DIR/lock while a measurement writes DIR (released by the kernel if it dies):
  ``nc_jax.training.workdir.Lock`` with this command's words."""
  from nc_jax.training import workdir as workdir_lib

  pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
  return workdir_lib.Lock(out_dir, what="measurement", flag="--out", error=CollectError)


def _agreed_resume_point(pass_index: int, position: int) -> tuple[int, int]:
  """Every process resumes in the earliest pass any of them is in; those further on have finished it (-1)."""
  if jax.process_count() == 1:
    return pass_index, position
  from jax.experimental import multihost_utils
  passes = np.asarray(multihost_utils.process_allgather(np.asarray(pass_index, np.int32)))
  earliest = int(passes.min())
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
    warn: Callable[[str], None] = default_warn,
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
    global_mean, solver, divide_nc1_by_classes, std_ddof, self_duality_squared, ncc_use_bias: as for
      ``nc_jax.metrics.neural_collapse``.

  Returns:
    {key: Python scalar}: every key of ``neural_collapse`` (and the ``*_test`` ones), the loss keys, ``info``
    and, with ``out_dir``, ``class_stats_sha256`` (the digest of class_stats.npz) and ``sha256`` (that of every
    other key, ``outputs.own_digest``): what nc.json holds.
  """
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
    raise CollectError(f"num_classes must be an int >= 2, got {num_classes!r}")
  if not isinstance(checkpoint_every, (int, np.integer)) or isinstance(checkpoint_every, bool):
    raise CollectError(f"checkpoint_every must be an int >= 0 (0: no checkpoints), got {checkpoint_every!r}", 2)
  if isinstance(out_dir, str) and not out_dir.strip():  # pathlib would read '' as the current folder
    raise CollectError("out_dir is empty: pass the folder for nc.json and class_stats.npz, or None to write nothing",
                       2)
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
  deviation_template = jax.eval_shape(lambda: steps.DeviationPass(streaming.init_deviations(
      streaming.finalize_class_means(start_means, weights, bias)), steps.init_loss()))
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), tree)
  template = {"means": jax.tree_util.tree_map(np.asarray, start_means), "main": zeros(deviation_template)}
  if heldout is not None:
    template["heldout"] = zeros(deviation_template)

  options = dict(global_mean=global_mean, solver=solver, divide_nc1_by_classes=divide_nc1_by_classes,
                 std_ddof=std_ddof, self_duality_squared=self_duality_squared, ncc_use_bias=ncc_use_bias)
  digest = json.dumps({
      "format": accumulator_files.FORMAT, "num_classes": num_classes, "feature_dim": feature_dim,
      "dtype": str(dtype),
      "params": digest_arrays(*jax.tree_util.tree_leaves(jax.device_get(params))),
      "weights": None if weights is None else digest_arrays(weights, np.zeros(0) if bias is None else bias),
      "data": main.digest, "heldout": None if heldout is None else heldout.digest, "pad_to": main.pad_to,
      "loss": loss_fn is not None, "options": options, "processes": [process_index, process_count],
      "local_devices": len(jax.local_devices()) if steps.local_shardings(main.pad_to)[0] else 1,
      "extra": fingerprint}, sort_keys=True)
  fingerprint = hashlib.sha256(digest.encode()).hexdigest()

  # ------------------------------------------------------------- resume
  out_dir = None if out_dir is None else pathlib.Path(out_dir)
  with OutputLock(out_dir) if out_dir is not None and process_index == 0 else contextlib.nullcontext():
    path = None
    state, pass_index, position = None, 0, 0
    if out_dir is not None:
      out_dir.mkdir(parents=True, exist_ok=True)
      path = accumulator_files.accumulator_path(out_dir)
      # Temporary files of a writer killed before its rename (never the result; ours to remove: the lock
      # is held, and each process names only its own accumulator file).
      owned = [path.name] + ([outputs.NC_FILE, outputs.STATS_FILE] if process_index == 0 else [])
      for name in owned:
        for stale in out_dir.glob(f".{name}.tmp*"):
          stale.unlink(missing_ok=True)
      problem = outputs.mismatch(out_dir) if process_index == 0 else None
      if problem is not None:
        warn(f"{problem}; measuring again rewrites both")
      state, pass_index, position = accumulator_files.resume_point(path, template, fingerprint, warn)
    pass_index, position = _agreed_resume_point(pass_index, position)
    state = dict(template if state is None else state)
    log_progress = Progress(live=(sys.stderr.isatty() if progress is None else progress) and process_index == 0,
                            quiet=quiet or process_index != 0)

    def save(pass_now: int, done: int) -> None:
      if path is not None and checkpoint_every:
        meta = {"format": accumulator_files.FORMAT, "fingerprint": fingerprint, "pass": pass_now, "position": done}
        accumulator_files.save_accumulators(path, state, meta)

    # ------------------------------------------------------------- passes
    means_step = steps.means_step(apply_fn)
    deviations_step = steps.deviations_step(apply_fn, loss_fn, ncc_use_bias)
    finalize_means = steps.jitted(streaming.finalize_class_means, global_mean=global_mean, solver=solver)
    passes = [("pass 1/{n} class means", "means", main), ("pass 2/{n} deviations", "main", main)]
    if heldout is not None:
      passes.append(("pass 3/{n} held-out deviations", "heldout", heldout))
    kill = _kill_point()
    replicated, sharded = steps.local_shardings(main.pad_to)
    place = (lambda tree: tree) if replicated is None else (lambda tree: jax.device_put(tree, replicated))
    params = place(params)
    geometry, merged = None, {}
    for index, (label, key, source) in enumerate(passes):
      if index > pass_index or (index == pass_index and position >= 0):
        start = position if index == pass_index else 0
        local = jax.device_put(state[key] if start else template[key], replicated)  # from 0: earlier work is redone
        log_progress.start(label.format(n=len(passes)), start, source.num_local)
        for done, (inputs, labels) in enumerate(source.read(start), start + 1):
          batch = padded(inputs, labels, source.pad_to)
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
      merge = streaming.merge_class_means if key == "means" else steps.merge_deviation_pass
      merged[key] = steps.merge_across_processes(state[key], merge)
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
    result |= steps.jitted(nc_metrics.finalize_collapse, global_mean=global_mean, std_ddof=std_ddof,
                           divide_nc1_by_classes=divide_nc1_by_classes,
                           self_duality_squared=self_duality_squared)(main_state.nc, geometry)
    result |= steps.jitted(further_keys, global_mean=global_mean, ddof=std_ddof)(main_state.nc, geometry)
    if heldout is not None:
      result |= steps.jitted(nc_metrics.finalize_transfer, divide_nc1_by_classes=divide_nc1_by_classes)(
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
      payload = outputs.stats_payload(per_class_statistics(geometry, main_state.nc, global_mean))
      result = outputs.stamped(result, payload)  # on every process: each returns what nc.json holds
      if process_index == 0:
        outputs.write_outputs(out_dir, result, payload)
      if path.exists():
        path.unlink()  # done: a rerun measures again (bit for bit the same)
    log_progress.summary(out_dir if out_dir is not None else "(not written)")
    return result


