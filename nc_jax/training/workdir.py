"""A run's directory: one run at a time (a lock), its config.json, and what a rerun may discard.

Layout: ``config.json`` (the resolved config), ``metrics.jsonl`` (nc_jax.records),
``tpt.json``, ``checkpoints/`` and ``lock``. The lock is an ``fcntl.flock`` on
``lock``, held for the whole run by process 0: the kernel releases it when the
process dies (even by kill -9), so a lock left by a dead run is simply taken
over; the file names the holder (pid, host, start time) for the refusal message.
flock is reliable on local disks and on NFSv4; on other network filesystems it
may not exclude a process on another host.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import socket
import time
from typing import Optional

from nc_jax import records as records_lib, schema

LOCK_FILE = "lock"
RESULTS = ("checkpoints", records_lib.METRICS_FILE, "tpt.json")


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
  that one process at a time may write (``nc_jax.collect``'s --out: ``what="measurement", flag="--out"``)."""

  def __init__(self, workdir: pathlib.Path, *, what: str = "run", flag: str = "--workdir",
               error: type = WorkdirError):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.what, self.flag, self.error = what, flag, error
    self.descriptor: Optional[int] = None
    self.previous_holder: Optional[dict] = None

  def __enter__(self) -> "Lock":
    descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(descriptor)
      os.close(descriptor)
      who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('since', '?')}"
             if holder else "another process")
      raise self.error(f"{'workdir' if self.flag == '--workdir' else self.flag} {self.path.parent} is in use by "
                       f"another {self.what} ({who}); wait for it to finish, stop it, or choose another "
                       f"{self.flag}") from None
    self.previous_holder = _holder(descriptor)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(descriptor)
    self.descriptor = descriptor
    return self

  def __exit__(self, *exc) -> None:
    if self.descriptor is not None:
      os.ftruncate(self.descriptor, 0)
      fcntl.flock(self.descriptor, fcntl.LOCK_UN)
      os.close(self.descriptor)
      self.descriptor = None


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
  for name in RESULTS:
    path = workdir / name
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


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


def write_config(workdir: pathlib.Path, resolved: dict, *, overwrite: bool, log=print) -> None:
  """Writes config.json (atomically); a different config is refused where it would orphan results.

  Same config: nothing to do. Different config: with ``overwrite`` the old results
  are deleted; without, refused if the workdir holds results, else replaced (the
  earlier run never measured or checkpointed anything, e.g. it was refused or
  diverged in its first epoch).
  """
  path = workdir / records_lib.CONFIG_FILE
  if path.exists():
    try:
      previous = json.loads(path.read_text())
    except json.JSONDecodeError:
      previous = None
      if not overwrite and has_results(workdir):
        raise WorkdirError(f"{path} is damaged (not JSON) and the workdir holds results; restore it, or "
                           "rerun with --overwrite to discard that run")
    if previous == resolved:
      return
    changed = schema.changed_keys(previous, resolved) if previous is not None else []
    if previous is not None and not changed:
      overwrite = False  # only keys that do not change results (checkpointing, resume_from), or defaults made explicit
    elif previous is not None and not overwrite and has_results(workdir):
      details = ", ".join(_differences(previous, resolved, changed))
      raise WorkdirError(f"workdir {workdir} holds a run with a different config ({details}); use another "
                         "--workdir (--resume_from " f"{workdir} starts one from its checkpoint), or --overwrite "
                         "to discard that run")
    if overwrite:
      discard_results(workdir)
    elif changed:
      log(f"note: replacing the config of {workdir}, which holds no measurement or checkpoint yet")
  workdir.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(path.name + ".tmp")  # atomic: other processes may be reading it
  temporary.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
  os.replace(temporary, path)
