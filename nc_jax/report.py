"""python -m nc_jax.report RUN_DIR [RUN_DIR ...] --out DIR: the paper's figures and Table 1 from runs.

Reads each run's metrics.jsonl (and config.json for its name); never imports the
trainer. Writes one PNG per figure (one panel per run, epochs on the x-axis, the
TPT start as a dashed line), table1.md (test accuracy at the TPT start and at
the last epoch) and report.md showing them together, with every figure's
quantity at the first measurement, the TPT start and the last measurement.
Partial runs are plotted as far as they go. Runs that log them also get the
MSE decomposition (fig9_mse_decomposition.png) and per-layer collapse against
depth at the first, TPT-start and last measurements (fig_depth.png).
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

from nc_jax import files, records as records_lib, schema  # noqa: E402

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


def load_run(directory: str) -> Run:
  """A run directory's records (through nc_jax.records: a torn last line is dropped with a warning) and config."""
  directory = pathlib.Path(directory)
  if not (directory / records_lib.METRICS_FILE).exists():
    raise FileNotFoundError(f"{directory} has no metrics.jsonl: is it a run directory of python -m nc_jax.train?")
  records = records_lib.read(directory)
  if not records:
    raise ValueError(f"{directory / records_lib.METRICS_FILE} is empty: the run has not reached its first "
                     "measurement yet")
  config = records_lib.read_config(directory)
  options = ", ".join(f"{k} {v}" for k, v in sorted(_named_options(config).items()))
  name = (f"{config.get('dataset', '?')} / {config.get('model', '?')}{f' ({options})' if options else ''}, "
          f"lr {config.get('lr', '?')}{_variant_suffix(config)}") if config else directory.name
  return Run(name, directory, records, config)


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


def plot_figure(runs: list[Run], stem: str, title: str, keys, log_scale: bool, out: pathlib.Path) -> Optional[str]:
  runs = [run for run in runs if any(run.series(key) for key, _ in keys)]  # a run without the keys: no panel
  if not runs:
    return None
  columns = min(len(runs), 4)
  rows = math.ceil(len(runs) / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
  for axis, run in zip(axes.flat, runs):
    for index, (key, label) in enumerate(keys):  # colour by key: a series keeps it across panels
      points = run.series(key)
      if log_scale:
        points = [(e, v) for e, v in points if v > 0]
      if points:
        axis.plot(*zip(*points), marker=".", markersize=3, color=f"C{index}", label=label or None)
    if run.tpt_start:
      axis.axvline(run.tpt_start, color="gray", linestyle="--", linewidth=1, label="TPT start")
    if log_scale:
      axis.set_yscale("log")
    axis.set_title(textwrap.fill(run.name, 48), fontsize=8)
    axis.set_xlabel("epoch", fontsize=8)
    axis.tick_params(labelsize=7)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=6)
  for axis in list(axes.flat)[len(runs):]:
    axis.axis("off")
  return _save(figure, title, out, stem)


def plot_class_norms(runs: list[Run], out: pathlib.Path) -> Optional[str]:
  """Per-class ||w_c|| and ||mu_c - mu_G|| at each run's last measurement (imbalanced runs log them), each
  divided by its largest, classes in order (the minority last)."""
  runs = [run for run in runs if "class/0/w_norm" in run.records[-1]]
  if not runs:
    return None
  figure, axes = plt.subplots(1, len(runs), figsize=(3.8 * len(runs), 2.9), squeeze=False)
  for axis, run in zip(axes.flat, runs):
    last = run.records[-1]
    classes = sorted(int(k.split("/")[1]) for k in last if k.startswith("class/") and k.endswith("/w_norm"))
    for offset, (key, label) in zip((-0.2, 0.2), (("w_norm", "||w_c||"), ("mean_norm", "||mu_c - mu_G||"))):
      values = [_number(last.get(f"class/{c}/{key}")) or 0.0 for c in classes]
      top = max(values) or 1.0
      axis.bar([c + offset for c in classes], [v / top for v in values], width=0.4, label=label)
    axis.set_title(textwrap.fill(f"{run.name}, epoch {last['epoch']}", 48), fontsize=8)
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


def plot_depth(runs: list[Run], out: pathlib.Path) -> Optional[str]:
  """Per-layer collapse: each DEPTH_PANELS metric against stage index (one row per run with per-layer keys),
  one line each for the first measurement, the first in TPT and the last."""
  runs = [run for run in runs if _stages(run.records[-1])]
  if not runs:
    return None
  figure, axes = plt.subplots(len(runs), len(DEPTH_PANELS), figsize=(3.0 * len(DEPTH_PANELS), 2.7 * len(runs)),
                              squeeze=False)
  for row, run in zip(axes, runs):
    stages = _stages(run.records[-1])
    chosen = {}  # epoch -> (label, record, colour), first/TPT/last without repeats, each label its own colour
    for index, (label, record) in enumerate(
        (("first", run.records[0]), ("TPT start", run.first_in_tpt), ("last", run.records[-1]))):
      if record is not None:
        chosen.setdefault(record["epoch"], (label, record, f"C{index}"))
    for axis, (key, title, log_scale) in zip(row, DEPTH_PANELS):
      for epoch, (label, record, colour) in chosen.items():
        points = [(i, _number(record.get(f"layer/{name}/{key}"))) for i, name in enumerate(stages, start=1)]
        points = [(i, v) for i, v in points if v is not None and (v > 0 or not log_scale)]
        if points:
          axis.plot(*zip(*points), marker="o", markersize=3, color=colour, label=f"epoch {epoch} ({label})")
      if log_scale:
        axis.set_yscale("log")
      axis.set_xticks(range(1, len(stages) + 1), stages, fontsize=6)
      axis.set_title(f"{title}\n{run.name}", fontsize=7)
      axis.set_xlabel("stage", fontsize=8)
      axis.tick_params(labelsize=7)
      if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=5)
  return _save(figure, "Per-layer collapse against depth", out, "fig_depth")


def table1(runs: list[Run]) -> str:
  """Test accuracy at the first measurement at or after the TPT start, and at the last measurement."""
  lines = ["| run | TPT start epoch | test acc at TPT start | last epoch | test acc at last epoch | change (points) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for run in runs:
    last = run.records[-1]
    start = run.first_in_tpt
    if start is None:
      lines.append(f"| {run.name} | not reached | - | {last['epoch']} | {100 * float(last['test_acc']):.2f} | - |")
      continue
    change = 100 * (float(last["test_acc"]) - float(start["test_acc"]))
    lines.append(f"| {run.name} | {run.tpt_start} (measured at {start['epoch']}) | {100 * float(start['test_acc']):.2f} "
                 f"| {last['epoch']} | {100 * float(last['test_acc']):.2f} | {change:+.2f} |")
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


def key_epochs(runs: list[Run]) -> str:
  """Every figure's quantity at the first measurement, the first one in TPT, and the last one, per run."""
  columns = [c for c in KEY_COLUMNS if any(c[0] in r for run in runs for r in run.records)]
  lines = ["| run | epoch | " + " | ".join(header for _, header, _ in columns) + " |",
           "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
  for run in runs:
    tpt = run.first_in_tpt
    rows = [("first", run.records[0])]
    if tpt is not None:
      rows.append(("TPT start" if tpt["epoch"] == run.tpt_start else f"first in TPT, from {run.tpt_start}", tpt))
    rows.append(("last", run.records[-1]))
    for label, record in rows:
      cells = []
      for key, _, form in columns:
        value = _number(record.get(key))
        cells.append("-" if value is None else form.format(value))
      lines.append(f"| {run.name} | {record['epoch']} ({label}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_report(run_directories, out: str) -> pathlib.Path:
  """Every figure, table1.md and report.md (written last) in ``out``, each file whole or not at all; OSError
  (naming the file) when ``out`` cannot be made or written."""
  runs = [load_run(d) for d in run_directories]
  out = pathlib.Path(out)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # a file in the way, a read-only parent
    raise OSError(error.errno, error.strerror, str(out)) from None
  if not out.is_dir():  # mkdir(exist_ok=True) accepts a symlink to a file on some systems
    raise NotADirectoryError(20, "Not a directory", str(out))
  figures = [(title, plot_figure(runs, stem, title, keys, log_scale, out))
             for stem, title, keys, log_scale in FIGURES + VARIANT_FIGURES]
  figures.append(("Per-class norms", plot_class_norms(runs, out)))
  figures.append(("Per-layer collapse against depth", plot_depth(runs, out)))
  table = table1(runs)
  files.write_atomically(out / "table1.md", (table + "\n").encode())
  parts = ["# Neural Collapse report", "", "Runs: " + "; ".join(f"`{r.directory}`" for r in runs), "",
           "## Table 1: test accuracy at the start of the terminal phase and at the end", "", table, "",
           "## Key epochs: first measurement, TPT start, last measurement", "", key_epochs(runs), ""]
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
  args = parser.parse_args(argv)
  try:
    path = write_report(args.runs, args.out)
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
