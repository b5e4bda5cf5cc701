"""train_and_evaluate: train into the terminal phase and measure Neural Collapse as it happens.

One function, read top to bottom under banners: config -> mesh -> data -> program -> workdir and resume ->
loop (epoch, evaluation, checkpoint) -> summary. Everything that can be refused (config values, sizes, the
workdir) is checked before anything is written. The program (model, optimizer, jitted steps) comes from
``program``, where the run starts from (and its ``RunState``) from ``resume``, signals and mid-epoch
checkpoints from ``preemption``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nc_jax import events as events_lib, files, records as records_lib, schema
from nc_jax.data import device, stream as stream_lib
from nc_jax.metrics import DEGENERACY_KEYS, raise_if_invalid
from nc_jax.training import preemption, program as program_lib, resume, schedule
from nc_jax.training import workdir as workdir_lib
# Names other modules and tests import from here (their homes are program.py and preemption.py).
from nc_jax.training.preemption import Preempted

SUMMARY_KEYS = ("nc1", "equinorm_means", "equiangular_means", "self_duality", "ncc_mismatch")


class Diverged(FloatingPointError):
  """The training loss (or the state) became non-finite; ``last_good_epoch`` is the newest checkpoint or None.

  ``lr`` is the lr in force at the diverging epoch, ``base_lr`` the config's (before the schedule's decays);
  ``advised_lr`` is the base lr under which the same schedule gives a tenth of ``lr`` at that epoch.
  """

  def __init__(self, epoch: int, loss: float, workdir: pathlib.Path, last_good_epoch: Optional[int], lr: float,
               holds_results: bool = False, feature_decay: float = 0.0, base_lr: Optional[float] = None):
    self.epoch, self.loss, self.workdir, self.last_good_epoch, self.lr = epoch, loss, workdir, last_good_epoch, lr
    self.holds_results, self.feature_decay = holds_results, feature_decay
    self.base_lr = lr if base_lr is None else base_lr
    self.advised_lr = advised_lr(self.base_lr)
    super().__init__(self.message())

  def rerun_workdir(self, workdir=None) -> str:
    """The new workdir the advice names: ``workdir`` (default: the run's) with the advised lr appended."""
    return f"{str(workdir or self.workdir).rstrip('/')}_lr{self.advised_lr:.3g}"

  def message(self, rerun: Optional[str] = None) -> str:
    """One line: the loss, the epoch, the lr, and what to do (the only place that advice is written).

    With a last good checkpoint: go on from it in a new workdir at ``advised_lr``, given as ``rerun`` (the
    command line's whole command, ``nc_jax.cli.rerun_command``) or else as the flags to change.
    """
    head = f"training loss is {self.loss} at epoch {self.epoch} (lr {self.lr:.3g}); stopped: "
    lower = "--config.lr" + (f" (or --config.feature_decay, now {self.feature_decay:g})" if self.feature_decay else "")
    if self.last_good_epoch is None and self.holds_results:
      return head + (f"no checkpoint of this run was written before it; lower {lower} and rerun with --overwrite "
                     "(this workdir holds measurements copied by --resume_from, which the changed config discards)")
    if self.last_good_epoch is None:
      return head + (f"no checkpoint was written before it; lower {lower} and rerun (this workdir holds no "
                     "result, so the changed config is accepted)")
    rerun = rerun or (f"--workdir {self.rerun_workdir()} --resume_from {self.workdir}:{self.last_good_epoch} "
                      f"--config.lr={self.advised_lr:.3g}")
    return head + (f"the last good checkpoint is epoch {self.last_good_epoch}; to go on from it with a 10x lower lr "
                   f"(base {self.advised_lr:.3g}, so {self.lr / 10:.3g} at epoch {self.epoch}) in a new workdir: "
                   f"{rerun}")


def advised_lr(base_lr: float) -> float:
  """The base lr that gives a tenth of the lr in force at any epoch, under the same schedule.

  The schedule is lr(step) = base x factor^(decays before step), linear in base: a tenth of the base gives a
  tenth at every epoch. (A tenth of the *decayed* lr as the new base would be decayed again: 100x lower after
  one decay of 0.1, and with a factor above 1 higher than the lr that diverged.)
  """
  return base_lr / 10


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       log=print) -> Optional[dict]:
  """Runs (or resumes) the config's training in ``workdir``; returns the last evaluation's metrics."""
  # ----------------------------------------------------------------- config
  schema.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  workdir_lib.check_usable(workdir)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *args, **kwargs: None)

  # ------------------------------------------------------------------- mesh
  mesh = program_lib.data_mesh(config)

  # ------------------------------------------------------------------- data
  dataset = _dataset(config, mesh)
  steps_per_epoch = len(dataset.train_labels) // config.batch_size

  # ---------------------------------------------------------------- program
  # Built (abstractly) before anything is written, so a model the data cannot feed is refused first.
  program = program_lib.build_program(config, mesh, dataset.num_classes, dataset.input_shape, steps_per_epoch,
                                      len(dataset.train_labels))
  inputs = _inputs(config, mesh, dataset, program)

  # ----------------------------------------------------- workdir and resume
  lock = workdir_lib.Lock(workdir) if is_main else contextlib.nullcontext()
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  with lock:
    with (resume.resumed(config, workdir, program.abstract_state, stream=inputs.stream, overwrite=overwrite,
                         is_main=is_main, log=log) as (ckpts, run),
          events_lib.RunEvents(workdir, run.records, enabled=is_main and config.tensorboard, log=log) as events):
      if run.state is None:
        run.state = program.init()
      if is_main:  # derived, never read back: rewritten from the checkpoint (a damaged or edited one is replaced)
        write_tpt(workdir, run.tpt_start_epoch, config.tpt_threshold)

      # ------------------------------------------------------------------ loop
      if run.epoch >= config.num_epochs:
        log(f"already trained for {config.num_epochs} epochs; nothing to do")
      else:
        log(f"{config.model} on {config.dataset}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} "
            f"test, {dataset.num_classes} classes, {steps_per_epoch} steps/epoch, {mesh.size} device(s), "
            f"epochs {run.epoch + 1}..{config.num_epochs}")
      measure = set(schedule.measurement_epochs(config.num_epochs, config.measure_epochs))
      run.start_clocks()
      epoch_seconds = []
      with preemption.StopSignals() as stop:
        mid_epoch = None if ckpts.mid is None else preemption.MidEpoch(
            ckpts.mid, inputs.stream, run, stop, config.checkpoint_every_seconds, program_lib.run_digest(config))
        for epoch in range(run.epoch + 1, config.num_epochs + 1):
          if is_main:
            lock.check()  # DIR/lock deleted meanwhile: locked again, or this run stops if another took it
          tic = time.perf_counter()
          run.state, totals = _train_epoch(program, inputs, run, epoch, mid_epoch)
          epoch_seconds.append(time.perf_counter() - tic)
          stats = _epoch_stats(totals, program.learning_rate(int(run.state.step) - 1), epoch_seconds[-1])
          if not math.isfinite(stats.loss) or not bool(program.all_finite(run.state)):
            ckpts.epochs.wait()
            raise _diverged(config, workdir, epoch, stats, ckpts.epochs.latest_epoch())
          tpt_starts_now = run.tpt_start_epoch is None and stats.acc >= config.tpt_threshold
          if tpt_starts_now:
            run.tpt_start_epoch = epoch
            if is_main:
              write_tpt(workdir, epoch, config.tpt_threshold)
          log(_progress_line(epoch, stats, epoch_seconds, config.num_epochs))
          # Also measured at the TPT start, so Table 1's "test accuracy when TPT begins" is that epoch's.
          measure_now = epoch in measure or epoch == config.num_epochs or tpt_starts_now
          wall = run.wall()
          if measure_now:
            run.records.append(_measure(inputs.evaluate, run, epoch, stats, wall, log))
          stopping = _checkpoint(config, ckpts.epochs, run, inputs.stream, epoch, wall, measure_now, stop)
          if measure_now:
            # A record is appended only once its checkpoint is on disk (the checkpoint carries it too), so
            # records without a checkpoint mean the checkpoints were removed, never that a save failed.
            ckpts.epochs.wait()
            if is_main:
              append_record(workdir / records_lib.METRICS_FILE, run.records, log)
              events.write(run.records[-1])  # TensorBoard's copy, after the record is on disk
          if stopping:
            ckpts.epochs.wait()
            stop.raise_preempted(epoch)

    # -------------------------------------------------------------- summary
    if is_main:  # the run is done (or was already): what it found, from the records on disk
      log("\n".join(records_lib.summary(records_lib.read(workdir), workdir, config.tpt_threshold)))
  return run.records[-1] if run.records else None


# ------------------------------------------------------------------ the banners' steps

def _dataset(config, mesh):
  """The run's data (``program.load_dataset``), its sizes checked against the config and the mesh."""
  kind = program_lib.pipeline(config)
  if kind == "stream":  # a batch the processes cannot split is refused before any reading
    stream_lib.process_rows(config.batch_size, jax.process_index(), jax.process_count())
  dataset = program_lib.load_dataset(config, kind)
  schema.validate_sizes(config, num_train=len(dataset.train_labels), num_test=len(dataset.test_labels),
                        num_devices=mesh.size)
  if config.imbalance != "none" and config.minority_classes >= dataset.num_classes:
    raise schema.ConfigError(f"config.minority_classes = {config.minority_classes}: must be fewer than the "
                             f"{dataset.num_classes} classes of {config.dataset} (0 = half of them)")
  return dataset


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What the loop trains and measures on: the training set on device (in memory) or ``stream`` (a
  ``stream.TrainStream``, streamed), and ``evaluate``, state -> the measurement's dict."""

  train_inputs: Any
  train_labels: Any
  evaluate: Callable
  stream: Optional[stream_lib.TrainStream] = None


def _inputs(config, mesh, dataset, program) -> Inputs:
  """The run's ``Inputs``. Streamed runs measure from streamed batches, except with keys that need every
  feature at once (per_layer_nc, mse, minority classes): their standardised sets are read whole (small only)."""
  chosen = program_lib.deepfool_indices(config, len(dataset.test_labels))
  stream = None
  if dataset.streamed:
    stream = stream_lib.TrainStream(dataset, config.batch_size, config.seed, mesh=mesh,
                                    worker_count=config.input_workers)
    if not program.measurement.needs_every_feature:
      return Inputs(None, None, program_lib.streamed_evaluator(config, mesh, dataset, program, chosen), stream)
    host_train, host_test = stream_lib.materialise(dataset, "train"), stream_lib.materialise(dataset, "test")
  else:
    host_train, host_test = dataset.train_inputs, dataset.test_inputs
  train_inputs, train_labels, test_inputs, test_labels = (
      device.put_replicated(x, mesh) for x in (host_train, dataset.train_labels, host_test, dataset.test_labels))
  deepfool_inputs = None if chosen is None else device.put_replicated(host_test[chosen], mesh)
  evaluate = lambda state: program.evaluate(state, train_inputs, train_labels, test_inputs, test_labels,
                                            deepfool_inputs)
  return Inputs(train_inputs, train_labels, evaluate, stream)


# ------------------------------------------------------------------ one epoch

class EpochStats(NamedTuple):
  """An epoch's training loss and accuracy (means over its examples), its lr, examples and seconds."""

  loss: float
  acc: float
  lr: float
  count: int
  seconds: float

  @property
  def images_per_sec(self) -> float:
    return self.count / self.seconds


def _train_epoch(program, inputs: Inputs, run: resume.RunState, epoch: int, mid_epoch):
  """(state, summed metrics as host values) after ``epoch``: in memory, or over the stream (from a mid-epoch
  position with the sums a mid-epoch checkpoint carried)."""
  if inputs.stream is None:
    state, totals = program.train_epoch(run.state, inputs.train_inputs, inputs.train_labels, epoch)
  else:
    state, totals = _streamed_epoch(run.state, inputs.stream, epoch, program.train_step, run.resumed_totals(),
                                    None if mid_epoch is None else mid_epoch.after_step)
  return state, jax.device_get(totals)


def _epoch_stats(totals: dict, lr, seconds: float) -> EpochStats:
  count = int(totals["count"])
  return EpochStats(float(totals["loss"]) / count, float(totals["correct"]) / count, float(lr), count, seconds)


def _diverged(config, workdir: pathlib.Path, epoch: int, stats: EpochStats, last_good_epoch) -> "Diverged":
  return Diverged(epoch, stats.loss, workdir, last_good_epoch, stats.lr,
                  holds_results=workdir_lib.has_results(workdir), feature_decay=config.feature_decay,
                  base_lr=config.lr)


def _progress_line(epoch: int, stats: EpochStats, epoch_seconds: list, num_epochs: int) -> str:
  """The epoch's log line; the eta takes the median epoch, the first (compiling) left out once there are more."""
  typical = float(np.median(epoch_seconds[1:] or epoch_seconds))
  eta = typical * (num_epochs - epoch)
  return (f"epoch {epoch:4d}  loss {stats.loss:.4f}  acc {stats.acc:.4f}  lr {stats.lr:.2e}  "
          f"{stats.images_per_sec:,.0f} img/s  eta {eta:,.0f}s")


def measurement_record(result: dict, *, epoch: int, step: int, stats: EpochStats, tpt_start_epoch: Optional[int],
                       wall: float, log, who: str = "") -> dict:
  """The metrics.jsonl record of ``epoch`` from the measurement ``result`` (host values) and the epoch's training
  statistics. Invalid inputs raise (``raise_if_invalid``); degenerate geometry is logged, prefixed by ``who``."""
  raise_if_invalid(result, allow_degenerate=True)  # bad labels or data raise; degenerate geometry is logged
  degenerate = {k: int(result[k]) for k in DEGENERACY_KEYS if int(result.get(k, 0)) > 0}
  if degenerate:
    log(f"WARNING: {who}epoch {epoch}: degenerate geometry {degenerate}; the metrics it affects are NaN")
  return {"epoch": epoch, "step": step, "lr": stats.lr, "epoch_loss": stats.loss, "epoch_acc": stats.acc,
          **{k: records_lib.plain(v) for k, v in result.items()}, "tpt_start_epoch": tpt_start_epoch or -1,
          "wall_time": wall, "images_per_sec": stats.images_per_sec}


def _measure(evaluate, run: resume.RunState, epoch: int, stats: EpochStats, wall: float, log) -> dict:
  """The record of ``epoch``: its training statistics and the measurement of the state after it."""
  result = jax.device_get(evaluate(run.state))
  record = measurement_record(result, epoch=epoch, step=int(run.state.step), stats=stats,
                              tpt_start_epoch=run.tpt_start_epoch, wall=wall, log=log)
  log("  NC " + "  ".join(f"{k} {float(result[k]):.3e}" for k in SUMMARY_KEYS)
      + f"  test_acc {float(result['test_acc']):.4f}")
  return record


def _checkpoint(config, ckpt, run: resume.RunState, stream, epoch: int, wall: float, measured: bool,
                stop: preemption.StopSignals) -> bool:
  """Saves the epoch's checkpoint when it was measured, is the last, the cadence says so or a signal came
  (any process's); returns whether to stop."""
  stopping, cadence_due = preemption.agree(
      stop.requested, preemption.cadence_due(config, epoch, run.saved_epoch, run.saved_time))
  if measured or cadence_due or stopping or epoch == config.num_epochs:
    extra = {} if stream is None else {"input_state": stream.get_state()}
    ckpt.save(epoch, run.state, run.meta(wall, **extra))
    run.saved_epoch, run.saved_time = epoch, time.monotonic()
  return stopping


def write_tpt(workdir: pathlib.Path, tpt_start_epoch: Optional[int], threshold: float) -> None:
  """DIR/tpt.json: the epoch TPT started and its threshold (written whole), or no file before TPT."""
  path = workdir / "tpt.json"
  if path.is_dir():
    raise workdir_lib.WorkdirError(f"{path} is a directory, not the run's tpt.json; remove it and rerun (the run "
                                   "writes it again from its checkpoint)")
  if tpt_start_epoch is None:
    path.unlink(missing_ok=True)
  else:
    text = json.dumps({"tpt_start_epoch": tpt_start_epoch, "threshold": threshold}) + "\n"
    files.write_atomically(path, text.encode())


def _streamed_epoch(state, train_stream: stream_lib.TrainStream, epoch: int, train_step, totals=None,
                    between_steps=None):
  """``step_lib.stepwise_epoch`` over streamed global batches: the same jitted step on the same batches, so a
  streamed run's losses equal an in-memory run's with epoch_loop='steps'. Returns (state, summed metrics).

  From a mid-epoch position the stream resumes at its step and ``totals`` are the sums of the steps before
  it, so the epoch's sums are the same additions in the same order. ``between_steps(state, totals)`` runs
  after every step but the epoch's last (mid-epoch checkpoints and stops)."""
  for batch in train_stream.epoch(epoch):
    state, metrics = train_step(state, batch)
    totals = metrics if totals is None else jax.tree_util.tree_map(jnp.add, totals, metrics)
    if between_steps is not None and train_stream.get_state()["step"] > 0:
      between_steps(state, totals)
  totals["count"] = jnp.asarray(train_stream.steps_per_epoch * train_stream.batch_size, jnp.int32)
  return state, totals


def append_record(path: pathlib.Path, records: list, log) -> None:
  """Appends records[-1]; if the file lost earlier records meanwhile (deleted, truncated), rewrites them all."""
  on_disk = records_lib.read(path, repair=True)
  if [r["epoch"] for r in on_disk] == [r["epoch"] for r in records[:-1]]:
    records_lib.append(path, records[-1])
  else:
    log(f"WARNING: {path} held {len(on_disk)} of the run's {len(records) - 1} earlier measurements (removed or "
        "changed while the run went on); rewrote it from the run's own copy")
    records_lib.rewrite(path, records)


__all__ = ["Diverged", "Preempted", "train_and_evaluate"]
