"""nc_jax.report and experiments/grid.py on small real runs."""

import json
import pathlib
import shutil

import pytest

from experiments import grid
from nc_jax import report
from nc_jax.training import train_and_evaluate
from tests.test_train import smoke_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  for lr in (0.05, 0.1):
    config = smoke_config(num_epochs=8, measure_epochs=(1, 2, 4, 8), lr=lr, tpt_threshold=0.45,
                          deepfool_samples=4)
    train_and_evaluate(config, str(root / "default" / f"lr_{lr:.6g}"), log=lambda *a, **k: None)
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
