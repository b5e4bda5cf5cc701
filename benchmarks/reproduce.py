"""The reproduction queue: on a lent accelerator, the paper's reachable conv-net cells, each run whole in one call.

    python benchmarks/reproduce.py --budget SECONDS [--data ROOT | --mnist DIR --fashion-mnist DIR]
                                   [--out results/accelerator] [--smoke] [--cells mnist_resnet18,...]
                                   [--compute-dtype bfloat16]

An accelerator is lent now and then for calls of at most 10 minutes on a fresh machine: only the files a call
writes under --out come back, so a cell counts only when its whole protocol (configs/paper/CELL.py: 350
epochs, its lr) ran inside one call. The queue takes the cells in order of value per minute (``CELLS``: the
notebook's MNIST/ResNet18 first) and, for each one not finished in OUT/CELL/:

  1. skips it when OUT/queue.json says it does not fit a call on this device (measured, below), or its data
     (ROOT/mnist or ROOT/fashion_mnist, the four IDX files) is missing;
  2. predicts its wall from this device's measured seconds per epoch of that net (queue.json), when known, and
     does not start it unless that fits in what is left of the budget;
  3. trains it (``python -m nc_jax.train``, bf16 compute with float32 parameters and float32 NC measurement:
     ``--compute-dtype``; the notebook trained in float32) in OUT/work/CELL, and from the third epoch on
     projects its end from the epochs' own pace: a run whose projection exceeds the whole budget is stopped
     (SIGTERM: it checkpoints) and marked in queue.json as not fitting a call on this device; one that the
     budget's end interrupts is stopped the same way and resumes from OUT/work/CELL on the next call where
     that folder is still there (the CPU rehearsal), and starts again where it is not (a fresh device);
  Each call keeps XLA's persistent compilation cache in OUT/compile_cache and records the first epoch's arrival
  (start-up, data, compiles and one epoch) in queue.json: what a cached compile saves is read from there.
  4. on success copies config.json, metrics.jsonl and tpt.json to OUT/CELL/ (no checkpoints: they are large and
     the run is whole), draws its report (``python -m nc_jax.report`` -> OUT/CELL/report/) and rewrites
     OUT/results.md: one row per finished cell (TPT start, test accuracy at TPT start and at the end: the
     paper's Table 1 quantity, NC1 first -> last, NC2-NC4 at the end).

Exit status: 0 every reachable cell is finished or known not to fit; 3 cells are left and this call advanced (a
cell finished, was measured not to fit, or checkpointed a newer epoch): run the same command again; 4 cells are
left and nothing advanced (the budget is too small to start or checkpoint one: a larger one is named); 1 a cell
failed (its log OUT/work/CELL.log is named); 2 bad arguments. benchmarks/accelerator.sh runs it as its mnist stage.
--smoke rehearses it on a CPU: each cell's :smoke variant on 20 images per class for 4 epochs, float32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import queue as queue_lib
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Optional

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from nc_jax import cli, files, records  # noqa: E402  (no JAX)

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
QUEUE_FILE = "queue.json"
RESULTS_FILE = "results.md"
PROJECT_AFTER_EPOCHS = 3  # the first epoch compiles; the pace is read from the epochs after it
REPORT_SECONDS = 60  # kept back from the budget for the report of a run that finishes (10 with --smoke)


class Cell(NamedTuple):
  name: str  # configs/paper/<name>.py
  dataset: str  # the IDX folder below --data


# The reachable cells (offline MNIST and Fashion-MNIST) in order of value per minute: the notebook's own cell,
# then the other ResNet18, the VGG11s, and the DenseNets (predicted ~13k img/s for DenseNet40 on an H100:
# ~23 minutes, more than a call, so the queue will measure and mark them rather than finish them).
CELLS = (Cell("mnist_resnet18", "mnist"), Cell("fashion_mnist_resnet18", "fashion_mnist"),
         Cell("mnist_vgg11", "mnist"), Cell("fashion_mnist_vgg11", "fashion_mnist"),
         Cell("mnist_densenet40", "mnist"), Cell("fashion_mnist_densenet250", "fashion_mnist"))
SMOKE_EPOCHS = 4
SMOKE_FLAGS = ("--config.per_class=20", f"--config.num_epochs={SMOKE_EPOCHS}", "--config.measure_epochs=(1,4)",
               "--config.lr_decay_epochs=(2,3)")


def read_queue(out: pathlib.Path) -> dict:
  """OUT/queue.json: {'devices': {device: {cell: {'epoch_seconds': s, 'num_epochs': E, 'fits': bool, ...}}}}."""
  try:
    return json.loads((out / QUEUE_FILE).read_text())
  except FileNotFoundError:
    return {"devices": {}}
  except ValueError:
    print(f"reproduce: {out / QUEUE_FILE} is damaged; starting a new one (finished cells are kept in OUT/CELL/)")
    return {"devices": {}}


def write_queue(out: pathlib.Path, queue: dict) -> None:
  files.write_atomically(out / QUEUE_FILE, (json.dumps(queue, indent=2, sort_keys=True) + "\n").encode())


def device_name() -> str:
  """The device kind training will run on (``jax.devices()[0].device_kind``), asked in a child process so
  this one never holds the accelerator."""
  found = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
                         capture_output=True, text=True, cwd=REPO)
  return found.stdout.strip().splitlines()[-1] if found.returncode == 0 and found.stdout.strip() else "unknown"


def newest_checkpoint(workdir: pathlib.Path) -> int:
  """The newest epoch checkpointed in ``workdir`` (0 if none)."""
  found = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(found, default=0)


def finished(run: pathlib.Path) -> bool:
  return (run / records.METRICS_FILE).exists() and records.finished(run)


def train_command(cell: Cell, args, workdir: pathlib.Path) -> list[str]:
  variant = ":smoke" if args.smoke else ""
  line = [sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs" / "paper" / f"{cell.name}.py{variant}"),
          "--workdir", str(workdir), "--config.data_source=idx", f"--config.data_dir={args.dirs[cell.dataset]}",
          f"--config.compute_dtype={args.compute_dtype}"]
  return line + (list(SMOKE_FLAGS) if args.smoke else [])


def projected_whole_run(arrivals: list, num_epochs: int) -> Optional[tuple[float, float]]:
  """(seconds an epoch, projected wall of the whole run from a fresh start) from ``arrivals``, the (epoch,
  seconds since the trainer started) of each epoch's log line: the first epoch's arrival (start-up, data and
  compile) plus num_epochs x the median interval of the later ones (measurement epochs included); None before
  PROJECT_AFTER_EPOCHS epochs have arrived after the first."""
  paced = arrivals[1:]
  if len(paced) < PROJECT_AFTER_EPOCHS:
    return None
  seconds = statistics.median((b[1] - a[1]) / max(1, b[0] - a[0]) for a, b in zip(paced, paced[1:]))
  return seconds, arrivals[0][1] + seconds * num_epochs


def _lines(stream, into: queue_lib.Queue) -> None:
  for line in stream:
    into.put(line)
  into.put(None)


def run_cell(cell: Cell, args, deadline: float, known: dict) -> str:
  """Trains ``cell`` in OUT/work/CELL until it ends, the budget ends or its pace shows it cannot fit a call.

  Returns 'finished', 'out_of_time' (stopped by the deadline: checkpointed), 'does_not_fit' (stopped: its
  projected whole run exceeds the budget; ``known['fits']`` False) or 'failed'. ``known``: this device's entry of
  queue.json for the cell, updated in place with the measured pace.
  """
  workdir = args.out / "work" / cell.name
  workdir.parent.mkdir(parents=True, exist_ok=True)
  started = time.monotonic()
  arrivals, verdict = [], None
  with open(args.out / "work" / f"{cell.name}.log", "a") as log:
    # XLA's persistent compilation cache in OUT: a later call on the same machine, or one that is given
    # OUT/compile_cache back, skips the compiles (the first epoch's arrival, recorded, shows what they cost)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(args.out / "compile_cache")}
    process = subprocess.Popen(train_command(cell, args, workdir), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    lines: queue_lib.Queue = queue_lib.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    while True:
      try:
        line = lines.get(timeout=0.5)
      except queue_lib.Empty:
        line = ""
      if line is None:
        break
      log.write(line)
      words = line.split()
      if len(words) > 1 and words[0] == "epoch" and words[1].isdigit():
        arrivals.append((int(words[1]), time.monotonic() - started))
        if len(arrivals) == 1:
          known["first_epoch_seconds"] = round(arrivals[0][1], 1)  # start-up, data, compiles, one epoch
        projection = projected_whole_run(arrivals, known["num_epochs"])
        if projection is not None:
          known["epoch_seconds"], known["projected_seconds"] = round(projection[0], 3), round(projection[1], 1)
          if verdict is None and projection[1] > args.call_seconds - args.reserve:
            verdict, known["fits"], known["call_seconds"] = "does_not_fit", False, args.call_seconds
            process.send_signal(signal.SIGTERM)  # the trainer checkpoints at the epoch's end and exits
      if verdict is None and time.monotonic() > deadline:
        verdict = "out_of_time"
        process.send_signal(signal.SIGTERM)
    process.wait()
  if verdict is not None:
    return verdict
  if process.returncode != 0:
    return "failed"
  known["fits"], known["wall_seconds"] = True, round(time.monotonic() - started, 1)
  return "finished"


def keep_result(cell: Cell, args) -> None:
  """OUT/CELL/: the finished run's config.json, metrics.jsonl, tpt.json and its report."""
  source, target = args.out / "work" / cell.name, args.out / cell.name
  target.mkdir(parents=True, exist_ok=True)
  for name in (records.CONFIG_FILE, records.METRICS_FILE, "tpt.json"):
    if (source / name).exists():
      shutil.copy2(source / name, target / name)
  report = subprocess.run([sys.executable, "-m", "nc_jax.report", str(target), "--out", str(target / "report")],
                          cwd=REPO, capture_output=True, text=True)
  if report.returncode != 0:
    print(f"reproduce: the report of {target} failed: {report.stdout[-500:]}{report.stderr[-500:]}")


def result_row(cell: str, run: pathlib.Path) -> str:
  """One row of results.md: the paper's Table 1 quantity (test accuracy at TPT start -> last) and NC1-NC4."""
  found = records.read(run)
  first, last = found[0], found[-1]
  start = last.get("tpt_start_epoch")
  start = None if start is None or start < 0 else start  # -1: not reached
  at_start = next((r for r in found if r["epoch"] == start), None)
  gain = "-" if at_start is None else (f"{100 * at_start['test_acc']:.2f} -> {100 * last['test_acc']:.2f} "
                                       f"({100 * (last['test_acc'] - at_start['test_acc']):+.2f})")
  return (f"| {cell} | {start if start is not None else 'not reached'} | {gain} | {first['nc1']:.3g} -> "
          f"{last['nc1']:.3g} | {last.get('equinorm_means', float('nan')):.3f} | "
          f"{last.get('equiangular_means', float('nan')):.3f} | {last.get('self_duality', float('nan')):.3f} | "
          f"{last.get('ncc_mismatch', float('nan')):.4f} |")


def write_results(args, queue: dict) -> None:
  rows = [result_row(cell.name, args.out / cell.name) for cell in CELLS if finished(args.out / cell.name)]
  misfits = [f"- {cell} on {device}: ~{entry.get('projected_seconds', '?')} s for the whole run "
             f"({entry.get('epoch_seconds', 0):.2f} s an epoch) against a {args.call_seconds} s call: not run to the end"
             for device, cells in sorted(queue["devices"].items()) for cell, entry in sorted(cells.items())
             if entry.get("fits") is False]
  text = ["# The reproduction queue's finished cells (benchmarks/reproduce.py)", "",
          "| cell | TPT start | test acc % at TPT start -> last | NC1 first -> last | equinorm M | equiangular M "
          "| self-duality | NCC mismatch |", "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |", *rows, ""]
  if misfits:
    text += ["Measured not to fit one call:", *misfits, ""]
  files.write_atomically(args.out / RESULTS_FILE, "\n".join(text).encode())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=int, required=True, help="seconds this call may use")
  parser.add_argument("--call-seconds", type=int, default=None,
                      help="a whole call's seconds on this device (default --budget): a cell whose run is projected "
                           "to need more is marked as not fitting one")
  parser.add_argument("--data", type=pathlib.Path, default=REPO.parent / "shared" / "data",
                      help="ROOT holding mnist/ and fashion_mnist/ (the four IDX files each)")
  parser.add_argument("--mnist", type=pathlib.Path, default=None, help="MNIST's IDX folder (default ROOT/mnist)")
  parser.add_argument("--fashion-mnist", type=pathlib.Path, default=None,
                      help="Fashion-MNIST's IDX folder (default ROOT/fashion_mnist)")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--cells", default="", help="comma-separated names of CELLS (default: all, in order)")
  parser.add_argument("--compute-dtype", default=None, help="default bfloat16 (float32 with --smoke)")
  args = parser.parse_args(argv)
  if args.budget <= 0:
    parser.error(f"--budget {args.budget}: give the call's seconds, e.g. --budget 480")
  args.dirs = {"mnist": args.mnist or args.data / "mnist",
               "fashion_mnist": args.fashion_mnist or args.data / "fashion_mnist"}
  args.out = args.out or REPO / "results" / ("accelerator-smoke" if args.smoke else "accelerator")
  args.compute_dtype = args.compute_dtype or ("float32" if args.smoke else "bfloat16")
  names = {cell.name: cell for cell in CELLS}
  chosen = [c for c in args.cells.split(",") if c] or list(names)
  unknown = [c for c in chosen if c not in names]
  if unknown:
    parser.error(f"--cells: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
  args.reserve = 10 if args.smoke else REPORT_SECONDS
  args.call_seconds = args.call_seconds or args.budget
  deadline = time.monotonic() + args.budget - args.reserve
  args.out.mkdir(parents=True, exist_ok=True)
  queue = read_queue(args.out)
  device = device_name() + (" (smoke)" if args.smoke else "")
  on_device = queue["devices"].setdefault(device, {})
  left_over, advanced, needed = False, False, 0
  for name in chosen:
    cell = names[name]
    if finished(args.out / name):
      continue
    known = on_device.setdefault(name, {})
    if known.get("fits") is False and known.get("call_seconds", 0) >= args.call_seconds:
      print(f"reproduce: {name} does not fit a {args.call_seconds} s call on {device} (measured "
            f"{known.get('projected_seconds', '?')} s); skipped")
      continue
    if not all((args.dirs[cell.dataset] / f).exists() for f in IDX_FILES):
      print(f"reproduce: {name}: no IDX files in {args.dirs[cell.dataset]}; skipped (pass --data ROOT or "
            f"--{cell.dataset.replace('_', '-')} DIR)")
      continue
    left = deadline - time.monotonic()
    if known.get("wall_seconds") and known["wall_seconds"] > left:
      print(f"reproduce: {name} needs ~{known['wall_seconds']:.0f} s (measured here), {left:.0f} s are left")
      left_over, needed = True, int(known["wall_seconds"]) + args.reserve + 1
      break
    known["num_epochs"] = SMOKE_EPOCHS if args.smoke else cli.config_keys(
        ["reproduce", f"--config={REPO / 'configs' / 'paper' / (name + '.py')}"])["num_epochs"]
    print(f"reproduce: {name} on {device}: training ({left:.0f} s left)")
    before = newest_checkpoint(args.out / "work" / name)
    verdict = run_cell(cell, args, deadline, known)
    write_queue(args.out, queue)
    print(f"reproduce: {name}: {verdict}")
    if verdict == "finished":
      keep_result(cell, args)
      write_results(args, queue)
    elif verdict == "failed":
      print(f"reproduce: {name} failed; see {args.out / 'work' / (name + '.log')}")
      return 1
    elif verdict == "out_of_time":
      left_over, needed = True, args.budget * 2
      advanced = advanced or newest_checkpoint(args.out / "work" / name) > before
      break
    advanced = True  # finished, or measured not to fit: either way the next call goes on past it
  write_queue(args.out, queue)
  write_results(args, queue)
  if not left_over:
    return 0
  if advanced:
    print("reproduce: cells are left; run the same command again to go on")
    return 3
  print(f"reproduce: no cell finished or checkpointed within --budget {args.budget}: rerunning this command "
        f"would never progress; rerun with --budget {max(needed, args.budget + 1)} or more")
  return 4


if __name__ == "__main__":
  sys.exit(main())
