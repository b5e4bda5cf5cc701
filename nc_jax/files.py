"""Durable writes: the one way nc-jax replaces a file, and the one line that describes a failed read or write.

Every file a run or a reader writes whole (config.json, tpt.json, a rewritten metrics.jsonl, collect's
accumulators and outputs, report figures and tables, grid selections, benchmark tables) goes through
``write_atomically``, so one rule holds for all of them: after a kill, a power cut or a full disk the file is
the old one or the new one, never a mix, and no temporary file is left behind. Every command line describes an
OSError with ``describe_os_error`` (the path, the system's reason, the fix). Imports the standard library only,
so the metrics-free readers (records, report, experiments) and the trainer may all import it.
"""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Optional

# fsync of a folder is refused on some file systems (EINVAL on a few network and FUSE mounts): the rename is
# then as durable as that file system makes it, and the write has still succeeded.
_FOLDER_SYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF)


def temporary_path(path: pathlib.Path) -> pathlib.Path:
  """Where ``write_atomically`` stages ``path``: ``.NAME.tmpPID``, hidden, in the same folder (a rename is atomic
  only within one file system), named by the writing process so two writers never share one; collect.measure
  removes the ones a kill left by this pattern."""
  return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomically(path, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` whole or not at all, and durably.

  Steps: write a temporary file in the same folder, flush and fsync it (its bytes are on disk), ``os.replace``
  it over ``path`` (atomic: readers see the old file or the new one), then fsync the folder (the rename itself
  survives a power cut). On any failure the temporary file is removed, ``path`` is as it was, and the OSError
  raised names ``path`` (not the temporary file), with the system's errno and reason.
  """
  path = pathlib.Path(path)
  temporary = temporary_path(path)
  try:
    with open(temporary, "wb") as handle:
      handle.write(payload)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_folder(path.parent)
  except OSError as error:
    raise OSError(error.errno, error.strerror or str(error), str(path)) from None
  finally:
    try:
      temporary.unlink(missing_ok=True)
    except OSError:  # the folder itself is gone or unreadable: nothing was left there
      pass


def _sync_folder(folder: pathlib.Path) -> None:
  descriptor = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  except OSError as error:
    if error.errno not in _FOLDER_SYNC_UNSUPPORTED:
      raise
  finally:
    os.close(descriptor)


def error_chain(error: Optional[BaseException]) -> list[BaseException]:
  """``error``, then each exception it was raised from or during (``__cause__``, else ``__context__``), each once."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    chain.append(error)
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return chain


def os_error(error: Optional[BaseException]) -> Optional[OSError]:
  """The OSError behind an exception (itself, or the first in its ``error_chain``: orbax wraps them), or None."""
  return next((link for link in error_chain(error) if isinstance(link, OSError)), None)


def describe_os_error(error: OSError, flag: Optional[str] = None, *, under: Optional[str] = None) -> str:
  """One line for an OSError: the path, the system's reason and, for a write, the fix.

  Without ``flag``: ``reason (path)``, e.g. 'No space left on device (/run/metrics.jsonl)'. With ``flag`` (the
  option that chose where the file goes), when the file is under the folder ``under`` (or ``under`` is None):
  'cannot write /r/fig1.png: No space left on device; free space on that disk or pass another --out'. The reason
  is the system's (strerror), else the error's own message on one line.
  """
  reason = error.strerror or _message(error)
  inside = under is None or bool(error.filename and
                                  os.path.abspath(str(error.filename)).startswith(os.path.abspath(under)))
  if flag is None or not inside:
    return f"{reason}{f' ({error.filename})' if error.filename else ''}"
  fixes = {errno.ENOSPC: f"free space on that disk or pass another {flag}",
           errno.EDQUOT: f"free space (your disk quota is used up) or pass another {flag}",
           errno.EACCES: f"pass a {flag} you may write to", errno.EPERM: f"pass a {flag} you may write to",
           errno.EROFS: f"pass a {flag} on a writable disk",
           errno.EEXIST: f"{flag} must be a folder (a file is in the way): pass another {flag}",
           errno.ENOTDIR: f"{flag} must be a folder (a file is in the way): pass another {flag}",
           errno.EISDIR: f"a folder is in the way: remove it or pass another {flag}"}
  return f"cannot write {error.filename or 'the output'}: {reason}; {fixes.get(error.errno, f'pass another {flag}')}"


def describe_write_error(error: OSError, flag: str = "--out") -> str:
  """``describe_os_error(error, flag)``: a failed write under the folder ``flag`` names."""
  return describe_os_error(error, flag)


def _message(error: BaseException) -> str:
  """An exception's message on one line: the last line of an embedded traceback, else every line joined."""
  text = str(error).strip()
  if "Traceback (most recent call last)" in text:
    return text.splitlines()[-1].strip()
  return " ".join(text.split()) or type(error).__name__


__all__ = ["describe_os_error", "describe_write_error", "error_chain", "os_error", "temporary_path",
           "write_atomically"]
