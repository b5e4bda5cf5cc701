"""A run's directory: one run at a time (a lock), its config.json, and what a start may discard.

Layout: ``config.json`` (the resolved config), ``metrics.jsonl`` (nc_jax.records),
``tpt.json``, ``checkpoints/`` and ``lock``. The lock is held for the whole run by
process 0 as two ``fcntl.flock``s: on the workdir directory itself and on the file
``lock`` (which names the holder: pid, host, start time, for the refusal message).
The kernel releases both when the process dies (even by kill -9), so a lock left by
a dead run is simply taken over; deleting or replacing ``DIR/lock`` releases nothing.
Limits: flock is reliable on local disks and on NFSv4, where directories cannot be
locked and the file alone excludes (a deleted one is locked again at the next epoch,
and the run stops if another run took it meanwhile); on other network filesystems it
may not exclude a process on another host; removing or renaming the workdir itself
(``rm -rf DIR``) ends the exclusion for a run started in a new DIR of that name.

A start first decides what it will do (``plan``: every refusal raised, nothing
changed), then the trainer restores and checks its starting state, and only then is
the plan carried out (``apply``): no command deletes what it then needs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import socket
import stat
import time
from typing import Optional

from nc_jax import files, records as records_lib, schema

LOCK_FILE = "lock"
RESULTS = ("checkpoints", records_lib.METRICS_FILE, "tpt.json")
EVENTS_PATTERN = "events.out.tfevents.*"  # nc_jax.events.FILE_PATTERN (not imported here: no protobuf for grid.py)


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked; the message says why and what to do."""


def check_usable(workdir: pathlib.Path) -> None:
  """Raises WorkdirError if ``workdir`` is a file or cannot be created or written."""
  for parent in [workdir, *workdir.parents]:
    if parent.exists():
      if not parent.is_dir():
        raise WorkdirError(f"workdir {workdir}: {parent} is a file, not a directory; choose another --workdir")
      if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir}: {parent} is not writable; choose another --workdir "
                           "or fix its permissions")
      return


class Lock:
  """Exclusive lock on a workdir for the life of a run (``with Lock(workdir):``); also serves other folders
  that one process at a time may write (``nc_jax.collect``'s --out: ``what="measurement", flag="--out"``).

  Two flocks: on the directory itself (so deleting or replacing ``DIR/lock`` releases nothing) and on
  ``DIR/lock`` (which names the holder, and excludes where a filesystem cannot lock a directory: NFS). The file
  lock is taken only on the file the path still names (a file deleted between open and flock is not a lock), and
  ``check`` re-creates a deleted one during the run, stopping the run if another process took it meanwhile.
  """

  def __init__(self, workdir: pathlib.Path, *, what: str = "run", flag: str = "--workdir",
               error: type = WorkdirError):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.what, self.flag, self.error = what, flag, error
    self.descriptor: Optional[int] = None
    self.directory_descriptor: Optional[int] = None
    self.previous_holder: Optional[dict] = None

  def _busy(self, holder: dict):
    who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
           if holder else "another process")
    return self.error(f"{'workdir' if self.flag == '--workdir' else self.flag} {self.path.parent} is in use by "
                      f"another {self.what} ({who}); wait for it to finish, stop it, or choose another {self.flag}")

  def __enter__(self) -> "Lock":
    self.directory_descriptor = _lock_directory(self.path.parent)
    if self.directory_descriptor is False:
      raise self._busy(_read_holder(self.path))
    try:
      descriptor = self._lock_file()
    except BaseException:
      self._release_directory()
      raise
    self.previous_holder = _holder(descriptor)
    self._claim(descriptor)
    return self

  def _lock_file(self) -> int:
    """A descriptor of ``self.path``, flocked, that the path still names (retried if it was replaced meanwhile)."""
    for _ in range(100):
      try:  # O_NOFOLLOW: a link named lock would make the claim truncate whatever it points to
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
      except IsADirectoryError:
        raise self.error(f"{self.path} is a directory, not the {self.what}'s lock file; remove it and rerun") from None
      except OSError as error:
        if self.path.is_symlink():
          raise self.error(f"{self.path} is a symbolic link, not the {self.what}'s lock file; remove the link "
                           "(not what it points to) and rerun") from None
        raise self.error(f"{self.path}: cannot open the {self.what}'s lock file ({error.strerror}); free space or "
                         "fix permissions there and rerun") from None
      if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a FIFO or device: not ours to write
        os.close(descriptor)
        raise self.error(f"{self.path} is not a regular file, so not the {self.what}'s lock file; remove it "
                         "and rerun")
      try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _holder(descriptor)
        os.close(descriptor)
        raise self._busy(holder) from None
      if _same_file(descriptor, self.path):
        return descriptor
      os.close(descriptor)  # deleted or replaced between open and flock: a lock on it excludes no one
    raise self.error(f"{self.path} keeps being replaced while this {self.what} locks it; stop what rewrites it")

  def _claim(self, descriptor: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
      os.ftruncate(descriptor, 0)
      os.pwrite(descriptor, (json.dumps(info) + "\n").encode(), 0)
      os.fsync(descriptor)
    except OSError as error:  # a full disk or quota: name the file, not just the errno
      os.close(descriptor)
      self._release_directory()
      raise self.error(f"{self.path}: cannot write the {self.what}'s lock file ({error.strerror}); free space "
                       "there (or fix permissions) and rerun") from None
    self.descriptor = descriptor

  def check(self) -> None:
    """Called during the run: if ``DIR/lock`` was deleted or replaced, lock (and name the holder in) a new one;
    raises the lock's error if another process holds that one (it came in while the file was gone)."""
    if self.descriptor is None or _same_file(self.descriptor, self.path):
      return
    os.close(self.descriptor)
    self.descriptor = None
    try:
      descriptor = self._lock_file()
    except self.error as busy:
      raise self.error(f"{self.path} was deleted while this {self.what} held it, and another process has locked "
                       f"it since: {busy}") from None
    self._claim(descriptor)

  def _release_directory(self) -> None:
    if self.directory_descriptor:
      os.close(self.directory_descriptor)  # closing the last descriptor releases its flock
    self.directory_descriptor = None

  def __exit__(self, *exc) -> None:
    if self.descriptor is not None:
      if _same_file(self.descriptor, self.path):
        os.ftruncate(self.descriptor, 0)
      fcntl.flock(self.descriptor, fcntl.LOCK_UN)
      os.close(self.descriptor)
      self.descriptor = None
    self._release_directory()


def _lock_directory(directory: pathlib.Path):
  """A flocked descriptor of ``directory``; False if another process holds it; None where the filesystem cannot
  lock a directory (NFS emulates flock with byte-range locks, which need a file open for writing)."""
  try:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
  except OSError:
    return None
  try:
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(descriptor)
    return False
  except OSError:
    os.close(descriptor)
    return None
  return descriptor


def _same_file(descriptor: int, path: pathlib.Path) -> bool:
  try:
    named = os.lstat(path)  # a link put in the lock's place is not the locked file
  except FileNotFoundError:
    return False
  opened = os.fstat(descriptor)
  return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    return {}


def _holder(descriptor: int) -> dict:
  try:
    return json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}


def has_results(workdir: pathlib.Path) -> bool:
  """True if the workdir holds measurements or checkpoints that a config change would orphan."""
  checkpoints = workdir / "checkpoints"
  mid_epoch = checkpoints / "mid_epoch"  # a streamed run's checkpoints inside an epoch (keyed by step)
  has_checkpoints = any(folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())
                        for folder in (checkpoints, mid_epoch))
  metrics = workdir / records_lib.METRICS_FILE
  return has_checkpoints or (metrics.exists() and metrics.stat().st_size > 0)


def discard_results(workdir: pathlib.Path) -> None:
  """Removes a run's results (``RESULTS``) and its TensorBoard event files (nc_jax.events.FILE_PATTERN)."""
  for name in RESULTS:
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  for path in workdir.glob(EVENTS_PATTERN):
    path.unlink(missing_ok=True)


def _differences(previous: dict, resolved: dict, keys, prefix: str = "") -> list[str]:
  """'key: old -> new' for each of ``keys``, descending into dicts (model_options.fixed_etf: False -> True)."""
  lines = []
  for key in keys:
    old, new = previous.get(key), resolved.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      inner = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      lines += _differences(old, new, inner, f"{prefix}{key}.")
    else:
      lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
  return lines


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a start does to its workdir, decided (every refusal raised) before anything in it changes.

  discard: every result goes first (--overwrite of a different config). restart_epoch: an in-place
  ``--resume_from DIR:EPOCH``: the checkpoints after that epoch go (and the records after it, when the resume
  cuts metrics.jsonl to the checkpoint's copy). config_readable: False when config.json is missing or damaged;
  the resumed checkpoint's config digest then decides whether the requested config is the run's.
  """
  discard: bool = False
  restart_epoch: Optional[int] = None
  config_readable: bool = True
  note: Optional[str] = None


def read_previous_config(workdir: pathlib.Path) -> Optional[dict]:
  """The workdir's config.json as a dict; None if it is missing, not JSON, or JSON but not an object;
  WorkdirError (naming the fix) if it cannot be read at all (a directory of that name, no permission)."""
  path = workdir / records_lib.CONFIG_FILE
  try:
    previous = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
    return None
  except IsADirectoryError:
    raise WorkdirError(f"{path} is a directory, not the run's config.json; remove it and rerun (the run writes it "
                       "again from its checkpoints)") from None
  except OSError as error:
    raise WorkdirError(f"{path}: cannot read the run's config ({error.strerror}); fix its permissions and "
                       "rerun") from None
  return previous if isinstance(previous, dict) else None


class ConfigMismatch(WorkdirError):
  """config.json disagrees with the config digest of the run's newest checkpoint (``digest``, of ``epoch``)."""

  def __init__(self, message: str, epoch: int, digest: str):
    super().__init__(message)
    self.epoch, self.digest = epoch, digest


def newest_config_digest(workdir: pathlib.Path) -> tuple[Optional[int], Optional[str]]:
  """(epoch, config digest) stored in the meta of the newest epoch checkpoint whose meta can be read; (None, None)
  if none carries one. Read from the meta's JSON file without restoring (no JAX): a hint that the restore,
  which verifies the checkpoint, confirms. Older checkpoints without a digest give (epoch, None)."""
  directory = workdir / "checkpoints"
  steps = sorted((int(p.name) for p in directory.glob("*") if p.name.isdigit()), reverse=True) \
      if directory.is_dir() else []
  for step in steps:
    try:
      meta = json.loads((directory / str(step) / "meta" / "metadata").read_text())
    except (OSError, ValueError):
      continue  # damaged or half written: the restore moves it aside; the next one still says the run's config
    if isinstance(meta, dict):
      return step, meta.get("config_digest")
  return None, None


def _restarts_from(values: dict, workdir: pathlib.Path, epoch: int) -> bool:
  """True if ``values`` (a config.json) is an in-place restart of ``workdir`` from ``epoch`` (resume_from
  'DIR:EPOCH' naming this workdir): that checkpoint was trained under the config before the restart."""
  directory, _, start = str(values.get("resume_from") or "").rpartition(":")
  try:
    return start == str(epoch) and pathlib.Path(directory).resolve() == workdir.resolve()
  except OSError:
    return False


def verified_config(workdir: pathlib.Path) -> dict:
  """The workdir's config.json, checked against the config digest (``schema.config_digest``) carried by its
  newest checkpoint: a config.json edited or replaced after training would relabel the run (a report, a grid
  selection, a collect or a resume under a config the run never had). Returned as written (earlier versions'
  files lack later keys; ``schema.fill_defaults`` reads them as train does). Unchecked where nothing can
  check it: no checkpoint, checkpoints older than digests, or the epoch an in-place restart starts from.

  Raises WorkdirError (one line naming the fix) if config.json is missing or damaged, ConfigMismatch if it is
  not the config of the newest checkpoint.
  """
  path = workdir / records_lib.CONFIG_FILE
  values = read_previous_config(workdir)
  if values is None:
    state = "damaged" if path.exists() else "missing"
    raise WorkdirError(f"{path} is {state}; rerun the run's training command (python -m nc_jax.train --workdir "
                       f"{workdir} ...): it writes {path.name} again when its config is the checkpoints' own")
  epoch, digest = newest_config_digest(workdir)
  if digest is None or digest == schema.config_digest(values) or _restarts_from(values, workdir, epoch):
    return values
  raise ConfigMismatch(f"{path} is not the config its run was trained with: the newest checkpoint (epoch {epoch}) "
                       f"carries another config digest ({path.name} was edited or replaced); restore it, or rerun "
                       f"the run's own training command (python -m nc_jax.train --workdir {workdir} ...), which "
                       f"writes {path.name} again", epoch, digest)


def results_after(workdir: pathlib.Path, epoch: int) -> list[str]:
  """What the workdir holds after ``epoch``, in words ('checkpoints of epochs [9, 12]', ...); [] if nothing."""
  checkpoints = workdir / "checkpoints"
  later = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit() and int(p.name) > epoch) \
      if checkpoints.is_dir() else []
  mid_epoch = checkpoints / "mid_epoch"
  partial = mid_epoch.is_dir() and any(p.name.isdigit() for p in mid_epoch.iterdir())
  measured = [r["epoch"] for r in records_lib.read(workdir / records_lib.METRICS_FILE) if r["epoch"] > epoch]
  return ([f"checkpoints of epochs {later}"] if later else []) + (["mid-epoch checkpoints"] if partial else []) \
      + ([f"measurements of epochs {measured}"] if measured else [])


def plan(workdir: pathlib.Path, resolved: dict, *, overwrite: bool, restart_epoch: Optional[int] = None) -> Plan:
  """What this start may do to ``workdir`` for the config ``resolved``; WorkdirError where it would lose results.

  Same config (or one differing only in ``schema.OPERATIONAL_KEYS``): resume. A different config: refused if
  the workdir holds results, unless ``overwrite`` (discard them all); replaced if it holds none (the earlier
  run never measured or checkpointed anything). config.json missing or damaged: resume, if the checkpoint
  resumed carries the requested config's digest (checked by the caller). ``restart_epoch``: an in-place restart
  from that epoch, which needs ``overwrite`` only if the workdir holds something after it.
  """
  holds = has_results(workdir)
  if restart_epoch is not None:
    later = results_after(workdir, restart_epoch)
    if later and not overwrite:
      raise WorkdirError(f"--resume_from {workdir}:{restart_epoch} restarts this workdir's run from epoch "
                         f"{restart_epoch}, which discards its {' and '.join(later)}; add --overwrite to do so, or "
                         f"keep them and restart elsewhere: --workdir OTHER --resume_from {workdir}:{restart_epoch}")
    return Plan(restart_epoch=restart_epoch)
  path = workdir / records_lib.CONFIG_FILE
  previous = read_previous_config(workdir)
  source = resolved.get("resume_from") or ""
  if holds and source and not _names_workdir(source, workdir) and not _same_source(
      (previous or {}).get("resume_from") or "", source):
    # The workdir holds a run that is not this resume's: resuming its checkpoints would ignore --resume_from
    # while config.json recorded it (a provenance that never happened).
    if not overwrite:
      raise WorkdirError(f"workdir {workdir} holds a run of its own, so --resume_from {source} would be ignored; "
                         f"use another --workdir, or add --overwrite to discard that run and start from {source}")
    return Plan(discard=True)
  if previous is None:
    if holds and overwrite:
      return Plan(discard=True)
    return Plan(config_readable=not holds)  # nothing to check against when the workdir holds no result
  changed = schema.changed_keys(previous, resolved)
  if not changed:
    return Plan()  # the same run (checkpointing or resume_from may differ, or defaults were made explicit)
  if not holds:
    return Plan(note=f"note: replacing the config of {workdir}, which holds no measurement or checkpoint yet")
  if overwrite:
    return Plan(discard=True)
  try:
    verified_config(workdir)
  except ConfigMismatch as mismatch:  # config.json is not the run's: the checkpoints say what the run is
    if mismatch.digest == schema.config_digest(resolved):
      return Plan(config_readable=False, note=f"note: {path} had been edited (it was not the config of the "
                  f"checkpoint of epoch {mismatch.epoch}, this command's is); written again from this command")
    raise WorkdirError(f"{mismatch}; or --overwrite to discard that run") from None
  details = ", ".join(_differences(previous, resolved, changed))
  raise WorkdirError(f"workdir {workdir} holds a run with a different config ({details}); use another "
                     f"--workdir (--resume_from {workdir}:EPOCH starts one from its checkpoint), or --overwrite to "
                     f"discard that run (its {path.name} says what it was trained with)")


def _source(spec: str) -> tuple[Optional[pathlib.Path], str]:
  """(resolved directory, epoch text or '') of a resume_from 'DIR[:EPOCH]'."""
  directory, colon, epoch = spec.rpartition(":")
  if not colon or not epoch.isdigit():
    directory, epoch = spec, ""
  try:
    return pathlib.Path(directory).expanduser().resolve(), epoch
  except OSError:
    return None, epoch


def _names_workdir(spec: str, workdir: pathlib.Path) -> bool:
  directory, _ = _source(spec)
  try:
    return directory is not None and directory == workdir.expanduser().resolve()
  except OSError:
    return False


def _same_source(recorded: str, requested: str) -> bool:
  """True if config.json's resume_from and the command's name the same checkpoint (a rerun of the resume)."""
  return bool(recorded) and (recorded == requested or _source(recorded) == _source(requested))


def apply(workdir: pathlib.Path, plan: Plan, resolved: dict, *, log=print) -> None:
  """Carries out ``plan`` (checked before, by ``plan``), then writes config.json (``files.write_atomically``:
  other processes may be reading it)."""
  if plan.discard:
    discard_results(workdir)
  if plan.restart_epoch is not None:
    checkpoints = workdir / "checkpoints"
    # Newest first: a restart killed half way leaves a run whose newest checkpoints are gone, never a gap.
    for step in sorted((p for p in checkpoints.iterdir() if p.name.isdigit() and int(p.name) > plan.restart_epoch),
                       key=lambda p: -int(p.name)):
      shutil.rmtree(step)
    shutil.rmtree(checkpoints / "mid_epoch", ignore_errors=True)
  if plan.note:
    log(plan.note)
  workdir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(resolved, indent=2, sort_keys=True) + "\n"
  files.write_atomically(workdir / records_lib.CONFIG_FILE, text.encode())


def config_mismatch(workdir: pathlib.Path, epoch: int, digest: Optional[str], resolved: dict,
                    config_readable: bool) -> Optional[str]:
  """Why the checkpoint of ``epoch`` (carrying config ``digest``, None if written before digests) may not be
  resumed under ``resolved``; None if it may. The digest is ``schema.config_digest`` of the config that wrote it."""
  if digest == schema.config_digest(resolved) or (digest is None and config_readable):
    return None
  file = workdir / records_lib.CONFIG_FILE
  state = "is damaged" if file.exists() else "is missing"
  if digest is None:
    return (f"{file} {state} and its checkpoints carry no config digest (written by an older nc-jax), so the "
            f"config they were trained with is unknown; restore {file.name}, or rerun with --overwrite to discard "
            "that run, or use another --workdir")
  if not config_readable:
    return (f"{file} {state} and the checkpoint of epoch {epoch} was written under another config than this "
            f"command's; rerun with the config it was trained with (config.json is then written again), or "
            "--overwrite to discard that run, or use another --workdir")
  return (f"{file} says this command's config, but the checkpoint of epoch {epoch} was written under another "
          f"config ({file.name} was edited or replaced); restore {file.name} to the config the run was trained "
          "with, or rerun with --overwrite to discard that run, or use another --workdir")
