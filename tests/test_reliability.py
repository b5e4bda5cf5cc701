"""Runs that survive: damaged checkpoints, bit flips, torn or lost records, a second run, signals, a full disk.

Every fault ends the same way: the rerun of the same command finishes with the
records (and final state) of an uninterrupted run, bit for bit. Runs are the
default config's smoke variant (a width-32 MLP on MNIST-1D, seconds per run).
"""

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from configs import default as default_config
from nc_jax import records, schema
from nc_jax.training import Diverged, Preempted, train_and_evaluate
from nc_jax.training import workdir as workdir_lib
from tests import run_helpers
from tests.run_helpers import QUIET, REPO, cli, comparable, cpu_env, saved_epochs, train_command
from tests.run_helpers import final_state  # noqa: F401  (test_variants_training imports it from here)


def smoke(**overrides):
  config = default_config.get_config("smoke")
  config.update({**dict(num_epochs=12, measure_epochs=(1, 3, 6, 12), checkpoint_every_epochs=2,
                        deepfool_samples=0), **overrides})
  return config


def stop_after(config, workdir, epoch, signum=signal.SIGINT):
  """Runs until ``epoch``, where a real signal (sent to this process) makes the loop checkpoint and stop."""
  def log(line, *args, **kwargs):
    if isinstance(line, str) and line.startswith(f"epoch {epoch:4d}"):
      os.kill(os.getpid(), signum)

  with pytest.raises(Preempted, match=f"after epoch {epoch}"):
    train_and_evaluate(config, str(workdir), log=log)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted run: what every recovery must reproduce."""
  workdir = tmp_path_factory.mktemp("straight")
  train_and_evaluate(smoke(), str(workdir), **QUIET)
  return workdir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A run stopped by SIGINT after epoch 9: checkpoints 6 (measured), 8 (cadence) and 9 (the stop)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  stop_after(smoke(), workdir, 9)
  assert saved_epochs(workdir) == [6, 8, 9]
  assert not list(workdir.rglob("*tmp*")), "a stop leaves no temporary directory"
  return workdir


def copy_of(run, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(run, target)
  return target


def assert_same_run(run, straight):
  run_helpers.assert_same_run(run, straight, last_epoch=12)


def data_files(step):
  """The array data files of a checkpoint (OCDBT keeps them in d/ folders; which copy is read is orbax's business)."""
  return [p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


def damage_garbage_metadata(step):
  for path in step.rglob("*"):
    if path.is_file() and ("METADATA" in path.name or path.name == "metadata"):
      path.write_bytes(b"\x00garbage{{")


def damage_truncate(step):
  for path in data_files(step):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_empty(step):
  for path in data_files(step):
    path.write_bytes(b"")


def damage_delete_state(step):
  shutil.rmtree(step / "state")


@pytest.mark.parametrize("damage", [damage_garbage_metadata, damage_truncate, damage_empty, damage_delete_state],
                         ids=lambda f: f.__name__[7:])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_goes_on(damage, stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  damage(run / "checkpoints" / "9")
  train_and_evaluate(smoke(), str(run), **QUIET)
  assert "checkpoints/9 is damaged" in capsys.readouterr().err
  assert [p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir()] == ["9"]
  assert_same_run(run, straight)
  train_and_evaluate(smoke(), str(run), **QUIET)  # and a rerun of the finished run changes nothing
  assert_same_run(run, straight)


def metadata_truncated(text):
  return text[: len(text) // 2]


def metadata_garbage(text):
  return "\x00garbage{{"


def metadata_without_tree(text):
  return "{}"  # valid JSON, none of orbax's keys


def metadata_without_keys(text):
  """Valid JSON in orbax's shape whose entries lack their 'key' (what was reported as "KeyError: 'key'")."""
  tree = json.loads(text)
  for entry in tree["tree_metadata"].values():
    for key in entry["key_metadata"]:
      del key["key"]
  return json.dumps(tree)


STATE_METADATA = "its state/_METADATA, orbax's index of the state's arrays, "


@pytest.mark.parametrize("damage,expected", [
    (metadata_truncated, "is not valid JSON (character "), (metadata_garbage, "is not valid JSON (character 0 of "),
    (metadata_without_tree, "is JSON but not in orbax's layout (no key 'tree_metadata')"),
    (metadata_without_keys, "is JSON but not in orbax's layout (no key 'key')")], ids=lambda v: getattr(v, "__name__", ""))
def test_a_damaged_state_metadata_file_is_named_and_the_run_goes_on_from_the_previous_checkpoint(
    damage, expected, stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  metadata = run / "checkpoints" / "9" / "state" / "_METADATA"
  metadata.write_text(damage(metadata.read_text()))
  train_and_evaluate(smoke(), str(run), **QUIET)
  err = capsys.readouterr().err
  assert f"checkpoints/9 is damaged ({STATE_METADATA}{expected}" in err, err
  assert "KeyError" not in err and "moved to " in err and "trying an older one" in err
  assert [p.name.split("-")[0] for p in (run / "checkpoints" / "corrupt").iterdir()] == ["9"]
  assert_same_run(run, straight)  # from checkpoint 8, as for any other damage


def test_collect_names_a_damaged_state_metadata_file_and_uses_or_offers_the_other_checkpoints(stopped, tmp_path):
  from nc_jax import collect as collect_lib
  run = copy_of(stopped, tmp_path)
  metadata = run / "checkpoints" / "9" / "state" / "_METADATA"
  metadata.write_text(metadata_without_keys(metadata.read_text()))
  with pytest.raises(collect_lib.CollectError) as error:
    collect_lib.restore_workdir(run, 9)
  message = str(error.value)
  assert message == (f"checkpoint {run / 'checkpoints' / '9'} is damaged ({STATE_METADATA}is JSON but not in orbax's "
                     "layout (no key 'key')); choose another --epoch (6, 8)")
  warnings = []
  assert collect_lib.restore_workdir(run, warn=warnings.append)[4] == 8  # the newest good one
  assert len(warnings) == 1 and f"checkpoints/9 is damaged ({STATE_METADATA}" in warnings[0]
  assert (run / "checkpoints" / "9").is_dir()  # read-only: nothing moved


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -1])
def test_a_flipped_bit_in_the_newest_checkpoint_never_reaches_the_results(where, stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  for path in data_files(run / "checkpoints" / "9"):
    content = bytearray(path.read_bytes())
    offset = len(content) - 1 if where == -1 else int(where * len(content))
    content[offset] ^= 0x10
    path.write_bytes(bytes(content))
  train_and_evaluate(smoke(), str(run), **QUIET)
  err = capsys.readouterr().err
  assert "checkpoints/9 is damaged" in err  # the state file has no slack: every bit is content
  assert_same_run(run, straight)


def test_checksum_covers_the_meta_too(stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  meta = run / "checkpoints" / "9" / "meta" / "metadata"
  meta.write_text(meta.read_text().replace('"tpt_start_epoch": null', '"tpt_start_epoch": 2'))
  train_and_evaluate(smoke(), str(run), **QUIET)
  assert "sha256" in capsys.readouterr().err
  assert_same_run(run, straight)


def test_torn_last_record_is_dropped_and_rewritten(stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  with (run / "metrics.jsonl").open("a") as f:
    f.write('{"epoch": 12, "nc1": 0.12')  # a write cut by a full disk
  train_and_evaluate(smoke(), str(run), **QUIET)
  assert "torn last line" in capsys.readouterr().err
  assert_same_run(run, straight)


def test_deleted_records_come_back_from_the_checkpoint(stopped, straight, tmp_path, capsys):
  run = copy_of(stopped, tmp_path)
  (run / "metrics.jsonl").unlink()
  train_and_evaluate(smoke(), str(run), log=print)
  assert "restored them from the checkpoint" in capsys.readouterr().out
  assert_same_run(run, straight)


def test_records_deleted_while_the_run_goes_on_are_rewritten(straight, tmp_path, capsys):
  def log(line, *args, **kwargs):
    if isinstance(line, str) and line.startswith("epoch    5"):
      (tmp_path / "run" / "metrics.jsonl").unlink()
    print(line)

  train_and_evaluate(smoke(), str(tmp_path / "run"), log=log)
  assert "rewrote it from the run's own copy" in capsys.readouterr().out
  assert comparable(tmp_path / "run") == comparable(straight)


def test_the_advice_after_a_divergence_is_a_command_that_runs():
  from nc_jax import train
  argv = ["nc_jax/train.py", "--config", "configs/default.py", "--workdir", "runs/a", "--config.lr=0.5", "--overwrite",
          "--config.num_epochs=10"]
  command = train.rerun_command(argv, workdir="runs/a_lr0.05", resume_from="runs/a:40", lr=0.05)
  assert command.endswith("-m nc_jax.train --config configs/default.py --config.num_epochs=10 --workdir runs/a_lr0.05 "
                          "--resume_from runs/a:40 --config.lr=0.05")


def test_a_run_whose_checkpoints_are_gone_is_refused_not_erased(straight, tmp_path):
  run = copy_of(straight, tmp_path)
  shutil.rmtree(run / "checkpoints")
  before = (run / "metrics.jsonl").read_text()
  with pytest.raises(workdir_lib.WorkdirError, match="no checkpoint to resume from.*--overwrite"):
    train_and_evaluate(smoke(), str(run), **QUIET)
  assert (run / "metrics.jsonl").read_text() == before


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
  with workdir_lib.Lock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):
      train_and_evaluate(smoke(), str(tmp_path), **QUIET)
  assert not (tmp_path / "config.json").exists()


def test_checkpoint_cadence_is_independent_of_measurement(tmp_path):
  train_and_evaluate(smoke(measure_epochs=(5,), checkpoint_every_epochs=4, keep_checkpoints=5), str(tmp_path), **QUIET)
  assert saved_epochs(tmp_path) == [4, 5, 9, 12]  # every 4 epochs since the last save, the measurement, the end
  config = smoke(measure_epochs=(12,), checkpoint_every_epochs=0, checkpoint_every_seconds=1e-9, keep_checkpoints=5)
  train_and_evaluate(config, str(tmp_path / "seconds"), **QUIET)
  assert saved_epochs(tmp_path / "seconds") == [8, 9, 10, 11, 12]  # every epoch, the last 5 kept


def test_resume_from_another_run_with_a_lower_lr(stopped, tmp_path):
  config = smoke(lr=0.01, resume_from=f"{stopped}:6")
  last = train_and_evaluate(config, str(tmp_path / "lower"), **QUIET)
  run = records.read(tmp_path / "lower")
  assert [r["epoch"] for r in run] == [1, 3, 6, 12] and last["epoch"] == 12
  assert comparable(tmp_path / "lower")[:3] == comparable(stopped)[:3]  # the history up to epoch 6
  assert json.loads((tmp_path / "lower" / "config.json").read_text())["resume_from"] == f"{stopped}:6"
  with pytest.raises(ValueError, match="no checkpoint of epoch 7"):
    train_and_evaluate(smoke(resume_from=f"{stopped}:7"), str(tmp_path / "bad"), **QUIET)
  # another model's shapes, or another optimizer's state: refused as such, and the source's checkpoints are
  # intact, not called damaged or moved aside
  wider = smoke(resume_from=str(stopped))
  wider.model_options.width = 64
  adam = smoke(resume_from=str(stopped), optimizer="adam")
  for other, name in ((wider, "wider"), (adam, "adam")):
    with pytest.raises(ValueError, match="other shapes or structure.*not the model's shapes or the optimizer"):
      train_and_evaluate(other, str(tmp_path / name), **QUIET)
  assert not (stopped / "checkpoints" / "corrupt").exists()


def test_divergence_names_the_last_good_checkpoint_and_a_command_that_works(tmp_path):
  diverging = smoke(measure_epochs=(1, 2), checkpoint_every_epochs=1, lr_decay_epochs=(2,), lr_decay_factor=1e6)
  with pytest.raises(Diverged) as error:
    train_and_evaluate(diverging, str(tmp_path / "run"), **QUIET)
  good = error.value.last_good_epoch
  assert good is not None and good == error.value.epoch - 1
  assert f"--resume_from {tmp_path / 'run'}:{good}" in str(error.value)
  # Following the advice works: a new workdir from the last good checkpoint, without the lr jump.
  healthy = smoke(measure_epochs=(1, 2), resume_from=f"{tmp_path / 'run'}:{good}")
  assert train_and_evaluate(healthy, str(tmp_path / "run_lower"), **QUIET)["epoch"] == 12

  with pytest.raises(Diverged, match="no checkpoint was written before it") as error:
    train_and_evaluate(smoke(lr=1e4), str(tmp_path / "huge"), **QUIET)
  assert error.value.last_good_epoch is None
  # ... and the advice (lower lr, same workdir) is accepted: nothing was measured there yet.
  assert train_and_evaluate(smoke(), str(tmp_path / "huge"), **QUIET)["epoch"] == 12


def test_a_refused_value_writes_nothing(tmp_path):
  with pytest.raises(schema.ConfigError, match="num_epochs"):
    train_and_evaluate(smoke(num_epochs=-3), str(tmp_path / "run"), **QUIET)
  assert not (tmp_path / "run").exists()
  with pytest.raises(schema.ConfigError, match="deepfool_samples"):
    train_and_evaluate(smoke(deepfool_samples=10**6), str(tmp_path / "run"), **QUIET)
  assert not (tmp_path / "run").exists()
  assert train_and_evaluate(smoke(num_epochs=1, measure_epochs=(1,)), str(tmp_path / "run"), **QUIET)["epoch"] == 1


# ---------------------------------------------------------------------------
# The command line, in subprocesses.
# ---------------------------------------------------------------------------


def one_line_error(result):
  lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("arguments,expected", [
    (["--config", "/nonexistent/config.py"], "cannot load the config"),
    (["--config.no_such_key=3"], "no_such_key"),
    (["--config.num_epochs=abc"], "num_epochs"),
    (["--config.num_epochs=-3"], "num_epochs"),
    (["--config.batch_size=0"], "batch_size"),
    (["--config.eval_batch_size=0"], "eval_batch_size"),
    (["--config.deepfool_samples=100000"], "deepfool_samples"),
    (["--config.keep_checkpoints=0"], "keep_checkpoints"),
    (["--config.lr=-1"], "lr"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_command_lines_are_one_line_and_write_nothing(arguments, expected, tmp_path):
  line = one_line_error(cli(tmp_path / "run", *arguments))
  assert expected in line
  assert not (tmp_path / "run").exists()


def test_model_options_can_be_set_from_the_command_line(tmp_path):
  result = cli(tmp_path / "run", "--config.model_options.fixed_etf=True", "--config.num_epochs=1",
               "--config.measure_epochs=1")
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model_options"]["fixed_etf"] is True


def test_a_repeated_flag_takes_its_last_value_on_the_command_line(tmp_path):
  # Issue 24: a repeated tuple key was joined ((1,) then (2,) gave (1, 2)) where a repeated scalar took the last.
  result = cli(tmp_path / "run", "--config.num_epochs=2", "--config.measure_epochs=1", "--config.measure_epochs=2",
               "--config.lr_decay_epochs=(1,)", "--config.lr_decay_epochs=(2,)", "--config.adam_betas=(0.5,0.6)",
               "--config.adam_betas=(0.8,0.9)", "--config.optimizer=adam", "--config.optimizer=sgd",
               "--config.per_layer_nc", "--noconfig.per_layer_nc", "--config.lr=0.5", "--config.lr", "0.01")
  assert result.returncode == 0, result.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert {k: saved[k] for k in ("measure_epochs", "lr_decay_epochs", "adam_betas", "optimizer", "per_layer_nc", "lr")} \
      == {"measure_epochs": [2], "lr_decay_epochs": [2], "adam_betas": [0.8, 0.9], "optimizer": "sgd",
          "per_layer_nc": False, "lr": 0.01}


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  assert "is a file" in one_line_error(cli(tmp_path / "file"))


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signals_checkpoint_and_exit_cleanly(signum, code, tmp_path):
  arguments = ["--config.num_epochs=40", "--config.measure_epochs=40", "--config.model_options.width=256"]
  process = subprocess.Popen(train_command(tmp_path, *arguments), cwd=REPO, env=cpu_env({"PYTHONUNBUFFERED": "1"}),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in process.stdout:  # wait until training is under way
    if line.startswith("epoch    3"):
      break
  process.send_signal(signum)
  output = process.communicate(timeout=300)[0]
  assert process.returncode == code, output
  stopped = saved_epochs(tmp_path)
  assert 3 <= stopped[-1] < 40 and "checkpoint saved" in output
  assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name], "no temporary files are left"
  result = cli(tmp_path, *arguments)
  assert f"resumed from the checkpoint of epoch {stopped[-1]}" in result.stdout
  assert records.read(tmp_path)[-1]["epoch"] == 40


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_recovers(tmp_path):
  arguments = ["--config.num_epochs=12", "--config.measure_epochs=1,3,6,12", "--config.checkpoint_every_epochs=2",
               "--config.deepfool_samples=0"]
  assert cli(tmp_path / "straight", *arguments).returncode == 0
  run = tmp_path / "full"
  failed = cli(run, *arguments, limit_file_bytes=6_000)  # ulimit -f: every file stops at 6 kB
  line = one_line_error(failed)
  assert "rerun the same command to resume" in line
  result = cli(run, *arguments)
  assert result.returncode == 0, result.stderr[-2000:]
  assert comparable(run) == comparable(tmp_path / "straight")


@pytest.mark.slow
def test_kill_9_with_the_newest_checkpoint_damaged_then_rerun(tmp_path):
  arguments = ["--config.num_epochs=30", "--config.measure_epochs=10,20,30", "--config.checkpoint_every_epochs=3",
               "--config.model_options.width=256", "--config.deepfool_samples=0"]
  assert cli(tmp_path / "straight", *arguments).returncode == 0
  run = tmp_path / "killed"
  process = subprocess.Popen(train_command(run, *arguments), cwd=REPO, env=cpu_env({"PYTHONUNBUFFERED": "1"}),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in process.stdout:
    if line.startswith("epoch   16"):  # checkpoints 12 and 15 are on disk (or being written)
      break
  process.send_signal(signal.SIGKILL)
  process.wait()
  newest = saved_epochs(run)[-1]
  assert newest < 30, "the run finished before it could be killed; make it longer"
  damage_truncate(run / "checkpoints" / str(newest))
  result = cli(run, *arguments)
  assert result.returncode == 0 and "is damaged" in result.stderr, result.stderr[-2000:]
  assert comparable(run) == comparable(tmp_path / "straight")


# ---------------------------------------------------------------------------
# Issue 24: no command deletes what it then needs; nothing derived is trusted unchecked; printed commands run.
# ---------------------------------------------------------------------------

def snapshot(run):
  """Every file of a run but its lock, with its bytes: what 'nothing changed' compares."""
  return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "lock"}


class Died(Exception):
  """Raised from the log to end a run between two lines, as a kill there would (nothing after it is written)."""


def die_at(epoch):
  def log(line, *args, **kwargs):
    if isinstance(line, str) and line.startswith(f"epoch {epoch:4d}"):
      raise Died(line)
  return log


def test_an_in_place_restart_from_an_epoch_is_a_restart_elsewhere_or_refused_before_any_change(stopped, tmp_path):
  run = copy_of(stopped, tmp_path)  # checkpoints 6, 8, 9; measurements 1, 3, 6
  before = snapshot(run)
  restart = smoke(lr=0.01, resume_from=f"{run}:6")
  with pytest.raises(workdir_lib.WorkdirError, match=r"discards its checkpoints of epochs \[8, 9\].*--overwrite"):
    train_and_evaluate(restart, str(run), **QUIET)
  for refused, match in ((smoke(lr=0.01, resume_from=f"{run}:7"), r"no checkpoint of epoch 7 there; it has epochs "
                          r"\[6, 8, 9\]"), (smoke(lr=0.01, resume_from=str(run)), r"names this workdir: add the "
                          r"epoch to restart from .*\[6, 8, 9\]")):
    with pytest.raises(workdir_lib.WorkdirError, match=match):
      train_and_evaluate(refused, str(run), overwrite=True, **QUIET)  # before the fix, everything was deleted first
  assert snapshot(run) == before
  # With --overwrite it restarts from epoch 6; a death before its first checkpoint, then the same command again.
  with pytest.raises(Died):
    train_and_evaluate(restart, str(run), overwrite=True, log=die_at(7))
  assert saved_epochs(run) == [6] and records.read(run)[-1]["epoch"] == 6
  train_and_evaluate(restart, str(run), overwrite=True, **QUIET)
  elsewhere = tmp_path / "elsewhere"  # what the same restart gives in a new workdir
  train_and_evaluate(smoke(lr=0.01, resume_from=f"{stopped}:6"), str(elsewhere), **QUIET)
  run_helpers.assert_same_run(run, elsewhere, last_epoch=12)
  finished = snapshot(run)
  train_and_evaluate(restart, str(run), overwrite=True, **QUIET)  # the restart's command again: a finished run
  assert {k: v for k, v in snapshot(run).items() if k != "config.json"} == {
      k: v for k, v in finished.items() if k != "config.json"}


def test_a_workdir_without_its_config_json_resumes_only_the_config_its_checkpoints_carry(stopped, straight, tmp_path):
  run = copy_of(stopped, tmp_path)
  original = (run / "config.json").read_text()
  (run / "config.json").unlink()
  before = snapshot(run)
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is missing and the checkpoint of epoch 9 was "
                     r"written under another config.*--overwrite"):
    train_and_evaluate(smoke(lr=0.5), str(run), **QUIET)  # before the fix: resumed at lr 0.5, relabelled
  assert snapshot(run) == before
  (run / "config.json").write_text(json.dumps({**json.loads(original), "lr": 0.5}))  # edited to match the command
  with pytest.raises(workdir_lib.WorkdirError, match="was edited or replaced"):
    train_and_evaluate(smoke(lr=0.5), str(run), **QUIET)
  (run / "config.json").write_text("{torn")
  with pytest.raises(workdir_lib.WorkdirError, match="config.json is damaged and the checkpoint of epoch 9"):
    train_and_evaluate(smoke(lr=0.5), str(run), **QUIET)
  (run / "config.json").unlink()
  train_and_evaluate(smoke(), str(run), **QUIET)  # the run's own config: resumed, config.json written again
  assert (run / "config.json").read_text() == original
  assert_same_run(run, straight)


def test_a_resume_from_at_or_past_the_last_epoch_is_refused_not_a_relabelling(stopped, tmp_path):
  # It would train nothing and only put the new config's name (lr 0.01) on the source's measurements.
  past_end = dict(lr=0.01, num_epochs=9, measure_epochs=(1, 3, 6, 9))
  run = copy_of(stopped, tmp_path)
  before = snapshot(run)
  for workdir in (tmp_path / "elsewhere", run):
    with pytest.raises(workdir_lib.WorkdirError, match="at or past config.num_epochs = 9, so nothing would be trained"):
      train_and_evaluate(smoke(**past_end, resume_from=f"{run}:9"), str(workdir), overwrite=True, **QUIET)
  assert snapshot(run) == before and not (tmp_path / "elsewhere" / "config.json").exists()


def test_tpt_json_is_rebuilt_from_the_run_not_trusted(tmp_path):
  config = smoke(num_epochs=4, measure_epochs=(4,), tpt_threshold=0.3)
  train_and_evaluate(config, str(tmp_path), **QUIET)
  started = records.read(tmp_path)[-1]["tpt_start_epoch"]
  assert 1 <= started <= 4, "the smoke run should reach the threshold; lower it"
  expected = {"tpt_start_epoch": started, "threshold": 0.3}
  assert json.loads((tmp_path / "tpt.json").read_text()) == expected
  for damage in (lambda p: p.write_text('{"tpt_start_epoch": 1, "thr'), lambda p: p.write_text(
      json.dumps({"tpt_start_epoch": started + 7, "threshold": 0.3})), lambda p: p.unlink()):
    damage(tmp_path / "tpt.json")
    train_and_evaluate(config, str(tmp_path), **QUIET)  # nothing to train: the file comes back from the checkpoint
    assert json.loads((tmp_path / "tpt.json").read_text()) == expected


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
  with workdir_lib.Lock(tmp_path):
    (tmp_path / "lock").unlink()  # before the fix, a second run then locked a new file of that name
    with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):
      with workdir_lib.Lock(tmp_path):
        pass
  with workdir_lib.Lock(tmp_path):  # released on exit
    pass


def test_where_directories_cannot_be_locked_a_deleted_lock_file_is_taken_again_or_the_run_stops(tmp_path,
                                                                                                 monkeypatch):
  monkeypatch.setattr(workdir_lib, "_lock_directory", lambda directory: None)  # as on NFS: the file alone
  first = workdir_lib.Lock(tmp_path).__enter__()
  (tmp_path / "lock").unlink()
  first.check()  # nobody came in: the file is made and locked again, naming this process
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):
    workdir_lib.Lock(tmp_path).__enter__()
  (tmp_path / "lock").unlink()
  second = workdir_lib.Lock(tmp_path).__enter__()  # came in while the file was gone
  with pytest.raises(workdir_lib.WorkdirError, match="was deleted while this run held it, and another process"):
    first.check()
  second.__exit__(None, None, None)
  first.__exit__(None, None, None)


def test_a_lock_or_tpt_json_that_is_a_directory_is_named(straight, tmp_path):
  run = copy_of(straight, tmp_path)
  for name in ("lock", "tpt.json"):
    (run / name).unlink(missing_ok=True)
    (run / name).mkdir()
    with pytest.raises(workdir_lib.WorkdirError, match=f"{name} is a directory.*remove it"):
      train_and_evaluate(smoke(), str(run), **QUIET)
    (run / name).rmdir()


def test_a_run_keeps_its_workdir_when_its_lock_file_is_deleted(tmp_path):
  attempts = []

  def log(line, *args, **kwargs):
    if isinstance(line, str) and line.startswith("epoch    2"):
      (tmp_path / "lock").unlink()
      try:
        train_and_evaluate(smoke(), str(tmp_path), **QUIET)  # a second run, while the first goes on
        attempts.append("ran")
      except workdir_lib.WorkdirError as error:
        attempts.append(str(error))
    if isinstance(line, str) and line.startswith("epoch    4"):
      attempts.append(json.loads((tmp_path / "lock").read_text())["pid"])  # made again at the next epoch

  assert train_and_evaluate(smoke(), str(tmp_path), log=log)["epoch"] == 12
  assert len(attempts) == 2 and "in use by another run" in attempts[0] and attempts[1] == os.getpid()


def test_the_printed_command_after_a_divergence_runs_and_gives_a_tenth_of_the_lr_that_diverged(tmp_path):
  # lr 0.1, x1000 after epoch 2: epoch 3 runs at 100 and diverges. The printed command must give 10 there, not
  # a tenth of 100 as the base lr (10, decayed again to 10,000: the old advice), and 100x lower after a decay of 0.1.
  arguments = ["--config.num_epochs=4", "--config.measure_epochs=1,2,3,4", "--config.checkpoint_every_epochs=1",
               "--config.lr_decay_epochs=(2,)", "--config.lr_decay_factor=1000", "--config.lr=0.1",
               "--config.deepfool_samples=0"]
  line = one_line_error(cli(tmp_path / "run", *arguments))
  assert "at epoch 3" in line and f"--resume_from {tmp_path / 'run'}:2" in line, line
  assert sys.executable in line, line
  command = line[line.index(sys.executable):]
  result = subprocess.run(shlex.split(command), cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  new_run = pathlib.Path(shlex.split(command)[shlex.split(command).index("--workdir") + 1])
  lrs = {r["epoch"]: r["lr"] for r in records.read(new_run)}
  assert lrs[3] == pytest.approx(100 / 10, rel=1e-6) and lrs[4] == pytest.approx(10, rel=1e-6)
  assert lrs[1] == pytest.approx(0.1, rel=1e-6)  # epochs 1-2 are the first run's, copied with its checkpoint


# ------------------------------------------------- adversarial findings on the reliability fixes
def test_a_lock_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
  # finding 12: the lock followed the link and truncated its target to 0 bytes
  target = tmp_path / "precious"
  target.write_text("data\n")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "lock").symlink_to(target)
  with pytest.raises(workdir_lib.WorkdirError, match=r"lock is a symbolic link.*remove the link"):
    with workdir_lib.Lock(tmp_path / "run"):
      pass
  assert target.read_text() == "data\n"
  (tmp_path / "run" / "lock").unlink()  # the advice: then it works (the refusal released the directory's lock)
  with workdir_lib.Lock(tmp_path / "run"):
    pass
  assert target.read_text() == "data\n"


def test_a_lock_file_that_cannot_be_written_names_its_path(tmp_path, monkeypatch):
  # finding 20: a full disk at the claim said "No space left on device" without a path
  def full(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(workdir_lib.os, "pwrite", full)
  with pytest.raises(workdir_lib.WorkdirError, match=rf"{tmp_path / 'lock'}: cannot write .*No space left.*free "
                     "space"):
    workdir_lib.Lock(tmp_path).__enter__()
  monkeypatch.undo()
  with workdir_lib.Lock(tmp_path):  # nothing left held
    pass


def test_a_config_json_that_is_a_directory_is_named(straight, tmp_path):
  # finding 11: "Is a directory (...); free space or fix permissions"
  run = copy_of(straight, tmp_path)
  (run / "config.json").unlink()
  (run / "config.json").mkdir()
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is a directory, not the run's config.json; "
                     "remove it and rerun"):
    train_and_evaluate(smoke(), str(run), **QUIET)


def test_an_edited_config_json_is_rewritten_when_the_command_is_the_checkpoints_config(straight, tmp_path):
  # finding 10: the advice was --overwrite, which would have deleted the good run the command belongs to
  run = copy_of(straight, tmp_path)
  original = (run / "config.json").read_text()
  (run / "config.json").write_text(json.dumps({**json.loads(original), "lr": 0.005}))
  before = snapshot(run)
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.json is not the config its run was trained with.*"
                     r"epoch 12.*restore it.*or --overwrite"):
    train_and_evaluate(smoke(lr=0.5), str(run), **QUIET)  # neither config.json's nor the run's: refused
  assert snapshot(run) == before
  lines = []
  train_and_evaluate(smoke(), str(run), log=lambda line, *a, **k: lines.append(str(line)))
  assert any("config.json had been edited" in line for line in lines), lines
  assert (run / "config.json").read_text() == original
  assert_same_run(run, straight)


def test_resume_from_into_a_workdir_holding_a_run_is_refused_or_overwrites_it(stopped, straight, tmp_path):
  # finding 7: the flag was ignored ("nothing to do") while config.json recorded it
  run = copy_of(straight, tmp_path)
  before = snapshot(run)
  resume = smoke(resume_from=f"{stopped}:6")
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds a run of its own, so --resume_from .*:6 would be "
                     r"ignored.*--overwrite"):
    train_and_evaluate(resume, str(run), **QUIET)
  assert snapshot(run) == before
  lines = []
  train_and_evaluate(resume, str(run), overwrite=True, log=lambda line, *a, **k: lines.append(str(line)))
  assert any(line.startswith(f"starting from epoch 6 of {stopped}:6") for line in lines), lines
  assert json.loads((run / "config.json").read_text())["resume_from"] == f"{stopped}:6"
  assert_same_run(run, straight)  # same config: epoch 6 of the stopped run goes on as the straight run did
  train_and_evaluate(resume, str(run), **QUIET)  # the resume's own command again: its run, finished, no refusal


def test_resume_from_with_other_data_is_refused(stopped, tmp_path):
  # finding 5: records of epochs 1-6 from data_seed 0, later ones from 1, config.json saying 1
  for key, value in (("data_seed", 1), ("random_label_fraction", 0.5), ("per_class", "50")):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"reads other data than that run \({key}: .* -> "):
      train_and_evaluate(smoke(**{key: value}, resume_from=f"{stopped}:6"), str(tmp_path / key), **QUIET)
    assert not (tmp_path / key / "config.json").exists()


def test_an_edited_record_is_rewritten_from_the_checkpoint(stopped, straight, tmp_path):
  # finding 6: only the epoch numbers were compared, so an edited nc1 stayed in metrics.jsonl
  run = copy_of(stopped, tmp_path)
  lines = (run / "metrics.jsonl").read_text().splitlines()
  edited = json.loads(lines[1])
  assert edited["epoch"] == 3
  lines[1] = json.dumps({**edited, "nc1": 0.001})
  (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  logged = []
  train_and_evaluate(smoke(), str(run), log=lambda line, *a, **k: logged.append(str(line)))
  assert any("measurements of epochs [3] differ from the checkpoint's copy" in line for line in logged), logged
  assert_same_run(run, straight)


def test_grid_select_leaves_out_a_run_whose_config_json_was_edited(straight, tmp_path, capsys):
  # finding 2: an lr edited in config.json was selected as the run's lr
  sys.path.insert(0, str(REPO / "experiments"))
  try:
    import grid
  finally:
    sys.path.remove(str(REPO / "experiments"))
  cell = tmp_path / "default"
  good, edited = cell / "lr_a", cell / "lr_b"
  shutil.copytree(straight, good)
  shutil.copytree(straight, edited)
  config = json.loads((edited / "config.json").read_text())
  (edited / "config.json").write_text(json.dumps({**config, "lr": 0.005}))
  choices = grid.select(tmp_path)
  assert [s["run"] for s in choices["default"]["sweep"]] == [str(good)]
  assert choices["default"]["lr"] == config["lr"]
  assert "lr_b/config.json is not the config its run was trained with" in capsys.readouterr().err


def test_verified_config_names_a_missing_config_and_skips_checkpoints_without_a_digest(straight, tmp_path):
  run = copy_of(straight, tmp_path)
  assert workdir_lib.verified_config(run) == json.loads((run / "config.json").read_text())
  (run / "config.json").unlink()
  with pytest.raises(workdir_lib.WorkdirError, match="config.json is missing; rerun the run's training command"):
    workdir_lib.verified_config(run)


def test_a_second_config_file_replaces_the_first(tmp_path):
  # finding 19: "The flag 'config.num_epochs' is defined twice"; the last --config wins, as every flag's last value
  result = subprocess.run(train_command(tmp_path / "run", "--config", str(REPO / "configs/default_mse.py:smoke"),
                                        "--config.lr=-1"), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
  line = one_line_error(result)
  assert "defined twice" not in line and "lr" in line, line
  assert not (tmp_path / "run").exists()
