"""The paper's grid and learning-rate sweep: one workdir per (cell, lr), run, printed, or selected.

    python experiments/grid.py run    --root runs/ [--cells cifar10_resnet18,mnist_vgg11] [--lrs 0.0184,0.0679]
                                      [--lr-indices 12,15,18] [--epochs 350] [--variant smoke] [-- --config.X=Y ...]
    python experiments/grid.py print  --root runs/ ...        # the commands, one per line (for a cluster / TPU VMs)
    python experiments/grid.py select --root runs/            # best final test error per cell -> selection.json

Cells are config files: names under configs/paper/ (default: all 21), or paths such
as configs/default.py. The sweep is the paper's 25 learning rates log-spaced on
[1e-4, 0.25]; --lr-indices picks some of them, --lrs gives values directly.
``run`` goes through the runs one after another, skipping finished ones and
resuming interrupted ones (rerunning nc_jax.train in the same workdir resumes it).
Only the CLI is launched: nothing here imports the trainer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = REPO / "configs" / "paper"
SWEEP = tuple(float(x) for x in np.logspace(np.log10(1e-4), np.log10(0.25), 25))


def cell_config(cell: str) -> pathlib.Path:
  path = pathlib.Path(cell)
  if path.suffix == ".py":
    return path.resolve()
  path = PAPER_CONFIGS / f"{cell}.py"
  if not path.exists():
    choices = ", ".join(sorted(p.stem for p in PAPER_CONFIGS.glob("*.py")))
    raise SystemExit(f"unknown cell {cell!r}; choose from: {choices}, or give a config file path")
  return path


def learning_rates(args) -> list[float]:
  if args.lrs:
    return [float(x) for x in args.lrs.split(",")]
  if args.lr_indices:
    return [SWEEP[int(i)] for i in args.lr_indices.split(",")]
  return list(SWEEP)


def runs(args):
  """(cell name, config path, lr, workdir) for every run of the grid."""
  cells = args.cells.split(",") if args.cells else sorted(p.stem for p in PAPER_CONFIGS.glob("*.py"))
  for cell in cells:
    config = cell_config(cell)
    name = config.stem if config.parent == PAPER_CONFIGS else config.stem
    for lr in learning_rates(args):
      yield name, config, lr, pathlib.Path(args.root) / name / f"lr_{lr:.6g}"


def command(config, lr, workdir, args) -> list[str]:
  spec = f"{config}:{args.variant}" if args.variant else str(config)
  line = [sys.executable, "-m", "nc_jax.train", "--config", spec, "--workdir", str(workdir), f"--config.lr={lr}"]
  if args.epochs:
    line.append(f"--config.num_epochs={args.epochs}")
  return line + list(args.extra)


def finished(workdir: pathlib.Path) -> bool:
  metrics, config = workdir / "metrics.jsonl", workdir / "config.json"
  if not (metrics.exists() and config.exists()):
    return False
  lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
  return bool(lines) and lines[-1]["epoch"] >= json.loads(config.read_text())["num_epochs"]


def select(root: pathlib.Path) -> dict:
  """Per cell, the lr whose final test error is lowest (the paper's rule); writes selection.json/.md."""
  choices = {}
  for cell_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    candidates = []
    for run_dir in sorted(cell_dir.glob("lr_*")):
      if finished(run_dir):
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        candidates.append((1.0 - float(last["test_acc"]), run_dir.name, float(last["test_acc"])))
    if candidates:
      error, name, accuracy = min(candidates)
      choices[cell_dir.name] = {"run": str(cell_dir / name), "lr": float(name[3:]), "final_test_acc": accuracy,
                                "finished_runs": len(candidates)}
  (root / "selection.json").write_text(json.dumps(choices, indent=2) + "\n")
  lines = ["| cell | chosen lr | final test acc | finished runs |", "| --- | ---: | ---: | ---: |"]
  lines += [f"| {cell} | {c['lr']:.6g} | {100 * c['final_test_acc']:.2f} | {c['finished_runs']} |"
            for cell, c in choices.items()]
  (root / "selection.md").write_text("\n".join(lines) + "\n")
  return choices


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=("run", "print", "select"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--cells", default="")
  parser.add_argument("--lrs", default="")
  parser.add_argument("--lr-indices", default="")
  parser.add_argument("--epochs", type=int, default=0)
  parser.add_argument("--variant", default="")
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []  # --config.KEY=VALUE overrides for every run
  args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
  args.extra = extra
  root = pathlib.Path(args.root)
  if args.action == "select":
    choices = select(root)
    print((root / "selection.md").read_text(), end="")
    return 0 if choices else 1
  failures = 0
  for cell, config, lr, workdir in runs(args):
    line = command(config, lr, workdir, args)
    if args.action == "print":
      print(shlex.join(line))
      continue
    if finished(workdir):
      print(f"skip {cell} lr {lr:.6g}: finished", flush=True)
      continue
    print(f"run  {cell} lr {lr:.6g} -> {workdir}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "train.log").open("a") as log:
      result = subprocess.run(line, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
      failures += 1
      print(f"     failed with exit code {result.returncode}; see {workdir / 'train.log'}", flush=True)
  if args.action == "run":
    select(root)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
