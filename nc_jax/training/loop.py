"""train_and_evaluate: train into the terminal phase and measure Neural Collapse as it happens.

Banner sections: config -> mesh -> data -> workdir (lock, config.json) -> model
and optimiser -> state -> resume -> jitted steps -> loop (epoch, evaluation,
checkpoint). Everything that can be refused (config values, sizes, the workdir)
is checked before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nc_jax import data, files, models, records as records_lib, schema
from nc_jax.data import device, stream as stream_lib
from nc_jax.metrics import DEGENERACY_KEYS, raise_if_invalid
from nc_jax.training import checkpoints, evaluate as evaluate_lib, schedule, step as step_lib
from nc_jax.training import workdir as workdir_lib

SUMMARY_KEYS = ("nc1", "equinorm_means", "equiangular_means", "self_duality", "ncc_mismatch")
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
# Streamed runs also checkpoint mid-epoch (cadence, signals) into checkpoints/MID_EPOCH_DIR, keyed by the global
# step, so epoch-keyed checkpoints/ keeps meaning "the state after epoch E" for --resume_from and collect.
MID_EPOCH_DIR = "mid_epoch"
MID_EPOCH_KEEP = 2
# Multi-process runs agree on a mid-epoch stop or checkpoint every this many steps (an allgather waits for the
# step in flight, so agreeing every step would stall the input pipeline); one process checks every step.
AGREE_EVERY_STEPS = 16
# Test-only: "EPOCH:STEP" forces a mid-epoch checkpoint after that step; "EPOCH:STEP:kill" then waits for it
# to be on disk and SIGKILLs the process (a deterministic kill -9 after a mid-epoch checkpoint).
MID_EPOCH_TEST_ENV = "NC_JAX_TEST_MID_EPOCH_CHECKPOINT"


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; the state was checkpointed at the end of ``epoch`` (or, for a streamed run,
  after ``step`` steps of ``epoch``)."""

  def __init__(self, epoch: int, signal_name: str = "SIGTERM", step: Optional[int] = None):
    where = f"after epoch {epoch}" if step is None else f"in epoch {epoch} after step {step}"
    super().__init__(f"stopped by {signal_name} {where}; checkpoint saved, rerun the command to resume")
    self.epoch, self.signal_name, self.step = epoch, signal_name, step


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
    command line's whole command, ``nc_jax.train.rerun_command``) or else as the flags to change.
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


class Program(NamedTuple):
  """What a config compiles to: the model, its lr schedule, and the jitted functions of a run."""

  model: Any
  learning_rate: Any
  init: Any
  abstract_state: Any
  train_epoch: Any
  evaluate: Any
  all_finite: Any
  train_step: Any  # jitted (state, (inputs (B, ...), labels (B,))) -> (state, sums), state donated


@functools.lru_cache(maxsize=4)
def _program(config_json: str, mesh, num_classes: int, input_shape: tuple, steps_per_epoch: int,
             num_train: int = 0) -> Program:
  """Builds (and caches, so reruns in one process reuse the compiled code) a config's model and functions.

  num_train (N, the training set's size) scales feature_decay's penalty; it is needed only with it.
  """
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = models.create(config.model, num_classes, dtype=jnp.dtype(config.compute_dtype),
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.model_options.items()})
  decay_after = schedule.decay_epochs(config.num_epochs, config.lr_decay_epochs)
  learning_rate = schedule.learning_rate(config.lr, steps_per_epoch, decay_after, config.lr_decay_factor)
  tx = schedule.optimizer(config.optimizer, learning_rate, momentum=config.momentum,
                          weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps)
  loss_fn = step_lib.loss_function(config.loss)
  replicated = device.replicated(mesh)
  init = jax.jit(functools.partial(step_lib.create_state, model, tx, input_shape, config.seed),
                 out_shardings=replicated)
  abstract_state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), jax.eval_shape(init))
  train_step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                         feature_decay=config.feature_decay, num_train=num_train), donate_argnums=0)
  epoch_loop = config.epoch_loop
  if epoch_loop == "auto":
    epoch_loop = "steps" if jax.default_backend() == "cpu" and config.model != "mlp" else "scan"
  if epoch_loop == "scan":
    train_epoch = jax.jit(functools.partial(
        step_lib.train_epoch, model=model, tx=tx, loss_fn=loss_fn, batch_size=config.batch_size,
        seed=config.seed, mesh=mesh, feature_decay=config.feature_decay), donate_argnums=0)
  else:
    train_epoch = functools.partial(
        step_lib.stepwise_epoch,
        draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=config.seed,
                                               batch_size=config.batch_size, mesh=mesh)),
        step=train_step)
  evaluate = jax.jit(functools.partial(
      evaluate_lib.evaluate, model=model, loss_fn=loss_fn, num_classes=num_classes,
      batch_size=config.eval_batch_size, mesh=mesh, per_layer=config.per_layer_nc,
      mse_weight_decay=config.weight_decay if config.loss == "mse" else None,
      minority_classes=_minority_classes(config, num_classes), eval_dtype=config.eval_dtype))
  all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(
      tree) if jnp.issubdtype(x.dtype, jnp.inexact)])))
  return Program(model, learning_rate, init, abstract_state, train_epoch, evaluate, all_finite, train_step)


def _minority_classes(config, num_classes: int) -> tuple:
  """The classes an imbalanced run keeps fewer of (the last minority_classes, or the last half); () if balanced."""
  if config.imbalance == "none" or config.imbalance_ratio == 1:
    return ()
  return tuple(range(num_classes - (config.minority_classes or num_classes // 2), num_classes))


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _compiled_json(config: ml_collections.ConfigDict) -> str:
  """The config without ``schema.PROGRAM_NEUTRAL_KEYS``, as sorted JSON: what a run's compiled functions
  depend on; ``build_program`` caches on it and ``_run_digest`` hashes it."""
  neutral = schema.PROGRAM_NEUTRAL_KEYS
  return json.dumps({k: v for k, v in _config_dict(config).items() if k not in neutral}, sort_keys=True)


def _load_dataset(config, pipeline: str = "memory"):
  """The in-memory ``data.Dataset``, or with pipeline 'stream' a ``stream.StreamedDataset`` (same subset, stats)."""
  per_class = schema.parse_per_class(config.per_class)
  if pipeline == "stream":
    return stream_lib.open_dataset(
        config.dataset, source=config.data_source, data_dir=config.data_dir or None, per_class=per_class,
        standardization=config.standardization, seed=config.data_seed, imbalance=config.imbalance,
        imbalance_ratio=config.imbalance_ratio, minority_classes=config.minority_classes,
        random_label_fraction=config.random_label_fraction, worker_count=config.input_workers)
  return data.load(config.dataset, source=config.data_source, data_dir=config.data_dir or None,
                   per_class=per_class, standardization=config.standardization, seed=config.data_seed,
                   imbalance=config.imbalance, imbalance_ratio=config.imbalance_ratio,
                   minority_classes=config.minority_classes, random_label_fraction=config.random_label_fraction)


def _pipeline(config) -> str:
  """'memory' or 'stream': ``config.input_pipeline``, with 'auto' decided by the size of the data it keeps."""
  return stream_lib.choose_pipeline(config.input_pipeline, config.dataset, schema.parse_per_class(config.per_class))


def load_dataset(config: ml_collections.ConfigDict):
  """A run's data, as ``train_and_evaluate`` loads it for ``config``: the in-memory ``data.Dataset``, or a
  ``stream.StreamedDataset`` (same subset and statistics, read batch by batch) where the run streams
  (``config.input_pipeline``; 'auto' streams what does not fit in memory)."""
  pipeline = _pipeline(config)
  return _load_dataset(config, pipeline)


def build_program(config: ml_collections.ConfigDict, mesh, num_classes: int, input_shape: tuple,
                  steps_per_epoch: int, num_train: int = 0) -> Program:
  """A config's ``Program`` (model, lr schedule, jitted init/steps/evaluation, the state's abstract shapes
  with their shardings on ``mesh``), exactly as ``train_and_evaluate`` builds it: from the config without
  ``schema.PROGRAM_NEUTRAL_KEYS``, cached per (config, mesh, shapes). input_shape is one example's (no batch axis);
  num_train (N) is needed only with ``feature_decay``."""
  return _program(_compiled_json(config), mesh, num_classes, tuple(input_shape), steps_per_epoch, num_train)


def _resume_source(spec: str) -> tuple[pathlib.Path, Optional[int]]:
  directory, _, epoch = spec.rpartition(":") if ":" in spec and spec.rpartition(":")[2].isdigit() else (spec, "", "")
  return pathlib.Path(directory).absolute(), int(epoch) if epoch else None


def _agree(stop_requested: bool, checkpoint_due: bool) -> tuple[bool, bool]:
  """Multi-process runs act together: stop if any process was signalled; checkpoint when process 0's clock says."""
  if jax.process_count() == 1:
    return stop_requested, checkpoint_due
  from jax.experimental import multihost_utils
  votes = np.asarray(multihost_utils.process_allgather(np.array([stop_requested, checkpoint_due], np.int32)))
  return bool(votes[:, 0].any()), bool(votes[0, 1])


@contextlib.contextmanager
def _stop_on_signals(stop: dict):
  """SIGTERM and SIGINT ask the loop to checkpoint and stop after the current epoch; a second one aborts."""
  def handler(signum, frame):
    if stop["signal"] is not None:  # asked twice: stop now
      raise KeyboardInterrupt
    stop["signal"] = STOP_SIGNALS[signum]

  previous = {}
  try:
    for signum in STOP_SIGNALS:
      previous[signum] = signal.signal(signum, handler)
  except ValueError:  # not the main thread: signals stay as they are
    pass
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


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
  if config.num_devices and jax.process_count() > 1:
    raise schema.ConfigError(f"config.num_devices = {config.num_devices}: must be 0 (every device) in a "
                             f"multi-process run ({jax.process_count()} processes)")
  mesh = device.data_mesh(jax.devices()[: config.num_devices] if config.num_devices else None)

  # ------------------------------------------------------------------- data
  pipeline = _pipeline(config)
  if pipeline == "stream":  # a batch the processes cannot split is refused before any reading
    stream_lib.process_rows(config.batch_size, jax.process_index(), jax.process_count())
  dataset = _load_dataset(config, pipeline)
  schema.validate_sizes(config, num_train=len(dataset.train_labels), num_test=len(dataset.test_labels),
                        num_devices=mesh.size)
  num_classes = dataset.num_classes
  if config.imbalance != "none" and config.minority_classes >= num_classes:
    raise schema.ConfigError(f"config.minority_classes = {config.minority_classes}: must be fewer than the "
                             f"{num_classes} classes of {config.dataset} (0 = half of them)")
  steps_per_epoch = len(dataset.train_labels) // config.batch_size

  # ----------------------------------- model, optimiser, state, jitted steps
  # Built (abstractly) before anything is written, so a model the data cannot feed is refused first.
  program = build_program(config, mesh, num_classes, dataset.input_shape, steps_per_epoch,
                          len(dataset.train_labels))

  # ---------------------------------------------------------------- workdir
  lock = workdir_lib.Lock(workdir) if is_main else contextlib.nullcontext()
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  with lock:
    last = _train(config, workdir, mesh, dataset, program, num_classes, steps_per_epoch, is_main, log,
                  overwrite=overwrite, lock=lock if is_main else None)
    if is_main:  # the run is done (or was already): what it found, from the records on disk
      log("\n".join(records_lib.summary(records_lib.read(workdir), workdir, config.tpt_threshold)))
    return last


def _train(config, workdir: pathlib.Path, mesh, dataset, program, num_classes: int, steps_per_epoch: int,
           is_main: bool, log, *, overwrite: bool = False, lock=None) -> Optional[dict]:
  metrics_path = workdir / records_lib.METRICS_FILE
  streamed = isinstance(dataset, stream_lib.StreamedDataset)
  train_stream = None
  chosen = np.sort(np.random.default_rng(config.seed).choice(len(dataset.test_labels), config.deepfool_samples,
                                                              replace=False)) if config.deepfool_samples else None
  evaluate_now = None
  if streamed:
    train_stream = stream_lib.TrainStream(dataset, config.batch_size, config.seed, mesh=mesh,
                                          worker_count=config.input_workers)
    if config.per_layer_nc or config.loss == "mse" or _minority_classes(config, num_classes):
      # These keys need every feature at once: the standardised sets are read whole (small sets only).
      host_train, host_test = stream_lib.materialise(dataset, "train"), stream_lib.materialise(dataset, "test")
    else:  # two streamed passes over the training set, one over the test set (evaluate.StreamedEvaluator)
      host_train = host_test = None
      evaluate_now = _streamed_evaluation(config, mesh, dataset, program, num_classes, chosen)
  else:
    host_train, host_test = dataset.train_inputs, dataset.test_inputs
  train_inputs = train_labels = test_inputs = test_labels = deepfool_inputs = None
  if evaluate_now is None:
    train_inputs, train_labels, test_inputs, test_labels = (
        device.put_replicated(x, mesh) for x in (host_train, dataset.train_labels, host_test, dataset.test_labels))
    if chosen is not None:
      deepfool_inputs = device.put_replicated(host_test[chosen], mesh)
    evaluate_now = lambda state: program.evaluate(state, train_inputs, train_labels, test_inputs, test_labels,
                                                  deepfool_inputs)

  abstract_state = program.abstract_state

  # ----------------------------------------------------------------- resume
  # Every refusal comes before anything in the workdir changes: the plan (config.json against the config), then
  # the starting state (restored and verified, from this workdir or from --resume_from's), then the plan is
  # carried out (results discarded, config.json written).
  resolved = _config_dict(config)
  restart_epoch = _restart_epoch(config, workdir, resolved)
  restored, resumed_from = None, None
  if restart_epoch is not None:  # the epoch restarted from is there and fits this config: else nothing to plan
    restored, resumed_from = _restore_other(config.resume_from, abstract_state, resolved), config.resume_from
    _refuse_nothing_to_train(config, restored[0])
  plan = workdir_lib.plan(workdir, resolved, overwrite=overwrite, restart_epoch=restart_epoch)
  ckpt = mid_ckpt = None
  try:
    if plan.restart_epoch is not None:
      pass
    elif plan.discard:  # this workdir's checkpoints are not resumed
      if config.resume_from:
        restored, resumed_from = _restore_other(config.resume_from, abstract_state, resolved), config.resume_from
        _refuse_nothing_to_train(config, restored[0])
    else:
      ckpt = checkpoints.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
      restored = ckpt.restore_latest(abstract_state)
      if streamed:
        mid_ckpt = checkpoints.Checkpoints(workdir / "checkpoints" / MID_EPOCH_DIR, keep=MID_EPOCH_KEEP)
        restored = _newer_mid_epoch(mid_ckpt, abstract_state, restored, log, _run_digest(config))
      if restored is not None:
        _check_config(config, workdir, restored, resolved, plan)
      elif config.resume_from:
        restored, resumed_from = _restore_other(config.resume_from, abstract_state, resolved), config.resume_from
        _refuse_nothing_to_train(config, restored[0])
      if restored is None and records_lib.read(metrics_path):
        found = records_lib.read(metrics_path)
        raise workdir_lib.WorkdirError(
            f"{metrics_path} holds {len(found)} measurements (up to epoch {found[-1]['epoch']}) but there is no "
            f"checkpoint to resume from in {ckpt.directory}; rerun with --overwrite to start again "
            "(the measurements are deleted), or use another --workdir")
    if not plan.config_readable and restored is not None and plan.note is None:
      log(f"note: {workdir / records_lib.CONFIG_FILE} was missing or damaged; written again from this command, "
          f"whose config is the one its checkpoint of epoch {restored[0]} was trained with")
    if is_main:
      workdir_lib.apply(workdir, plan, resolved, log=log)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("nc_jax: workdir ready")
    if ckpt is None:  # opened after the plan removed what it discards
      ckpt = checkpoints.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
      if streamed:
        mid_ckpt = checkpoints.Checkpoints(workdir / "checkpoints" / MID_EPOCH_DIR, keep=MID_EPOCH_KEEP)
    records = records_lib.read(metrics_path, repair=is_main)

    if resumed_from is not None and plan.restart_epoch is not None:
      log(f"restarting this run from its checkpoint of epoch {restored[0]}, with its "
          f"{len(restored[2].get('records', []))} measurements so far")
    elif resumed_from is not None:
      log(f"starting from epoch {restored[0]} of {resumed_from}, with its "
          f"{len(restored[2].get('records', []))} measurements so far")
    elif restored is not None and not restored[2].get("epoch_totals"):
      log(f"resumed from the checkpoint of epoch {restored[0]} in {ckpt.directory}")
    if restored is None:
      start_epoch, state, meta = 0, program.init(), {"tpt_start_epoch": None, "elapsed": 0.0, "records": []}
    else:
      start_epoch, state, meta = restored
      meta.setdefault("records", [r for r in records if r["epoch"] <= start_epoch])
      if train_stream is not None:  # the input's own position, saved with the state (epoch ends: (epoch + 1, 0))
        train_stream.set_state(meta.get("input_state") or {"epoch": start_epoch + 1, "step": 0})
      records = _reconcile(metrics_path, records, meta["records"], start_epoch, is_main,
                           log if resumed_from is None else lambda *a, **k: None)
    if is_main:  # derived, never read back: rewritten from the checkpoint (a damaged or edited one is replaced)
      _write_tpt(workdir, meta.get("tpt_start_epoch"), config.tpt_threshold)
    return _loop(config, workdir, ckpt, state, meta, records, start_epoch, mesh, program, num_classes,
                 steps_per_epoch, dataset, (train_inputs, train_labels, evaluate_now), is_main, log, train_stream,
                 mid_ckpt, lock)
  finally:
    failing = sys.exc_info()[0] is not None
    try:
      if mid_ckpt is not None:
        mid_ckpt.close(quiet=failing)
    finally:
      if ckpt is not None:
        ckpt.close(quiet=failing)


def _refuse_nothing_to_train(config, epoch: int) -> None:
  """A --resume_from at or past num_epochs would train nothing and only put this config's name on the
  source's measurements: refused."""
  if epoch >= config.num_epochs:
    raise workdir_lib.WorkdirError(
        f"--resume_from {config.resume_from}: its checkpoint of epoch {epoch} is at or past config.num_epochs = "
        f"{config.num_epochs}, so nothing would be trained; raise --config.num_epochs to go on from it, or resume "
        "from an earlier epoch")


def _same_directory(a: pathlib.Path, b: pathlib.Path) -> bool:
  """True if ``a`` and ``b`` name one directory (through links and relative parts too)."""
  try:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
  except OSError:
    return False


def _restart_epoch(config, workdir: pathlib.Path, resolved: dict) -> Optional[int]:
  """EPOCH of an in-place restart (``--resume_from`` naming this workdir), else None.

  Rerunning the restart's own command (config.json holds the same config and resume_from) resumes the
  restarted run: None too. Without EPOCH the restart is refused: the latest checkpoint is what a plain
  rerun resumes, and which epoch to go back to is the user's to say.
  """
  if not config.resume_from:
    return None
  directory, epoch = _resume_source(config.resume_from)
  if not _same_directory(directory, workdir):
    return None
  if epoch is None:
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    raise workdir_lib.WorkdirError(
        f"--resume_from {config.resume_from} names this workdir: add the epoch to restart from "
        f"(--resume_from {config.resume_from}:EPOCH, EPOCH one of {saved}), or leave --resume_from out to resume "
        "its latest checkpoint")
  previous = workdir_lib.read_previous_config(workdir)
  if previous is None:  # config.json lost: the newest checkpoint's config digest says whether this is the rerun
    return None if workdir_lib.newest_config_digest(workdir)[1] == schema.config_digest(resolved) else epoch
  if previous.get("resume_from") and not schema.changed_keys(previous, resolved):
    before, before_epoch = _resume_source(previous["resume_from"])
    if before_epoch == epoch and _same_directory(before, workdir):
      return None
  return epoch


def _check_config(config, workdir: pathlib.Path, restored, resolved: dict, plan) -> None:
  """Refuses a checkpoint of this workdir written under another config than ``resolved`` (config.json missing,
  damaged, edited or replaced), except the one an in-place restart (resume_from DIR:EPOCH) starts from."""
  epoch, _, meta = restored
  if config.resume_from:
    directory, start = _resume_source(config.resume_from)
    if start == epoch and _same_directory(directory, workdir) and "epoch_totals" not in meta:
      return
  problem = workdir_lib.config_mismatch(workdir, epoch, meta.get("config_digest"), resolved, plan.config_readable)
  if problem:
    raise workdir_lib.WorkdirError(problem)


def _write_tpt(workdir: pathlib.Path, tpt_start_epoch: Optional[int], threshold: float) -> None:
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


def _run_digest(config) -> str:
  """sha256 of the config keys the compiled functions depend on: a mid-epoch checkpoint of another is ignored
  (every checkpoint also carries ``schema.config_digest``, which ``_check_config`` compares with the config)."""
  return hashlib.sha256(_compiled_json(config).encode()).hexdigest()


def _newer_mid_epoch(mid_ckpt, abstract_state, restored, log, digest: str):
  """The newest good mid-epoch checkpoint as (epoch done, state, meta) if it is past ``restored``'s epoch end.

  Its meta holds input_state {'epoch': e, 'step': s} (s of e's steps done) and ``epoch_totals``, the sums of
  e's training metrics so far; it resumes as "epoch e - 1 done" with the stream and the sums at step s.
  """
  partial = mid_ckpt.restore_latest(abstract_state)
  if partial is None:
    return restored
  _, state, meta = partial
  position = meta["input_state"]
  if restored is not None and position["epoch"] - 1 < restored[0]:
    return restored  # an epoch-end checkpoint was written after it
  if meta.get("run") != digest:
    log(f"WARNING: ignoring the mid-epoch checkpoints in {mid_ckpt.directory}: written under another config")
    return restored
  log(f"resumed from the mid-epoch checkpoint of epoch {position['epoch']} step {position['step']} in "
      f"{mid_ckpt.directory}")
  return position["epoch"] - 1, state, meta


def _restore_other(spec: str, abstract_state, resolved: dict):
  """(epoch, state, meta) of the checkpoint ``spec`` ('DIR[:EPOCH]') names, for a run of config ``resolved``.

  Refused (WorkdirError) where it is missing or damaged, its shapes differ, or its run read other data
  (``schema.DATA_KEYS``, against the source's config.json verified by its checkpoints' digest): the records
  carried over would then come from other data than the rest of the run's.
  """
  directory, epoch = _resume_source(spec)
  if not (directory / "checkpoints").is_dir():
    raise workdir_lib.WorkdirError(f"--resume_from {spec}: {directory / 'checkpoints'} does not exist")
  try:
    source = workdir_lib.verified_config(directory)
  except workdir_lib.WorkdirError as error:
    raise workdir_lib.WorkdirError(f"--resume_from {spec}: its data cannot be checked: {error}") from None
  changed = schema.data_changes(source, resolved)
  if changed:
    raise workdir_lib.WorkdirError(
        f"--resume_from {spec}: this config reads other data than that run ({', '.join(changed)}); --resume_from "
        "can change the lr, the schedule and what is measured, not the data: keep its values, or start a new run")
  other = checkpoints.Checkpoints(directory / "checkpoints", read_only=True)
  try:
    if epoch is not None and epoch not in other.epochs():
      raise workdir_lib.WorkdirError(f"--resume_from {spec}: no checkpoint of epoch {epoch} there; "
                                     f"it has epochs {other.epochs()}")
    try:
      restored = other.restore_latest(abstract_state, before=epoch)
    except ValueError as error:
      raise workdir_lib.WorkdirError(
          f"--resume_from {spec}: {str(error).splitlines()[0]}. --resume_from can change the lr, the schedule "
          "and what is measured, not the model's shapes or the optimizer: start a new run instead") from None
  finally:
    other.close()
  if restored is None or (epoch is not None and restored[0] != epoch):
    raise workdir_lib.WorkdirError(f"--resume_from {spec}: no good checkpoint there"
                                   + ("" if epoch is None else f" of epoch {epoch}")
                                   + " (damaged, or its model differs from this config's)")
  return restored


def _reconcile(path: pathlib.Path, on_disk: list, in_checkpoint: list, start_epoch: int, is_main: bool, log) -> list:
  """The records up to the resumed epoch: the checkpoint's copy (verified by its checksum) wherever the file's
  differ from it, lost or changed (compared as canonical JSON, so NaN equals NaN)."""
  kept = [r for r in on_disk if r["epoch"] <= start_epoch]
  backup = [r for r in in_checkpoint if r["epoch"] <= start_epoch]
  canonical = lambda rs: [json.dumps(r, sort_keys=True) for r in rs]
  if [r["epoch"] for r in kept] != [r["epoch"] for r in backup]:
    if len(backup) > len(kept):
      log(f"WARNING: {path} lacked {len(backup) - len(kept)} of the {len(backup)} measurements up to epoch "
          f"{start_epoch}; restored them from the checkpoint")
    kept = backup
  elif canonical(kept) != canonical(backup):
    changed = [b["epoch"] for a, b in zip(canonical(kept), backup) if a != json.dumps(b, sort_keys=True)]
    log(f"WARNING: {path}: the measurements of epochs {changed} differ from the checkpoint's copy (edited or "
        "damaged); rewrote them from the checkpoint")
    kept = backup
  if is_main and kept != on_disk:
    records_lib.rewrite(path, kept)  # later records are re-measured, bit for bit, as training passes them
  return kept


def _loop(config, workdir, ckpt, state, meta, records, start_epoch, mesh, program, num_classes, steps_per_epoch,
          dataset, arrays, is_main, log, train_stream=None, mid_ckpt=None, lock=None) -> Optional[dict]:
  train_inputs, train_labels, evaluate_now = arrays
  if start_epoch >= config.num_epochs:
    log(f"already trained for {config.num_epochs} epochs; nothing to do")
    return records[-1] if records else None
  train_epoch, all_finite, learning_rate = program.train_epoch, program.all_finite, program.learning_rate
  measure = set(schedule.measurement_epochs(config.num_epochs, config.measure_epochs))

  # ------------------------------------------------------------------- loop
  stop = {"signal": None}
  log(f"{config.model} on {config.dataset}: {len(dataset.train_labels)} train / {len(dataset.test_labels)} test, "
      f"{num_classes} classes, {steps_per_epoch} steps/epoch, {mesh.size} device(s), "
      f"epochs {start_epoch + 1}..{config.num_epochs}")
  last = records[-1] if records else None
  started = time.perf_counter()
  elapsed_before = float(meta.get("elapsed", 0.0))
  last_saved_epoch, last_saved_time = start_epoch, time.monotonic()
  epoch_seconds = []
  # A mid-epoch checkpoint's sums of its epoch's training metrics so far, as the host values they had.
  resumed_totals = {k: np.asarray(v["value"], v["dtype"]) for k, v in (meta.pop("epoch_totals", None) or {}).items()}
  meta.pop("input_state", None), meta.pop("run", None)
  test_position = os.environ.get(MID_EPOCH_TEST_ENV, "").split(":")
  run_digest = _run_digest(config)
  # Every checkpoint names the config that wrote it: a workdir whose config.json is missing, damaged or edited
  # resumes it only under that config (_check_config).
  meta["config_digest"] = schema.config_digest(_config_dict(config))

  def mid_epoch(state, totals):
    """After a step that is not an epoch's last: checkpoint (cadence, test hook) and stop (signals) here."""
    nonlocal last_saved_time
    position = train_stream.get_state()
    forced = test_position[:2] == [str(position["epoch"]), str(position["step"])]
    if not forced and jax.process_count() > 1 and position["step"] % AGREE_EVERY_STEPS:
      return
    every_seconds = config.checkpoint_every_seconds
    due = forced or bool(every_seconds and time.monotonic() - last_saved_time >= every_seconds)
    stopping, due = _agree(stop["signal"] is not None, due)
    if not (stopping or due):
      return
    wall = elapsed_before + time.perf_counter() - started
    totals = {k: {"value": np.asarray(v).item(), "dtype": str(np.asarray(v).dtype)}
              for k, v in jax.device_get(totals).items()}
    mid_ckpt.save(int(state.step), state, {**meta, "elapsed": wall, "records": records, "input_state": position,
                                           "epoch_totals": totals, "run": run_digest})
    last_saved_time = time.monotonic()
    if forced and test_position[2:] == ["kill"]:
      mid_ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if stopping:
      mid_ckpt.wait()
      raise Preempted(position["epoch"], stop["signal"] or "a signal to another process", position["step"])

  with _stop_on_signals(stop):
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      tic = time.perf_counter()
      if lock is not None:
        lock.check()  # DIR/lock deleted meanwhile: locked again, or this run stops if another took it
      if train_stream is None:
        state, totals = train_epoch(state, train_inputs, train_labels, epoch)
      else:
        state, totals = _streamed_epoch(state, train_stream, epoch, program.train_step, resumed_totals or None,
                                        mid_epoch if mid_ckpt is not None else None)
        resumed_totals = None
      totals = jax.device_get(totals)
      seconds = time.perf_counter() - tic
      epoch_seconds.append(seconds)
      count = int(totals["count"])
      epoch_loss, epoch_acc = float(totals["loss"]) / count, float(totals["correct"]) / count
      lr = float(learning_rate(int(state.step) - 1))
      if not math.isfinite(epoch_loss) or not bool(all_finite(state)):
        ckpt.wait()
        raise Diverged(epoch, epoch_loss, workdir, ckpt.latest_epoch(), lr,
                       holds_results=workdir_lib.has_results(workdir), feature_decay=config.feature_decay,
                       base_lr=config.lr)
      tpt_starts_now = meta["tpt_start_epoch"] is None and epoch_acc >= config.tpt_threshold
      if tpt_starts_now:
        meta["tpt_start_epoch"] = epoch
        if is_main:
          _write_tpt(workdir, epoch, config.tpt_threshold)
      images_per_sec = count / seconds
      typical = float(np.median(epoch_seconds[1:] or epoch_seconds))
      eta = typical * (config.num_epochs - epoch)
      log(f"epoch {epoch:4d}  loss {epoch_loss:.4f}  acc {epoch_acc:.4f}  lr {lr:.2e}  "
          f"{images_per_sec:,.0f} img/s  eta {eta:,.0f}s")

      # Also measured at the TPT start, so Table 1's "test accuracy when TPT begins" is that epoch's.
      measure_now = epoch in measure or epoch == config.num_epochs or tpt_starts_now
      wall = elapsed_before + time.perf_counter() - started
      if measure_now:
        result = jax.device_get(evaluate_now(state))
        raise_if_invalid(result, allow_degenerate=True)  # bad labels or data raise; degenerate geometry is logged
        degenerate = {k: int(result[k]) for k in DEGENERACY_KEYS if int(result.get(k, 0)) > 0}
        if degenerate:
          log(f"WARNING: epoch {epoch}: degenerate geometry {degenerate}; the metrics it affects are NaN")
        last = {"epoch": epoch, "step": int(state.step), "lr": lr, "epoch_loss": epoch_loss, "epoch_acc": epoch_acc,
                **{k: records_lib.plain(v) for k, v in result.items()},
                "tpt_start_epoch": meta["tpt_start_epoch"] or -1, "wall_time": wall,
                "images_per_sec": images_per_sec}
        records.append(last)
        log("  NC " + "  ".join(f"{k} {float(result[k]):.3e}" for k in SUMMARY_KEYS)
            + f"  test_acc {float(result['test_acc']):.4f}")
      every_epochs, every_seconds = config.checkpoint_every_epochs, config.checkpoint_every_seconds
      cadence_due = ((every_epochs and epoch - last_saved_epoch >= every_epochs)
                     or (every_seconds and time.monotonic() - last_saved_time >= every_seconds))
      stopping, cadence_due = _agree(stop["signal"] is not None, bool(cadence_due))
      if measure_now or cadence_due or stopping or epoch == config.num_epochs:
        input_state = {} if train_stream is None else {"input_state": train_stream.get_state()}
        ckpt.save(epoch, state, {**meta, "elapsed": wall, "records": records, **input_state})
        last_saved_epoch, last_saved_time = epoch, time.monotonic()
      if measure_now:
        # A record is appended only once its checkpoint is on disk (the checkpoint carries it too), so
        # records without a checkpoint mean the checkpoints were removed, never that a save failed.
        ckpt.wait()
        if is_main:
          _append_record(workdir / records_lib.METRICS_FILE, records, log)
      if stopping:
        ckpt.wait()
        raise Preempted(epoch, stop["signal"] or "a signal to another process")
  return last


def _streamed_evaluation(config, mesh, dataset, program, num_classes: int, chosen):
  """state -> the measurement's dict, from streamed batches (``evaluate.StreamedEvaluator``)."""
  evaluator = evaluate_lib.StreamedEvaluator(model=program.model, loss_fn=step_lib.loss_function(config.loss),
                                             num_classes=num_classes, mesh=mesh, eval_dtype=config.eval_dtype)
  feature_dim = jax.eval_shape(lambda variables: program.model.apply(
      variables, jnp.zeros((1, *dataset.input_shape)), train=False), program.abstract_state.variables)[1].shape[-1]
  deepfool_inputs = None
  if chosen is not None:
    images = [image for image, _ in dataset.test_source.read(chosen)]
    deepfool_inputs = device.put_replicated(dataset.transform.batch(images), mesh)

  def batches(split):
    return stream_lib.eval_batches(dataset, split, config.eval_batch_size, mesh=mesh,
                                   worker_count=config.input_workers)

  return lambda state: evaluator(state, batches, feature_dim, deepfool_inputs)


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


def _append_record(path: pathlib.Path, records: list, log) -> None:
  """Appends records[-1]; if the file lost earlier records meanwhile (deleted, truncated), rewrites them all."""
  on_disk = records_lib.read(path, repair=True)
  if [r["epoch"] for r in on_disk] == [r["epoch"] for r in records[:-1]]:
    records_lib.append(path, records[-1])
  else:
    log(f"WARNING: {path} held {len(on_disk)} of the run's {len(records) - 1} earlier measurements (removed or "
        "changed while the run went on); rewrote it from the run's own copy")
    records_lib.rewrite(path, records)


__all__ = ["Diverged", "Preempted", "train_and_evaluate"]
