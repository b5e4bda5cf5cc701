"""A learning-rate sweep as one population vs the same runs one after another (issue 22).

  python benchmarks/population.py [--epochs 10] [--ks 1,2,4,8,16,25] [--member_loop vmap] [--out FILE]
  python benchmarks/population.py --case resnet18 [--ks 1,2,4,8,16,25] [--epochs 2] [--num-images 50000]
                                  [--budget SECONDS] [--smoke] [--out FILE]            # an accelerator

The sweep is the paper's: 25 lrs log-spaced on [1e-4, 0.25]; a sweep of K takes the first K of them spread
over the range (every 25/K-th).

--case mlp (default): the default config (configs/default.py: 5x512 BN MLP, MNIST-1D) for ``--epochs`` epochs
with its measurement schedule rescaled to them, in memory (``population.train_population``), compiles included:
- population: one ``train_population`` of the K lrs;
- sequential: K ``train_population`` calls of one lr each, with JAX's and the program cache cleared before
  each, so every run compiles its program as a separate process would (the process start, ~2 s, and the
  single run's checkpoint writes are *not* counted: the sequential times are a lower bound).
Sequential wall of K is the sum of the first K single runs of the sweep's order, so the 25 single runs are
timed once and shared by every K. Aggregate img/s = K x epochs x training examples / wall.

--case resnet18: the paper's CIFAR-10 ResNet18 cell (configs/paper/cifar10_resnet18.py, batch 128) in bf16
with the scanned epoch an accelerator runs, on ``--num-images`` synthetic 32x32x3 images (speed does not
depend on the values; nothing is read from disk). Training only: no NC evaluation is timed. Each program is
compiled ahead of time (``lower().compile()``, caches cleared first: a new process's compile), then runs
``--epochs`` epochs:
- single: one run's program (``program.build_program(...).train_epoch``), timed once; K sequential runs = K x
  its compile + epochs (every lr's run is the same program);
- population of K: ``population.build_population(...).train_epoch`` of K lrs.
Per K: compile seconds, the last epoch's seconds, aggregate img/s = K x images / that epoch, the measured wall
(compile + epochs) against K sequential runs', the device's buffer sizes (``memory_analysis``), and the
protocol's 25-lr sweep projected from these measured parts (350 epochs of 50 000 images; grid.py --population
K cuts it into programs of K members and one of 25 mod K, priced pro rata; NC evaluations not counted).
The compiled program's convolutions are counted (cost_model.conv_census: grouped or not, and the cuDNN call
each became on a GPU) for the single run and the first population. K are run largest first, then the rest in
increasing order; with ``--budget`` a K whose predicted time (its compile as the slowest so far x 1.5, its
epochs at the last aggregate rate) does not fit what is left is skipped and named in the table. ``--smoke``:
the cell's smoke variant (ResNet18 width 4, batch 8) on 64 images, K in 1, 2: the same code in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ as a package

import cost_model  # noqa: E402  (conv_census)
from configs import default as default_config  # noqa: E402
from configs.paper import common as paper  # noqa: E402
from nc_jax.data import device  # noqa: E402
from nc_jax.training import population, program  # noqa: E402

PAPER_LRS = tuple(float(v) for v in np.logspace(np.log10(1e-4), np.log10(0.25), 25))
PROTOCOL_EPOCHS, PROTOCOL_IMAGES = 350, 50_000  # cifar10/resnet18: the sweep the resnet18 case projects


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


def append(table: str, out: str) -> None:
  print(table, flush=True)
  if out:
    with open(out, "a") as handle:
      handle.write("\n" + table)


def mlp_main(args) -> None:
  ks = [int(k) for k in (args.ks or "1,2,4,8,16,25").split(",")]
  epochs = args.epochs or 10
  config = default_config.get_config()
  config.num_epochs = epochs
  num_train = len(program.load_dataset(config, "memory").train_labels)

  single = {}  # lr -> seconds of its single run
  for lr in sorted({lr for k in ks for lr in sweep(k)}):
    single[lr] = timed(config, (lr,), args.member_loop)
    print(f"single lr {lr:.3g}: {single[lr]:.1f} s", flush=True)
  rows = []
  for k in ks:
    wall = timed(config, sweep(k), args.member_loop)
    sequential = sum(single[lr] for lr in sweep(k))
    rows.append((k, wall, sequential, wall / sequential, k * epochs * num_train / wall))
    print(f"K={k}: population {wall:.1f} s, sequential {sequential:.1f} s", flush=True)

  header = (f"### benchmarks/population.py, {datetime.date.today()}: "
            f"Default MLP (5x512 BN, MNIST-1D, {num_train} train examples), {epochs} epochs, member_loop "
            f"{args.member_loop}, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}; "
            "compiles included, in memory, no checkpoints\n\n"
            "| K | population wall s | sequential wall s | population / sequential | aggregate img/s |\n"
            "|---|---|---|---|---|\n")
  append(header + "".join(f"| {k} | {w:.1f} | {s:.1f} | {r:.2f} | {ips:,.0f} |\n" for k, w, s, r, ips in rows),
         args.out)


# ------------------------------------------------------------------ --case resnet18 (an accelerator)

def run_program(epoch_fn, state, inputs, labels, epochs: int) -> dict:
  """``epoch_fn`` (a jitted epoch, state donated) compiled ahead of time, then ``epochs`` epochs.

  -> {'compile': s (lowering + compile), 'epochs': [s, ...], 'census': its convolutions, 'temp': bytes,
  'arguments': bytes} (the buffer sizes from the compiled program's memory_analysis, on this device).
  """
  tic = time.perf_counter()
  compiled = epoch_fn.lower(state, inputs, labels, jnp.int32(1)).compile()
  seconds = time.perf_counter() - tic
  memory = compiled.memory_analysis()
  times = []
  for epoch in range(1, epochs + 1):
    tic = time.perf_counter()
    state, totals = compiled(state, inputs, labels, jnp.int32(epoch))
    jax.block_until_ready(totals)
    times.append(time.perf_counter() - tic)
  return {"compile": seconds, "epochs": times, "census": cost_model.conv_census(compiled.as_text()),
          "temp": getattr(memory, "temp_size_in_bytes", 0), "arguments": getattr(memory, "argument_size_in_bytes", 0)}


def resnet_config(smoke: bool):
  config = paper.load("cifar10", "resnet18", "smoke" if smoke else "")
  config.compute_dtype, config.epoch_loop = "bfloat16", "scan"
  return config


def measure_single(config, mesh, inputs, labels, epochs: int) -> dict:
  fresh()
  steps = len(labels) // config.batch_size
  single = program.build_program(config, mesh, 10, inputs.shape[1:], steps, len(labels))
  return run_program(single.train_epoch, single.init(), inputs, labels, epochs)


def measure_population(config, mesh, inputs, labels, epochs: int, k: int, member_loop: str) -> dict:
  fresh()
  steps = len(labels) // config.batch_size
  pop = population.build_population(config, sweep(k), mesh, 10, inputs.shape[1:], steps, len(labels), member_loop)
  return run_program(jax.jit(pop.train_epoch, donate_argnums=0), pop.init(), inputs, labels, epochs)


def protocol_sweep_s(k: int, result: dict, steps: int, protocol_steps: int) -> float:
  """The 25-lr protocol's training wall as grid.py --population K cuts it, from a measured K program:
  programs of K members and one of 25 mod K (compiled alike, its epochs pro rata), 350 epochs each."""
  epoch = result["epochs"][-1] * protocol_steps / steps
  sizes = [k] * (len(PAPER_LRS) // k) + ([len(PAPER_LRS) % k] if len(PAPER_LRS) % k else [])
  return sum(result["compile"] + PROTOCOL_EPOCHS * epoch * size / k for size in sizes)


def resnet_main(args) -> None:
  start = time.perf_counter()
  ks = [int(k) for k in (args.ks or ("1,2" if args.smoke else "1,2,4,8,16,25")).split(",")]
  order = [max(ks)] + sorted(k for k in ks if k != max(ks))  # the headline K first
  epochs = args.epochs or 2
  config = resnet_config(args.smoke)
  num_images = args.num_images or (64 if args.smoke else PROTOCOL_IMAGES)
  batch = config.batch_size
  steps = num_images // batch
  if steps < 1:
    raise SystemExit(f"--num-images {num_images}: fewer than one batch of {batch}; pass at least {batch}")
  mesh = program.data_mesh(config)
  rng = np.random.default_rng(0)
  inputs = device.put_replicated(rng.standard_normal((num_images, 32, 32, 3), np.float32), mesh)
  labels = device.put_replicated(rng.integers(0, 10, num_images).astype(np.int32), mesh)
  left = lambda: args.budget - (time.perf_counter() - start) if args.budget else math.inf  # noqa: E731

  single = measure_single(config, mesh, inputs, labels, epochs)
  single_rate = steps * batch / single["epochs"][-1]
  single_wall = single["compile"] + sum(single["epochs"])
  print(f"single run: compile {single['compile']:.1f} s, epochs {', '.join(f'{t:.2f}' for t in single['epochs'])} s, "
        f"{single_rate:,.0f} img/s", flush=True)
  results, skipped = {}, []
  slowest_compile, rate = single["compile"], single_rate
  for k in order:
    predicted = 1.5 * slowest_compile + epochs * k * steps * batch / rate
    if predicted > left():
      skipped.append(k)
      print(f"K={k}: skipped, predicted {predicted:.0f} s, {left():.0f} s of --budget left", flush=True)
      continue
    result = results[k] = measure_population(config, mesh, inputs, labels, epochs, k, args.member_loop)
    slowest_compile = max(slowest_compile, result["compile"])
    rate = k * steps * batch / result["epochs"][-1]
    print(f"K={k}: compile {result['compile']:.1f} s, epochs {', '.join(f'{t:.2f}' for t in result['epochs'])} s, "
          f"{rate:,.0f} img/s aggregate, wall {result['compile'] + sum(result['epochs']):.1f} s against "
          f"{k * single_wall:.1f} s sequential", flush=True)

  dev = jax.devices()[0]
  protocol_steps = PROTOCOL_IMAGES // batch
  one_run = single["compile"] + PROTOCOL_EPOCHS * single["epochs"][-1] * protocol_steps / steps
  census_k = min((k for k in results if k > 1), default=None)
  census = f"single run: {cost_model.census_text(single['census'], 1)}" + (
      "" if census_k is None else f"; K = {census_k}: {cost_model.census_text(results[census_k]['census'], census_k)}")
  lines = [
      f"### benchmarks/population.py --case resnet18, {datetime.date.today()}: {dev.platform} ({dev.device_kind}), "
      f"{jax.device_count()} device(s), jax {jax.__version__}; cifar10/resnet18{' smoke' if args.smoke else ''} "
      f"at batch {batch}, bf16, scanned epoch, {num_images:,} synthetic 32x32x3 images, {epochs} epochs per "
      f"program, member_loop {args.member_loop}; training only (no NC evaluation); compiles included "
      "(ahead of time, caches cleared); K sequential runs = K x the one single run timed", "",
      f"Single run: compile {single['compile']:.1f} s, last epoch {single['epochs'][-1]:.2f} s = {single_rate:,.0f} "
      f"img/s, device temp {single['temp'] / 1e9:.2f} GB. Compiled convolutions ({census}). Protocol columns: "
      f"the 25-lr sweep projected from these measured parts ({PROTOCOL_EPOCHS} epochs of {PROTOCOL_IMAGES:,} "
      f"images, compiles included, evaluations not): one run {one_run / 3600:.2f} h, 25 sequential "
      f"{25 * one_run / 3600:.2f} h; the issue's target on one H100/H200: sweep <= 8 x one run, >= 3x faster than "
      "sequential." + (f" Not run (--budget {args.budget:g} s): K = {', '.join(map(str, skipped))}."
                       if skipped else ""),
      "", "| K | compile (s) | epoch (s) | aggregate img/s | x one run's img/s | wall (s) | K sequential (s) | "
      "wall / sequential | device temp (GB) | protocol sweep (h) | sweep / one run | x faster than sequential |",
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for k in sorted(results):
    r = results[k]
    wall, sequential = r["compile"] + sum(r["epochs"]), k * single_wall
    aggregate = k * steps * batch / r["epochs"][-1]
    swept = protocol_sweep_s(k, r, steps, protocol_steps)
    lines.append(f"| {k} | {r['compile']:.1f} | {r['epochs'][-1]:.2f} | {aggregate:,.0f} | "
                 f"{aggregate / single_rate:.2f} | {wall:.1f} | {sequential:.1f} | {wall / sequential:.2f} | "
                 f"{r['temp'] / 1e9:.2f} | {swept / 3600:.2f} | {swept / one_run:.1f} | {25 * one_run / swept:.2f} |")
  append("\n".join(lines) + "\n", args.out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="mlp", choices=("mlp", "resnet18"))
  parser.add_argument("--epochs", type=int, default=None, help="default: 10 (mlp), 2 (resnet18)")
  parser.add_argument("--ks", default=None, help="member counts; default 1,2,4,8,16,25 (1,2 with --smoke)")
  parser.add_argument("--member_loop", default="vmap", choices=population.MEMBER_LOOPS)
  parser.add_argument("--num-images", type=int, default=None,
                      help="resnet18: synthetic training images (default 50000; 64 with --smoke)")
  parser.add_argument("--budget", type=float, default=0,
                      help="resnet18: seconds this run may take; a K predicted not to fit is skipped (0: no limit)")
  parser.add_argument("--smoke", action="store_true", help="resnet18: the cell's smoke variant, seconds on a CPU")
  parser.add_argument("--out", default="BENCHMARKS.md", help="append the table (markdown) to this file ('' : none)")
  args = parser.parse_args(argv)
  if args.case == "mlp":
    mlp_main(args)
  else:
    resnet_main(args)


if __name__ == "__main__":
  main()
