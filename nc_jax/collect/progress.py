"""Progress of a measurement on stderr: a live '\\r' line per pass on a terminal, one summary line at the end."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
  """A '\\r' progress line (pass, batches done/total, items/s, ETA) when ``live``; a summary line at the end."""

  def __init__(self, live: bool, quiet: bool = False, stream=None, every: float = 0.2):
    self.live, self.quiet, self.stream, self.every = live, quiet, stream or sys.stderr, every
    self.started = time.perf_counter()
    self.items_total = self.batches_total = self.passes = 0

  def start(self, name: str, done: int, total: Optional[int]) -> None:
    """A pass begins, with ``done`` of its ``total`` batches already done (a resume)."""
    self.name, self.first, self.done, self.total = name, done, done, total
    self.items, self.pass_started, self.shown = 0, time.perf_counter(), 0.0
    self.passes += 1
    self._show(force=True)

  def advance(self, items: int) -> None:
    """One more batch done, of ``items`` valid (unmasked) examples."""
    self.done += 1
    self.items += items
    self.items_total += items
    self.batches_total += 1
    self._show()

  def _show(self, force: bool = False) -> None:
    if not self.live or self.quiet:
      return
    now = time.perf_counter()
    if not force and now - self.shown < self.every and self.done != self.total:
      return
    self.shown = now
    seconds = max(now - self.pass_started, 1e-9)
    eta = ""
    if self.total is not None and self.done > self.first:
      eta = f"  ETA {(self.total - self.done) * seconds / (self.done - self.first):,.0f}s"
    total = "?" if self.total is None else self.total
    self.stream.write(f"\r{self.name}: {self.done}/{total} batches  {self.items / seconds:,.0f} items/s{eta}\033[K")
    self.stream.flush()

  def end_pass(self) -> None:
    """The pass is done: its line is shown complete and ended."""
    if self.live and not self.quiet:
      self._show(force=True)
      self.stream.write("\n")
      self.stream.flush()

  def summary(self, out_dir) -> None:
    """'collect: P passes, B batches, N items in Ts (R items/s) -> out_dir' (unless quiet)."""
    if self.quiet:
      return
    seconds = time.perf_counter() - self.started
    self.stream.write(f"collect: {self.passes} passes, {self.batches_total} batches, {self.items_total:,} items in "
                      f"{seconds:,.1f}s ({self.items_total / max(seconds, 1e-9):,.0f} items/s) -> {out_dir}\n")
    self.stream.flush()

