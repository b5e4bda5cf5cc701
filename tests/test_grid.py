"""experiments/grid.py's run and print on hostile input: no run is
started here (nc_jax.train is replaced by a stub), so these take seconds."""

import json
import pathlib
import subprocess

import pytest

from experiments import grid
from nc_jax import records

REPO = pathlib.Path(__file__).resolve().parents[1]
CELL = str(REPO / "configs" / "default.py")


@pytest.mark.parametrize("extra", [["--config.lr=0.5"], ["--config.lr", "0.5"], ["--workdir=/tmp/elsewhere"],
                                   ["--config", "configs/default_mse.py"], ["--config.num_epochs=3"]])
def test_an_override_of_what_the_sweep_sets_is_refused_in_one_line(extra, capsys):
  # Appended after the sweep's --config.lr, a user's --config.lr=0.5 would win: every lr_* folder at lr 0.5.
  with pytest.raises(SystemExit) as exit_:
    grid.main(["print", "--root", "/tmp/r", "--cells", CELL, "--variant", "smoke", "--lrs", "0.01,0.02",
               "--epochs", "4", "--", *extra])
  message = str(exit_.value.code)
  assert "\n" not in message and extra[0] in message and "--lrs" in message
  assert "nc_jax.train" not in capsys.readouterr().out  # no command printed


def test_other_overrides_after_the_separator_are_passed_on(capsys):
  assert grid.main(["print", "--root", "/tmp/r", "--cells", CELL, "--lrs", "0.01", "--",
                    "--config.batch_size=64"]) == 0
  line = capsys.readouterr().out
  assert "--config.lr=0.01" in line and line.rstrip().endswith("--config.batch_size=64")


def _config_of(line):
  return grid.requested_config(line)


def test_a_repeated_tuple_override_takes_its_last_value_as_train_does(tmp_path):
  # The run grid itself trained with '(1,)' then '(6,)' holds measure_epochs [6] (train keeps the last value);
  # comparing it with the two values joined, (1, 6), would call grid's own run a different config.
  workdir = tmp_path / "default" / "lr_0.01"
  workdir.mkdir(parents=True)
  base = ["python", "-m", "nc_jax.train", "--config", f"{CELL}:smoke", "--workdir", str(workdir),
          "--config.lr=0.01"]
  (workdir / "config.json").write_text(json.dumps(_config_of([*base, "--config.measure_epochs=(6,)"])))
  assert _config_of([*base, "--config.measure_epochs=(6,)"])["measure_epochs"] == [6]
  repeated = [*base, "--config.measure_epochs=(1,)", "--config.measure_epochs=(6,)"]
  assert grid.changed_keys(workdir, repeated) == []
  assert _config_of([*base, "--config.measure_epochs=(1,)", "--config.measure_epochs", "(6,)"])[
      "measure_epochs"] == [6]


def test_a_damaged_workdir_is_named_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
  root = tmp_path / "runs"
  damaged = root / "default" / "lr_0.01"
  damaged.mkdir(parents=True)
  (damaged / "config.json").write_text('{"lr":')
  started = []

  def fake_run(line, **kwargs):  # the trainer, not run: only which workdirs grid launches matters here
    started.append(line[line.index("--workdir") + 1])
    return subprocess.CompletedProcess(line, 0)

  monkeypatch.setattr(grid.subprocess, "run", fake_run)
  code = grid.main(["run", "--root", str(root), "--cells", CELL, "--variant", "smoke", "--lrs", "0.01,0.02"])
  out, err = capsys.readouterr()
  assert code == 1
  assert started == [str(root / "default" / "lr_0.02")]  # the other lr still ran
  assert str(damaged / "config.json") in out and "--overwrite" not in out  # grid has no --overwrite
  assert str(damaged) in err.strip().splitlines()[-1]  # named again at the end
  assert (damaged / "config.json").read_text() == '{"lr":'  # left alone


def test_the_flag_rule_grid_and_train_share_keeps_each_key_where_last_given():
  from nc_jax import cli
  assert cli.override_name("--config.model_options.width=3") == "model_options.width"
  assert cli.override_name("--noconfig.per_layer_nc") == "per_layer_nc"
  assert cli.override_name("--config=configs/default.py") is None and cli.override_name("--workdir=x") is None
  argv = ["train", "--config=a.py", "--config.lr=1", "--config.measure_epochs=(2,)", "--config=b.py",
          "--config.lr=2", "--config.measure_epochs=(4,)", "--", "--config.lr=3"]
  assert cli.last_values(argv) == ["train", "--config=b.py", "--config.lr=2", "--config.measure_epochs=(4,)",
                                   "--", "--config.lr=3"]  # after '--': not flags, left alone
  # '--config.KEY VALUE' spans two arguments unless KEY is a boolean (then the next argument is a flag of its own)
  two = ["train", f"--config={CELL}", "--config.lr", "0.1", "--config.per_layer_nc", "--config.lr", "0.2"]
  assert cli.last_values(two) == ["train", f"--config={CELL}", "--config.per_layer_nc", "--config.lr", "0.2"]


def test_population_prints_one_command_per_chunk_of_the_pending_lrs(capsys):
  assert grid.main(["print", "--root", "/tmp/r", "--cells", CELL, "--lrs", "0.01,0.02,0.03", "--population", "2",
                    "--", "--config.batch_size=64"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  assert "--lrs=0.01,0.02" in lines[0] and "--lrs=0.03" in lines[1]
  assert all("--workdir /tmp/r/default " in line and line.endswith("--config.batch_size=64") for line in lines)


def test_a_negative_population_is_refused_in_one_line():
  with pytest.raises(SystemExit) as exit_:
    grid.main(["run", "--root", "/tmp/r", "--cells", CELL, "--lrs", "0.01", "--population", "-1"])
  assert "--population -1" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


def test_grid_runs_a_cells_sweep_as_populations_whose_members_are_its_single_runs(tmp_path, capsys):
  # Real training (the smoke MLP): 4 lrs as populations of at most 2; each member is the lr_* run
  # the single-run sweep would have made (same config), and select ranks them; lr 1e4 diverges alone.
  root = tmp_path / "runs"
  arguments = ["--root", str(root), "--cells", CELL, "--variant", "smoke", "--lrs", "0.01,0.02,0.03,10000"]
  assert grid.main(["run", *arguments, "--population", "2"]) == 0
  out = capsys.readouterr().out
  assert out.count("population of") == 2
  assert "lower its lr" in (root / "default" / "lr_10000" / records.DIVERGED_FILE).read_text()
  for lr in ("0.01", "0.02", "0.03"):
    workdir = root / "default" / f"lr_{lr}"
    single = grid.command(grid.cell_config(CELL), float(lr), workdir, SMOKE_ARGS)
    assert grid.changed_keys(workdir, single) == [] and grid.finished(workdir)
  assert len(json.loads((root / "selection.json").read_text())["default"]["sweep"]) == 3
  assert grid.main(["run", *arguments, "--population", "2"]) == 0  # a rerun: every member finished or diverged
  out = capsys.readouterr().out
  assert out.count("finished") == 3 and out.count("diverged (") == 1 and "population of" not in out


SMOKE_ARGS = type("Args", (), {"variant": "smoke", "epochs": 0, "extra": []})()  # grid's parsed arguments
