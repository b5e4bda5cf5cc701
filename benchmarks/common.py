"""What every benchmark script shares: timing and the BENCHMARKS.md log."""

from __future__ import annotations

import pathlib
import statistics
import time

import jax

BENCHMARKS_MD = pathlib.Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def median_time(fn, repeats: int) -> float:
  """Median wall time in seconds of ``fn()`` (results blocked on) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def report(table: str, append: bool) -> None:
  """Prints a markdown table and, if ``append``, adds it as a new section of BENCHMARKS.md."""
  print(table)
  if append:
    with BENCHMARKS_MD.open("a") as f:
      if f.tell() == 0:
        f.write("# Benchmarks\n\nEach section is one run of a script under `benchmarks/`; "
                "ratios compare timings taken in that run.\n\n")
      f.write(table + "\n\n")
