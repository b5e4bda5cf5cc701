"""The default MLP's learning-rate sweep as one population vs the same runs one after another (issue 22).

  python benchmarks/population.py [--epochs 10] [--ks 1,2,4,8,16,25] [--member_loop vmap] [--out FILE]

The sweep is the paper's: 25 lrs log-spaced on [1e-4, 0.25]; a sweep of K takes the first K of them spread
over the range (every 25/K-th). Both sides run the default config (configs/default.py: 5x512 BN MLP,
MNIST-1D) for ``--epochs`` epochs with its measurement schedule rescaled to them, in memory
(``population.train_population``), compiles included:
- population: one ``train_population`` of the K lrs;
- sequential: K ``train_population`` calls of one lr each, with JAX's and the program cache cleared before
  each, so every run compiles its program as a separate process would (the process start, ~2 s, and the
  single run's checkpoint writes are *not* counted: the sequential times are a lower bound).
Sequential wall of K is the sum of the first K single runs of the sweep's order, so the 25 single runs are
timed once and shared by every K. Aggregate img/s = K x epochs x training examples / wall.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ as a package

from configs import default as default_config  # noqa: E402
from nc_jax.training import population, program  # noqa: E402

PAPER_LRS = tuple(float(v) for v in np.logspace(np.log10(1e-4), np.log10(0.25), 25))


def sweep(k: int) -> tuple:
  """K lrs of the paper's 25, spread over the range (all 25 when K = 25)."""
  return tuple(PAPER_LRS[i] for i in np.round(np.linspace(0, len(PAPER_LRS) - 1, k)).astype(int))


def fresh() -> None:
  """Forget every compiled function, as a new process would."""
  program._CACHE.clear()
  jax.clear_caches()


def timed(config, lrs, member_loop: str) -> float:
  fresh()
  tic = time.perf_counter()
  population.train_population(config, lrs, member_loop=member_loop, log=lambda *a, **k: None)
  return time.perf_counter() - tic


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--ks", default="1,2,4,8,16,25")
  parser.add_argument("--member_loop", default="vmap", choices=population.MEMBER_LOOPS)
  parser.add_argument("--out", default="BENCHMARKS.md", help="append the table (markdown) to this file ('' : none)")
  args = parser.parse_args(argv)
  ks = [int(k) for k in args.ks.split(",")]
  config = default_config.get_config()
  config.num_epochs = args.epochs
  num_train = len(program.load_dataset(config, "memory").train_labels)

  single = {}  # lr -> seconds of its single run
  for lr in sorted({lr for k in ks for lr in sweep(k)}):
    single[lr] = timed(config, (lr,), args.member_loop)
    print(f"single lr {lr:.3g}: {single[lr]:.1f} s", flush=True)
  rows = []
  for k in ks:
    wall = timed(config, sweep(k), args.member_loop)
    sequential = sum(single[lr] for lr in sweep(k))
    rows.append((k, wall, sequential, wall / sequential, k * args.epochs * num_train / wall))
    print(f"K={k}: population {wall:.1f} s, sequential {sequential:.1f} s", flush=True)

  header = (f"### benchmarks/population.py, {datetime.date.today()}: "
            f"Default MLP (5x512 BN, MNIST-1D, {num_train} train examples), {args.epochs} epochs, member_loop "
            f"{args.member_loop}, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}; "
            "compiles included, in memory, no checkpoints\n\n"
            "| K | population wall s | sequential wall s | population / sequential | aggregate img/s |\n"
            "|---|---|---|---|---|\n")
  table = header + "".join(f"| {k} | {w:.1f} | {s:.1f} | {r:.2f} | {ips:,.0f} |\n" for k, w, s, r, ips in rows)
  print(table)
  if args.out:
    with open(args.out, "a") as handle:
      handle.write("\n" + table)


if __name__ == "__main__":
  main()
