"""The paper's grid and lr sweep, crossed with any config keys: one workdir per run, run, printed, or selected.

    python experiments/grid.py run    --root runs/ [--cells cifar10_resnet18,mnist_vgg11] [--lrs 0.0184,0.0679]
                                      [--lr-indices 12,15,18] [--epochs 350] [--variant smoke] [--population K]
                                      [--sweep seed=1,2,3] [--sweep weight_decay=5e-4,1e-3 ...]
                                      [-- --config.X=Y ...]
    python experiments/grid.py print  --root runs/ ...        # the commands, one per line (for a cluster / TPU VMs)
    python experiments/grid.py select --root runs/            # best final test error per cell -> selection.json/.md
    python experiments/grid.py report --root runs/            # select, then nc_jax.report on the chosen runs -> runs/report/

Cells are config files: names under configs/paper/ (default: all 21), or paths such
as configs/default.py. The sweep is the paper's 25 learning rates log-spaced on
[1e-4, 0.25]; --lr-indices picks some of them, --lrs gives values directly.
``--sweep KEY=V1,V2,...`` (repeatable) crosses the lrs with the values of any config key, each given to
nc_jax.train as ``--config.KEY=V`` (commas inside brackets, '(0.9,0.99)', belong to one value). Without it a
run's workdir is ROOT/CELL/lr_<lr>; with it ROOT/CELL/KEY_VALUE/.../lr_<lr>, one folder per swept key in
sorted order (ROOT/CELL/seed_1/weight_decay_0.0005/lr_0.01; floats to 6 significant digits, as the lr). Every
key and value is checked against each cell's config before anything starts, each mistake one line: an
undeclared key, a value of the wrong type or out of range, a value a folder name cannot hold, two values
naming the same folder, and a key grid sets itself (lr, num_epochs with --epochs) or that '--' also sets.
``run`` goes through the runs one after another, skipping finished ones and
resuming interrupted ones (rerunning nc_jax.train in the same workdir resumes it);
a workdir whose config.json differs from the requested config, or cannot be read, is reported and left
alone, the other runs go on, and the exit status is 1 naming each such workdir at the end. After '--',
--config.KEY=VALUE overrides go to every run; one that sets what the sweep sets (--config.lr, --config,
--workdir, and --config.num_epochs with --epochs) is refused; a key given twice takes its last value, as
nc_jax.train does. ``--population K`` trains the pending lrs of each cell and swept combination as populations
of up to K members (``nc_jax.train --lrs``: one program per population, members differ only in lr, each
member the same lr_* workdir a single run would be; the log in that combination's folder, population.log):
every other swept value, width as much as seed, is a program of its own.
``select`` picks per cell and combination of swept keys other than the seeds (seed, data_seed) the lr with the
lowest final test error, averaged over the seeds when they are swept (``select``'s docstring: how a seed a run
lacks is handled). Only the CLI is launched: nothing here imports the trainer (configs are resolved with
ml_collections, as the CLI resolves them, to compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nc_jax.records (no JAX), also when not installed
from nc_jax import cli, files, records, report_seeds, schema  # noqa: E402  (cli: absl and ml_collections, no JAX)
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


# ------------------------------------------------------------------ --sweep: any config key, crossed with the lrs
# Keys grid sets for each run itself, and where the user gives them instead.
SET_BY_GRID = {"lr": "give learning rates with --lrs or --lr-indices", "workdir": "give the folders' root with --root",
               "config": "give config files with --cells and --variant"}
FOLDER = re.compile(r"[A-Za-z0-9_.+-]+")  # what a KEY_VALUE folder name may hold
SEED_KEYS = report_seeds.SEED_KEYS  # swept seeds are averaged over in select and report, not chosen between


@dataclasses.dataclass(frozen=True)
class Setting:
  """One combination of --sweep values: what nc_jax.train is told, and the folders below the cell its runs go in."""
  values: tuple[tuple[str, str], ...] = ()  # (key, value as given), keys sorted
  folders: tuple[str, ...] = ()  # 'KEY_VALUE' for each, in the same order

  @property
  def overrides(self) -> list[str]:
    return [f"--config.{key}={value}" for key, value in self.values]


def split_values(text: str) -> list[str]:
  """'1,2,(0.9,0.99)' -> ['1', '2', '(0.9,0.99)']: a comma ends a value except inside brackets or quotes."""
  values, current, depth, quote = [], "", 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      values.append(current.strip())
      current = ""
      continue
    current += char
  return values + [current.strip()]


def parse_sweeps(specs: Sequence[str], extra: Sequence[str], epochs: int) -> list[tuple[str, list[str]]]:
  """--sweep KEY=V1,V2,... arguments as [(key, [value, ...]), ...] in sorted key order; SystemExit (one line) for
  one that is malformed, a key given twice, a key grid sets itself (lr, workdir, config; num_epochs with --epochs)
  or one an override after '--' also sets (the last value would win: every folder would train the same run)."""
  sweeps = {}
  overridden = {cli.override_name(argument) for argument in extra} - {None}
  for spec in specs:
    key, equals, text = spec.partition("=")
    values = split_values(text) if equals else []
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key) or not values or "" in values:
      raise SystemExit(f"error: --sweep {spec}: give KEY=V1,V2,... (a config key and comma-separated values, e.g. "
                       "--sweep seed=1,2,3 or --sweep model_options.width=256,512)")
    if key in SET_BY_GRID or (key == "num_epochs" and epochs):
      fix = SET_BY_GRID.get(key, "give either --epochs or --sweep num_epochs=...")
      raise SystemExit(f"error: --sweep {spec}: grid sets {key} itself for each run; {fix}")
    if key in sweeps:
      raise SystemExit(f"error: --sweep {key} is given twice; give all its values in one --sweep {key}=V1,V2,...")
    if key in overridden:
      raise SystemExit(f"error: --sweep {key} and --config.{key} after '--' both set {key} (the last would win in "
                       f"every run); give its values in --sweep only")
    sweeps[key] = values
  return sorted(sweeps.items())


def folder_name(key: str, value) -> Optional[str]:
  """The folder of a swept config value: 'KEY_VALUE', a float to 6 significant digits as in lr_* (5e-4 and 0.0005
  are weight_decay_0.0005); None for a value no folder name can hold (a tuple, a group, a '/')."""
  if isinstance(value, float):
    text = f"{value:.6g}"
  elif isinstance(value, (bool, int, str)):
    text = str(value)
  else:
    return None
  name = f"{key}_{text}"
  return name if text and FOLDER.fullmatch(name) else None


def settings(config: pathlib.Path, sweeps: list[tuple[str, list[str]]], args) -> list[Setting]:
  """Every combination of ``sweeps`` for the cell ``config``, each checked as nc_jax.train would check its runs
  (with the grid's first lr, --epochs and the overrides after '--'); SystemExit (one line) at the first key the
  config does not declare, value it cannot take, value no folder can name, or two values naming one folder.
  [Setting()] without sweeps (nothing loaded)."""
  if not sweeps:
    return [Setting()]
  spec = f"{config}:{args.variant}" if args.variant else str(config)
  declared = cli.config_keys(["grid", f"--config={spec}"])
  if not declared:
    raise SystemExit(f"error: cannot load the config {spec}; python -m nc_jax.train --config {spec} says why")
  lr = learning_rates(args)[0]
  for key, _ in sweeps:
    if key not in declared:
      close = difflib.get_close_matches(key, list(declared), n=3)
      hint = f"did you mean {' or '.join('--sweep ' + c + '=...' for c in close)}? " if close else ""
      raise SystemExit(f"error: --sweep {key}: no such config key in {spec}; {hint}"
                       "nc_jax/schema.py says what each key means")
    if key in schema.OPERATIONAL_KEYS:
      raise SystemExit(f"error: --sweep {key}: config.{key} says how a run is kept, not what it computes "
                       "(nc_jax.schema.OPERATIONAL_KEYS): every value would train the same run; set it after '--'")
    if hasattr(declared[key], "keys"):  # a group (model_options, nc): its values are keys of their own
      raise SystemExit(f"error: --sweep {key}: config.{key} is a group; sweep one of its keys, --sweep {key}.KEY=... "
                       f"(KEY one of {', '.join(sorted(declared[key].keys()))})")
  folders = {key: {} for key, _ in sweeps}  # key -> {folder: value as given}
  for key, values in sweeps:
    for value in values:
      override = f"--config.{key}={value}"
      try:
        resolved = requested_config(command(config, lr, pathlib.Path("-"), args, [override]))
      except Exception:  # noqa: BLE001  (absl's IllegalFlagValueError and whatever a parser raised: one line)
        default = declared[key]
        raise SystemExit(f"error: --sweep {key}={value}: {value!r} is not a value of config.{key}, which takes "
                         f"{type(default).__name__} values ({spec} has {default!r})") from None
      folder = folder_name(key, report_seeds.flat(resolved).get(key))
      if folder is None:
        raise SystemExit(f"error: --sweep {key}={value}: this value cannot name a folder (KEY_VALUE of letters, "
                         f"digits and _.+-); sweep numbers, booleans or plain words, one folder per value")
      if folder in folders[key]:
        raise SystemExit(f"error: --sweep {key}: {folders[key][folder]} and {value} are the same value (folder "
                         f"{folder}); give each value once")
      folders[key][folder] = value
  combinations = []
  for chosen in itertools.product(*(list(folders[key].items()) for key, _ in sweeps)):
    setting = Setting(tuple((key, value) for (key, _), (_, value) in zip(sweeps, chosen)),
                      tuple(folder for folder, _ in chosen))
    try:  # ranges and the keys' agreement (measure_epochs within num_epochs, ...), as nc_jax.train checks them
      schema.validate(requested_config(command(config, lr, pathlib.Path("-"), args, setting.overrides), raw=True))
    except schema.ConfigError as error:
      raise SystemExit(f"error: cell {config.stem} with {' '.join(setting.overrides)}: {error}") from None
    combinations.append(setting)
  return combinations


def runs(args) -> list[tuple[str, pathlib.Path, Setting, float, pathlib.Path]]:
  """(cell name, config path, setting, lr, workdir) for every run of the grid, the workdir
  ROOT/CELL/lr_<lr> or ROOT/CELL/KEY_VALUE/.../lr_<lr>; every cell and sweep checked before any is returned."""
  cells = args.cells.split(",") if args.cells else paper_cells()
  lrs = learning_rates(args)
  planned = []
  for cell in cells:
    config = cell_config(cell)
    for setting in settings(config, args.sweeps, args):
      for lr in lrs:
        planned.append((config.stem, config, setting, lr,
                        pathlib.Path(args.root, config.stem, *setting.folders, f"lr_{lr:.6g}")))
  return planned


def command(config, lr, workdir, args, overrides: Sequence[str] = ()) -> list[str]:
  """One nc_jax.train command: the cell at ``lr`` in ``workdir``, the swept ``overrides``, then the user's."""
  spec = f"{config}:{args.variant}" if args.variant else str(config)
  line = [sys.executable, "-m", "nc_jax.train", "--config", spec, "--workdir", str(workdir), f"--config.lr={lr}"]
  if args.epochs:
    line.append(f"--config.num_epochs={args.epochs}")
  return line + list(overrides) + list(args.extra)


def population_command(config, lrs: list[float], directory: pathlib.Path, args,
                       overrides: Sequence[str] = ()) -> list[str]:
  """One nc_jax.train command training ``lrs`` as one population in ``directory`` (members directory/lr_*): the
  cell's folder, or a swept combination's below it (its ``overrides``)."""
  spec = f"{config}:{args.variant}" if args.variant else str(config)
  line = [sys.executable, "-m", "nc_jax.train", "--config", spec, "--workdir", str(directory),
          "--lrs=" + ",".join(repr(float(lr)) for lr in lrs)]
  if args.epochs:
    line.append(f"--config.num_epochs={args.epochs}")
  return line + list(overrides) + list(args.extra)


def sweep_conflicts(extra: list[str], epochs: int) -> list[str]:
  """The arguments of ``extra`` (what follows '--') that set what the sweep sets for each run: --config,
  --workdir, --config.lr, and --config.num_epochs when --epochs is given. Appended after the sweep's own
  flags, each would win (the last value wins) and every lr_* folder would train the same run."""
  swept = {"lr"} | ({"num_epochs"} if epochs else set())
  return [a for a in extra
          if re.match(r"^--?(config|workdir)(=|$)", a) or cli.override_name(a) in swept]


def requested_config(line: list[str], raw: bool = False):
  """The config a command line asks for, resolved as nc_jax.train resolves it and writes it to config.json:
  a --config.KEY given more than once takes its last value (``nc_jax.cli.last_values``), for every type.
  A dict of JSON values; with ``raw``, the ml_collections ConfigDict itself (what ``schema.validate`` checks)."""
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
  return values.config if raw else json.loads(values.config.to_json_best_effort())


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


# ------------------------------------------------------------------ select: the best lr per cell and setting
def _run_folders(folder: pathlib.Path, below: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], pathlib.Path]]:
  """(the KEY_VALUE folders between the cell's folder and the run, the run's folder) for each lr_<lr> folder under
  ``folder``: in it (no --sweep) or below its KEY_VALUE folders; a population's own population_* folder, a
  symlinked folder and anything 16 folders down are not walked."""
  for path in sorted(p for p in folder.iterdir() if p.is_dir()):
    # lr_0.01, lr_1e-05, or any lr_* folder holding a run's config.json (not lr_decay_factor_0.5/, a swept key's)
    if re.fullmatch(r"lr_[0-9.]+(e[-+]?[0-9]+)?", path.name) or (
        path.name.startswith("lr_") and (path / records.CONFIG_FILE).is_file()):
      yield below, path
    elif not path.is_symlink() and not path.name.startswith("population_") and len(below) < 16:
      yield from _run_folders(path, below + (path.name,))


def _swept(folders: tuple[str, ...], config: dict) -> Optional[dict]:
  """{key: value} for each KEY_VALUE folder, the value the run's config has (what grid named the folder after);
  None when a folder names no value of the config (renamed, or not grid's)."""
  flat, swept = report_seeds.flat(config), {}
  for folder in folders:
    keys = [k for k in flat if folder.startswith(k + "_") and folder_name(k, flat[k]) == folder]
    if not keys:
      return None
    swept[max(keys, key=len)] = flat[max(keys, key=len)]
  return swept


def _summary(run_dir: pathlib.Path, folders: tuple[str, ...] = ()) -> Optional[dict]:
  """The numbers a sweep is compared by, from a finished run's config and last measurement (and, below KEY_VALUE
  folders, its swept values); None (with a line on stderr) for a run whose last record has no test accuracy to
  compare or whose folders do not name its config's values."""
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
  swept = _swept(folders, config)
  if swept is None:
    print(f"     {run_dir}: its folders {'/'.join(folders)} do not name its config's values (KEY_VALUE, as "
          "grid.py --sweep makes them); left out of the selection", file=sys.stderr, flush=True)
    return None
  nc1 = records.number(last.get("nc1"))
  summary = {"run": str(run_dir), "lr": float(config["lr"]), "num_epochs": int(config["num_epochs"]),
             "final_test_acc": float(last["test_acc"]),
             "final_train_acc": records.number(last.get("train_acc")) or float("nan"),
             "final_nc1": float("nan") if nc1 is None else nc1, "tpt_start_epoch": records.tpt_start(run)}
  return {**summary, "swept": swept} if folders else summary


def _seeds(summary: dict) -> tuple:
  """A run's swept seeds, ((key, value), ...); () where none are swept."""
  return tuple((k, v) for k, v in summary.get("swept", {}).items() if k in SEED_KEYS)


def _seed_text(seeds: tuple) -> str:
  return ", ".join(f"{key} {value}" for key, value in seeds)


@dataclasses.dataclass
class _Group:
  """The runs of one cell and one setting of the swept keys other than the seeds, at its longest protocol."""
  name: str  # 'cell', or its folders with the seeds' as KEY_*: 'default/seed_*/weight_decay_0.0005'
  cell: str
  sweep: list  # summaries, by lr then seeds
  seeds: list = dataclasses.field(default_factory=list)  # every seed (tuple) a run of the group has
  by_lr: dict = dataclasses.field(default_factory=dict)  # lr -> {seeds: summary}
  choice: Optional[dict] = None

  @property
  def swept(self) -> bool:
    return any("swept" in s for s in self.sweep)


def _missing_run(present: dict, seeds: tuple) -> pathlib.Path:
  """The folder the run at ``present``'s lr and setting but ``seeds`` would have."""
  parts = list(pathlib.Path(present["run"]).parts)
  for key, value in seeds:
    old = folder_name(key, present["swept"][key])
    parts[len(parts) - 1 - parts[::-1].index(old)] = folder_name(key, value)
  return pathlib.Path(*parts)


def _why_missing(path: pathlib.Path) -> str:
  if (path / records.DIVERGED_FILE).exists():
    return f"diverged ({path / records.DIVERGED_FILE})"
  if not path.exists():
    return f"not run ({path})"
  return f"not finished, or left out as said above ({path})"


def _choose(group: _Group) -> Optional[dict]:
  """The lr with the lowest final test error, its mean over the group's seeds where seeds are swept (ties: the
  smaller lr); an lr lacking a seed is named and does not compete. None if no lr has every seed."""
  if not group.swept:  # no --sweep: as it always was
    best = min(group.sweep, key=lambda s: (1.0 - s["final_test_acc"], s["lr"]))
    return {"run": best["run"], "lr": best["lr"], "final_test_acc": best["final_test_acc"],
            "finished_runs": len(group.sweep), "sweep": group.sweep}
  means, incomplete = {}, []
  for lr, at in group.by_lr.items():
    missing = [seeds for seeds in group.seeds if seeds not in at]
    if missing:
      incomplete.append({"lr": lr, "missing": [dict(seeds) for seeds in missing]})
      present = next(iter(at.values()))
      for seeds in missing:
        print(f"     {group.name}: lr {lr:.6g} lacks {_seed_text(seeds)}: {_why_missing(_missing_run(present, seeds))};"
              " the lr is left out of the choice, which compares lrs on every seed", file=sys.stderr, flush=True)
      continue
    means[lr] = report_seeds.Spread.of([at[seeds]["final_test_acc"] for seeds in group.seeds])
  if not means:
    print(f"     {group.name}: no lr has finished at every seed ({len(group.seeds)}); no choice yet", file=sys.stderr,
          flush=True)
    return None
  lr = min(means, key=lambda lr: (1.0 - means[lr].mean, lr))
  chosen = [group.by_lr[lr][seeds] for seeds in group.seeds]
  return {"cell": group.cell, "swept": {k: v for k, v in group.sweep[0]["swept"].items() if k not in SEED_KEYS},
          "seeds": [dict(seeds) for seeds in group.seeds if seeds], "run": chosen[0]["run"],
          "runs": [s["run"] for s in chosen], "lr": lr, "final_test_acc": means[lr].mean,
          "final_test_acc_range": [means[lr].low, means[lr].high], "finished_runs": len(group.sweep),
          "incomplete": incomplete, "sweep": group.sweep}


def _groups(root: pathlib.Path) -> list[_Group]:
  """The finished runs under ``root`` as groups, each at its longest protocol (a smoke run never beats a full one)."""
  groups = {}
  for cell_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    for folders, run_dir in _run_folders(cell_dir):
      summary = _summary(run_dir, folders) if finished(run_dir) else None
      if summary is None:
        continue
      keys = list(summary.get("swept", {}))
      name = "/".join([cell_dir.name, *(f"{k}_*" if k in SEED_KEYS else f for k, f in zip(keys, folders))])
      groups.setdefault(name, _Group(name, cell_dir.name, [])).sweep.append(summary)
  for group in groups.values():
    longest = max(s["num_epochs"] for s in group.sweep)
    group.sweep = sorted((s for s in group.sweep if s["num_epochs"] == longest),
                         key=lambda s: (s["lr"], [str(v) for v in _seeds(s)]))
    group.seeds = sorted({_seeds(s) for s in group.sweep}, key=lambda seeds: [str(v) for v in seeds])
    for s in group.sweep:
      group.by_lr.setdefault(s["lr"], {})[_seeds(s)] = s
    group.choice = _choose(group)
  return list(groups.values())


def _spread_text(values, form, unit: float = 1.0) -> str:
  values = [unit * v for v in values if v is not None and np.isfinite(v)]
  return report_seeds.Spread.of(values).text(form) if values else "nan"


def _selection_rows(group: _Group) -> list[str]:
  """selection.md's rows of a group: one per lr (its seeds' mean [min..max]), the chosen one marked."""
  rows = []
  for lr, at in group.by_lr.items():
    runs_ = list(at.values())
    chosen = group.choice is not None and group.choice["lr"] == lr
    swept = ", ".join(f"{k} {v}" for k, v in runs_[0].get("swept", {}).items() if k not in SEED_KEYS) or "-"
    missing = [seeds for seeds in group.seeds if seeds not in at]
    seeds = "-" if group.seeds == [()] else str(len(at)) + (
        f" of {len(group.seeds)} (missing {'; '.join(_seed_text(m) for m in missing)})" if missing else "")
    reached = [s["tpt_start_epoch"] for s in runs_ if s["tpt_start_epoch"]]
    tpt = (report_seeds.Spread.of(reached).text(report_seeds.epoch_text) if reached else "not reached") + (
        f" ({len(runs_) - len(reached)} of {len(runs_)} not reached)" if reached and len(reached) < len(runs_) else "")
    rows.append(f"| {group.cell} | {swept} | {lr:.6g} | {'yes' if chosen else ''} | {seeds} | {tpt} "
                f"| {_spread_text([s['final_train_acc'] for s in runs_], '{:.2f}', 100)} "
                f"| {_spread_text([s['final_test_acc'] for s in runs_], '{:.2f}', 100)} "
                f"| {_spread_text([s['final_nc1'] for s in runs_], '{:.4g}')} |")
  return rows


def select(root: pathlib.Path) -> dict:
  """Per cell and setting of its swept keys other than the seeds (seed, data_seed), the lr whose final test error
  is lowest (the paper's rule; ties: the smaller lr), writes selection.json/.md and returns what it wrote.

  Runs are grouped by cell and by their KEY_VALUE folders (``grid.py run --sweep``), a group named by its folders
  with the seeds' as KEY_*: 'default' (no --sweep), 'default/seed_*/weight_decay_0.0005'. Only runs of a group's
  longest protocol compete (a smoke run never beats a full one). Where seeds are swept, an lr's error is its mean
  over the seeds, and an lr competes only once every seed of the group (every seed any of its finished runs has)
  has finished at it: one lacking a seed (diverged, not finished, not run) is named on stderr and in selection.md
  and left out, not compared on fewer seeds (a diverged seed says the lr is unstable; the mean of the others would
  hide it, and means over different seeds are not comparable). A group where no lr has every seed has no choice.

  selection.json: {group: {run, lr, final_test_acc, finished_runs, sweep: [summary per run]}}; a swept group's
  also has cell, swept ({key: value}, seeds left out), seeds ([{key: value}, ...]), runs (the chosen lr's, one per
  seed; run is the first), final_test_acc_range ([min, max] over seeds; final_test_acc is their mean),
  incomplete ([{lr, missing: [seeds]}]), and each summary its swept values.
  selection.md: one row per run (no --sweep), or, where any group is swept, one per group and lr with
  mean [min..max] over its seeds; the chosen one marked.
  """
  if not root.is_dir():
    raise SystemExit(f"no run directory {root}: give the --root that `grid.py run` used")
  groups = _groups(root)
  choices = {group.name: group.choice for group in groups if group.choice is not None}
  files.write_atomically(root / "selection.json", (json.dumps(choices, indent=2) + "\n").encode())
  if any(group.swept for group in groups):
    lines = ["| cell | swept | lr | chosen | seeds | TPT start epoch | final train acc | final test acc | final NC1 |",
             "| --- | --- | ---: | :---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [row for group in groups for row in _selection_rows(group)]
  else:
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
  parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []  # --config.KEY=VALUE overrides for every run
  args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
  args.extra = extra
  conflicts = sweep_conflicts(extra, args.epochs)
  if conflicts:
    raise SystemExit(f"error: {' '.join(conflicts)} after '--' would replace what the sweep sets for each run; "
                     "give learning rates with --lrs or --lr-indices, epochs with --epochs, cells with --cells "
                     "and --variant, and the folders with --root")
  args.sweeps = parse_sweeps(args.sweep, extra, args.epochs)
  root = pathlib.Path(args.root)
  if args.action in ("select", "report"):
    choices = select(root)
    print((root / "selection.md").read_text(), end="")
    if not choices:
      print(f"no finished runs under {root}/CELL/lr_* or {root}/CELL/KEY_VALUE/.../lr_* (with swept seeds: none "
            "at every seed, as said above)", file=sys.stderr)
      return 1
    if args.action == "report":  # the paper's figures and Table 1 for the chosen lr of each cell and setting
      chosen = [choice.get("runs", [choice["run"]]) for choice in choices.values()]
      seeds = ["--group", "seeds"] if any(len(runs_) > 1 for runs_ in chosen) else []  # one panel per setting
      return subprocess.run([sys.executable, "-m", "nc_jax.report", *(run for runs_ in chosen for run in runs_),
                             "--out", str(root / "report"), *seeds], env=ENV).returncode
    return 0
  if args.population < 0:
    raise SystemExit(f"error: --population {args.population}: give the most members one program trains (>= 1), "
                     "or 0 for one run per lr")
  failures = []  # the workdirs not done, named again at the end
  pending = {}  # --population: (cell, setting) -> (config, [lr, ...]) still to train
  for cell, config, setting, lr, workdir in runs(args):
    line = command(config, lr, workdir, args, setting.overrides)
    name = "/".join([cell, *setting.folders])  # the cell, or a swept combination of it
    if args.action == "print" and not args.population:
      print(shlex.join(line))
      continue
    if args.action == "print":
      pending.setdefault((cell, setting), (config, []))[1].append(lr)
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
      print(f"skip {name} lr {lr:.6g}: finished", flush=True)
      continue
    diverged = workdir / records.DIVERGED_FILE  # a population member that stopped alone: its sweep answer
    if diverged.exists():
      print(f"skip {name} lr {lr:.6g}: diverged ({diverged.read_text().strip()})", flush=True)
      continue
    if args.population:
      pending.setdefault((cell, setting), (config, []))[1].append(lr)
      continue
    print(f"run  {name} lr {lr:.6g} -> {workdir}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "train.log").open("a") as log:
      result = subprocess.run(line, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
      failures.append(workdir)
      print(f"     failed with exit code {result.returncode}; see {workdir / 'train.log'}", flush=True)
  for (cell, setting), (config, lrs) in pending.items():  # members differ in lr only: a setting is a program
    directory = root.joinpath(cell, *setting.folders)
    name = "/".join([cell, *setting.folders])
    for start in range(0, len(lrs), args.population):
      chunk = lrs[start:start + args.population]
      line = population_command(config, chunk, directory, args, setting.overrides)
      if args.action == "print":
        print(shlex.join(line))
        continue
      print(f"run  {name} population of {len(chunk)} lrs ({chunk[0]:.6g}..{chunk[-1]:.6g}) -> {directory}/lr_*",
            flush=True)
      directory.mkdir(parents=True, exist_ok=True)
      with (directory / "population.log").open("a") as log:
        result = subprocess.run(line, env=ENV, stdout=log, stderr=subprocess.STDOUT)
      if result.returncode != 0:
        failures.append(directory)
        print(f"     failed with exit code {result.returncode}; see {directory / 'population.log'}", flush=True)
  if args.action == "run":
    select(root)
  if failures:
    print(f"error: {len(failures)} run(s) not done, each named above: {', '.join(map(str, failures))}",
          file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
