"""Training throughput: the jitted step and the scanned epoch against PyTorch, and the cost of one NC evaluation.

    python benchmarks/train.py [--no-append]

Models: the default 3x512 BatchNorm MLP on MNIST-1D-shaped data (N = 3940, d = 40)
and the small CNN (3 conv layers) on 28x28x1 images (N = 1024), batch 128, SGD
momentum 0.9 with weight decay, cross-entropy. For each it times, in one run:
  jax step    one jitted train_step on a device-resident batch (state donated);
  jax epoch   one jitted epoch: batches drawn on device + lax.scan over steps, and the
              stepwise epoch (host loop over the jitted step) that epoch_loop="auto" uses
              for conv nets on CPU;
  torch       the same architecture and optimiser in PyTorch eager mode, one epoch
              over pre-built CPU tensors (skipped if torch is not installed:
              `pip install torch==2.13.0` is the CPU wheel on this machine);
  NC eval     one jitted in-graph evaluation (features of the whole train set and of a
              test set 1/6 its size, + neural_collapse), as a fraction of the faster jax epoch.
Prints a markdown table and appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import functools
import platform

import jax
import numpy as np
import optax

import common
from nc_jax import models
from nc_jax.data import device
from nc_jax.training import evaluate as evaluate_lib, schedule, step as step_lib

BATCH = 128


def jax_rows(name, model, inputs, labels, repeats):
  mesh = device.data_mesh(jax.devices()[:1])
  tx = schedule.sgd(optax.constant_schedule(0.01), 0.9, 5e-4)
  loss_fn = step_lib.loss_function("cross_entropy")
  state = step_lib.create_state(model, tx, inputs.shape[1:], 0)
  x, y = device.put_replicated(inputs, mesh), device.put_replicated(labels, mesh)

  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn), donate_argnums=0)
  batch = (x[:BATCH], y[:BATCH])
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  epoch = jax.jit(functools.partial(step_lib.train_epoch, model=model, tx=tx, loss_fn=loss_fn, batch_size=BATCH,
                                    seed=0, mesh=mesh), donate_argnums=0)

  def one_epoch():
    holder["state"], totals = epoch(holder["state"], x, y, 1)
    jax.block_until_ready(totals)

  stepwise = functools.partial(
      step_lib.stepwise_epoch,
      draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=0, batch_size=BATCH, mesh=mesh)),
      step=jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn), donate_argnums=0))

  def one_stepwise_epoch():
    holder["state"], totals = stepwise(holder["state"], x, y, 1)
    jax.block_until_ready(totals)

  evaluate = jax.jit(functools.partial(evaluate_lib.evaluate, model=model, loss_fn=loss_fn, num_classes=10,
                                       batch_size=1024, mesh=mesh))
  def one_evaluation():
    jax.block_until_ready(evaluate(holder["state"], x, y, x[:test_size], y[:test_size]))

  test_size = len(labels) // 6  # the paper's datasets have ~1 test image per 5-6 training images
  steps = len(labels) // BATCH
  step_time = common.median_time(one_step, repeats * 10)
  epoch_time = common.median_time(one_epoch, repeats)
  stepwise_time = common.median_time(one_stepwise_epoch, repeats)
  eval_time = common.median_time(one_evaluation, repeats)
  best = min(epoch_time, stepwise_time)  # what epoch_loop="auto" picks on CPU (scan: MLP, steps: conv nets)
  return {"model": name, "jax_step": BATCH / step_time, "jax_epoch": steps * BATCH / epoch_time,
          "jax_stepwise": steps * BATCH / stepwise_time,
          "eval_fraction": eval_time / best, "eval_ms": 1e3 * eval_time, "epoch_ms": 1e3 * best}


def torch_epoch_rate(kind, inputs, labels, repeats):
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  if kind == "mlp":
    layers, width = [], inputs.shape[1]
    for _ in range(3):
      layers += [torch.nn.Linear(width, 512, bias=False), torch.nn.BatchNorm1d(512), torch.nn.ReLU()]
      width = 512
    net = torch.nn.Sequential(*layers, torch.nn.Linear(512, 10))
    x = torch.tensor(inputs)
  else:
    blocks, channels = [], 1
    for out in (32, 64, 128):
      blocks += [torch.nn.Conv2d(channels, out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out),
                 torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
      channels = out
    net = torch.nn.Sequential(*blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.tensor(inputs).permute(0, 3, 1, 2).contiguous()
  y = torch.tensor(labels, dtype=torch.long)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  criterion = torch.nn.CrossEntropyLoss()
  steps = len(labels) // BATCH

  def one_epoch():
    order = torch.randperm(len(labels))
    for i in range(steps):
      index = order[i * BATCH:(i + 1) * BATCH]
      optimizer.zero_grad(set_to_none=True)
      loss = criterion(net(x[index]), y[index])
      loss.backward()
      optimizer.step()

  net.train()
  return steps * BATCH / common.median_time(one_epoch, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  cases = [
      ("mlp 3x512 BN, MNIST-1D shape", models.create("mlp", 10), "mlp",
       rng.normal(size=(3940, 40)).astype(np.float32)),
      ("cnn 3-conv, 28x28x1", models.create("cnn", 10), "cnn",
       rng.normal(size=(1024, 28, 28, 1)).astype(np.float32)),
  ]
  rows = []
  for name, model, kind, inputs in cases:
    labels = (np.arange(len(inputs)) % 10).astype(np.int32)
    row = jax_rows(name, model, inputs, labels, args.repeats)
    row["torch_epoch"] = torch_epoch_rate(kind, inputs, labels, args.repeats)
    rows.append(row)
    print(f"done {name}", flush=True)

  dev = jax.devices()[0]
  torch_version = "not installed"
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    pass
  lines = [f"### benchmarks/train.py, {datetime.date.today()}: {dev.platform} ({dev.device_kind}), "
           f"{platform.machine()}, jax {jax.__version__}, torch {torch_version}; batch {BATCH}, "
           f"median of {args.repeats} epochs after warm-up", "",
           "| model | jax step (img/s) | jax scanned epoch (img/s) | jax stepwise epoch (img/s) | torch epoch (img/s) | best jax epoch / torch | NC eval (ms) | best epoch (ms) | NC eval / epoch |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    torch_rate = row["torch_epoch"]
    torch_cell = "n/a" if torch_rate is None else f"{torch_rate:,.0f}"
    best_rate = max(row["jax_epoch"], row["jax_stepwise"])
    ratio_cell = "n/a" if torch_rate is None else f"{best_rate / torch_rate:.2f}x"
    lines.append(
        f"| {row['model']} | {row['jax_step']:,.0f} | {row['jax_epoch']:,.0f} | {row['jax_stepwise']:,.0f} | "
        f"{torch_cell} | {ratio_cell} | "
        f"{row['eval_ms']:.0f} | {row['epoch_ms']:.0f} | {row['eval_fraction']:.2f} |")
  table = "\n".join(lines)
  common.report(table, append=not args.no_append)

if __name__ == "__main__":
  main()
