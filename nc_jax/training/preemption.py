"""Stopping on a signal, and the mid-epoch checkpoints of streamed runs.

SIGTERM or SIGINT asks the loop to checkpoint and stop at the next point it can (an epoch's end, or for a
streamed run the next step); a second signal aborts. Streamed runs also checkpoint mid-epoch on
``config.checkpoint_every_seconds`` into checkpoints/MID_EPOCH_DIR, keyed by the global step, so the
epoch-keyed checkpoints/ keeps meaning "the state after epoch E" for --resume_from and collect. The processes
of a multi-process run act together (``agree``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import jax
import numpy as np

from nc_jax import multihost

STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
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


def agree(stop_requested: bool, checkpoint_due: bool) -> tuple[bool, bool]:
  """Multi-process runs act together: stop if any process was signalled; checkpoint when process 0's clock says.

  One allgather of both votes (P, 2); the identity in a single-process run.
  """
  votes = multihost.gather(np.array([stop_requested, checkpoint_due], np.int32))
  return bool(votes[:, 0].any()), bool(votes[0, 1])


def cadence_due(config, epoch: int, saved_epoch: int, saved_time: float) -> bool:
  """Whether the checkpoint cadence asks for a checkpoint at ``epoch``: config.checkpoint_every_epochs epochs or
  checkpoint_every_seconds (time.monotonic) since the last save at ``saved_epoch`` / ``saved_time`` (0: off)."""
  every_epochs, every_seconds = config.checkpoint_every_epochs, config.checkpoint_every_seconds
  return bool((every_epochs and epoch - saved_epoch >= every_epochs)
              or (every_seconds and time.monotonic() - saved_time >= every_seconds))


class StopSignals:
  """While entered, SIGTERM and SIGINT set ``name`` (the first signal's) instead of stopping; a second raises
  KeyboardInterrupt. Outside the main thread signals stay as they are."""

  def __init__(self):
    self.name: Optional[str] = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.name is not None

  def _handler(self, signum, frame):
    if self.name is not None:  # asked twice: stop now
      raise KeyboardInterrupt
    self.name = STOP_SIGNALS[signum]

  def __enter__(self) -> "StopSignals":
    try:
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handler)
    except ValueError:  # not the main thread
      pass
    return self

  def __exit__(self, *exc) -> None:
    for signum, old in self._previous.items():
      signal.signal(signum, old)
    self._previous = {}

  def raise_preempted(self, epoch: int, step: Optional[int] = None):
    raise Preempted(epoch, self.name or "a signal to another process", step)


def _test_position() -> list:
  return os.environ.get(MID_EPOCH_TEST_ENV, "").split(":")


class MidEpoch:
  """``after_step(state, totals)``: run after each step of a streamed epoch but its last; checkpoints there when
  due (``every_seconds`` since the run's last save, or the test hook) and stops there on a signal.

  ``run`` is the loop's ``resume.RunState`` (its meta goes into the checkpoint, its ``saved_time`` is reset);
  the checkpoint's meta adds the stream's position ``input_state``, ``epoch_totals`` (the epoch's summed
  metrics so far, as host values with their dtypes) and ``run`` (``program.run_digest``: resumed only under it).
  """

  def __init__(self, checkpoints, stream, run, stop: StopSignals, every_seconds: float, digest: str):
    self.checkpoints, self.stream, self.run, self.stop = checkpoints, stream, run, stop
    self.every_seconds, self.digest = every_seconds, digest
    self.test_position = _test_position()

  def after_step(self, state, totals) -> None:
    position = self.stream.get_state()
    forced = self.test_position[:2] == [str(position["epoch"]), str(position["step"])]
    if not forced and jax.process_count() > 1 and position["step"] % AGREE_EVERY_STEPS:
      return
    due = forced or bool(self.every_seconds and time.monotonic() - self.run.saved_time >= self.every_seconds)
    stopping, due = agree(self.stop.requested, due)
    if not (stopping or due):
      return
    totals = {k: {"value": np.asarray(v).item(), "dtype": str(np.asarray(v).dtype)}
              for k, v in jax.device_get(totals).items()}
    self.checkpoints.save(int(state.step), state, self.run.meta(self.run.wall(), input_state=position,
                                                                epoch_totals=totals, run=self.digest))
    self.run.saved_time = time.monotonic()
    if forced and self.test_position[2:] == ["kill"]:
      self.checkpoints.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if stopping:
      self.checkpoints.wait()
      self.stop.raise_preempted(position["epoch"], position["step"])


__all__ = ["AGREE_EVERY_STEPS", "MID_EPOCH_DIR", "MID_EPOCH_KEEP", "MID_EPOCH_TEST_ENV", "MidEpoch", "Preempted",
           "STOP_SIGNALS", "StopSignals", "agree"]
