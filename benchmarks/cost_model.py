"""A cost model on paper: predicted throughput, wall time and memory of the paper's 21 cells on H100, H200, TPU v5e, v4.

    python benchmarks/cost_model.py [--cells all|DATASET/NET,DATASET,NET,...] [--batch-sizes 128,512]
                                    [--calibrate DEVICE:NET:BATCH:IMG_PER_S[:DATASET]]... [--eval-calibration
                                    EPOCH_S:EVAL_S:IMAGES] [--no-append]
    python benchmarks/cost_model.py --population 1,2,4,8,16,25 [--cells cifar10/resnet18] [--batch-sizes 128]
                                    [--compile-s 7.1] [...]      # K learning rates as one vmapped program

Nothing here runs on an accelerator. For each cell it builds the model as the trainer does (paper_config, bf16
compute, f32 params and SGD momentum state) and compiles one train step (forward + backward + SGD update, state
donated) at each batch size B for the cell's input shape, from abstract inputs; XLA's ``cost_analysis()`` gives
F (flops) and Q (bytes accessed) per step, ``memory_analysis()`` the argument, output and temp sizes.

Model, per device with peak dense bf16 rate P and memory bandwidth W:

    t_step(B)   = max(F / P, Q / W) / eta_B
    img/s       = B / t_step(B)
    t_eval      = r * (N_train + N_test) * t_step(128) / 128           (one in-graph NC evaluation)
    run         = epochs * (N_train // B) * t_step(B) + M * t_eval       (M = measurement epochs)
    sweep       = 25 * run                                              (the 25 learning rates)

eta_B is calibrated on one measured point per batch size (default: one H100, ResNet18 on CIFAR-10-shaped
32x32x3 input, 44 800 img/s at B = 128 and 75 100 at B = 512): eta_B = roofline time / measured time on that
device for that cell; a batch size without its own point uses the nearest calibrated one. r is the measured
cost of evaluating one image relative to training on one (default: 50 000 images evaluated in 0.168 s against a
1.135 s epoch of 390 x 128 images on the same H100: r = 0.148).

Assumptions, stated once:
- F and Q are XLA:CPU's counts (this script compiles on the machine it runs on). F is nearly platform
  independent; Q is what XLA:CPU's fusion touches, an estimate only: XLA:CPU runs bf16 convolutions in f32, and
  a GPU or TPU fuses differently. With these Q every cell is bandwidth-bound on every device, so the predictions
  are Q / W scaled by one factor; the "flops-bound" column shows what the calibrated MFU alone would predict.
- One efficiency per batch size for every net and device: calibrated on a small ResNet on an H100 and applied
  to 224 px ImageNet nets and to TPUs (another compiler). A better point, e.g. an H200 measurement, replaces it
  through --calibrate.
- The epoch is its steps (the measured scanned epoch ran 2% below the measured step rate); no input pipeline
  cost (datasets are device-resident, as the trainer holds them); DeepFool (100 test inputs per measurement) and
  the NC metric arithmetic beyond the calibrated evaluation are not counted; the TPT-start measurement (at most
  one more) is not counted.
- Dataset sizes after the paper's balancing (nc_jax.data.PAPER_PER_CLASS x classes); test sets are the tfds
  test splits (ImageNet: validation); M is the trainer's schedule (nc_jax.training.schedule).
- Memory at B = 128 per device: state (params, batch statistics, momentum) and XLA:CPU's temp (activations,
  gradients), which is likely an upper bound (f32 convolutions); the dataset in f32 on every device, as the
  trainer replicates it; the NC evaluation's features and logits (N_train + N_test) x (p + C) f32. A device
  fits a cell if the larger of training (step + dataset) and evaluation (state + dataset + features) is at most
  90% of its HBM.
- ImageNet slices: data parallel, global batch 128, per-chip batch 128 / n (n <= 128). Per chip: the state
  (replicated) + temp(128 / n), with temp(b) = a + c b fitted through the B = 128 and B = 512 compiles (without
  a 512 compile: a = the f32 gradients, c from B = 128), and the NC features / n; either with the input
  streamed from the host (nc-jax cannot yet) or with the f32 dataset sharded over the chips. Slices: v5e 1, 4, 8,
  ... chips; v4 4 (v4-8), 8, 16, ... chips. Time on the slice assumes ideal scaling of the one-chip prediction.

Populations (--population K,...; nc_jax.training.population): the K learning rates of a sweep as one program,
every state leaf with a leading member axis and the train step vmapped over it, the batch shared. For each K
the cell's population epoch (``build_population(...).train_epoch``, bf16 compute, epoch_loop 'scan' as on an
accelerator) is compiled over a one-batch dataset, so the scan is one step: F_K, Q_K and the buffer sizes as
above, and the convolutions of the lowered HLO (JAX's own ops, the same lowered for cpu, cuda or tpu) and of
XLA:CPU's optimised HLO are counted with their feature_group_count / batch_group_count (``conv_census``).
A population step on one device, member batch B (t_1(B): the one-run step above):

    t_K(B)      = t_1(B) * [roofline(F_K, Q_K) / roofline(F_1, Q_1)] * eta_B / eta'
    img/s       = K B / t_K(B)                                            (aggregate, all members)
    program     = c + epochs * (N_train // B) * t_K(B) + K * M * t_eval   (one compile, K runs, K evaluations)
    sweep       = the ceil(25 / K) programs grid.py --population K runs (K members each, the last one 25 mod K)
                  against 25 * (c + run) (sequential) and c + run (one run)

with eta' = eta_B ("no gain": a grouped step as efficient per FLOP as one run's step at B) or eta' = eta at batch
K B, log-linear between the calibrated batch sizes and held at the largest one beyond it ("dense batch K B":
the grouped convolutions as efficient as one run's dense ones at K B images). Neither is measured: they bracket
what a device does with the grouped convolutions. c is one program's compile (--compile-s; default: the
H200's measured first-epoch overhead of the paper's MNIST/ResNet18 run, 8.8 s at 5,687 img/s against 1.7 s
steady, results/accelerator/mnist.log, 2026-11-30; a single run's, applied to every K). Evaluations: K times
one run's (the vmapped evaluation is assumed no cheaper per member). The largest K that fits a device:
step memory(K) fitted linear in K through the compiles, plus the epoch's gathered batches (N_train // B * B
images, f32) and the dataset (f32, replicated), or K x (state + NC features) at an evaluation, <= 90% of HBM.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import math
import pathlib
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from nc_jax import data, models
from nc_jax.data import device as device_lib
from nc_jax.training import population as population_lib, schedule, step as step_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's configs/
from configs.paper import common as paper  # noqa: E402  (the paper's cells)


@dataclasses.dataclass(frozen=True)
class Device:
  flops: float  # peak dense bf16, FLOP/s
  bandwidth: float  # HBM, bytes/s
  memory: float  # HBM, bytes


DEVICES = {"H100": Device(989e12, 3.35e12, 80e9), "H200": Device(989e12, 4.8e12, 141e9),
           "v5e": Device(197e12, 819e9, 16e9), "v4": Device(275e12, 1.2e12, 32e9)}
TPU_SLICE_CHIPS = {"v5e": (1, 4, 8, 16, 32, 64, 128), "v4": (4, 8, 16, 32, 64, 128)}
USABLE_MEMORY = 0.9  # of HBM; XLA and the runtime keep some
SWEEP = 25  # learning rates, logspace(1e-4, 0.25, 25)
INPUT_SHAPE = {"mnist": (32, 32, 1), "fashion_mnist": (32, 32, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3),
               "svhn_cropped": (32, 32, 3), "stl10": (96, 96, 3), "imagenet2012": (224, 224, 3)}
TEST_SIZE = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000,
             "svhn_cropped": 26_032, "stl10": 8_000, "imagenet2012": 50_000}
NUM_CLASSES = {name: 1000 if name == "imagenet2012" else 100 if name == "cifar100" else 10 for name in INPUT_SHAPE}
DEFAULT_CALIBRATION = ("H100:resnet18:128:44800:cifar10", "H100:resnet18:512:75100:cifar10")
GB = 1e9
# LLVM code generation only: XLA's HLO passes, hence cost_analysis and the buffer sizes, are unchanged (checked on
# ResNet18, ResNet152, DenseNet201); DenseNet201 at 224 px compiles in ~47 s instead of ~90 s on 2 cores.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class Cost:
  """One compiled train step of one cell at one batch size (XLA:CPU's counts)."""
  flops: float
  bytes_accessed: float
  step_memory: int  # arguments + outputs - aliased + temp
  temp: int
  state: int  # params + batch statistics + optimiser state
  params: int  # bytes, f32
  num_params: int
  opt_state: int
  feature_dim: int
  compile_s: float


@functools.lru_cache(maxsize=None)  # in memory only: a cell compiled for a table is reused for calibration
def compile_cost(dataset: str, net: str, batch: int) -> Cost:
  """Builds the cell's model as nc_jax.training.program does and compiles its train step from abstract inputs."""
  config = paper.load(dataset, net)
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_options.to_dict().items()}
  model = models.create(net, NUM_CLASSES[dataset], dtype=jnp.bfloat16, **options)
  tx = schedule.sgd(optax.constant_schedule(config.lr), config.momentum, config.weight_decay)
  shape = INPUT_SHAPE[dataset]
  state = jax.eval_shape(functools.partial(step_lib.create_state, model, tx, shape, 0))
  _, features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *shape)), train=False), state.variables)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   loss_fn=step_lib.loss_function(config.loss)), donate_argnums=0)
  batch_spec = (jax.ShapeDtypeStruct((batch, *shape), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  start = time.perf_counter()
  compiled = step.lower(state, batch_spec).compile(compiler_options=FAST_COMPILE)
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  return Cost(flops=cost["flops"], bytes_accessed=cost["bytes accessed"],
              step_memory=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes + memory.temp_size_in_bytes),
              temp=memory.temp_size_in_bytes, state=_bytes((state.params, state.batch_stats, state.opt_state)),
              params=_bytes(state.params), num_params=sum(x.size for x in jax.tree_util.tree_leaves(state.params)),
              opt_state=_bytes(state.opt_state), feature_dim=features.shape[-1], compile_s=seconds)


def roofline_s(cost: Cost, device: Device) -> float:
  return max(cost.flops / device.flops, cost.bytes_accessed / device.bandwidth)


def bound(cost: Cost, device: Device) -> str:
  return "flops" if cost.flops / device.flops >= cost.bytes_accessed / device.bandwidth else "bytes"


# ------------------------------------------------------------------------ calibration
@dataclasses.dataclass(frozen=True)
class Calibration:
  device: str
  net: str
  dataset: str
  batch: int
  images_per_s: float
  efficiency: float  # eta_B = roofline time / measured time
  mfu: float  # measured FLOP/s over the device's peak


def parse_calibration(spec: str) -> tuple[str, str, int, float, str]:
  """'DEVICE:NET:BATCH:IMG_PER_S[:DATASET]' (dataset default cifar10) -> (device, net, batch, img/s, dataset)."""
  fields = spec.split(":")
  try:
    device, net, batch, rate = fields[0], fields[1], int(fields[2]), float(fields[3])
  except (IndexError, ValueError):
    device = None
  if device not in DEVICES or len(fields) > 5:
    raise SystemExit(f"--calibrate {spec!r}: expected DEVICE:NET:BATCH:IMG_PER_S[:DATASET] with DEVICE one of "
                     f"{', '.join(DEVICES)}, e.g. H200:resnet18:128:52000")
  dataset = fields[4] if len(fields) == 5 else "cifar10"
  if (dataset, net) not in paper.cells():
    raise SystemExit(f"--calibrate {spec!r}: ({dataset}, {net}) is not a paper cell; name one, e.g. "
                     f"H100:resnet18:128:44800:cifar10")
  return device, net, batch, rate, dataset


def calibrate(device: str, net: str, batch: int, rate: float, dataset: str) -> Calibration:
  """eta for ``batch``: the roofline time of the cell's step on ``device`` over the measured time."""
  cost = compile_cost(dataset, net, batch)
  measured_s = batch / rate
  return Calibration(device, net, dataset, batch, rate, roofline_s(cost, DEVICES[device]) / measured_s,
                     cost.flops / measured_s / DEVICES[device].flops)


def efficiency_for(batch: int, calibrations: dict[int, Calibration]) -> Calibration:
  """The calibration at ``batch``, else the one nearest in log(batch)."""
  return calibrations.get(batch) or min(calibrations.values(), key=lambda c: abs(math.log(c.batch / batch)))


# ---------------------------------------------------------------------- predictions
@dataclasses.dataclass(frozen=True)
class Cell:
  dataset: str
  net: str

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.net}"

  @property
  def train_size(self) -> int:
    return data.PAPER_PER_CLASS[self.dataset] * NUM_CLASSES[self.dataset]

  @property
  def epochs(self) -> int:
    return paper.load(self.dataset, self.net).num_epochs

  @property
  def measurements(self) -> int:
    return len(schedule.measurement_epochs(self.epochs))

  @property
  def dataset_bytes(self) -> int:
    return (self.train_size + TEST_SIZE[self.dataset]) * math.prod(INPUT_SHAPE[self.dataset]) * 4

  def feature_bytes(self, cost: Cost) -> int:
    return (self.train_size + TEST_SIZE[self.dataset]) * (cost.feature_dim + NUM_CLASSES[self.dataset]) * 4


def step_s(cost: Cost, device: Device, calibration: Calibration) -> float:
  return roofline_s(cost, device) / calibration.efficiency


def run_s(cell: Cell, costs: dict[int, Cost], batch: int, device: Device, calibrations, eval_ratio: float):
  """(one run's seconds, the NC evaluations' share of it) at training batch ``batch``."""
  base = min(costs, key=lambda b: abs(b - 128))  # the evaluation is priced at the protocol's batch
  per_image = step_s(costs[base], device, efficiency_for(base, calibrations)) / base
  evaluations = cell.measurements * eval_ratio * (cell.train_size + TEST_SIZE[cell.dataset]) * per_image
  training = cell.epochs * (cell.train_size // batch) * step_s(costs[batch], device,
                                                               efficiency_for(batch, calibrations))
  return training + evaluations, evaluations / (training + evaluations)


def slice_chips(cell: Cell, costs: dict[int, Cost], chip: str, sharded_dataset: bool):
  """Smallest data-parallel slice (chips) that holds the cell at global batch 128, or None."""
  c128 = costs.get(128)
  if c128 is None:
    return None
  c512 = costs.get(512)
  per_image = (c512.temp - c128.temp) / 384 if c512 else (c128.temp - c128.params) / 128
  fixed = max(0.0, c128.temp - 128 * per_image)
  state = c128.step_memory - c128.temp
  budget = USABLE_MEMORY * DEVICES[chip].memory
  for n in TPU_SLICE_CHIPS[chip]:
    data_part = cell.dataset_bytes / n if sharded_dataset else 0
    need = data_part + state + max(fixed + per_image * 128 / n, cell.feature_bytes(c128) / n)
    if need <= budget:
      return n
  return None


# ------------------------------------------------------------------------------ tables
def select_cells(spec: str) -> list[Cell]:
  every = [Cell(d, n) for d, n in paper.cells()]
  if spec == "all":
    return every
  chosen = []
  for item in spec.split(","):
    matches = [c for c in every if item in (c.name, c.dataset, c.net)]
    if not matches:
      raise SystemExit(f"--cells: {item!r} names no cell; use DATASET/NET, a dataset or a net, e.g. "
                       f"cifar10/resnet18; cells: {', '.join(c.name for c in every)}")
    chosen += [c for c in matches if c not in chosen]
  return chosen


def _short(value: float) -> str:
  return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"


def _hours(seconds: float) -> str:
  return _short(seconds / 3600)


def tables(cells, costs, batches, calibrations, eval_ratio, run_seconds) -> str:
  dev = jax.devices()[0]
  bytes_bound = all(bound(costs[cell][b], device) == "bytes" for cell in cells for b in batches
                    for device in DEVICES.values())
  bound_text = ("with these Q every cell is bandwidth-bound on every device, so the predictions scale with bandwidth"
                if bytes_bound else "some cells are flops-bound")
  cal_text = "; ".join(
      f"B={c.batch}: {c.device} {c.dataset}/{c.net} {c.images_per_s:,.0f} img/s -> eta = {c.efficiency:.3f} "
      f"(MFU {100 * c.mfu:.1f}%)" for c in sorted(calibrations.values(), key=lambda c: c.batch))
  lines = [
      f"### benchmarks/cost_model.py, {datetime.date.today()}: PREDICTIONS, not measurements; XLA costs compiled on "
      f"{dev.platform} ({dev.device_kind}), {platform.machine()}, jax {jax.__version__}; script ran {run_seconds:.0f} s",
      "",
      "Roofline per device: t_step = max(F / peak FLOP/s, Q / HBM bandwidth) / eta_B, F and Q from XLA:CPU's "
      "cost_analysis of one compiled train step (bf16 compute, f32 params, fwd + bwd + SGD). F is close to "
      "platform independent; Q is XLA:CPU's fusion estimate (bf16 convolutions run in f32 there); "
      f"{bound_text}. Calibration (one eta per batch size, for every net and device; eta > 1 means XLA:CPU's Q "
      f"overstates what the measured step moved): {cal_text}. NC evaluation: r = {eval_ratio:.3f} x the training cost per image, "
      "over train + test sets, at each of the trainer's measurement epochs. Peaks: H100 989 TFLOP/s, 3.35 TB/s, "
      "80 GB; H200 989, 4.8, 141; v5e 197, 0.819, 16; v4 275, 1.2, 32. See the script's docstring for every "
      "assumption.", "",
      "**Throughput per device** (F per image = train step FLOPs / B; flops-bound column: H100 at the calibrated "
      "MFU alone)", ""]
  head = "| cell | input | params (M) | GFLOP/img | GB/step (CPU est.) |"
  rule = "| --- | --- | ---: | ---: | ---: |"
  for b in batches:
    head += f" H100 B={b} | H200 B={b} | v5e B={b} | v4 B={b} |"
    rule += " ---: | ---: | ---: | ---: |"
  head += f" H100 flops-bound B={batches[0]} |"
  rule += " ---: |"
  lines += [head, rule]
  for cell in cells:
    c = costs[cell][batches[0]]
    row = (f"| {cell.name} | {'x'.join(map(str, INPUT_SHAPE[cell.dataset]))} | {c.num_params / 1e6:.1f} | "
           f"{c.flops / batches[0] / 1e9:.2f} | {c.bytes_accessed / GB:.1f} (B={batches[0]}) |")
    for b in batches:
      cal = efficiency_for(b, calibrations)
      row += "".join(f" {b / step_s(costs[cell][b], device, cal):,.0f} |" for device in DEVICES.values())
    cal = efficiency_for(batches[0], calibrations)
    flops_bound = DEVICES["H100"].flops * cal.mfu / (c.flops / batches[0])
    row += f" {flops_bound:,.0f} |"
    lines.append(row)

  lines += ["", f"**Wall time of the protocol** (350 epochs, ImageNet 300; one run, hours; the {SWEEP}-lr sweep, "
            "device-days; batch B as trained)", "",
            "| cell | B | train N | test N | epochs | NC evals | run H100 (h) | run H200 | run v5e | run v4 | "
            "NC eval share | sweep H100 (days) | sweep H200 | sweep v5e | sweep v4 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  totals = {b: {name: 0.0 for name in DEVICES} for b in batches}
  for b in batches:
    for cell in cells:
      runs = {name: run_s(cell, costs[cell], b, device, calibrations, eval_ratio) for name, device in DEVICES.items()}
      for name, (seconds, _) in runs.items():
        totals[b][name] += SWEEP * seconds
      lines.append(
          f"| {cell.name} | {b} | {cell.train_size:,} | {TEST_SIZE[cell.dataset]:,} | {cell.epochs} | "
          f"{cell.measurements} | " + " | ".join(_hours(s) for s, _ in runs.values()) +
          f" | {100 * runs['H100'][1]:.0f}% | " + " | ".join(_short(SWEEP * s / 86400) for s, _ in runs.values())
          + " |")
    lines.append(f"| **all {len(cells)} cells** | {b} | | | | | | | | | | " +
                 " | ".join(f"**{_short(s / 86400)}**" for s in totals[b].values()) + " |")

  lines += ["", "**Memory per device at B = 128** (GB; XLA:CPU's buffer sizes, likely an upper bound; the trainer "
            f"keeps the f32 dataset on every device; fits = max(step, state + NC features) + dataset <= "
            f"{USABLE_MEMORY:.0%} of HBM; streamed: without the dataset)", "",
            "| cell | params (f32) | optimiser state | step: state + temp | NC features + logits | dataset (f32) | "
            "fits on | fits on, input streamed |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
  for cell in cells:
    c = costs[cell].get(128)
    if c is None:
      continue
    need = max(c.step_memory, c.state + cell.feature_bytes(c))
    fits = [", ".join(name for name, device in DEVICES.items() if extra + need <= USABLE_MEMORY * device.memory)
            or "none" for extra in (cell.dataset_bytes, 0)]
    lines.append(f"| {cell.name} | {c.params / GB:.2f} | {c.opt_state / GB:.2f} | {c.step_memory / GB:.1f} | {cell.feature_bytes(c) / GB:.2f} "
                 f"| {cell.dataset_bytes / GB:.1f} | {fits[0]} | {fits[1]} |")

  imagenet = [cell for cell in cells if cell.dataset == "imagenet2012" and 128 in costs[cell]]
  if imagenet:
    lines += ["", "**Smallest TPU slice for the ImageNet cells** (data parallel, global batch 128, per-chip batch "
              "128 / chips; state replicated, temp(b) = a + c b from the B = 128 and 512 compiles, NC features "
              "sharded; hours: on the input-streamed slice, ideal scaling of the one-chip prediction)", "",
              "| cell | temp a (GB) | temp c (MB/img) | v5e, input streamed | v4, input streamed | "
              "v5e, dataset sharded in HBM | v4, dataset sharded in HBM | run on v5e slice (h) | run on v4 slice (h) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in imagenet:
      c128, c512 = costs[cell][128], costs[cell].get(512)
      per_image = (c512.temp - c128.temp) / 384 if c512 else (c128.temp - c128.params) / 128
      chips = {(chip, sharded): slice_chips(cell, costs[cell], chip, sharded)
               for sharded in (False, True) for chip in ("v5e", "v4")}
      hours = []
      for chip in ("v5e", "v4"):
        n = chips[(chip, False)]
        seconds, _ = run_s(cell, costs[cell], 128, DEVICES[chip], calibrations, eval_ratio)
        hours.append("n/a" if n is None else _hours(seconds / n))
      lines.append(f"| {cell.name} | {(c128.temp - 128 * per_image) / GB:.1f} | {per_image / 1e6:.0f} | " +
                   " | ".join("> 128" if n is None else f"{n} chips" for n in chips.values()) +
                   f" | {' | '.join(hours)} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------- populations
DEFAULT_COMPILE_S = 7.1  # see the docstring: the H200's first-epoch overhead of one run, 2026-11-30
_CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$conv(\w+)"')


def conv_census(hlo_text: str) -> collections.Counter:
  """{(role, kernel, groups): count} over the convolutions of an HLO module's text.

  role: for an HLO convolution, 'forward', 'input grad' or 'weight grad' from the dim_labels JAX emits (a
  transposed kernel '..oi' is an input gradient, a kernel-shaped output '->01..' a weight gradient); for the
  cuDNN call a GPU made of it, 'forward' or 'backward' from its op_name (transpose(...) is the gradient);
  kernel: 'conv' or the cuDNN call ('Forward', 'BackwardInput', 'BackwardFilter', 'BiasActivationForward');
  groups: 'dense', 'grouped G' (feature_group_count G > 1) or 'batch-grouped G' (batch_group_count G > 1).
  """
  census = collections.Counter()
  for line in hlo_text.splitlines():
    target = _CUDNN_CONV.search(line)
    if " convolution(" not in line and not target:
      continue
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if target:
      role = "backward" if op_name and "transpose(" in op_name.group(1) else "forward"
    elif labels and labels.group(3)[0].isdigit():
      role = "weight grad"
    elif labels and labels.group(2).endswith("oi"):
      role = "input grad"
    else:
      role = "forward"
    features = re.search(r"feature_group_count=(\d+)", line)
    batches = re.search(r"batch_group_count=(\d+)", line)
    groups = ("batch-grouped " + batches.group(1) if batches and int(batches.group(1)) > 1 else
              "grouped " + features.group(1) if features and int(features.group(1)) > 1 else "dense")
    census[(role, target.group(1) if target else "conv", groups)] += 1
  return census


def census_text(census: collections.Counter, members: int) -> str:
  """'forward: 1 dense, 19 grouped K; ...' with K for the member count (the convolutions by role)."""
  roles = {}
  for (role, kernel, groups), n in sorted(census.items()):
    groups = groups.replace(f"grouped {members}", "grouped K") if members > 1 else groups
    roles.setdefault(role, []).append(f"{n} {groups}" + ("" if kernel == "conv" else f" (cuDNN {kernel})"))
  return "; ".join(f"{role}: {', '.join(parts)}" for role, parts in roles.items())


@dataclasses.dataclass(frozen=True)
class PopulationCost:
  """One compiled population step of a cell: K members at member batch B (XLA:CPU's counts)."""
  members: int
  flops: float
  bytes_accessed: float
  step_memory: int  # arguments + outputs - aliased + temp, the one-batch epoch program
  temp: int
  state: int  # the K members' params, batch statistics and optimiser state
  compile_s: float
  lowered: collections.Counter  # conv_census of the lowered HLO: JAX's ops before any XLA pass
  compiled: collections.Counter  # conv_census after XLA:CPU's passes
  layout_ops: int  # transposes and copies in XLA:CPU's optimised HLO (vmap moves the member axis)
  platforms_agree: bool | None  # the HLO lowered for cuda and tpu has the same census as for cpu (None: not lowered)


@functools.lru_cache(maxsize=None)
def compile_population_cost(dataset: str, net: str, batch: int, members: int) -> PopulationCost:
  """Builds the cell's population of ``members`` lrs as training does and compiles its epoch over one batch."""
  config = paper.load(dataset, net)
  config.compute_dtype, config.epoch_loop, config.batch_size = "bfloat16", "scan", batch
  cell, shape = Cell(dataset, net), INPUT_SHAPE[dataset]
  lrs = tuple(float(v) for v in np.geomspace(1e-4, 0.25, members))  # the values do not change the program
  population = population_lib.build_population(config, lrs, device_lib.data_mesh(jax.devices()[:1]),
                                               NUM_CLASSES[dataset], shape, cell.train_size // batch, cell.train_size)
  state = jax.eval_shape(population.init)
  one_batch = (jax.ShapeDtypeStruct((batch, *shape), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  traced = jax.jit(population.train_epoch, donate_argnums=0).trace(state, *one_batch, 1)
  lowered = traced.lower()
  census = conv_census(lowered.as_text(dialect="hlo"))
  try:
    agree = all(conv_census(traced.lower(lowering_platforms=(p,)).as_text(dialect="hlo")) == census
                for p in ("cuda", "tpu"))
  except Exception:  # noqa: BLE001  (a jax without that platform's lowering rules: the check is only informative)
    agree = None
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options=FAST_COMPILE)
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  return PopulationCost(
      members=members, flops=cost["flops"], bytes_accessed=cost["bytes accessed"],
      step_memory=(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                   + memory.temp_size_in_bytes), temp=memory.temp_size_in_bytes,
      state=_bytes((state.params, state.batch_stats, state.opt_state)), compile_s=seconds, lowered=census,
      compiled=conv_census(text), layout_ops=text.count(" transpose(") + text.count(" copy("),
      platforms_agree=agree)


def interpolated_efficiency(batch: float, calibrations: dict[int, Calibration]) -> float:
  """eta at ``batch``: log-linear between the calibrated batch sizes, the nearest end's outside them."""
  points = sorted((c.batch, c.efficiency) for c in calibrations.values())
  if batch <= points[0][0]:
    return points[0][1]
  for (b0, e0), (b1, e1) in zip(points, points[1:]):
    if batch <= b1:
      return e0 + (e1 - e0) * math.log(batch / b0) / math.log(b1 / b0)
  return points[-1][1]


def largest_population(cell: Cell, cost: Cost, pcosts: dict[int, PopulationCost], batch: int,
                       device: Device) -> int:
  """The most members of ``cell`` at member batch ``batch`` that fit ``device`` (0: not even one).

  Training: step memory(K) = a + b K (least squares through the compiled K) + the epoch's gathered batches +
  the dataset; an evaluation: K (state + NC features) + the dataset; the larger <= USABLE_MEMORY of HBM.
  """
  ks = np.array(sorted(pcosts), float)
  if len(ks) > 1:
    b, a = np.polyfit(ks, [pcosts[int(k)].step_memory for k in ks], 1)
  else:
    a, b = 0.0, pcosts[int(ks[0])].step_memory / ks[0]
  batches = cell.train_size // batch * batch * math.prod(INPUT_SHAPE[cell.dataset]) * 4
  free = USABLE_MEMORY * device.memory - cell.dataset_bytes
  per_member_eval = pcosts[int(ks[0])].state / ks[0] + cell.feature_bytes(cost)
  return max(0, min(math.floor((free - a - batches) / b), math.floor(free / per_member_eval)))


@dataclasses.dataclass(frozen=True)
class SweepPrediction:
  """One device, one K, one efficiency assumption: a population step and the 25-lr sweep it makes."""
  step_s: float
  images_per_s: float  # aggregate, all members
  mfu: float
  sweep_s: float  # ceil(25 / K) programs, compiles included
  one_run_s: float  # c + one run (train + NC evaluations)


def predict_sweep(cell: Cell, costs: dict[int, Cost], pcosts: dict[int, PopulationCost], members: int, batch: int,
                  device: Device, calibrations, eval_ratio: float, compile_s: float, dense_batch: bool):
  """The population of ``members`` on ``device``, its step at eta' = eta_B or (``dense_batch``) one run's eta at
  batch K B, and the sweep of 25 lrs as grid.py --population cuts it: programs of K members and one of the
  remaining 25 mod K (its roofline per member taken from K's compile, its eta' at its own batch)."""
  calibration = efficiency_for(batch, calibrations)
  run, eval_share = run_s(cell, costs, batch, device, calibrations, eval_ratio)
  train_1, eval_1 = run * (1 - eval_share), run * eval_share
  per_member = roofline_s(pcosts[members], device) / roofline_s(pcosts[1], device) / members

  def slowdown(k):  # t_k(B) / t_1(B)
    eta = interpolated_efficiency(k * batch, calibrations) if dense_batch else calibration.efficiency
    return k * per_member * calibration.efficiency / eta

  step = step_s(costs[batch], device, calibration) * slowdown(members)
  sizes = [members] * (SWEEP // members) + ([SWEEP % members] if SWEEP % members else [])
  sweep = sum(compile_s + train_1 * slowdown(k) + k * eval_1 for k in sizes)
  return SweepPrediction(step, members * batch / step, pcosts[members].flops / step / device.flops, sweep,
                         compile_s + run)


def population_tables(cell: Cell, costs, pcosts, batch: int, calibrations, eval_ratio: float, compile_s: float,
                      run_seconds: float) -> str:
  dev = jax.devices()[0]
  ks = sorted(pcosts)
  one = pcosts[1]
  census_k = max(ks)
  cal_text = "; ".join(f"B={c.batch}: {c.device} {c.dataset}/{c.net} {c.images_per_s:,.0f} img/s -> eta = "
                       f"{c.efficiency:.3f}" for c in sorted(calibrations.values(), key=lambda c: c.batch))
  lines = [
      f"### benchmarks/cost_model.py --population, {datetime.date.today()}: PREDICTED, not measured; "
      f"{cell.name} at member batch {batch}, bf16 compute; XLA costs compiled on {dev.platform} "
      f"({dev.device_kind}), {platform.machine()}, jax {jax.__version__}; script ran {run_seconds:.0f} s", "",
      "Method (benchmarks/cost_model.py's docstring): the population's scanned epoch "
      "(`build_population(...).train_epoch`) compiled over a one-batch dataset, F and Q from XLA:CPU's "
      "cost_analysis, buffers from memory_analysis; a population step costs one run's calibrated step times "
      "roofline(F_K, Q_K) / roofline(F_1, Q_1) times eta_B / eta', where eta' is either eta_B (**no gain**: the "
      "grouped step as efficient as one run's) or the eta of one run at batch K x B, log-linear between the "
      "calibrated batches and held beyond the largest (**dense batch KB**: not an upper bound where K x B exceeds "
      f"the largest calibrated batch; a dense batch that large may run faster still); neither is measured. "
      f"Calibration: {cal_text}. A program = one compile ({compile_s:g} s, the H200's measured "
      "first-epoch overhead of one run, applied to every K: assumed) + the paper's epochs + K times one run's "
      f"NC evaluations (r = {eval_ratio:.3f}); the sweep = ceil(25 / K) programs as `grid.py run --population K` cuts "
      "it (K members each, the last one the remaining 25 mod K); sequential = 25 runs, each with its compile; "
      "process starts not counted.", "",
      f"**What vmap makes of the convolutions** (counted in the HLO; K = {census_k} shown, every K > 1 alike)", ""]
  lowered, compiled = pcosts[census_k].lowered, pcosts[census_k].compiled
  agree = {True: "the same", False: "NOT the same", None: "not checked"}[pcosts[census_k].platforms_agree]
  lines += [
      f"- One run (K = 1): {sum(one.lowered.values())} convolutions, {census_text(one.lowered, 1)}.",
      f"- Lowered population (JAX's ops, before XLA; {agree} when lowered for cuda and tpu): "
      f"{sum(lowered.values())} convolutions, {census_text(lowered, census_k)}. "
      "jax.vmap of lax.conv over the member axis of both the weights and the activations folds the member axis "
      "into the feature axis and multiplies feature_group_count by K (jax/_src/lax/convolution.py, "
      "_conv_general_dilated_batch_rule): a grouped convolution. Where only one operand carries the member axis "
      "(the first convolution, whose input every member shares, and its weight gradient) the member axis joins "
      "the output features instead: one dense convolution with K times the outputs. No batch_group_count "
      "appears.",
      f"- After XLA:CPU's passes: {sum(compiled.values())} convolutions, {census_text(compiled, census_k)}: XLA:CPU "
      "keeps grouped f32 convolutions grouped (cpu_compiler.cc expands feature groups only for other types).",
      "- FLOPs: F_K / (K F_1) = " + ", ".join(f"{pcosts[k].flops / (k * one.flops):.4f} (K={k})" for k in ks) +
      ": a grouped convolution does K times one member's work, nothing more (no block-diagonal expansion).",
      "- What it does to speed (from XLA's source, not measured): XLA:GPU's conv rewriter maps a convolution with "
      "feature_group_count > 1 to neither cuDNN backward-filter (\"All grouped backward filters are mapped to batch "
      "grouped convolutions in tf2xla bridge\") nor backward-input (disabled for grouped convolutions: \"not much "
      "performance improvement\"), so every grouped input and weight gradient runs as a cuDNN *forward* grouped "
      "convolution, the weight gradients with the activation's whole spatial extent as window; a single run's "
      "go to cuDNN's backward kernels. How fast cuDNN (or a TPU's convolution emitter) runs those grouped shapes "
      "is what the two ends of each range below stand for; benchmarks/population.py --case resnet18 prints the "
      "compiled GPU census and measures it (accelerator.sh, stage population).", "",
      "**The population step per K** (XLA:CPU; Q is XLA:CPU's fusion estimate, bf16 convolutions run in f32 there)", "",
      "| K | GFLOP/step | F_K / (K F_1) | GB accessed/step | Q_K / (K Q_1) | state (GB) | step memory (GB) | "
      "temp per member (GB) | transposes + copies | XLA:CPU compile (s, FAST_COMPILE) |",
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for k in ks:
    c = pcosts[k]
    lines.append(f"| {k} | {c.flops / 1e9:,.0f} | {c.flops / (k * one.flops):.3f} | {c.bytes_accessed / GB:,.1f} | "
                 f"{c.bytes_accessed / (k * one.bytes_accessed):.3f} | {c.state / GB:.2f} | {c.step_memory / GB:.1f} | "
                 f"{c.temp / k / GB:.2f} | {c.layout_ops} | {c.compile_s:.1f} |")

  lines += ["", f"**Per device** (step and aggregate img/s: no gain .. dense batch KB; sweep of {SWEEP} lrs in "
            f"hours; x one run = sweep / one run's wall, the issue's target <= 8 on an H100/H200; x faster = "
            "sequential / sweep, target >= 3)", "",
            "| device | K | step (ms) | aggregate img/s | MFU | sweep (h) | x one run | x faster than sequential | "
            "one run (h) | sequential (h) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  needed = {}
  for name, device in DEVICES.items():
    for k in ks:
      low, high = (predict_sweep(cell, costs, pcosts, k, batch, device, calibrations, eval_ratio, compile_s, dense)
                   for dense in (False, True))
      one_run = low.one_run_s
      sequential = SWEEP * one_run
      lines.append(
          f"| {name} | {k} | {1e3 * low.step_s:.1f} .. {1e3 * high.step_s:.1f} | {low.images_per_s:,.0f} .. "
          f"{high.images_per_s:,.0f} | {100 * low.mfu:.0f}% .. {100 * high.mfu:.0f}% | {_hours(low.sweep_s)} .. "
          f"{_hours(high.sweep_s)} | {low.sweep_s / one_run:.1f} .. {high.sweep_s / one_run:.1f} | "
          f"{sequential / low.sweep_s:.2f} .. {sequential / high.sweep_s:.2f} | {_hours(one_run)} | "
          f"{_hours(sequential)} |")
      if k == SWEEP:  # eta' the target needs: compile + train_1 * scale * eta_B / eta' + 25 eval_1 <= 8 one run
        run, eval_share = run_s(cell, costs, batch, device, calibrations, eval_ratio)
        train_1, eval_1 = run * (1 - eval_share), run * eval_share
        scale = roofline_s(pcosts[k], device) / roofline_s(one, device)
        gain = train_1 * scale / (8 * one_run - compile_s - SWEEP * eval_1)
        step = step_s(costs[batch], device, efficiency_for(batch, calibrations)) * scale / gain
        needed[name] = (gain, pcosts[k].flops / step / device.flops, SWEEP * batch / step)
  if needed:
    lines += ["", f"**What the target needs** (K = {SWEEP}, one program: sweep <= 8 x one run): the population "
              "step must run this much faster per FLOP than one run's step at B (eta' / eta_B), i.e. at this MFU "
              "and aggregate rate; for comparison, one run measured on the H200 (BENCHMARKS.md, 2026-11-30): "
              "13.3% MFU at B = 128, 24.6% at B = 512 (a dense batch of 4 x 128)", "",
              "| device | eta' / eta_B needed | MFU needed | aggregate img/s needed |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {g:.2f} | {100 * m:.0f}% | {r:,.0f} |" for name, (g, m, r) in needed.items()]

  lines += ["", f"**Largest K that fits one device** (member batch {batch}; XLA:CPU's buffers, likely an upper "
            "bound: f32 convolutions there; step memory fitted a + b K through the compiles above, plus the "
            "epoch's gathered batches and the f32 dataset on the device; <= 90% of HBM)", "",
            "| device | HBM (GB) | largest K | populations for 25 lrs |", "| --- | ---: | ---: | --- |"]
  for name, device in DEVICES.items():
    k_max = largest_population(cell, costs[batch], pcosts, batch, device)
    plan = ("none fits" if k_max == 0 else f"1 program of {SWEEP}" if k_max >= SWEEP else
            f"{math.ceil(SWEEP / k_max)} programs of <= {k_max}")
    lines.append(f"| {name} | {device.memory / GB:.0f} | {k_max} | {plan} |")
  return "\n".join(lines)


def population_main(args, cells, batches, calibrations, eval_ratio, start) -> None:
  """--population: the population tables of each cell at member batch batches[0]."""
  try:
    ks = sorted({int(k) for k in args.population.split(",")} | {1})
  except ValueError:
    raise SystemExit(f"--population {args.population!r}: expected comma-separated member counts, e.g. "
                     "1,2,4,8,16,25") from None
  if ks[0] < 1:
    raise SystemExit(f"--population {args.population!r}: member counts are >= 1")
  batch = batches[0]
  sections = []
  for cell in cells:
    costs = {batch: compile_cost(cell.dataset, cell.net, batch)}
    pcosts = {}
    for k in ks:
      pcosts[k] = compile_population_cost(cell.dataset, cell.net, batch, k)
      print(f"compiled {cell.name} population K={k} B={batch} in {pcosts[k].compile_s:.0f} s", flush=True)
    sections.append(population_tables(cell, costs, pcosts, batch, calibrations, eval_ratio, args.compile_s,
                                      time.perf_counter() - start))
  common.report("\n\n".join(sections), append=not args.no_append)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cells", default=None, help="'all' or comma-separated DATASET/NET, DATASET or NET (default: "
                      "all; with --population, cifar10/resnet18)")
  parser.add_argument("--batch-sizes", default="128,512", help="comma-separated; the first is the protocol's")
  parser.add_argument("--calibrate", action="append", default=None,
                      help="DEVICE:NET:BATCH:IMG_PER_S[:DATASET] (dataset default cifar10), one per batch size; "
                           f"repeatable; default {' and '.join(DEFAULT_CALIBRATION)}")
  parser.add_argument("--eval-calibration", default="1.135:0.168:50000",
                      help="EPOCH_S:EVAL_S:IMAGES measured on one device at B=128: an epoch over IMAGES and one "
                           "NC evaluation over IMAGES")
  parser.add_argument("--population", default=None, metavar="K,...",
                      help="member counts of the population tables (K lrs as one vmapped program) instead of the "
                           "throughput tables, at member batch = the first of --batch-sizes, e.g. 1,2,4,8,16,25")
  parser.add_argument("--compile-s", type=float, default=DEFAULT_COMPILE_S,
                      help="seconds one program's compile costs on the device (--population; default: the "
                           "H200's measured first-epoch overhead of one run)")
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  start = time.perf_counter()
  batches = [int(b) for b in args.batch_sizes.split(",")]
  cells = select_cells(args.cells or ("cifar10/resnet18" if args.population else "all"))
  points = [parse_calibration(spec) for spec in args.calibrate or DEFAULT_CALIBRATION]
  try:
    epoch_s, eval_s, images = (float(x) for x in args.eval_calibration.split(":"))
  except ValueError:
    raise SystemExit(f"--eval-calibration {args.eval_calibration!r}: expected EPOCH_S:EVAL_S:IMAGES, "
                     f"e.g. 1.135:0.168:50000") from None
  eval_ratio = (eval_s / images) / (epoch_s / (int(images) // 128 * 128))
  if args.population:
    calibrations = {c.batch: c for c in (calibrate(*point) for point in points)}
    population_main(args, cells, batches, calibrations, eval_ratio, start)
    return

  costs = {}
  for cell in cells:
    costs[cell] = {}
    for b in batches:
      costs[cell][b] = compile_cost(cell.dataset, cell.net, b)
      print(f"compiled {cell.name} B={b} in {costs[cell][b].compile_s:.0f} s", flush=True)
  calibrations = {}
  for point in points:
    calibration = calibrate(*point)
    calibrations[calibration.batch] = calibration
  table = tables(cells, costs, batches, calibrations, eval_ratio, time.perf_counter() - start)
  common.report(table, append=not args.no_append)


if __name__ == "__main__":
  main()
