"""A population on disk: every member a single run's workdir, the population's own checkpoints beside them.

``train_population(config, lrs, workdir=DIR)`` (``training.population``) writes:

  DIR/<member>/                 member k's workdir, lr_<lrs[k] to 6 significant digits>: the name
                                experiments/grid.py gives the single run of that lr in a cell's folder
  DIR/population_<id>/          the population's own (id: a digest of its lrs, so populations of other lrs
                                share DIR): population.json (the lrs, each member's directory and config
                                digest) and checkpoints/<epoch>/ (the state, every leaf (K, ...), with each
                                member's records, TPT start and stop reason: one checkpoint, so a kill
                                leaves every member at one epoch)
  DIR/<member>/config.json      member k's config: the single run's (config with lr = lrs[k])
  DIR/<member>/metrics.jsonl    its records as its single run appends them (each after the checkpoint holding it)
  DIR/<member>/events.out.tfevents.*  the same records as TensorBoard events, as its single run writes them
                                (nc_jax.events; config.tensorboard)
  DIR/<member>/tpt.json         its TPT start
  DIR/<member>/checkpoints/<E>/ at the end: its single-run checkpoint of its last epoch, so ``nc_jax.report``,
                                ``experiments/grid.py``, ``python -m nc_jax.collect`` and ``--resume_from`` take
                                the member as the single run it is (a diverged member gets none: its last
                                population checkpoint holds its last good state)

SIGTERM / SIGINT checkpoint the population at the epoch's end and stop (``preemption.Preempted``). A rerun of
the same command resumes from the newest good population checkpoint (records reconciled with each
member's metrics.jsonl, as a single run's); another config or other lrs are refused unless ``overwrite``.

Several processes (multi-host): every process reads what is there and takes part in each checkpoint's save
and restore (orbax); only process 0 holds the lock and writes the members' files, and every process waits
for it (``multihost.sync``) before going on from what it changed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import time
from typing import Optional, Sequence

import jax
import ml_collections

from nc_jax import events as events_lib, files, multihost, records as records_lib, schema
from nc_jax.training import checkpoints as checkpoints_lib, loop, program as program_lib, resume
from nc_jax.training import workdir as workdir_lib

STATE_FILE = "population.json"
DIVERGED_FILE = records_lib.DIVERGED_FILE  # in a member's directory: why it stopped (the others went on)


def member_name(lr: float) -> str:
  """A member's directory: 'lr_' and its lr to 6 significant digits (lr_0.0255), as experiments/grid.py's."""
  return f"lr_{lr:.6g}"


def population_name(lrs: Sequence[float]) -> str:
  """The folder of a population's own files in DIR: population_<the first 12 hex digits of sha256(lrs)>."""
  return "population_" + hashlib.sha256(json.dumps([float(lr) for lr in lrs]).encode()).hexdigest()[:12]


class PopulationDisk:
  """The workdir of one population (see the module's docstring); ``None`` workdir: nothing is written."""

  def __init__(self, workdir, config: ml_collections.ConfigDict, member_configs: Sequence, *, overwrite: bool,
               log=print):
    self.workdir = pathlib.Path(workdir).absolute()
    self.config, self.log = config, log
    self.resolved = [program_lib.config_values(c) for c in member_configs]
    self.digests = [schema.config_digest(values) for values in self.resolved]
    self.lrs = [c.lr for c in member_configs]
    names = [member_name(lr) for lr in self.lrs]
    if len(set(names)) != len(names):
      raise schema.ConfigError(f"population lrs {self.lrs} name the same member directory twice ({names}); "
                               "give lrs that differ in their first 6 significant digits")
    self.member_dirs = [self.workdir / name for name in names]
    self.own = self.workdir / population_name(self.lrs)
    workdir_lib.check_usable(self.workdir)
    self.overwrite = overwrite
    self.is_main = jax.process_index() == 0
    self.lock: Optional[workdir_lib.Lock] = None
    self.member_locks: list[workdir_lib.Lock] = []
    self.checkpoints: Optional[checkpoints_lib.Checkpoints] = None
    self.events: list[events_lib.RunEvents] = []  # each member's, opened by ``start``
    self.started = time.perf_counter()
    self.elapsed_before = 0.0

  def __enter__(self) -> "PopulationDisk":
    """Locks the population's folder and each member's (one process writes a population at a time, and no
    single run writes a member's folder meanwhile, as a single run's workdir is locked)."""
    if self.is_main:
      self.own.mkdir(parents=True, exist_ok=True)
      self.lock = workdir_lib.Lock(self.own)
      self.lock.__enter__()
      try:
        for directory in self.member_dirs:
          directory.mkdir(parents=True, exist_ok=True)
          self.member_locks.append(workdir_lib.Lock(directory).__enter__())
      except BaseException as error:
        self._unlock(type(error), error, None)
        raise
    multihost.sync("nc_jax: population locked")
    return self

  def _unlock(self, kind, error, traceback) -> None:
    for lock in reversed(self.member_locks):
      lock.__exit__(kind, error, traceback)
    self.member_locks = []
    if self.lock is not None:
      self.lock.__exit__(kind, error, traceback)
      self.lock = None

  def __exit__(self, kind, error, traceback) -> None:
    try:
      self.close(quiet=error is not None)
    finally:
      self._unlock(kind, error, traceback)

  # ------------------------------------------------------------------ start

  def start(self, abstract_state):
    """(epoch, state or None, per-member meta list or None): the newest good population checkpoint's, else a
    fresh start (0, None, None). Every refusal is raised before anything is changed."""
    known = self._read_state_file()
    fresh_request = {"lrs": self.lrs, "members": [p.name for p in self.member_dirs], "config_digests": self.digests}
    if known is not None and known != fresh_request and not self.overwrite:
      raise workdir_lib.WorkdirError(
          f"{self.own} holds a population of another config ({self.own / STATE_FILE}); add --overwrite to "
          "discard it, or use another --workdir")
    discard = known is not None and known != fresh_request
    plans = []
    for directory, values in zip(self.member_dirs, self.resolved):
      plans.append(workdir_lib.plan(directory, values, overwrite=self.overwrite or discard))
    restored = None
    if not discard:
      self.checkpoints = checkpoints_lib.Checkpoints(self.own / "checkpoints", keep=self.config.keep_checkpoints)
      restored = self.checkpoints.restore_latest(abstract_state)
    if restored is not None and restored[2].get("config_digests", self.digests) != self.digests:
      if not self.overwrite:  # population.json lost or damaged: the checkpoint still says whose it is
        raise workdir_lib.WorkdirError(
            f"{self.own}'s checkpoint of epoch {restored[0]} was trained with another config; add --overwrite to "
            "discard it, or use another --workdir")
      discard, restored = True, None
    holding = [d for d in self.member_dirs if workdir_lib.has_results(d)]
    if restored is None and holding and not (self.overwrite or discard):
      raise workdir_lib.WorkdirError(
          f"{holding[0]} holds results but the population in {self.own} has no checkpoint to resume them from; "
          "rerun with --overwrite to start again (they are deleted), or use another --workdir")
    # ------------------------------------------------ from here on, the workdir changes (process 0 changes it)
    wipe = discard or (restored is None and bool(holding))
    multihost.sync("nc_jax: population read")
    if wipe and self.checkpoints is not None:
      self.checkpoints.close()
      self.checkpoints = None
    if self.is_main:
      self._prepare(wipe, [workdir_lib.Plan() if (discard or holding) else plan for plan in plans],
                    fresh=restored is None)
    multihost.sync("nc_jax: population ready")
    if self.checkpoints is None:
      self.checkpoints = checkpoints_lib.Checkpoints(self.own / "checkpoints", keep=self.config.keep_checkpoints)
    if restored is None:
      self._open_events([[] for _ in self.member_dirs])
      return 0, None, None
    epoch, state, meta = restored
    self.elapsed_before = float(meta.get("elapsed", 0.0))
    members = meta["members"]
    for directory, member in zip(self.member_dirs, members):
      path = directory / records_lib.METRICS_FILE
      member["records"] = resume.reconcile(path, records_lib.read(path, repair=self.is_main), member["records"],
                                           epoch, self.is_main, self.log)
      if self.is_main:
        loop.write_tpt(directory, member.get("tpt_start_epoch"), self.config.tpt_threshold)
    self.log(f"resumed the population of {len(self.lrs)} members from its checkpoint of epoch {epoch}")
    self._open_events([member["records"] for member in members])
    return epoch, state, members

  def _open_events(self, records: list) -> None:
    """Each member's TensorBoard events (process 0's), showing ``records[k]`` (its records so far) to start."""
    self.events = [events_lib.RunEvents(directory, member_records, enabled=self.is_main and self.config.tensorboard,
                                        log=self.log) for directory, member_records in zip(self.member_dirs, records)]

  def _prepare(self, wipe: bool, plans: list, *, fresh: bool) -> None:
    """Process 0 makes the folders ready: ``wipe`` removes the population's checkpoints and the members'
    results first; then each member's workdir plan is applied, population.json written and, on a ``fresh``
    start, each member's tpt.json."""
    fresh_request = {"lrs": self.lrs, "members": [p.name for p in self.member_dirs], "config_digests": self.digests}
    if wipe:
      shutil.rmtree(self.own / "checkpoints", ignore_errors=True)
      (self.own / STATE_FILE).unlink(missing_ok=True)
      for directory in self.member_dirs:
        workdir_lib.discard_results(directory)
    for directory, plan, values in zip(self.member_dirs, plans, self.resolved):
      workdir_lib.apply(directory, plan, values, log=self.log)
    files.write_atomically(self.own / STATE_FILE, (json.dumps(fresh_request, indent=2) + "\n").encode())
    if fresh:
      for directory in self.member_dirs:
        loop.write_tpt(directory, None, self.config.tpt_threshold)

  def _read_state_file(self) -> Optional[dict]:
    path = self.own / STATE_FILE
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # damaged: the checkpoint's config digests still decide (``start``)
      return None

  # ------------------------------------------------------------------ as the loop goes

  def start_clock(self) -> None:
    """The epoch loop begins: wall time counts from now (as a single run's ``RunState.start_clocks``), not from
    the restore and the placing of the data before it."""
    self.started = time.perf_counter()

  def wall(self) -> float:
    """Seconds of training so far, over every call of this population."""
    return self.elapsed_before + time.perf_counter() - self.started

  def save(self, epoch: int, state, members) -> None:
    """The population checkpoint of ``epoch`` (waited for), then each member's newest record appended if it
    was measured at ``epoch``, and its tpt.json."""
    meta = {"elapsed": self.wall(), "config_digests": self.digests, "members": [
        {"records": m.records, "tpt_start_epoch": m.tpt_start_epoch, "diverged": m.diverged} for m in members]}
    self.checkpoints.save(epoch, state, meta)
    self.checkpoints.wait()
    if not self.is_main:
      return
    for directory, m, events in zip(self.member_dirs, members, self.events):
      if m.records and m.records[-1]["epoch"] == epoch:
        loop.append_record(directory / records_lib.METRICS_FILE, m.records, self.log)
        events.write(m.records[-1])
      loop.write_tpt(directory, m.tpt_start_epoch, self.config.tpt_threshold)

  def finish(self, epoch: int, state, members, take) -> None:
    """Each member that did not diverge gets its single run's checkpoint of ``epoch`` (``take(state, k)``)."""
    for k, (directory, m) in enumerate(zip(self.member_dirs, members)):
      if m.diverged is not None:
        if self.is_main:
          files.write_atomically(directory / DIVERGED_FILE, (m.diverged + "\n").encode())
        continue
      ckpts = checkpoints_lib.Checkpoints(directory / "checkpoints", keep=self.config.keep_checkpoints)
      try:
        if epoch in ckpts.epochs():  # a rerun of a finished population
          continue
        ckpts.save(epoch, take(state, k), {"tpt_start_epoch": m.tpt_start_epoch, "elapsed": self.wall(),
                                           "records": m.records, "config_digest": self.digests[k]})
      finally:
        ckpts.close()

  def close(self, *, quiet: bool = False) -> None:
    for events in self.events:
      events.close()
    if self.checkpoints is not None:
      self.checkpoints.close(quiet=quiet)


def abstract_population_state(init, sharding):
  """The population state's shapes with ``sharding`` (``Population.state_sharding``: what a population
  checkpoint is restored into)."""
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                jax.eval_shape(init))
