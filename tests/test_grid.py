"""experiments/grid.py's run and print on hostile input: no run is
started here (nc_jax.train is replaced by a stub), so these take seconds."""

import json
import pathlib
import shutil
import subprocess

import numpy as np
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


# ------------------------------------------------------------------ --sweep: any config key, crossed with the lrs
def _print(root, *arguments):
  return grid.main(["print", "--root", str(root), "--cells", CELL, "--variant", "smoke", *arguments])


@pytest.mark.parametrize("arguments, named", [
    (["--sweep", "sed=1,2"], "--sweep seed=..."),  # undeclared: the close key named
    (["--sweep", "seed=1,x"], "takes int"),
    (["--sweep", "lr=0.1,0.2"], "--lrs"),
    (["--sweep", "num_epochs=3,6", "--epochs", "6"], "--epochs"),
    (["--sweep", "workdir=a,b"], "--root"),
    (["--sweep", "loss=mse", "--sweep", "loss=cross_entropy"], "given twice"),
    (["--sweep", "seed=1,2", "--", "--config.seed=3"], "--sweep only"),
    (["--sweep", "weight_decay=5e-4,0.0005"], "weight_decay_0.0005"),  # two values, one folder
    (["--sweep", "adam_betas=(0.9,0.99)"], "cannot name a folder"),
    (["--sweep", "model_options=1"], "model_options.KEY"),
    (["--sweep", "imbalance_ratio=0.5"], "imbalance_ratio"),  # out of range, as nc_jax.train would refuse it
    (["--sweep", "seed"], "KEY=V1,V2"),
    (["--sweep", "keep_checkpoints=1,2"], "same run"),  # leaves results alone
])
def test_a_sweep_mistake_is_refused_in_one_line_before_anything_runs(arguments, named, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    _print(tmp_path, "--lrs", "0.01", *arguments)
  message = str(exit_.value.code)
  assert message.startswith("error: --sweep") or message.startswith("error: cell default")
  assert "\n" not in message and named in message
  assert "nc_jax.train" not in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_sweeps_cross_the_lrs_in_sorted_key_folders_each_with_its_overrides(capsys):
  assert _print("/tmp/r", "--lrs", "0.01,0.02", "--sweep", "weight_decay=5e-4,1e-3", "--sweep", "seed=1,2",
                "--", "--config.batch_size=64") == 0
  lines = capsys.readouterr().out.strip().splitlines()
  workdirs = [line.split("--workdir ")[1].split()[0] for line in lines]
  assert workdirs == [f"/tmp/r/default/seed_{seed}/weight_decay_{wd}/lr_{lr}"
                      for seed in (1, 2) for wd in ("0.0005", "0.001") for lr in ("0.01", "0.02")]
  for line, workdir in zip(lines, workdirs):
    seed, wd = workdir.split("/")[4][5:], {"0.0005": "5e-4", "0.001": "1e-3"}[workdir.split("/")[5][13:]]
    assert f"--config.seed={seed} --config.weight_decay={wd} --config.batch_size=64" in line  # the user's last
    config = grid.requested_config(line.split())  # what nc_jax.train will write to config.json
    assert config["seed"] == int(seed) and config["weight_decay"] == float(wd) and config["batch_size"] == 64


def test_a_population_holds_lrs_only_each_other_swept_value_is_its_own_program(capsys):
  # Width changes the parameters' shapes; seed changes nothing of the program, but members differ in lr only.
  assert _print("/tmp/r", "--lrs", "0.01,0.02,0.03", "--population", "2", "--sweep", "model_options.width=16,32",
                "--sweep", "seed=1,2") == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 8  # 4 settings x (2 lrs + 1 lr)
  for index, (width, seed) in enumerate((w, s) for w in (16, 32) for s in (1, 2)):
    folder = f"/tmp/r/default/model_options.width_{width}/seed_{seed}"
    for line, lrs in zip(lines[2 * index:2 * index + 2], ("0.01,0.02", "0.03")):
      assert f"--workdir {folder} --lrs={lrs} --config.model_options.width={width} --config.seed={seed}" in line


def _fake_run(workdir, test_accs, *, seed=None, lr=0.01, num_epochs=6, epochs=(1, 3, 6), tpt=None, **overrides):
  """A run as nc_jax.train leaves it (config.json, metrics.jsonl), written directly: the config is the one grid
  asks for (so grid's run skips it as finished), the records the smoke schedule's with these test accuracies."""
  line = ["python", "-m", "nc_jax.train", "--config", f"{CELL}:smoke", "--workdir", str(workdir), f"--config.lr={lr}",
          *([f"--config.seed={seed}"] if seed is not None else []),
          *(f"--config.{key}={value}" for key, value in overrides.items())]
  config = grid.requested_config(line)
  assert config["num_epochs"] == num_epochs
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  lines = [records.line_of({"epoch": epoch, "lr": lr, "train_acc": 0.9 + epoch / 100, "test_acc": acc,
                            "nc1": 1.0 / epoch, **({"tpt_start_epoch": tpt} if tpt and epoch >= tpt else {})})
           for epoch, acc in zip(epochs, test_accs)]
  (workdir / records.METRICS_FILE).write_text("".join(lines))
  return workdir


# Final test accuracies by (lr, seed): lr 0.02 wins seed 1 alone; lr 0.01 has the best mean over seeds.
FINAL = {(0.01, 1): 0.80, (0.01, 2): 0.82, (0.01, 3): 0.81, (0.02, 1): 0.85, (0.02, 2): 0.70, (0.02, 3): 0.72}


def _seed_sweep(root, final=FINAL, wd_values=("0.0005",)):
  for (lr, seed), acc in final.items():
    for wd in wd_values:
      _fake_run(root / "default" / f"seed_{seed}" / f"weight_decay_{wd}" / f"lr_{lr:.6g}", [0.5, 0.6, acc],
                seed=seed, lr=lr, weight_decay=wd, tpt=3 if seed < 3 else None)


def test_select_chooses_the_lr_of_the_best_mean_over_seeds_per_setting(tmp_path):
  root = tmp_path / "runs"
  _seed_sweep(root, wd_values=("0.0005", "0.001"))
  choices = grid.select(root)
  assert set(choices) == {"default/seed_*/weight_decay_0.0005", "default/seed_*/weight_decay_0.001"}
  choice = choices["default/seed_*/weight_decay_0.0005"]
  means = {lr: np.mean([FINAL[lr, seed] for seed in (1, 2, 3)]) for lr in (0.01, 0.02)}
  assert choice["lr"] == max(means, key=means.get) == 0.01
  assert choice["final_test_acc"] == pytest.approx(means[0.01])
  assert choice["final_test_acc_range"] == [0.80, 0.82]
  assert choice["swept"] == {"weight_decay": 0.0005} and choice["seeds"] == [{"seed": 1}, {"seed": 2}, {"seed": 3}]
  assert choice["runs"] == [str(root / "default" / f"seed_{s}" / "weight_decay_0.0005" / "lr_0.01") for s in (1, 2, 3)]
  assert choice["finished_runs"] == 6 and choice["incomplete"] == []
  assert [(s["lr"], s["swept"]["seed"]) for s in choice["sweep"]] == sorted(FINAL)
  rows = [row for row in (root / "selection.md").read_text().splitlines() if "weight_decay 0.0005" in row]
  accs = [100 * FINAL[0.02, seed] for seed in (1, 2, 3)]
  assert rows[1] == (f"| default | weight_decay 0.0005 | 0.02 |  | 3 | 3 (1 of 3 not reached) | 96.00 "
                     f"| {np.mean(accs):.2f} [{min(accs):.2f}..{max(accs):.2f}] | 0.1667 |")
  assert "| 0.01 | yes | 3 |" in rows[0]


def test_an_lr_missing_a_seed_is_named_and_left_out_of_the_choice(tmp_path, capsys):
  root = tmp_path / "runs"
  final = {**FINAL, (0.03, 1): 0.95, (0.03, 2): 0.95}  # the best of all, but seed 3 diverged
  _seed_sweep(root, final)
  diverged = root / "default" / "seed_3" / "weight_decay_0.0005" / "lr_0.03"
  _fake_run(diverged, [0.5], seed=3, lr=0.03, weight_decay="0.0005", epochs=(1,))
  (diverged / records.DIVERGED_FILE).write_text("loss nan at epoch 2; lower its lr\n")
  choice = grid.select(root)["default/seed_*/weight_decay_0.0005"]
  err = capsys.readouterr().err
  assert choice["lr"] == 0.01 and choice["incomplete"] == [{"lr": 0.03, "missing": [{"seed": 3}]}]
  assert f"lr 0.03 lacks seed 3: diverged ({diverged / records.DIVERGED_FILE})" in err
  row = next(r for r in (root / "selection.md").read_text().splitlines() if "| 0.03 |" in r)
  assert "|  | 2 of 3 (missing seed 3) |" in row
  (diverged / records.DIVERGED_FILE).unlink()
  shutil.rmtree(root / "default" / "seed_1" / "weight_decay_0.0005" / "lr_0.01")  # no lr has every seed now
  shutil.rmtree(root / "default" / "seed_2" / "weight_decay_0.0005" / "lr_0.02")
  assert grid.select(root) == {}
  err = capsys.readouterr().err
  assert "lr 0.01 lacks seed 1: not run (" in err and "lr 0.03 lacks seed 3: not finished" in err
  assert "no lr has finished at every seed (3); no choice yet" in err


def test_without_sweep_the_selection_has_its_former_shape_and_a_renamed_folder_is_left_out(tmp_path, capsys):
  root = tmp_path / "runs"
  for lr, acc in ((0.01, 0.8), (0.02, 0.9)):
    _fake_run(root / "default" / f"lr_{lr:.6g}", [0.5, 0.6, acc], lr=lr, tpt=3)
  choices = grid.select(root)
  assert list(choices) == ["default"] and set(choices["default"]) == {"run", "lr", "final_test_acc",
                                                                      "finished_runs", "sweep"}
  assert choices["default"]["lr"] == 0.02
  assert set(choices["default"]["sweep"][0]) == {"run", "lr", "num_epochs", "final_test_acc", "final_train_acc",
                                                 "final_nc1", "tpt_start_epoch"}
  assert (root / "selection.md").read_text().splitlines()[2] == "| default | 0.01 |  | 3 | 96.00 | 80.00 | 0.1667 |"
  # a folder that does not name its run's value (grid made seed_1, someone renamed it) is named, not believed
  _fake_run(root / "other" / "seed_2" / "lr_0.01", [0.5, 0.6, 0.99], seed=1)
  assert "other/seed_*" not in grid.select(root)
  assert "folders seed_2 do not name its config's values" in capsys.readouterr().err
  # a swept key whose folder starts like a run's: lr_decay_factor_0.5 holds runs, it is not one
  _fake_run(root / "decay" / "lr_decay_factor_0.5" / "lr_0.01", [0.5, 0.6, 0.7], lr_decay_factor=0.5)
  assert grid.select(root)["decay/lr_decay_factor_0.5"]["swept"] == {"lr_decay_factor": 0.5}


def test_run_skips_the_finished_runs_of_a_sweep_and_launches_the_others_by_setting(tmp_path, monkeypatch, capsys):
  root = tmp_path / "runs"
  _fake_run(root / "default" / "seed_1" / "lr_0.01", [0.5, 0.6, 0.8], seed=1, lr=0.01)
  started = []
  monkeypatch.setattr(grid.subprocess, "run",
                      lambda line, **kwargs: started.append(line) or subprocess.CompletedProcess(line, 0))
  assert grid.main(["run", "--root", str(root), "--cells", CELL, "--variant", "smoke", "--lrs", "0.01,0.02",
                    "--sweep", "seed=1,2", "--population", "4"]) == 0
  assert "skip default/seed_1 lr 0.01: finished" in capsys.readouterr().out
  assert [(line[line.index("--workdir") + 1], line[line.index("--workdir") + 2]) for line in started] == [
      (str(root / "default" / "seed_1"), "--lrs=0.02"), (str(root / "default" / "seed_2"), "--lrs=0.01,0.02")]
