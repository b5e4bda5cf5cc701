"""Training throughput: the jitted step and the scanned epoch against PyTorch, and the cost of one NC evaluation.

    python benchmarks/train.py [--cases mlp,cnn] [--batch-sizes 128] [--dtype float32] [--no-append]
    python benchmarks/train.py --cases resnet18 --batch-sizes 128,512 --dtype bfloat16   # accelerators

Cases: `mlp`, the default 3x512 BatchNorm MLP on MNIST-1D-shaped data (N = 3940, d = 40);
`cnn`, the small CNN (3 conv layers) on 28x28x1 images (N = 1024); `resnet18`, the
paper's CIFAR ResNet18 (3x3 stem) on 32x32x3 images, N = 50 000 (--num-images), the
issue's calibration workload. SGD momentum 0.9 with weight decay, cross-entropy,
random data (speed does not depend on the values). For each case and batch size it
times, in one run:
  jax step    one jitted train_step on a device-resident batch (state donated);
  jax epoch   one jitted epoch: batches drawn on device + lax.scan over steps, and the
              stepwise epoch (host loop over the jitted step) that epoch_loop="auto" uses
              for conv nets on CPU;
  torch       the same architecture and optimiser in PyTorch eager mode, one epoch
              over pre-built CPU tensors (skipped if torch is not installed:
              `pip install torch==2.13.0` is the CPU wheel on this machine);
  NC eval     one jitted in-graph evaluation (features of the whole train set and of a
              test set 1/6 its size, + neural_collapse), as a fraction of the faster jax epoch;
  TFLOP/s     the step's FLOPs (XLA's count on the lowered step) x steps/s of the best epoch
              (of the step with --step-only), and, with --peak-tflops, that as a fraction of
              the device's peak (MFU).
The stepwise epoch is skipped off CPU (the scan is what runs there) and torch for the
resnet18 case runs on CUDA only (eager, bf16 autocast, channels-last) when --dtype is bfloat16.
Prints a markdown table and appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from nc_jax import models
from nc_jax.data import device
from nc_jax.training import evaluate as evaluate_lib, schedule, step as step_lib

CASES = {  # name -> (model name, model options, input shape of one example, default number of examples)
    "mlp": ("mlp", {}, (40,), 3940),
    "cnn": ("cnn", {}, (28, 28, 1), 1024),
    "resnet18": ("resnet18", {"stem": "small"}, (32, 32, 3), 50_000),
    # step-only calibration points for benchmarks/cost_model.py: nets unlike ResNet18
    "densenet40": ("densenet40", {}, (32, 32, 3), 0),
    "vgg19_224": ("vgg19", {"stem": "imagenet"}, (224, 224, 3), 0),
    "resnet152_224": ("resnet152", {"stem": "imagenet"}, (224, 224, 3), 0),
}
LABELS = {"mlp": "mlp 3x512 BN, MNIST-1D shape", "cnn": "cnn 3-conv, 28x28x1", "resnet18": "resnet18, 32x32x3",
          "densenet40": "densenet40, 32x32x3", "vgg19_224": "vgg19, 224x224x3", "resnet152_224": "resnet152, 224x224x3"}


def flops(lowered) -> float | None:
  """XLA's FLOP count of a lowered function, or None where the backend gives none."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return (cost or {}).get("flops") or None


def jax_rows(case, model, inputs, labels, batch_size, repeats, stepwise, eval_time=None, step_only=False):
  """One row; ``eval_time`` (s) reuses an evaluation already timed for this model and data.

  FLOPs are XLA's count on the lowered (not yet compiled) step, lowered for the CPU where the backend
  gives no count: the compiled count leaves out convolutions handed to a library (cuDNN on GPU; it read
  ~100x low on an H200), and jax 0.11.2's lowered count is empty on GPU.
  """
  mesh = device.data_mesh(jax.devices()[:1])
  tx = schedule.sgd(optax.constant_schedule(0.01), 0.9, 5e-4)
  loss_fn = step_lib.loss_function("cross_entropy")
  state = step_lib.create_state(model, tx, inputs.shape[1:], 0)
  x, y = device.put_replicated(inputs, mesh), device.put_replicated(labels, mesh)

  batch = (x[:batch_size], y[:batch_size])
  traced = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn),
                   donate_argnums=0).trace(state, batch)
  lowered = traced.lower()
  step_flops = flops(lowered) or flops(traced.lower(lowering_platforms=("cpu",)))  # GPU's lowered count is empty
  step = lowered.compile()  # compiled once: timed and costed
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  epoch = jax.jit(functools.partial(step_lib.train_epoch, model=model, tx=tx, loss_fn=loss_fn, batch_size=batch_size,
                                    seed=0, mesh=mesh), donate_argnums=0)

  def one_epoch():
    holder["state"], totals = epoch(holder["state"], x, y, 1)
    jax.block_until_ready(totals)

  stepwise_epoch = functools.partial(
      step_lib.stepwise_epoch,
      draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=0, batch_size=batch_size, mesh=mesh)),
      step=step)

  def one_stepwise_epoch():
    holder["state"], totals = stepwise_epoch(holder["state"], x, y, 1)
    jax.block_until_ready(totals)

  test_size = len(labels) // 6  # the paper's datasets have ~1 test image per 5-6 training images
  evaluate = jax.jit(functools.partial(evaluate_lib.evaluate, measurement=evaluate_lib.Measurement(
      model=model, loss_fn=loss_fn, num_classes=10, batch_size=1024, mesh=mesh)))

  def one_evaluation():
    jax.block_until_ready(evaluate(holder["state"], x, y, x[:test_size], y[:test_size]))

  steps = len(labels) // batch_size
  step_time = common.median_time(one_step, repeats * 10)
  if step_only:
    return {"model": LABELS[case], "batch": batch_size, "jax_step": batch_size / step_time, "jax_epoch": None,
            "jax_stepwise": None, "eval_fraction": None, "eval_ms": None, "epoch_ms": None, "eval_time": None,
            "tflops": None if not step_flops else step_flops / step_time / 1e12}
  epoch_time = common.median_time(one_epoch, repeats)
  stepwise_time = common.median_time(one_stepwise_epoch, repeats) if stepwise else None
  if eval_time is None:  # the evaluation does not depend on the training batch size
    eval_time = common.median_time(one_evaluation, repeats)
  best = min(epoch_time, stepwise_time or epoch_time)  # what epoch_loop="auto" picks (steps: conv nets on CPU)
  return {"model": LABELS[case], "batch": batch_size, "jax_step": batch_size / step_time,
          "jax_epoch": steps * batch_size / epoch_time,
          "jax_stepwise": None if stepwise_time is None else steps * batch_size / stepwise_time,
          "eval_fraction": eval_time / best, "eval_ms": 1e3 * eval_time, "epoch_ms": 1e3 * best,
          "eval_time": eval_time, "tflops": None if not step_flops else step_flops * steps / best / 1e12}


def torch_epoch_rate(case, inputs, labels, batch_size, repeats, bfloat16):
  """Images/s of one PyTorch epoch of the same model; None where not comparable here (see the docstring)."""
  try:
    import torch
  except ImportError:
    return None
  cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
  if case == "resnet18" and not (cuda and bfloat16):
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  where = "cuda" if cuda else "cpu"
  if case == "mlp":
    layers, width = [], inputs.shape[1]
    for _ in range(3):
      layers += [torch.nn.Linear(width, 512, bias=False), torch.nn.BatchNorm1d(512), torch.nn.ReLU()]
      width = 512
    net = torch.nn.Sequential(*layers, torch.nn.Linear(512, 10))
    x = torch.tensor(inputs)
  elif case == "cnn":
    blocks, channels = [], 1
    for out in (32, 64, 128):
      blocks += [torch.nn.Conv2d(channels, out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out),
                 torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
      channels = out
    net = torch.nn.Sequential(*blocks, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 10))
    x = torch.tensor(inputs).permute(0, 3, 1, 2).contiguous()
  else:  # the notebook's ResNet18: torchvision's, 3x3 stride-1 stem, no max-pool
    import torchvision
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    x = torch.tensor(inputs).permute(0, 3, 1, 2).contiguous()
  net = net.to(where)
  x = x.to(where)
  if case != "mlp" and cuda:
    net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
  y = torch.tensor(labels, dtype=torch.long, device=where)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  criterion = torch.nn.CrossEntropyLoss()
  steps = len(labels) // batch_size

  def one_epoch():
    order = torch.randperm(len(labels), device=where)
    for i in range(steps):
      index = order[i * batch_size:(i + 1) * batch_size]
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(where, dtype=torch.bfloat16, enabled=bfloat16):
        loss = criterion(net(x[index]), y[index])
      loss.backward()
      optimizer.step()
    if cuda:
      torch.cuda.synchronize()

  net.train()
  return steps * batch_size / common.median_time(one_epoch, repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="mlp,cnn", help=f"comma-separated, of {', '.join(CASES)}")
  parser.add_argument("--batch-sizes", default="128", help="comma-separated")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  parser.add_argument("--num-images", type=int, default=0, help="examples per epoch (0 = the case's default)")
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for the MFU column (0 = omit)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--step-only", action="store_true", help="time the jitted step alone (no epoch, NC eval, torch)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  cases = args.cases.split(",")
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  stepwise = jax.default_backend() == "cpu"
  rng = np.random.default_rng(0)
  rows = []
  for case in cases:
    name, options, shape, default_count = CASES[case]
    count = args.num_images or default_count or max(batch_sizes)
    model = models.create(name, 10, dtype=jnp.dtype(args.dtype), **options)
    inputs = rng.normal(size=(count, *shape)).astype(np.float32)
    labels = (np.arange(count) % 10).astype(np.int32)
    eval_time = None
    for batch_size in batch_sizes:
      row = jax_rows(case, model, inputs, labels, batch_size, args.repeats, stepwise, eval_time, args.step_only)
      eval_time = row["eval_time"]
      row["torch_epoch"] = None
      if not (args.no_torch or args.step_only):
        try:
          row["torch_epoch"] = torch_epoch_rate(case, inputs, labels, batch_size, args.repeats, args.dtype == "bfloat16")
        except Exception as error:  # noqa: BLE001  (the jax rows still count)
          print(f"torch {case} batch {batch_size} failed: {type(error).__name__}: {error}", flush=True)
      rows.append(row)
      print(f"done {case} batch {batch_size}", flush=True)

  dev = jax.devices()[0]
  torch_version = "not installed"
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    pass
  cell = lambda value, fmt: "n/a" if value is None else format(value, fmt)
  lines = [f"### benchmarks/train.py, {datetime.date.today()}: {dev.platform} ({dev.device_kind}), "
           f"{platform.machine()}, jax {jax.__version__}, torch {torch_version}; {args.dtype} compute, "
           f"median of {args.repeats} epochs after warm-up"
           + (f"; MFU against {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else ""), "",
           "| model | batch | jax step (img/s) | jax scanned epoch (img/s) | jax stepwise epoch (img/s) | torch epoch (img/s) "
           "| best jax epoch / torch | NC eval (ms) | best epoch (ms) | NC eval / epoch | TFLOP/s | MFU |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    best_rate = max(row["jax_epoch"] or 0.0, row["jax_stepwise"] or 0.0)
    ratio = None if row["torch_epoch"] is None else best_rate / row["torch_epoch"]
    mfu = None if not (args.peak_tflops and row["tflops"]) else row["tflops"] / args.peak_tflops
    lines.append(
        f"| {row['model']} | {row['batch']} | {row['jax_step']:,.0f} | {cell(row['jax_epoch'], ',.0f')} | "
        f"{cell(row['jax_stepwise'], ',.0f')} | {cell(row['torch_epoch'], ',.0f')} | {cell(ratio, '.2f')}"
        f"{'' if ratio is None else 'x'} | {cell(row['eval_ms'], '.0f')} | {cell(row['epoch_ms'], '.0f')} | "
        f"{cell(row['eval_fraction'], '.2f')} | "
        f"{cell(row['tflops'], '.1f')} | {cell(mfu, '.1%')} |")
  common.report("\n".join(lines), append=not args.no_append)


if __name__ == "__main__":
  main()
