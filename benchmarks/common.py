"""What every benchmark script shares: timing and the BENCHMARKS.md log."""

from __future__ import annotations

import pathlib
import statistics
import sys
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


def report(table: str, append: bool, path: pathlib.Path = BENCHMARKS_MD) -> None:
  """Prints a markdown table and, if ``append``, adds it as a new section of ``path`` (BENCHMARKS.md).

  The file is rewritten whole (``nc_jax.files.write_atomically``): a full disk or a kill leaves it as it
  was, never half a table. An OS error is one line naming the file and the fix, and exit status 1 (the
  table is printed above it).
  """
  from nc_jax import files
  print(table, flush=True)
  if not append:
    return
  try:
    before = path.read_text() if path.exists() else ""
    header = "" if before else ("# Benchmarks\n\nEach section is one run of a script under `benchmarks/`; "
                                "ratios compare timings taken in that run.\n\n")
    files.write_atomically(path, (before + header + table + "\n\n").encode())
  except OSError as error:
    reason = error.strerror or " ".join(str(error).split())
    print(f"error: cannot append the table above to {error.filename or path}: {reason}; free space or make it "
          "writable and rerun, or pass --no-append", file=sys.stderr, flush=True)
    sys.exit(1)
