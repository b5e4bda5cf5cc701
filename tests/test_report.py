"""nc_jax.report and experiments/grid.py on small real runs."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from experiments import grid
from nc_jax import records, report
from nc_jax.training import train_and_evaluate
from tests.test_train import smoke_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CELL = str(REPO / "configs" / "default.py")


def run_config(lr):
  """The config of each of ``two_runs``."""
  return smoke_config(num_epochs=8, measure_epochs=(1, 2, 4, 8), lr=lr, tpt_threshold=0.45, deepfool_samples=4)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for lr in (0.05, 0.1):
    train_and_evaluate(run_config(lr), str(root / "default" / f"lr_{lr:.6g}"), log=lambda *a, **k: None)
  return root


def test_report_writes_every_figure_and_table1(two_runs, tmp_path):
  runs = sorted(str(p) for p in (two_runs / "default").iterdir())
  assert report.main([*runs, "--out", str(tmp_path)]) == 0
  names = {p.name for p in tmp_path.iterdir()}
  for stem, *_ in report.FIGURES:
    assert f"{stem}.png" in names, stem
  table = (tmp_path / "table1.md").read_text()
  assert table.count("\n") == 4 and "mnist1d / mlp (depth 5, width 32), lr 0.05" in table
  assert "![NC1" in (tmp_path / "report.md").read_text()


def test_key_epochs_table_quotes_the_first_tpt_and_last_records(two_runs):
  run = report.load_run(str(two_runs / "default" / "lr_0.05"))
  rows = [l for l in report.key_epochs([run]).splitlines()[2:]]
  first, last = run.records[0], run.records[-1]
  assert run.tpt_start and len(rows) == 3
  assert rows[0].split(" | ")[1] == f"{first['epoch']} (first)" and rows[-1].split(" | ")[1] == f"{last['epoch']} (last)"
  assert f"| {float(last['nc1']):.3g} |" in rows[-1] and f"| {float(first['test_acc']):.2%} |" in rows[0]
  assert f"{run.tpt_start} (TPT start)" in rows[1]  # the loop measures the TPT start epoch itself


def test_partial_run_is_plotted_and_missing_metrics_are_named(two_runs, tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  lines = (two_runs / "default" / "lr_0.05" / "metrics.jsonl").read_text().splitlines()[:2]
  (partial / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  assert report.main([str(partial), "--out", str(tmp_path / "out")]) == 0
  assert "not reached" in (tmp_path / "out" / "table1.md").read_text() or "| 2 |" in (tmp_path / "out" / "table1.md").read_text()
  with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
    report.load_run(str(tmp_path / "nowhere"))


def test_a_lost_log_beside_checkpoints_says_the_train_command_restores_it(two_runs, tmp_path, capsys):
  run = tmp_path / "run"
  shutil.copytree(two_runs / "default" / "lr_0.05", run)
  (run / "metrics.jsonl").write_text("")
  assert report.main([str(run), "--out", str(tmp_path / "out")]) == 1
  assert "is empty: the run has checkpoints" in capsys.readouterr().err
  (run / "metrics.jsonl").unlink()
  with pytest.raises(FileNotFoundError, match="has no metrics.jsonl: the run has checkpoints.*nc_jax.train"):
    report.load_run(str(run))
  train_and_evaluate(run_config(0.05), str(run), log=lambda *a, **k: None)  # its own command: restores the records
  assert report.load_run(str(run)).records == report.load_run(str(two_runs / "default" / "lr_0.05")).records
  empty = tmp_path / "fresh"
  (empty / "checkpoints").mkdir(parents=True)
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="has not reached its first measurement"):
    report.load_run(str(empty))


def test_grid_selects_the_best_final_test_error_and_skips_finished(two_runs, capsys):
  choices = grid.select(two_runs)
  accuracies = {lr: json.loads((two_runs / "default" / f"lr_{lr}" / "metrics.jsonl").read_text().splitlines()[-1])
                ["test_acc"] for lr in ("0.05", "0.1")}
  best = max(accuracies, key=accuracies.get)
  assert choices["default"]["lr"] == float(best)
  code = grid.main(["run", "--root", str(two_runs), "--cells", str(REPO / "configs/default.py"),
                    "--lrs", "0.05,0.1", "--variant", "smoke", "--", "--config.num_epochs=8",
                    "--config.measure_epochs=1,2,4,8", "--config.tpt_threshold=0.45", "--config.deepfool_samples=4"])
  assert code == 0 and capsys.readouterr().out.count("skip") == 2
  before = (two_runs / "default" / "lr_0.05" / "metrics.jsonl").read_text()
  code = grid.main(["run", "--root", str(two_runs), "--cells", str(REPO / "configs/default.py"),
                    "--lrs", "0.05", "--variant", "smoke", "--", "--config.num_epochs=9",
                    "--config.measure_epochs=1,2,4,8", "--config.tpt_threshold=0.45", "--config.deepfool_samples=4"])
  out = capsys.readouterr().out
  assert code == 1 and "different config (num_epochs)" in out and "skip" not in out
  assert (two_runs / "default" / "lr_0.05" / "metrics.jsonl").read_text() == before


def test_grid_selection_ignores_shorter_runs(two_runs, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(two_runs / "default", root / "default")
  short = root / "default" / "lr_0.2"  # a 4-epoch run with a perfect test score must not win
  short.mkdir()
  config = json.loads((root / "default" / "lr_0.05" / "config.json").read_text())
  (short / "config.json").write_text(json.dumps({**config, "lr": 0.2, "num_epochs": 4}))
  (short / "metrics.jsonl").write_text(json.dumps({"epoch": 4, "test_acc": 1.0, "train_acc": 1.0, "nc1": 0.1}) + "\n")
  choice = grid.select(root)["default"]
  assert choice["lr"] in (0.05, 0.1) and choice["finished_runs"] == 2


def test_grid_report_lists_the_sweep_and_reports_the_chosen_run(two_runs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # workdirs and --root are relative to the caller, not to the repository
  assert grid.main(["report", "--root", str(two_runs)]) == 0
  rows = [l for l in (two_runs / "selection.md").read_text().splitlines() if l.startswith("| default")]
  assert len(rows) == 2 and sum("| yes |" in row for row in rows) == 1
  chosen = grid.select(two_runs)["default"]
  assert [s["lr"] for s in chosen["sweep"]] == [0.05, 0.1]
  table = (two_runs / "report" / "table1.md").read_text()
  assert table.count("\n") == 3 and f"lr {chosen['lr']:g}" in table  # header, rule, the chosen run only
  with pytest.raises(SystemExit, match="no run directory"):
    grid.select(tmp_path / "missing")


def test_grid_prints_the_paper_sweep_commands(capsys):
  assert len(grid.SWEEP) == 25 and grid.SWEEP[0] == pytest.approx(1e-4) and grid.SWEEP[-1] == pytest.approx(0.25)
  grid.main(["print", "--root", "/tmp/r", "--cells", "cifar10_resnet18", "--lr-indices", "0,24"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and "configs/paper/cifar10_resnet18.py" in lines[0] and "--config.lr=0.25" in lines[1]


@pytest.mark.parametrize("arguments", [["--lr-indices", "99"], ["--lrs", "abc"], ["--lrs", "-0.1"]])
def test_grid_bad_learning_rates_are_one_line(arguments):
  with pytest.raises(SystemExit, match="^error: --lr.*comma-separated positive numbers"):
    grid.main(["print", "--root", "/tmp/r", "--cells", "cifar10_resnet18", *arguments])


def test_a_torn_run_is_reported_as_far_as_it_goes_and_a_broken_one_does_not_stop_the_grid(two_runs, tmp_path, capsys):
  root = tmp_path / "root"
  shutil.copytree(two_runs / "default", root / "default")
  torn = root / "default" / "lr_0.05" / "metrics.jsonl"
  whole = report.load_run(torn.parent).records
  torn.write_text(torn.read_text() + '{"epoch": 9, "nc1"')  # a write cut short
  assert report.load_run(torn.parent).records == whole and whole[-1]["epoch"] == 8
  assert "torn last line" in capsys.readouterr().err
  broken = root / "default" / "lr_0.1" / "metrics.jsonl"
  lines = broken.read_text().splitlines(keepends=True)
  broken.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
  choice = grid.select(root)["default"]  # the broken run is named and left out; the others still compete
  assert choice["lr"] == 0.05 and choice["finished_runs"] == 1
  assert "lr_0.1/metrics.jsonl, line 2: not a JSON record" in capsys.readouterr().err
  assert report.main([str(broken.parent), "--out", str(tmp_path / "out")]) == 1


def test_a_series_keeps_its_colour_in_every_panel(two_runs, tmp_path, monkeypatch):
  """A run lacking the first key must not shift the colours of the others (matplotlib's cycle would)."""
  run = report.load_run(str(two_runs / "default" / "lr_0.05"))
  stripped = report.Run(run.name, run.directory, [{k: v for k, v in r.items() if k != "equinorm_means"}
                                                  for r in run.records], run.config)
  drawn = []
  closing = report.plt.close
  monkeypatch.setattr(report.plt, "close", lambda figure: (drawn.append(figure), closing(figure)))
  keys = (("equinorm_means", "means"), ("equinorm_weights", "weights"))
  assert report.plot_figure([run, stripped], "fig", "title", keys, True, tmp_path)
  full, missing = drawn[0].axes[:2]
  colour = {line.get_label(): line.get_color() for line in full.get_lines()}
  assert [line.get_color() for line in missing.get_lines() if line.get_label() == "weights"] == [colour["weights"]]
  assert colour["weights"] != colour["means"]


# ------------------------------------------------------------------ seeds: mean and range (--group seeds)
def _records_of(directory):
  return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def seed_runs(tmp_path):
  """Three runs of one config at seeds 1, 2, 3 (and one at another lr), written as nc_jax.train writes them
  (config.json as grid resolves the command, metrics.jsonl one record per line) with random measurements on
  the smoke schedule (1, 3, 6); seed 1 reaches TPT at 2, seed 2 at 4 (each measured there), seed 3 never."""
  rng = np.random.default_rng(0)
  keys = [key for _, _, series, _ in report.FIGURES for key, _ in series if key != "train_error"]
  directories = []
  for seed, lr, tpt in ((1, 0.05, 2), (2, 0.05, 4), (3, 0.05, None), (1, 0.1, 2)):
    directory = tmp_path / "runs" / f"seed_{seed}" / f"lr_{lr:g}"
    line = ["python", "-m", "nc_jax.train", "--config", f"{CELL}:smoke", "--workdir", str(directory),
            f"--config.lr={lr}", f"--config.seed={seed}"]
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(grid.requested_config(line), indent=2, sort_keys=True) + "\n")
    lines = []
    for epoch in sorted({1, 3, 6} | ({tpt} if tpt else set())):
      record = {"epoch": epoch, "train_acc": float(rng.uniform(0.9, 1.0)), "test_acc": float(rng.uniform(0.6, 0.8)),
                **{key: float(rng.uniform(0.01, 1.0)) for key in keys},
                **{f"layer/layer{i}/{key}": float(rng.uniform(0.01, 1.0)) for i in (1, 2)
                   for key, _, _ in report.DEPTH_PANELS},
                **{f"class/{c}/{key}": float(rng.uniform(0.5, 1.5)) for c in range(3)
                   for key in ("w_norm", "mean_norm")}}
      if tpt and epoch >= tpt:
        record["tpt_start_epoch"] = tpt
      lines.append(records.line_of(record))
    (directory / "metrics.jsonl").write_text("".join(lines))
    directories.append(directory)
  return directories


def _drawn(monkeypatch):
  drawn = {}
  closing = report.plt.close
  monkeypatch.setattr(report.plt, "close",
                      lambda figure: (drawn.__setitem__(figure._suptitle.get_text(), figure), closing(figure)))
  return drawn


def test_a_group_of_seeds_draws_and_tabulates_the_mean_and_range_numpy_computes(seed_runs, tmp_path, monkeypatch):
  drawn = _drawn(monkeypatch)
  out = tmp_path / "out"
  assert report.main([*map(str, seed_runs), "--out", str(out), "--group", "seeds"]) == 0
  seeds = [_records_of(d) for d in seed_runs[:3]]
  common = [1, 3, 6]  # the epochs every seed measured (each TPT start is one seed's only)
  nc1 = np.array([[next(r["nc1"] for r in run if r["epoch"] == e) for e in common] for run in seeds])
  # the figure: a line at the mean, the range shaded between min and max at each epoch
  axis = drawn[next(t for t in drawn if t.startswith("NC1"))].axes[0]
  line = axis.get_lines()[0]
  assert list(line.get_xdata()) == common and np.allclose(line.get_ydata(), nc1.mean(axis=0), rtol=1e-12)
  band = axis.collections[0].get_paths()[0].vertices
  for index, epoch in enumerate(common):
    at = band[band[:, 0] == epoch, 1]
    assert np.isclose(at, nc1[:, index].min()).any() and np.isclose(at, nc1[:, index].max()).any()
  assert "mean of 3 runs (seed 1, 2, 3)" in axis.get_title().replace("\n", " ")
  assert len(drawn[next(t for t in drawn if t.startswith("NC1"))].axes) == 2  # the other lr: a panel of its own
  # table 1: the TPT columns over the two seeds that reached it, the last over all three
  start = [next(r for r in run if r["epoch"] >= tpt) for run, tpt in zip(seeds[:2], (2, 4))]
  last = np.array([100 * run[-1]["test_acc"] for run in seeds])
  at_start = np.array([100 * r["test_acc"] for r in start])
  change = last[:2] - at_start
  row = (out / "table1.md").read_text().splitlines()[2]
  assert row == (f"| {report.load_run(seed_runs[0]).name}, mean of 3 runs (seed 1, 2, 3) | 3 [2..4] "
                 f"(measured at 3 [2..4]; not reached by 1 of 3) "
                 f"| {at_start.mean():.2f} [{at_start.min():.2f}..{at_start.max():.2f}] | 6 "
                 f"| {last.mean():.2f} [{last.min():.2f}..{last.max():.2f}] "
                 f"| {change.mean():+.2f} [{change.min():+.2f}..{change.max():+.2f}] |")
  # key epochs: each seed's own first, TPT-start and last measurement
  rows = [r for r in report.key_epochs(report.group_runs([report.load_run(d) for d in seed_runs[:3]], "seeds"))
          .splitlines()[2:]]
  assert [r.split(" | ")[1] for r in rows] == ["1 (first)", "3 [2..4] (TPT start; 2 of 3 reached it)", "6 (last)"]
  assert f"| {nc1[:, -1].mean():.3g} [{nc1[:, -1].min():.3g}..{nc1[:, -1].max():.3g}] |" in rows[-1]
  assert "mean [min..max]" in (out / "report.md").read_text()
  for stem in ("fig_depth", "fig_class_norms", *(stem for stem, *_ in report.FIGURES)):
    assert (out / f"{stem}.png").exists(), stem


def test_only_seeds_make_a_group_and_without_group_every_run_is_its_own(seed_runs):
  runs = [report.load_run(d) for d in seed_runs]
  assert [len(g.runs) for g in report.group_runs(runs, "seeds")] == [3, 1]  # lr 0.1 is another config
  assert [len(g.runs) for g in report.group_runs(runs + runs[:1], "seeds")] == [3, 1, 1]  # the same seed twice
  # default: a panel per run, named as before, and where names coincide the keys that differ are added
  assert [g.name for g in report.group_runs(runs)] == [f"{runs[0].name}, seed {s}" for s in (1, 2, 3)] + [runs[3].name]
  assert report.table1(runs[2:]) == report.table1(report.group_runs(runs[2:]))


def test_grid_reports_a_seed_sweep_as_one_mean_per_setting(tmp_path, monkeypatch):
  from tests.test_grid import FINAL, _seed_sweep
  monkeypatch.chdir(tmp_path)
  root = tmp_path / "runs"
  _seed_sweep(root)
  assert grid.main(["report", "--root", str(root)]) == 0
  rows = (root / "report" / "table1.md").read_text().splitlines()[2:]
  last = [100 * FINAL[0.01, seed] for seed in (1, 2, 3)]
  assert len(rows) == 1 and "lr 0.01, mean of 3 runs (seed 1, 2, 3)" in rows[0]
  assert f"| {np.mean(last):.2f} [{min(last):.2f}..{max(last):.2f}] |" in rows[0]
