"""Where a run starts: fresh, from this workdir's newest checkpoint (epoch end or mid-epoch), or from another
run's (``--resume_from DIR[:EPOCH]``, an in-place restart when DIR is this workdir).

Every refusal comes before anything in the workdir changes: the plan (config.json against the config), then
the starting state (restored and verified), then the plan is carried out (results discarded, config.json
written). ``resumed`` yields the run's checkpoint managers and its ``RunState``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import time
from typing import Any, Iterator, Optional

import numpy as np

from nc_jax import multihost, records as records_lib, schema
from nc_jax.training import checkpoints, preemption, program as program_lib, workdir as workdir_lib

# The meta keys RunState holds; a checkpoint's others (an older version's) are saved again as they were.
_META_KEYS = ("tpt_start_epoch", "elapsed", "records", "config_digest", "input_state", "epoch_totals", "run",
              "sha256")


@dataclasses.dataclass
class RunState:
  """What a run carries from epoch to epoch, and what its checkpoints' meta hold.

  ``epoch`` epochs are done and ``state`` (the TrainState) is after them; ``records`` are the measurements so
  far; ``elapsed_before`` the wall seconds of this run's earlier processes. A run resumed from a mid-epoch
  checkpoint also has ``input_state`` (the stream's position) and ``epoch_totals`` (host sums of the epoch's
  training metrics so far). ``saved_epoch`` / ``saved_time`` (time.monotonic) say when it last checkpointed.
  """

  epoch: int
  state: Any
  records: list
  tpt_start_epoch: Optional[int] = None
  elapsed_before: float = 0.0
  config_digest: Optional[str] = None
  input_state: Optional[dict] = None
  epoch_totals: Optional[dict] = None
  carried: dict = dataclasses.field(default_factory=dict)
  started: float = 0.0
  saved_epoch: int = 0
  saved_time: float = 0.0

  def start_clocks(self) -> None:
    """The loop begins: wall time counts from now, and so does the checkpoint cadence."""
    self.started, self.saved_epoch, self.saved_time = time.perf_counter(), self.epoch, time.monotonic()

  def wall(self) -> float:
    """Seconds of training so far, over every process of this run."""
    return self.elapsed_before + time.perf_counter() - self.started

  def meta(self, wall: float, **extra) -> dict:
    """A checkpoint's meta at wall time ``wall``: the TPT start, elapsed seconds, records, config digest."""
    return {**self.carried, "tpt_start_epoch": self.tpt_start_epoch, "elapsed": wall, "records": self.records,
            "config_digest": self.config_digest, **extra}

  def resumed_totals(self):
    """The epoch sums a mid-epoch checkpoint carried, as the host values they had (once; then None)."""
    totals, self.epoch_totals = self.epoch_totals, None
    return {k: np.asarray(v["value"], v["dtype"]) for k, v in totals.items()} if totals else None


class RunCheckpoints:
  """The checkpoint managers of a run: ``epochs`` (checkpoints/, keyed by epoch) and, for a streamed run,
  ``mid`` (checkpoints/MID_EPOCH_DIR, keyed by global step); either None until opened."""

  def __init__(self, workdir: pathlib.Path, keep: int, streamed: bool):
    self.directory, self.keep, self.streamed = workdir / "checkpoints", keep, streamed
    self.epochs: Optional[checkpoints.Checkpoints] = None
    self.mid: Optional[checkpoints.Checkpoints] = None

  def open(self) -> None:
    if self.epochs is None:
      self.epochs = checkpoints.Checkpoints(self.directory, keep=self.keep)
    if self.streamed and self.mid is None:
      self.mid = checkpoints.Checkpoints(self.directory / preemption.MID_EPOCH_DIR, keep=preemption.MID_EPOCH_KEEP)

  def close(self, *, quiet: bool = False) -> None:
    """Waits for pending saves and closes; ``quiet`` drops a save failure (another error is on its way)."""
    try:
      if self.mid is not None:
        self.mid.close(quiet=quiet)
    finally:
      if self.epochs is not None:
        self.epochs.close(quiet=quiet)


@contextlib.contextmanager
def resumed(config, workdir: pathlib.Path, abstract_state, *, stream=None, overwrite: bool = False,
            is_main: bool = True, log=print) -> Iterator[tuple[RunCheckpoints, RunState]]:
  """The run's (checkpoints, RunState), its workdir made ready for it; the checkpoints closed on leaving.

  ``stream``: a streamed run's ``stream.TrainStream``, set to the resumed position.
  """
  resolved = program_lib.config_values(config)
  restart_epoch = _restart_epoch(config, workdir, resolved)
  restarted = None
  if restart_epoch is not None:  # the epoch restarted from is there and fits this config: else nothing to plan
    restarted = _restore_other(config, abstract_state, resolved)
  plan = workdir_lib.plan(workdir, resolved, overwrite=overwrite, restart_epoch=restart_epoch)
  ckpts = RunCheckpoints(workdir, config.keep_checkpoints, streamed=stream is not None)
  try:
    if restarted is not None:
      restored, from_other = restarted, True
    else:
      restored, from_other = _restore(config, workdir, abstract_state, resolved, plan, ckpts, log)
    if not plan.config_readable and restored is not None and plan.note is None:
      log(f"note: {workdir / records_lib.CONFIG_FILE} was missing or damaged; written again from this command, "
          f"whose config is the one its checkpoint of epoch {restored[0]} was trained with")
    if is_main:
      workdir_lib.apply(workdir, plan, resolved, log=log)
    multihost.sync("nc_jax: workdir ready")
    ckpts.open()  # what was not opened above is opened after the plan removed what it discards
    run = _run_state(config, workdir, restored, from_other, plan, ckpts, stream, is_main, log)
    run.config_digest = schema.config_digest(resolved)
    yield ckpts, run
  except BaseException:
    ckpts.close(quiet=True)
    raise
  ckpts.close()


def _restore(config, workdir: pathlib.Path, abstract_state, resolved: dict, plan, ckpts: RunCheckpoints, log):
  """(restored (epoch, state, meta) or None, True if it is another run's) for a start that is not a restart."""
  if plan.discard:  # this workdir's checkpoints are not resumed
    return (_restore_other(config, abstract_state, resolved), True) if config.resume_from else (None, False)
  ckpts.open()
  restored = ckpts.epochs.restore_latest(abstract_state)
  if ckpts.mid is not None:
    restored = _newer_mid_epoch(ckpts.mid, abstract_state, restored, log, program_lib.run_digest(config))
  if restored is not None:
    _check_config(config, workdir, restored, resolved, plan)
    return restored, False
  if config.resume_from:
    return _restore_other(config, abstract_state, resolved), True
  metrics_path = workdir / records_lib.METRICS_FILE
  found = records_lib.read(metrics_path)
  if found:
    raise workdir_lib.WorkdirError(
        f"{metrics_path} holds {len(found)} measurements (up to epoch {found[-1]['epoch']}) but there is no "
        f"checkpoint to resume from in {ckpts.epochs.directory}; rerun with --overwrite to start again "
        "(the measurements are deleted), or use another --workdir")
  return None, False


def _run_state(config, workdir, restored, from_other: bool, plan, ckpts: RunCheckpoints, stream, is_main: bool,
               log) -> RunState:
  """The RunState to go on from: fresh (epoch 0, ``init`` left to the caller: state None) or ``restored``,
  whose records are reconciled with metrics.jsonl (the checkpoint's copy wins)."""
  metrics_path = workdir / records_lib.METRICS_FILE
  records = records_lib.read(metrics_path, repair=is_main)
  if from_other and plan.restart_epoch is not None:
    log(f"restarting this run from its checkpoint of epoch {restored[0]}, with its "
        f"{len(restored[2].get('records', []))} measurements so far")
  elif from_other:
    log(f"starting from epoch {restored[0]} of {config.resume_from}, with its "
        f"{len(restored[2].get('records', []))} measurements so far")
  elif restored is not None and not restored[2].get("epoch_totals"):
    log(f"resumed from the checkpoint of epoch {restored[0]} in {ckpts.epochs.directory}")
  if restored is None:
    return RunState(epoch=0, state=None, records=records)
  epoch, state, meta = restored
  backup = meta.get("records", [r for r in records if r["epoch"] <= epoch])
  if stream is not None:  # the input's own position, saved with the state (epoch ends: (epoch + 1, 0))
    stream.set_state(meta.get("input_state") or {"epoch": epoch + 1, "step": 0})
  records = reconcile(metrics_path, records, backup, epoch, is_main, log if not from_other else lambda *a, **k: None)
  return RunState(epoch=epoch, state=state, records=records, tpt_start_epoch=meta.get("tpt_start_epoch"),
                  elapsed_before=float(meta.get("elapsed", 0.0)), input_state=meta.get("input_state"),
                  epoch_totals=meta.get("epoch_totals"),
                  carried={k: v for k, v in meta.items() if k not in _META_KEYS})


def reconcile(path: pathlib.Path, on_disk: list, in_checkpoint: list, start_epoch: int, is_main: bool, log) -> list:
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


# ------------------------------------------------------------------ --resume_from and in-place restarts

def resume_source(spec: str) -> tuple[pathlib.Path, Optional[int]]:
  """(directory, epoch or None) of a --resume_from 'DIR[:EPOCH]'."""
  directory, _, epoch = spec.rpartition(":") if ":" in spec and spec.rpartition(":")[2].isdigit() else (spec, "", "")
  return pathlib.Path(directory).absolute(), int(epoch) if epoch else None


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
  directory, epoch = resume_source(config.resume_from)
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
    before, before_epoch = resume_source(previous["resume_from"])
    if before_epoch == epoch and _same_directory(before, workdir):
      return None
  return epoch


def _check_config(config, workdir: pathlib.Path, restored, resolved: dict, plan) -> None:
  """Refuses a checkpoint of this workdir written under another config than ``resolved`` (config.json missing,
  damaged, edited or replaced), except the one an in-place restart (resume_from DIR:EPOCH) starts from."""
  epoch, _, meta = restored
  if config.resume_from:
    directory, start = resume_source(config.resume_from)
    if start == epoch and _same_directory(directory, workdir) and "epoch_totals" not in meta:
      return
  problem = workdir_lib.config_mismatch(workdir, epoch, meta.get("config_digest"), resolved, plan.config_readable)
  if problem:
    raise workdir_lib.WorkdirError(problem)


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


def _restore_other(config, abstract_state, resolved: dict):
  """(epoch, state, meta) of the checkpoint ``config.resume_from`` ('DIR[:EPOCH]') names, for a run of config
  ``resolved``; refused (WorkdirError) where it is at or past num_epochs (nothing would be trained).

  Refused too where it is missing or damaged, its shapes differ, or its run read other data
  (``schema.DATA_KEYS``, against the source's config.json verified by its checkpoints' digest): the records
  carried over would then come from other data than the rest of the run's.
  """
  spec = config.resume_from
  directory, epoch = resume_source(spec)
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
  restored = _restore_epoch(directory / "checkpoints", spec, epoch, abstract_state)
  if restored[0] >= config.num_epochs:  # it would train nothing and only put this config's name on its records
    raise workdir_lib.WorkdirError(
        f"--resume_from {spec}: its checkpoint of epoch {restored[0]} is at or past config.num_epochs = "
        f"{config.num_epochs}, so nothing would be trained; raise --config.num_epochs to go on from it, or resume "
        "from an earlier epoch")
  return restored


def _restore_epoch(directory: pathlib.Path, spec: str, epoch: Optional[int], abstract_state):
  """(epoch, state, meta) of the checkpoint of ``epoch`` (None: the newest good one) in another run's
  ``directory``, read-only; WorkdirError naming ``spec`` where there is none that fits."""
  other = checkpoints.Checkpoints(directory, read_only=True)
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


__all__ = ["RunCheckpoints", "RunState", "reconcile", "resume_source", "resumed"]
