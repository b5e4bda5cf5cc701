"""Orbax checkpoints of the train state, keyed by epoch, checksummed, with damaged ones moved aside.

Each checkpoint holds two items: ``state`` (the TrainState arrays) and ``meta``
(JSON: TPT start, elapsed time, the run's records so far, and ``sha256``, a
checksum of the state's bytes and of the rest of meta). Orbax writes a checkpoint
to a temporary directory and renames it when complete, so a run killed mid-save
leaves no half checkpoint (temporaries are cleaned at the next start).

A checkpoint that fails to restore (missing or truncated files, garbage
metadata) or whose content does not match its checksum (a flipped bit) is
*damaged*: ``restore_latest`` moves it to ``checkpoints/corrupt/<epoch>-<time>/``
(kept for inspection; orbax ignores that folder), warns, and tries the next
older one, so the run goes on from the newest good checkpoint and re-creates the
later ones as it passes their epochs. The warning names the file when it is one of
the checkpoint's JSON files (``state/_METADATA``, ``meta/metadata``) that is not JSON
or not in orbax's layout, instead of the parser's bare ``KeyError: 'key'``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
import traceback
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from nc_jax import multihost
from nc_jax.files import error_chain

CORRUPT_DIR = "corrupt"


# Orbax's words for a checkpoint that is intact but of another model or optimizer (not damage).
_MISMATCH_SIGNS = ("is not compatible with the stored shape", "tree structures do not match")


class CheckpointMismatch(ValueError):
  """A readable checkpoint whose arrays or tree do not fit the requested state: another model or optimizer."""


class CheckpointDamaged(Exception):
  """A checkpoint that cannot be restored, or whose content fails its checksum."""


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed (a full disk, a file-size limit, permissions); older checkpoints are intact."""


def _first_line(error: BaseException, limit: int = 400) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _writing(directory: pathlib.Path):
  try:
    yield
  except CheckpointWriteError:
    raise
  except Exception as error:  # orbax/tensorstore report write failures as ValueError, RuntimeError, OSError...
    raise CheckpointWriteError(f"writing a checkpoint in {directory} failed: {_first_line(error)}") from error


def checksum(state, meta: dict) -> str:
  """sha256 over every state leaf (path, dtype, shape, bytes, in tree order) and meta's JSON (sorted keys)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(multihost.fetch(state))[0]:
    array = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  digest.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
  return digest.hexdigest()


# The JSON files of a checkpoint that a restore parses, and what each holds (orbax's layout).
_JSON_FILES = {"state/_METADATA": "orbax's index of the state's arrays", "meta/metadata": "the run's meta and checksum"}




def _damaged_json(step: pathlib.Path, error: BaseException) -> Optional[str]:
  """What a failed restore of checkpoint ``step`` tripped on, when it is one of its JSON files, else None.

  A file that is not JSON (truncated, overwritten) is named as such; valid JSON that orbax's tree-metadata
  parser rejects (missing or wrongly typed keys: KeyError 'key', 'tree_metadata'...) names state/_METADATA.
  """
  for name, holds in _JSON_FILES.items():
    try:
      text = (step / name).read_bytes()
      json.loads(text)
    except OSError:
      continue  # a missing or unreadable file is orbax's to report
    except ValueError as problem:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      where = f" (character {problem.pos} of {len(text)})" if isinstance(problem, json.JSONDecodeError) else ""
      return f"its {name}, {holds}, is not valid JSON{where}: truncated or overwritten"
  for link in error_chain(error):
    in_parser = any(f"{os.sep}metadata{os.sep}" in frame.filename or frame.name == "_read_metadata_file"
                    for frame in traceback.extract_tb(link.__traceback__))
    if in_parser and isinstance(link, (KeyError, TypeError, AttributeError, IndexError)):
      detail = f"no key {link.args[0]!r}" if isinstance(link, KeyError) and link.args else _first_line(link, 120)
      return f"its state/_METADATA, {_JSON_FILES['state/_METADATA']}, is JSON but not in orbax's layout ({detail})"
  return None


def _collect_abandoned_reads() -> None:
  """Collects the read coroutines a failed restore abandons, without their 'Exception ignored' tracebacks.

  The failure is reported once, as damage; the other reads' errors are the same fault.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


class Checkpoints:
  """The checkpoints of one run directory (``workdir/checkpoints``)."""

  def __init__(self, directory: pathlib.Path, keep: int = 3, *, read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.keep, self.read_only = keep, read_only
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=not self.read_only,
                                           create=not self.read_only, read_only=self.read_only,
                                           cleanup_tmp_directories=not self.read_only)
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def epochs(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_epoch(self) -> Optional[int]:
    steps = self.epochs()
    return steps[-1] if steps else None

  def save(self, epoch: int, state, meta: dict) -> None:
    """Saves asynchronously (device->host copy now, the write in the background), with its checksum."""
    meta = {**meta, "sha256": checksum(state, meta)}
    with _writing(self.directory):  # also raises an earlier background save's failure
      self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    with _writing(self.directory):
      self.manager.wait_until_finished()

  def restore(self, epoch: int, abstract_state) -> tuple[Any, dict]:
    """(state, meta) of the checkpoint of ``epoch``; CheckpointDamaged if it cannot be trusted."""
    try:
      restored = self.manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      state, meta = jax.block_until_ready(restored["state"]), dict(restored["meta"])
    except Exception as error:  # orbax/tensorstore raise many types for damaged files
      _collect_abandoned_reads()
      first_line = (str(error).splitlines()[0] if str(error) else "").split(". Truncating")[0]
      if isinstance(error, ValueError) and any(sign in first_line for sign in _MISMATCH_SIGNS):
        raise CheckpointMismatch(f"checkpoint {self.directory / str(epoch)} holds a state of other shapes or "
                                 f"structure than this config's model and optimizer ({first_line.rstrip(':')})") from None
      raise CheckpointDamaged(_damaged_json(self.directory / str(epoch), error)
                              or f"{type(error).__name__}: {first_line}") from None
    expected = meta.get("sha256")
    if expected is None:
      _warn(f"checkpoint {self.directory / str(epoch)} has no checksum (written by an older nc-jax); not verified")
    elif checksum(state, meta) != expected:
      raise CheckpointDamaged("content does not match its sha256 checksum (a changed or flipped bit)")
    return state, meta

  def restore_latest(self, abstract_state, *, before: Optional[int] = None,
                     warn: Callable[[str], None] = _warn) -> Optional[tuple[int, Any, dict]]:
    """(epoch, state, meta) of the newest good checkpoint (at most ``before``), or None if there is none.

    Damaged checkpoints met on the way are moved aside (unless read-only) with a warning.
    """
    damaged, found = [], None
    candidates = [epoch for epoch in sorted(self.epochs(), reverse=True) if before is None or epoch <= before]
    for i, epoch in enumerate(candidates):
      try:
        state, meta = self.restore(epoch, abstract_state)
      except CheckpointDamaged as error:
        damaged.append(epoch)
        next_step = "trying an older one" if i + 1 < len(candidates) else "there is no older one"
        warn(f"checkpoint {self.directory / str(epoch)} is damaged ({error}); "
             + (next_step if self.read_only else f"moved to {self.directory / CORRUPT_DIR}/, {next_step}"))
        continue
      found = (epoch, state, meta)
      break
    if damaged and not self.read_only:
      self._move_aside(damaged)
    return found

  def _move_aside(self, epochs: list[int]) -> None:
    """Moves damaged checkpoints to corrupt/<epoch>-<time>/ (process 0, after every process has looked)."""
    multihost.sync("nc_jax: checkpoints inspected")
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for epoch in epochs:
        target = self.directory / CORRUPT_DIR / f"{epoch}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(epoch)), str(target))
    multihost.sync("nc_jax: damaged checkpoints moved")
    self.manager.close()
    self.manager = self._open()

  def close(self, *, quiet: bool = False) -> None:
    """Waits for a pending save and closes; ``quiet`` drops a save failure (another error is already on its way)."""
    try:
      self.wait()
    except CheckpointWriteError:
      if not quiet:
        raise
    finally:
      self.manager.close()
