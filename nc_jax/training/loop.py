"""train_and_evaluate: train into the terminal phase and measure Neural Collapse as it happens.

Banner sections: workdir -> mesh -> data -> model and optimiser -> state ->
resume -> jitted steps -> loop (epoch, evaluation, checkpoint).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import shutil
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nc_jax import data, models
from nc_jax.data import device
from nc_jax.metrics import raise_if_invalid
from nc_jax.training import checkpoints, evaluate as evaluate_lib, schedule, step as step_lib, writer as writer_lib

SUMMARY_KEYS = ("nc1", "equinorm_means", "equiangular_means", "self_duality", "ncc_mismatch")


class Preempted(Exception):
  """SIGTERM arrived; the state was checkpointed at the end of ``epoch``."""

  def __init__(self, epoch: int):
    super().__init__(f"stopped by SIGTERM after epoch {epoch}; checkpoint saved, rerun the command to resume")
    self.epoch = epoch


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
  """Writes config.json; refuses a workdir that holds a run with another config unless ``overwrite``."""
  resolved = _config_dict(config)
  config_path = workdir / "config.json"
  if config_path.exists():
    previous = json.loads(config_path.read_text())
    if previous != resolved and not overwrite:
      changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
      details = ", ".join(f"{k}: {previous.get(k)!r} -> {resolved.get(k)!r}" for k in changed)
      raise ValueError(f"workdir {workdir} holds a run with a different config ({details}); "
                       "use another --workdir, or --overwrite to discard that run")
    if previous != resolved and jax.process_index() == 0:
      for stale in ("checkpoints", "metrics.jsonl", "tpt.json"):
        path = workdir / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    temporary = config_path.with_suffix(".json.tmp")  # atomic: other processes may be reading it
    temporary.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    temporary.replace(config_path)


def _load_dataset(config) -> data.Dataset:
  per_class = config.per_class
  if isinstance(per_class, str) and per_class not in ("paper",):
    per_class = None if per_class.lower() == "none" else int(per_class)
  return data.load(config.dataset, source=config.data_source, data_dir=config.data_dir or None,
                   per_class=per_class, standardization=config.standardization, seed=config.data_seed)


def _dtype(name: str):
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ValueError(f"unknown compute_dtype {name!r}; use float32 or bfloat16") from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       log=print) -> Optional[dict]:
  """Runs (or resumes) the config's training in ``workdir``; returns the last evaluation's metrics."""
  # ---------------------------------------------------------------- workdir
  workdir = pathlib.Path(workdir).absolute()
  _prepare_workdir(workdir, config, overwrite)
  writer = writer_lib.MetricsWriter(workdir / "metrics.jsonl")
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *args, **kwargs: None)

  # ------------------------------------------------------------------- mesh
  mesh = device.data_mesh(jax.devices()[: config.num_devices] if config.get("num_devices") else None)
  if config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {mesh.size} devices")

  # ------------------------------------------------------------------- data
  dataset = _load_dataset(config)
  num_classes = dataset.num_classes
  train_inputs, train_labels, test_inputs, test_labels = (
      device.put_replicated(x, mesh) for x in
      (dataset.train_inputs, dataset.train_labels, dataset.test_inputs, dataset.test_labels))
  deepfool_inputs = None
  if config.get("deepfool_samples"):
    chosen = np.random.default_rng(config.seed).choice(len(dataset.test_labels), config.deepfool_samples, replace=False)
    deepfool_inputs = device.put_replicated(dataset.test_inputs[np.sort(chosen)], mesh)
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {len(dataset.train_labels)} training examples")

  # ------------------------------------------------- model and optimiser
  model = models.create(config.model, num_classes, dtype=_dtype(config.compute_dtype),
                        **dict(config.model_options))
  decay_after = schedule.decay_epochs(config.num_epochs, config.lr_decay_epochs)
  learning_rate = schedule.learning_rate(config.lr, steps_per_epoch, decay_after, config.lr_decay_factor)
  tx = schedule.sgd(learning_rate, config.momentum, config.weight_decay)
  loss_fn = step_lib.loss_function(config.loss)
  measure = set(schedule.measurement_epochs(config.num_epochs, config.measure_epochs))

  # ------------------------------------------------------------------ state
  replicated = device.replicated(mesh)
  init = jax.jit(functools.partial(step_lib.create_state, model, tx, dataset.input_shape, config.seed),
                 out_shardings=replicated)
  abstract_state = jax.eval_shape(init)

  # ----------------------------------------------------------------- resume
  ckpt = checkpoints.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
  restored = ckpt.restore_latest(jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract_state))
  if restored is None:
    start_epoch, state, meta = 0, init(), {"tpt_start_epoch": None, "elapsed": 0.0}
    writer.keep_until(0)
  else:
    start_epoch, state, meta = restored
    writer.keep_until(start_epoch)
    log(f"resumed from the checkpoint of epoch {start_epoch} in {ckpt.directory}")
  if start_epoch >= config.num_epochs:
    log(f"already trained for {config.num_epochs} epochs; nothing to do")
    ckpt.close()
    records = writer.read()
    return records[-1] if records else None

  # ------------------------------------------------------------ jitted steps
  epoch_loop = config.get("epoch_loop", "auto")
  if epoch_loop == "auto":
    epoch_loop = "steps" if jax.default_backend() == "cpu" and config.model != "mlp" else "scan"
  if epoch_loop == "scan":
    train_epoch = jax.jit(functools.partial(
        step_lib.train_epoch, model=model, tx=tx, loss_fn=loss_fn, batch_size=config.batch_size,
        seed=config.seed, mesh=mesh), donate_argnums=0)
  elif epoch_loop == "steps":
    train_epoch = functools.partial(
        step_lib.stepwise_epoch,
        draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=config.seed,
                                               batch_size=config.batch_size, mesh=mesh)),
        step=jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn),
                     donate_argnums=0))
  else:
    raise ValueError(f"unknown epoch_loop {epoch_loop!r}; choose 'auto', 'scan' or 'steps'")
  evaluate = jax.jit(functools.partial(
      evaluate_lib.evaluate, model=model, loss_fn=loss_fn, num_classes=num_classes,
      batch_size=config.eval_batch_size, mesh=mesh, per_layer=config.per_layer_nc))

  # ------------------------------------------------------------------- loop
  stop = {"requested": False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True)) if is_main else None
  log(f"{config.model} on {config.dataset}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test, "
      f"{num_classes} classes, {steps_per_epoch} steps/epoch, {mesh.size} device(s), "
      f"epochs {start_epoch + 1}..{config.num_epochs}")
  last = None
  started = time.perf_counter()
  elapsed_before = float(meta.get("elapsed", 0.0))
  epoch_seconds = []
  try:
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      tic = time.perf_counter()
      state, totals = train_epoch(state, train_inputs, train_labels, epoch)
      totals = jax.device_get(totals)
      seconds = time.perf_counter() - tic
      epoch_seconds.append(seconds)
      count = int(totals["count"])
      epoch_loss, epoch_acc = float(totals["loss"]) / count, float(totals["correct"]) / count
      if not math.isfinite(epoch_loss):
        raise FloatingPointError(
            f"training loss is {epoch_loss} at epoch {epoch}; stopping. The last good checkpoint "
            f"(epoch {ckpt.manager.latest_step()}) is kept in {ckpt.directory}; lower config.lr and resume")
      tpt_starts_now = meta["tpt_start_epoch"] is None and epoch_acc >= config.tpt_threshold
      if tpt_starts_now:
        meta["tpt_start_epoch"] = epoch
        if is_main:
          (workdir / "tpt.json").write_text(json.dumps({"tpt_start_epoch": epoch, "threshold": config.tpt_threshold}))
      images_per_sec = count / seconds
      typical = float(np.median(epoch_seconds[1:] or epoch_seconds))
      eta = typical * (config.num_epochs - epoch)
      log(f"epoch {epoch:4d}  loss {epoch_loss:.4f}  acc {epoch_acc:.4f}  lr {float(learning_rate(int(state.step) - 1)):.2e}  "
          f"{images_per_sec:,.0f} img/s  eta {eta:,.0f}s")

      # Also measured at the TPT start, so Table 1's "test accuracy when TPT begins" is that epoch's.
      measure_now = epoch in measure or epoch == config.num_epochs or tpt_starts_now
      if measure_now or stop["requested"]:
        wall = elapsed_before + time.perf_counter() - started
        if measure_now:
          result = jax.device_get(evaluate(state, train_inputs, train_labels, test_inputs, test_labels,
                                           deepfool_inputs))
          raise_if_invalid(result)
          last = {"epoch": epoch, "step": int(state.step), "lr": float(learning_rate(int(state.step) - 1)),
                  "epoch_loss": epoch_loss, "epoch_acc": epoch_acc, **result,
                  "tpt_start_epoch": meta["tpt_start_epoch"] or -1, "wall_time": wall,
                  "images_per_sec": images_per_sec}
          writer.write(last)
          log("  NC " + "  ".join(f"{k} {float(result[k]):.3e}" for k in SUMMARY_KEYS)
              + f"  test_acc {float(result['test_acc']):.4f}")
        ckpt.save(epoch, state, {**meta, "elapsed": wall})
      if stop["requested"]:
        ckpt.wait()
        raise Preempted(epoch)
  finally:
    ckpt.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return last


__all__ = ["Preempted", "train_and_evaluate"]

