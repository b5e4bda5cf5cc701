"""The paper's grid and learning-rate sweep: one workdir per (cell, lr), run, printed, or selected.

    python experiments/grid.py run    --root runs/ [--cells cifar10_resnet18,mnist_vgg11] [--lrs 0.0184,0.0679]
                                      [--lr-indices 12,15,18] [--epochs 350] [--variant smoke] [--population K]
                                      [-- --config.X=Y ...]
    python experiments/grid.py print  --root runs/ ...        # the commands, one per line (for a cluster / TPU VMs)
    python experiments/grid.py select --root runs/            # best final test error per cell -> selection.json/.md
    python experiments/grid.py report --root runs/            # select, then nc_jax.report on the chosen runs -> runs/report/

Cells are config files: names under configs/paper/ (default: all 21), or paths such
as configs/default.py. The sweep is the paper's 25 learning rates log-spaced on
[1e-4, 0.25]; --lr-indices picks some of them, --lrs gives values directly.
``run`` goes through the runs one after another, skipping finished ones and
resuming interrupted ones (rerunning nc_jax.train in the same workdir resumes it);
a workdir whose config.json differs from the requested config, or cannot be read, is reported and left
alone, the other runs go on, and the exit status is 1 naming each such workdir at the end. After '--',
--config.KEY=VALUE overrides go to every run; one that sets what the sweep sets (--config.lr, --config,
--workdir, and --config.num_epochs with --epochs) is refused; a key given twice takes its last value, as
nc_jax.train does. ``--population K`` trains each cell's pending lrs as populations of up to K members
(``nc_jax.train --lrs``: one program per population, each member the same lr_* workdir a single run would
be; the log in CELL/population.log). Only the CLI is launched: nothing here imports the trainer (configs are
resolved with ml_collections, as the CLI resolves them, to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Optional

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nc_jax.records (no JAX), also when not installed
from nc_jax import cli, files, records, schema  # noqa: E402  (cli: absl and ml_collections only, no JAX)
from nc_jax.training import workdir as workdir_lib  # noqa: E402  (no JAX: the package loads its loop lazily)

PAPER_CONFIGS = REPO / "configs" / "paper"
# Workdirs are relative to the caller's directory; the package is found even when not installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
SWEEP = tuple(float(x) for x in np.logspace(np.log10(1e-4), np.log10(0.25), 25))


def paper_cells() -> list[str]:
  """The names of the paper's 21 cells: the files of configs/paper/ but common.py (what they share)."""
  return sorted(p.stem for p in PAPER_CONFIGS.glob("*.py") if p.stem != "common")


def cell_config(cell: str) -> pathlib.Path:
  path = pathlib.Path(cell)
  if path.suffix == ".py":
    return path.resolve()
  path = PAPER_CONFIGS / f"{cell}.py"
  if not path.exists() or cell not in paper_cells():
    choices = ", ".join(paper_cells())
    raise SystemExit(f"unknown cell {cell!r}; choose from: {choices}, or give a config file path")
  return path


def learning_rates(args) -> list[float]:
  """--lrs values, or --lr-indices into the 25-value sweep, or the whole sweep; SystemExit (one line) if bad."""
  try:
    if args.lrs:
      values = [float(x) for x in args.lrs.split(",")]
      if not all(0 < v < float("inf") for v in values):
        raise ValueError
      return values
    if args.lr_indices:
      indices = [int(i) for i in args.lr_indices.split(",")]
      if not all(0 <= i < len(SWEEP) for i in indices):
        raise ValueError
      return [SWEEP[i] for i in indices]
  except ValueError:
    given = f"--lrs {args.lrs}" if args.lrs else f"--lr-indices {args.lr_indices}"
    raise SystemExit(f"error: {given}: give comma-separated positive numbers for --lrs, or indices in "
                     f"0..{len(SWEEP) - 1} of the paper's sweep for --lr-indices") from None
  return list(SWEEP)


def runs(args):
  """(cell name, config path, lr, workdir) for every run of the grid."""
  cells = args.cells.split(",") if args.cells else paper_cells()
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


def population_command(config, lrs: list[float], cell_dir: pathlib.Path, args) -> list[str]:
  """One nc_jax.train command training ``lrs`` as one population in ``cell_dir`` (members cell_dir/lr_*)."""
  spec = f"{config}:{args.variant}" if args.variant else str(config)
  line = [sys.executable, "-m", "nc_jax.train", "--config", spec, "--workdir", str(cell_dir),
          "--lrs=" + ",".join(repr(float(lr)) for lr in lrs)]
  if args.epochs:
    line.append(f"--config.num_epochs={args.epochs}")
  return line + list(args.extra)


def sweep_conflicts(extra: list[str], epochs: int) -> list[str]:
  """The arguments of ``extra`` (what follows '--') that set what the sweep sets for each run: --config,
  --workdir, --config.lr, and --config.num_epochs when --epochs is given. Appended after the sweep's own
  flags, each would win (the last value wins) and every lr_* folder would train the same run."""
  swept = {"lr"} | ({"num_epochs"} if epochs else set())
  return [a for a in extra
          if re.match(r"^--?(config|workdir)(=|$)", a) or cli.override_name(a) in swept]


def requested_config(line: list[str]) -> dict:
  """The config a command line asks for, resolved as nc_jax.train resolves it and writes it to config.json:
  a --config.KEY given more than once takes its last value (``nc_jax.cli.last_values``), for every type."""
  from absl import flags
  from ml_collections import config_flags

  overrides, i = [], line.index("--workdir") + 2  # everything after is the sweep's or the user's overrides
  while i < len(line):
    if cli.override_name(line[i]) is not None:
      overrides.append(line[i])
      if "=" not in line[i] and i + 1 < len(line) and not line[i + 1].startswith("-"):
        overrides.append(line[i + 1])  # '--config.KEY VALUE' (two arguments)
        i += 1
    i += 1
  argv = cli.last_values(["grid", "--config", line[line.index("--config") + 1], *overrides])
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return json.loads(values.config.to_json_best_effort())


def changed_keys(workdir: pathlib.Path, line: list[str]) -> list[str]:
  """Config keys where the run already in ``workdir`` differs from the one ``line`` asks for ([] if none there)."""
  previous = records.read_config(workdir)
  if not previous:
    return []
  return schema.changed_keys(previous, requested_config(line))


def finished(workdir: pathlib.Path) -> bool:
  """True for a run whose records reach its num_epochs; a run whose records cannot be read is not finished."""
  try:
    return records.finished(workdir)
  except records.RecordsError as error:
    print(f"     {error}", file=sys.stderr, flush=True)
    return False


def _summary(run_dir: pathlib.Path) -> Optional[dict]:
  """The numbers a sweep is compared by, from a finished run's config and last measurement; None (with a line
  on stderr) for a run whose last record has no test accuracy to compare."""
  run = records.read(run_dir)
  try:  # config.json checked against the checkpoints' config digest: an edited lr would relabel the run
    config = workdir_lib.verified_config(run_dir)
  except workdir_lib.WorkdirError as error:
    print(f"     {error}; left out of the selection", file=sys.stderr, flush=True)
    return None
  last = run[-1]
  if records.number(last.get("test_acc")) is None:
    print(f"     {run_dir}: its last record has no finite test_acc; left out of the selection", file=sys.stderr,
          flush=True)
    return None
  nc1 = records.number(last.get("nc1"))
  return {"run": str(run_dir), "lr": float(config["lr"]), "num_epochs": int(config["num_epochs"]),
          "final_test_acc": float(last["test_acc"]),
          "final_train_acc": records.number(last.get("train_acc")) or float("nan"),
          "final_nc1": float("nan") if nc1 is None else nc1, "tpt_start_epoch": records.tpt_start(run)}


def select(root: pathlib.Path) -> dict:
  """Per cell, the lr whose final test error is lowest (the paper's rule); writes selection.json/.md.

  Only runs of the cell's longest protocol compete (a smoke run never beats a full one).
  selection.json: {cell: {run, lr, final_test_acc, finished_runs, sweep: [summary per such run]}};
  selection.md: one row per such run, the chosen one marked.
  """
  if not root.is_dir():
    raise SystemExit(f"no run directory {root}: give the --root that `grid.py run` used")
  choices = {}
  for cell_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    sweep = [s for s in (_summary(d) for d in sorted(cell_dir.glob("lr_*")) if finished(d)) if s is not None]
    longest = max((s["num_epochs"] for s in sweep), default=0)
    sweep = sorted((s for s in sweep if s["num_epochs"] == longest), key=lambda s: s["lr"])
    if sweep:
      best = min(sweep, key=lambda s: (1.0 - s["final_test_acc"], s["lr"]))
      choices[cell_dir.name] = {"run": best["run"], "lr": best["lr"], "final_test_acc": best["final_test_acc"],
                                "finished_runs": len(sweep), "sweep": sweep}
  files.write_atomically(root / "selection.json", (json.dumps(choices, indent=2) + "\n").encode())
  lines = ["| cell | lr | chosen | TPT start epoch | final train acc | final test acc | final NC1 |",
           "| --- | ---: | :---: | ---: | ---: | ---: | ---: |"]
  for cell, choice in choices.items():
    for s in choice["sweep"]:
      lines.append(f"| {cell} | {s['lr']:.6g} | {'yes' if s['run'] == choice['run'] else ''} "
                   f"| {s['tpt_start_epoch'] or 'not reached'} | {100 * s['final_train_acc']:.2f} "
                   f"| {100 * s['final_test_acc']:.2f} | {s['final_nc1']:.4g} |")
  files.write_atomically(root / "selection.md", ("\n".join(lines) + "\n").encode())
  return choices


def main(argv=None) -> int:
  """The command; an OS error (a full disk, a read-only --root, a file in the way) is one line naming the path."""
  try:
    return _main(argv)
  except records.RecordsError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  except OSError as error:
    if error.filename and error.strerror:
      print(f"error: {files.describe_os_error(error, '--root')}", file=sys.stderr)
    else:
      print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=("run", "print", "select", "report"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--cells", default="")
  parser.add_argument("--lrs", default="")
  parser.add_argument("--lr-indices", default="")
  parser.add_argument("--epochs", type=int, default=0)
  parser.add_argument("--variant", default="")
  parser.add_argument("--population", type=int, default=0)
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []  # --config.KEY=VALUE overrides for every run
  args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
  args.extra = extra
  conflicts = sweep_conflicts(extra, args.epochs)
  if conflicts:
    raise SystemExit(f"error: {' '.join(conflicts)} after '--' would replace what the sweep sets for each run; "
                     "give learning rates with --lrs or --lr-indices, epochs with --epochs, cells with --cells "
                     "and --variant, and the folders with --root")
  root = pathlib.Path(args.root)
  if args.action in ("select", "report"):
    choices = select(root)
    print((root / "selection.md").read_text(), end="")
    if not choices:
      print(f"no finished runs under {root}/CELL/lr_*", file=sys.stderr)
      return 1
    if args.action == "report":  # the paper's figures and Table 1 for the chosen lr of each cell
      chosen = [choice["run"] for choice in choices.values()]
      return subprocess.run([sys.executable, "-m", "nc_jax.report", *chosen, "--out", str(root / "report")],
                            env=ENV).returncode
    return 0
  if args.population < 0:
    raise SystemExit(f"error: --population {args.population}: give the most members one program trains (>= 1), "
                     "or 0 for one run per lr")
  failures = []  # the workdirs not done, named again at the end
  pending = {}  # --population: cell -> (config, [lr, ...]) still to train
  for cell, config, lr, workdir in runs(args):
    line = command(config, lr, workdir, args)
    if args.action == "print" and not args.population:
      print(shlex.join(line))
      continue
    if args.action == "print":
      pending.setdefault(cell, (config, []))[1].append(lr)
      continue
    try:
      changed = changed_keys(workdir, line)
    except records.RecordsError as error:  # a damaged config.json: this lr is left alone, the others still run
      failures.append(workdir)
      problem = str(error).split("; ")[0]  # its advice is train's (--overwrite), not grid's
      print(f"     {problem}; left alone: restore that file, or delete {workdir} and rerun this command to "
            "train that lr again", flush=True)
      continue
    if changed:  # never skipped as finished, never overwritten: the user decides
      failures.append(workdir)
      print(f"     {workdir} holds a run with a different config ({', '.join(changed)}); "
            "use another --root, or delete that run", flush=True)
      continue
    if finished(workdir):
      print(f"skip {cell} lr {lr:.6g}: finished", flush=True)
      continue
    diverged = workdir / records.DIVERGED_FILE  # a population member that stopped alone: its sweep answer
    if diverged.exists():
      print(f"skip {cell} lr {lr:.6g}: diverged ({diverged.read_text().strip()})", flush=True)
      continue
    if args.population:
      pending.setdefault(cell, (config, []))[1].append(lr)
      continue
    print(f"run  {cell} lr {lr:.6g} -> {workdir}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "train.log").open("a") as log:
      result = subprocess.run(line, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
      failures.append(workdir)
      print(f"     failed with exit code {result.returncode}; see {workdir / 'train.log'}", flush=True)
  for cell, (config, lrs) in pending.items():
    cell_dir = root / cell
    for start in range(0, len(lrs), args.population):
      chunk = lrs[start:start + args.population]
      line = population_command(config, chunk, cell_dir, args)
      if args.action == "print":
        print(shlex.join(line))
        continue
      print(f"run  {cell} population of {len(chunk)} lrs ({chunk[0]:.6g}..{chunk[-1]:.6g}) -> {cell_dir}/lr_*",
            flush=True)
      cell_dir.mkdir(parents=True, exist_ok=True)
      with (cell_dir / "population.log").open("a") as log:
        result = subprocess.run(line, env=ENV, stdout=log, stderr=subprocess.STDOUT)
      if result.returncode != 0:
        failures.append(cell_dir)
        print(f"     failed with exit code {result.returncode}; see {cell_dir / 'population.log'}", flush=True)
  if args.action == "run":
    select(root)
  if failures:
    print(f"error: {len(failures)} run(s) not done, each named above: {', '.join(map(str, failures))}",
          file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
