"""Orbax checkpoints of the train state, keyed by epoch, with a fallback past corrupt ones.

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save leaves no half checkpoint behind. A
checkpoint damaged later (a truncated file) fails to restore: we then warn and
fall back to the previous one, never loading it half-way.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, directory: pathlib.Path, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def save(self, epoch: int, state, meta: dict) -> None:
    """Saves asynchronously (device->host copy now, the write in the background)."""
    self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, dict]]:
    """(epoch, state, meta) of the newest checkpoint that restores, or None if there is none.

    Raises RuntimeError naming the directory if checkpoints exist but none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for epoch in steps:
      try:
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state = jax.block_until_ready(restored["state"])
      except Exception as error:  # orbax/tensorstore raise many types for damaged files
        failures.append(f"{self.directory / str(epoch)}: {type(error).__name__}: {error}")
        logging.warning("checkpoint %s cannot be restored (%s); falling back to an older one",
                        self.directory / str(epoch), error)
        print(f"WARNING: checkpoint for epoch {epoch} is corrupt ({type(error).__name__}); trying an older one",
              flush=True)
        continue
      return epoch, state, dict(restored["meta"])
    if failures:
      raise RuntimeError("no checkpoint could be restored:\n  " + "\n  ".join(failures))
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
