"""python -m nc_jax.report RUN_DIR [RUN_DIR ...] --out DIR [--group seeds]: the paper's figures and Table 1 from runs.

Reads each run's metrics.jsonl (and config.json for its name); never imports the
trainer. Writes one PNG per figure (one panel per run, epochs on the x-axis, the
TPT start as a dashed line), table1.md (test accuracy at the TPT start and at
the last epoch) and report.md showing them together, with every figure's
quantity at the first measurement, the TPT start and the last measurement.
Partial runs are plotted as far as they go. Runs that log them also get the
MSE decomposition (fig9_mse_decomposition.png) and per-layer collapse against
depth at the first, TPT-start and last measurements (fig_depth.png).

With ``--group seeds``, runs whose configs differ only in seed and data_seed
(``nc_jax.report_seeds``) are one panel and one table row each: every measurement
drawn as the mean over the seeds at each epoch all of them measured, with the
range (min..max) shaded, the TPT start at the seeds' mean (their range shaded
grey); table cells give 'mean [min..max]' (the mean alone where the seeds agree).
A group's first, TPT-start and last rows take each seed's own such measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import pathlib
import sys
import textwrap
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nc_jax import files, records as records_lib, report_seeds, schema  # noqa: E402
from nc_jax.report_seeds import Spread, epoch_text  # noqa: E402

# (file stem, title, [(metrics key, label)], log scale) in the paper's order.
FIGURES = (
    ("fig1_train_error", "Training error", [("train_error", "train error")], True),
    ("fig2_equinorm", "Equinorm: Std/Avg of norms", [("equinorm_means", "class means"),
                                                      ("equinorm_weights", "classifiers")], True),
    ("fig3_equiangularity", "Equiangularity: Std of cosines", [("equiangular_means", "class means"),
                                                               ("equiangular_weights", "classifiers")], True),
    ("fig4_max_angle", "Maximal angles: Avg |cos + 1/(C-1)|", [("max_angle_means", "class means"),
                                                                ("max_angle_weights", "classifiers")], True),
    ("fig5_self_duality", "Self-duality: ||W/||W|| - M/||M|| ||^2", [("self_duality", "")], True),
    ("fig6_nc1", "NC1: Tr(Sigma_W Sigma_B^+)/C", [("nc1", "")], True),
    ("fig7_ncc_mismatch", "NCC mismatch (train)", [("ncc_mismatch", "")], True),
    ("fig8_deepfool", "DeepFool robustness ||r||/||x||", [("deepfool_robustness", "")], False),
)
# Figures of protocol variants, drawn only for runs that log their keys (same form as FIGURES).
VARIANT_FIGURES = (
    # MSE runs (Han, Papyan & Donoho 2022): the last layer's regularised MSE on the training features and its split
    ("fig9_mse_decomposition", "MSE decomposition: L_NC1 + L_NC2/3 + L_perp", [
        ("mse_lnc1", "L_NC1"), ("mse_lnc23", "L_NC2/3"), ("mse_lperp", "L_perp"), ("mse_total", "sum (reg. MSE)")],
     True),
    # imbalanced runs (minority collapse, Fang et al. 2021): the simplex ETF's cosine is -1/(C-1)
    ("fig_minority_cosines", "Minority collapse: mean pairwise cosine", [
        ("minority_w_cosine", "minority classifiers"), ("majority_w_cosine", "majority classifiers"),
        ("minority_mean_cosine", "minority means"), ("majority_mean_cosine", "majority means")], False),
)


@dataclasses.dataclass
class Run:
  name: str
  directory: pathlib.Path
  records: list
  config: dict

  @property
  def tpt_start(self) -> Optional[int]:
    return records_lib.tpt_start(self.records)

  @property
  def first_in_tpt(self) -> Optional[dict]:
    """The first measurement at or after the TPT start (the TPT start itself for runs that measure it)."""
    return records_lib.first_in_tpt(self.records)

  def series(self, key):
    points = [(r["epoch"], _number(r.get("train_acc"), invert=True) if key == "train_error" else _number(r.get(key)))
              for r in self.records]
    return [(e, v) for e, v in points if v is not None]


_number = records_lib.number


def _named_options(config: dict) -> dict:
  """The model options worth a run's name: width and depth, and any other option off its default."""
  options = config.get("model_options") or {}
  model = config.get("model")
  defaults = json.loads(schema.model_options_for(model).to_json()) if model in schema.MODEL_OPTIONS else {}
  return {k: v for k, v in options.items() if k in ("width", "depth") or k not in defaults or defaults[k] != v}


# Protocol-variant keys named in a run's title when off the paper's default (schema.base_config's).
VARIANT_KEYS = ("loss", "optimizer", "adam_betas", "adam_eps", "feature_decay", "imbalance", "imbalance_ratio",
                "minority_classes", "random_label_fraction", "per_class", "compute_dtype", "per_layer_nc")


def _variant_suffix(config: dict) -> str:
  reference = schema.base_config(dataset="mnist1d", data_source="generated", model="mlp")
  def same(key):  # config.json holds JSON (lists for tuples)
    value, default = config[key], reference[key]
    return (list(value) == list(default)) if isinstance(default, tuple) and isinstance(value, list) else value == default

  changed = [f"{key} {config[key]}" for key in VARIANT_KEYS if key in config and key in reference and not same(key)]
  # metric conventions off the paper's (config.nc): NC1 without the 1/C is not the paper's NC1 beside it
  conventions = config.get("nc") if isinstance(config.get("nc"), dict) else {}
  changed += [f"nc.{key} {value}" for key, value in schema.non_default_nc(conventions).items()]
  return f", {', '.join(changed)}" if changed else ""


def _lost_log_advice(directory: pathlib.Path, otherwise: str) -> str:
  """Why a run folder has no records, and the fix: lost beside its checkpoints (the train command restores them
  from the newest), else ``otherwise``."""
  checkpoints = directory / "checkpoints"
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    return ("the run has checkpoints, so the file was lost: rerun the run's python -m nc_jax.train command, which "
            "restores its records from the newest checkpoint (and goes on if the run is unfinished), then this")
  return otherwise


def load_run(directory: str) -> Run:
  """A run directory's records (through nc_jax.records: a torn last line is dropped with a warning) and config."""
  directory = pathlib.Path(directory)
  if not (directory / records_lib.METRICS_FILE).exists():
    raise FileNotFoundError(f"{directory} has no metrics.jsonl: "
                            + _lost_log_advice(directory, "is it a run directory of python -m nc_jax.train?"))
  records = records_lib.read(directory)
  if not records:
    raise ValueError(f"{directory / records_lib.METRICS_FILE} is empty: "
                     + _lost_log_advice(directory, "the run has not reached its first measurement yet"))
  config = records_lib.read_config(directory)
  options = ", ".join(f"{k} {v}" for k, v in sorted(_named_options(config).items()))
  name = (f"{config.get('dataset', '?')} / {config.get('model', '?')}{f' ({options})' if options else ''}, "
          f"lr {config.get('lr', '?')}{_variant_suffix(config)}") if config else directory.name
  return Run(name, directory, records, config)


@dataclasses.dataclass
class Seeds:
  """Runs of one config at several seeds, drawn and tabulated as one (a single run is a group of one, drawn as
  it always was): the mean over the runs with the range (min..max), ``nc_jax.report_seeds.Spread``."""
  runs: list
  apart: str = ""  # what tells it from groups of the same name ('weight_decay 0.0005'): ``_named_apart``

  @property
  def name(self) -> str:
    name = self.runs[0].name + (f", {self.apart}" if self.apart else "")
    seeds = report_seeds.describe_seeds([run.config for run in self.runs])
    return f"{name}, mean of {len(self.runs)} runs ({seeds})" if len(self.runs) > 1 else name

  def spread(self, key) -> list[tuple[int, Spread]]:
    """``key`` (or 'train_error') over the epochs every run measured it: [(epoch, Spread over runs), ...]."""
    return report_seeds.aligned([run.series(key) for run in self.runs])

  def at(self, pick) -> list[dict]:
    """The record ``pick(run)`` of each run (records[0], first_in_tpt, ...), runs without one left out."""
    return [record for record in (pick(run) for run in self.runs) if record is not None]

  @property
  def tpt_starts(self) -> list[int]:
    return [run.tpt_start for run in self.runs if run.tpt_start]


def group_runs(runs: list[Run], by: str = "none") -> list[Seeds]:
  """``runs`` as the report draws them: one group each (``by='none'``), or replicates together (``'seeds'``:
  configs equal but for seed and data_seed, ``nc_jax.report_seeds.group``), named apart (``_named_apart``)."""
  if by == "none":
    return _named_apart([Seeds([run]) for run in runs])
  if by == "seeds":
    return _named_apart([Seeds(members) for members in report_seeds.group(runs, lambda run: run.config)])
  raise ValueError(f"unknown grouping {by!r}; choose 'none' (one panel per run) or 'seeds'")


def _named_apart(groups: list[Seeds]) -> list[Seeds]:
  """``groups`` with their names told apart: where several share a name, each gets the config keys that differ
  between them (a swept weight_decay, model option or seed that names do not show); a group's own seeds stay in
  its 'mean of' part."""
  by_name = {}
  for group in groups:
    by_name.setdefault(group.name, []).append(group)
  for same in by_name.values():
    shared = [{k: v for k, v in g.runs[0].config.items() if len(g.runs) == 1 or k not in report_seeds.SEED_KEYS}
              for g in same]
    keys = report_seeds.differing_keys(shared)
    for group, config in zip(same, shared):
      values = report_seeds.flat(config)
      group.apart = ", ".join(f"{key} {values[key]}" for key in keys)
  return groups


def _as_groups(entries) -> list[Seeds]:
  """Runs or groups as groups (a run alone is a group of one)."""
  return [entry if isinstance(entry, Seeds) else Seeds([entry]) for entry in entries]


def _spread_cell(values, form) -> str:
  """A table cell: the values' 'mean [min..max]' in ``form``, or '-' for none."""
  return Spread.of(values).text(form) if values else "-"


def _draw_spread(axis, xs, spreads, *, log_scale: bool, **style) -> None:
  """The means as a line (``style``: colour, marker, label) and, where the values differ, the range shaded in
  the line's colour (on a log axis, only where its lower edge is positive)."""
  axis.plot(xs, [s.mean for s in spreads], **style)
  if any(s.high > s.low for s in spreads):
    lows, highs = [s.low for s in spreads], [s.high for s in spreads]
    where = [low > 0 for low in lows] if log_scale else None
    axis.fill_between(xs, lows, highs, where=where, color=style.get("color"), alpha=0.25, linewidth=0)


def _save(figure, title: str, out: pathlib.Path, stem: str) -> str:
  """Titles, lays out, writes out/stem.png whole or not at all (``files.write_atomically``: a full disk
  leaves no truncated PNG) and closes ``figure``; returns the file name."""
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  path = out / f"{stem}.png"
  buffer = io.BytesIO()
  try:
    figure.savefig(buffer, format="png", dpi=110)
  finally:
    plt.close(figure)
  files.write_atomically(path, buffer.getvalue())
  return path.name


def plot_figure(runs, stem: str, title: str, keys, log_scale: bool, out: pathlib.Path) -> Optional[str]:
  """One panel per run or group of seeds (``Seeds``) that logs any of ``keys``: each key's series (a group's
  mean, its range shaded) against epochs, the TPT start dashed; writes out/stem.png and returns its name."""
  groups = [group for group in _as_groups(runs) if any(group.spread(key) for key, _ in keys)]  # no keys: no panel
  if not groups:
    return None
  columns = min(len(groups), 4)
  rows = math.ceil(len(groups) / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
  for axis, group in zip(axes.flat, groups):
    for index, (key, label) in enumerate(keys):  # colour by key: a series keeps it across panels
      points = group.spread(key)
      if log_scale:
        points = [(e, s) for e, s in points if s.mean > 0]
      if points:
        epochs, spreads = zip(*points)
        _draw_spread(axis, epochs, spreads, log_scale=log_scale, marker=".", markersize=3, color=f"C{index}",
                     label=label or None)
    if group.tpt_starts:  # a group's: at the seeds' mean, their range in grey
      starts = Spread.of(group.tpt_starts)
      axis.axvline(starts.mean, color="gray", linestyle="--", linewidth=1, label="TPT start")
      if starts.high > starts.low:
        axis.axvspan(starts.low, starts.high, color="gray", alpha=0.15, linewidth=0)
    if log_scale:
      axis.set_yscale("log")
    axis.set_title(textwrap.fill(group.name, 48), fontsize=8)
    axis.set_xlabel("epoch", fontsize=8)
    axis.tick_params(labelsize=7)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=6)
  for axis in list(axes.flat)[len(groups):]:
    axis.axis("off")
  return _save(figure, title, out, stem)


def plot_class_norms(runs, out: pathlib.Path) -> Optional[str]:
  """Per-class ||w_c|| and ||mu_c - mu_G|| at each run's last measurement (imbalanced runs log them), each
  divided by its largest, classes in order (the minority last); a group's bars at the seeds' mean, their range
  as error bars."""
  groups = [group for group in _as_groups(runs) if all("class/0/w_norm" in run.records[-1] for run in group.runs)]
  if not groups:
    return None
  figure, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 2.9), squeeze=False)
  for axis, group in zip(axes.flat, groups):
    lasts = group.at(lambda run: run.records[-1])
    classes = sorted(int(k.split("/")[1]) for k in lasts[0] if k.startswith("class/") and k.endswith("/w_norm"))
    for offset, (key, label) in zip((-0.2, 0.2), (("w_norm", "||w_c||"), ("mean_norm", "||mu_c - mu_G||"))):
      relative = []  # per run, per class
      for last in lasts:
        values = [_number(last.get(f"class/{c}/{key}")) or 0.0 for c in classes]
        top = max(values) or 1.0
        relative.append([v / top for v in values])
      spreads = [Spread.of(column) for column in zip(*relative)]
      means = [s.mean for s in spreads]
      errors = ([[s.mean - s.low for s in spreads], [s.high - s.mean for s in spreads]]
                if any(s.high > s.low for s in spreads) else None)
      axis.bar([c + offset for c in classes], means, width=0.4, label=label, yerr=errors, capsize=2 if errors else 0)
    epochs = Spread.of([last["epoch"] for last in lasts]).text(epoch_text)
    axis.set_title(textwrap.fill(f"{group.name}, epoch {epochs}", 48), fontsize=8)
    axis.set_xlabel("class", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=6)
  return _save(figure, "Per-class norms (relative to the largest)", out, "fig_class_norms")


# Per-layer keys ('layer/<name>/<key>', logged with per_layer_nc) drawn against depth: (key, title, log scale).
DEPTH_PANELS = (("nc1", "NC1", True), ("equinorm_means", "equinorm of means", True),
                ("equiangular_means", "equiangularity of means", True),
                ("max_angle_means", "max-angle of means", True), ("ncc_accuracy", "NCC accuracy", False))


def _stages(record: dict) -> list[str]:
  """The layer names of a record's 'layer/<name>/...' keys in depth order (layer2 before layer10)."""
  names = {key.split("/")[1] for key in record if key.startswith("layer/") and key.count("/") == 2}
  def order(name):
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem):] or -1)
  return sorted(names, key=order)


def plot_depth(runs, out: pathlib.Path) -> Optional[str]:
  """Per-layer collapse: each DEPTH_PANELS metric against stage index (one row per run or group of seeds with
  per-layer keys), one line each for the first measurement, the first in TPT and the last (a group's: the mean
  of each seed's own such measurement, their range shaded)."""
  groups = [group for group in _as_groups(runs) if _stages(group.runs[0].records[-1])]
  if not groups:
    return None
  figure, axes = plt.subplots(len(groups), len(DEPTH_PANELS),
                              figsize=(3.0 * len(DEPTH_PANELS), 2.7 * len(groups)), squeeze=False)
  for row, group in zip(axes, groups):
    stages = _stages(group.runs[0].records[-1])
    chosen = {}  # epochs -> (label, records, colour), first/TPT/last without repeats, each label its own colour
    for index, (label, pick) in enumerate((("first", lambda run: run.records[0]),
                                           ("TPT start", lambda run: run.first_in_tpt),
                                           ("last", lambda run: run.records[-1]))):
      records = group.at(pick)
      if records:
        chosen.setdefault(tuple(record["epoch"] for record in records), (label, records, f"C{index}"))
    for axis, (key, title, log_scale) in zip(row, DEPTH_PANELS):
      for epochs, (label, records, colour) in chosen.items():
        points = []
        for i, name in enumerate(stages, start=1):
          values = [_number(record.get(f"layer/{name}/{key}")) for record in records]
          if all(v is not None for v in values):
            points.append((i, Spread.of(values)))
        points = [(i, s) for i, s in points if s.mean > 0 or not log_scale]
        if points:
          _draw_spread(axis, *zip(*points), log_scale=log_scale, marker="o", markersize=3, color=colour,
                       label=f"epoch {Spread.of(epochs).text(epoch_text)} ({label})")
      if log_scale:
        axis.set_yscale("log")
      axis.set_xticks(range(1, len(stages) + 1), stages, fontsize=6)
      axis.set_title(f"{title}\n{textwrap.fill(group.name, 48)}", fontsize=7)
      axis.set_xlabel("stage", fontsize=8)
      axis.tick_params(labelsize=7)
      if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=5)
  return _save(figure, "Per-layer collapse against depth", out, "fig_depth")


def table1(runs) -> str:
  """Test accuracy at the first measurement at or after the TPT start, and at the last measurement; a group of
  seeds' cells are 'mean [min..max]' over its seeds (the TPT columns over the seeds that reached it)."""
  lines = ["| run | TPT start epoch | test acc at TPT start | last epoch | test acc at last epoch | change (points) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for group in _as_groups(runs):
    lasts = group.at(lambda run: run.records[-1])
    last_epoch = _spread_cell([last["epoch"] for last in lasts], epoch_text)
    last_acc = _spread_cell([100 * float(last["test_acc"]) for last in lasts], "{:.2f}")
    reached = [run for run in group.runs if run.first_in_tpt is not None]
    if not reached:
      lines.append(f"| {group.name} | not reached | - | {last_epoch} | {last_acc} | - |")
      continue
    missing = len(group.runs) - len(reached)
    tpt = (f"{_spread_cell([run.tpt_start for run in reached], epoch_text)} (measured at "
           f"{_spread_cell([run.first_in_tpt['epoch'] for run in reached], epoch_text)}"
           f"{f'; not reached by {missing} of {len(group.runs)}' if missing else ''})")
    start_acc = _spread_cell([100 * float(run.first_in_tpt["test_acc"]) for run in reached], "{:.2f}")
    change = _spread_cell([100 * (float(run.records[-1]["test_acc"]) - float(run.first_in_tpt["test_acc"]))
                           for run in reached], "{:+.2f}")
    lines.append(f"| {group.name} | {tpt} | {start_acc} | {last_epoch} | {last_acc} | {change} |")
  return "\n".join(lines)


# (metrics key, column header, format) for the key-epochs table.
KEY_COLUMNS = (
    ("train_acc", "train acc", "{:.2%}"), ("test_acc", "test acc", "{:.2%}"), ("nc1", "NC1", "{:.3g}"),
    ("equinorm_means", "equinorm M", "{:.3f}"), ("equinorm_weights", "equinorm W", "{:.3f}"),
    ("equiangular_means", "equiangular M", "{:.3f}"), ("max_angle_means", "max-angle M", "{:.3f}"),
    ("etf_deviation_means", "ETF dev. M", "{:.3f}"), ("self_duality", "self-duality", "{:.3f}"),
    ("ncc_mismatch", "NCC mismatch", "{:.4f}"), ("deepfool_robustness", "DeepFool", "{:.4f}"),
    ("minority_w_cosine", "minority W cos", "{:.3f}"), ("majority_w_cosine", "majority W cos", "{:.3f}"),
)


def key_epochs(runs) -> str:
  """Every figure's quantity at the first measurement, the first one in TPT, and the last one, per run; a group
  of seeds' row takes each seed's own such measurement and gives 'mean [min..max]' over them."""
  groups = _as_groups(runs)
  columns = [c for c in KEY_COLUMNS if any(c[0] in r for group in groups for run in group.runs for r in run.records)]
  lines = ["| run | epoch | " + " | ".join(header for _, header, _ in columns) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
  for group in groups:
    rows = [("first", group.at(lambda run: run.records[0]))]
    reached = [run for run in group.runs if run.first_in_tpt is not None]
    if reached:
      exact = all(run.first_in_tpt["epoch"] == run.tpt_start for run in reached)
      label = "TPT start" if exact else f"first in TPT, from {_spread_cell([r.tpt_start for r in reached], epoch_text)}"
      if len(reached) < len(group.runs):
        label += f"; {len(reached)} of {len(group.runs)} reached it"
      rows.append((label, [run.first_in_tpt for run in reached]))
    rows.append(("last", group.at(lambda run: run.records[-1])))
    for label, records in rows:
      cells = []
      for key, _, form in columns:
        cells.append(_spread_cell([v for v in (_number(r.get(key)) for r in records) if v is not None], form))
      epochs = _spread_cell([r["epoch"] for r in records], epoch_text)
      lines.append(f"| {group.name} | {epochs} ({label}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(run_directories, out: str, group: str = "none") -> pathlib.Path:
  """Every figure, table1.md and report.md (written last) in ``out``, each file whole or not at all; OSError
  (naming the file) when ``out`` cannot be made or written. ``group``: 'none' (a panel and a row per run) or
  'seeds' (runs differing only in seed and data_seed as one: ``group_runs``)."""
  runs = [load_run(d) for d in run_directories]
  groups = group_runs(runs, group)
  out = pathlib.Path(out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # a file in the way, a read-only parent
    raise OSError(error.errno, error.strerror, str(out)) from None
  if not out.is_dir():  # mkdir(exist_ok=True) accepts a symlink to a file on some systems
    raise NotADirectoryError(20, "Not a directory", str(out))
  figures = [(title, plot_figure(groups, stem, title, keys, log_scale, out))
             for stem, title, keys, log_scale in FIGURES + VARIANT_FIGURES]
  figures.append(("Per-class norms", plot_class_norms(groups, out)))
  figures.append(("Per-layer collapse against depth", plot_depth(groups, out)))
  table = table1(groups)
  files.write_atomically(out / "table1.md", (table + "\n").encode())
  parts = ["# Neural Collapse report", "", "Runs: " + "; ".join(f"`{r.directory}`" for r in runs), ""]
  if any(len(g.runs) > 1 for g in groups):
    parts += ["Runs of one config at several seeds are drawn as one: the mean over the seeds at each epoch every "
              "one of them measured, the range (min..max) shaded; table cells give mean [min..max].", ""]
  parts += ["## Table 1: test accuracy at the start of the terminal phase and at the end", "", table, "",
            "## Key epochs: first measurement, TPT start, last measurement", "", key_epochs(groups), ""]
  for title, name in figures:
    if name:
      parts += [f"## {title}", "", f"![{title}]({name})", ""]
  path = out / "report.md"
  files.write_atomically(path, "\n".join(parts).encode())
  return path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="Figures and Table 1 of the paper from nc_jax.train run directories.")
  parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--group", choices=("none", "seeds"), default="none",
                      help="seeds: runs whose configs differ only in seed and data_seed drawn as one, their mean "
                           "with the range (min..max) shaded, tables giving mean [min..max] (default: none, one "
                           "panel and one row per run)")
  args = parser.parse_args(argv)
  try:
    path = write_report(args.runs, args.out, args.group)
  except OSError as error:
    written = error.filename and pathlib.Path(str(error.filename)).absolute().is_relative_to(
        pathlib.Path(args.out).absolute())
    if written:
      message = files.describe_write_error(error)
    elif error.filename and error.strerror:  # reading a run
      message = f"cannot read {error.filename}: {error.strerror}"
    else:
      message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    return 1
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
