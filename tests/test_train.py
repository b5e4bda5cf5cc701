"""nc_jax.training: schedule, optimiser, steps, evaluation, checkpoints, resume, devices, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from nc_jax import data, models, records
from nc_jax.training import checkpoints, schedule, step as step_lib, train_and_evaluate
from configs import default as default_config
from tests import run_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
  config = default_config.get_config("smoke")
  config.update(overrides)
  return config


def read_metrics(workdir):
  return records.read(workdir)


def run_cli(workdir, *overrides, check=True, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs/default.py:smoke"),
             "--workdir", str(workdir), *overrides]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=check, timeout=600)


class TestSchedule:

  def test_notebook_measurement_epochs_and_rescaling(self):
    assert schedule.measurement_epochs(350) == schedule.NOTEBOOK_MEASURE_EPOCHS
    rescaled = schedule.measurement_epochs(35)
    assert rescaled[0] == 1 and rescaled[-1] == 35 and list(rescaled) == sorted(set(rescaled))
    assert schedule.measurement_epochs(10, (2, 5, 5)) == (2, 5)
    with pytest.raises(ValueError, match="must lie in"):
      schedule.measurement_epochs(10, (0, 11))

  def test_learning_rate_steps_down_after_epochs_116_and_233(self):
    assert schedule.decay_epochs(350) == (116, 233)
    lr = schedule.learning_rate(0.1, 10, schedule.decay_epochs(350), 0.1)
    last_of_116, first_of_117 = 116 * 10 - 1, 116 * 10
    assert float(lr(last_of_116)) == pytest.approx(0.1)
    assert float(lr(first_of_117)) == pytest.approx(0.01)
    assert float(lr(233 * 10 - 1)) == pytest.approx(0.01)
    assert float(lr(233 * 10)) == pytest.approx(0.001)

  def test_sgd_is_torch_sgd_with_coupled_weight_decay(self):
    lr, momentum, decay = 0.1, 0.9, 5e-4
    tx = schedule.sgd(optax.constant_schedule(lr), momentum, decay)
    weights, buffer = np.array([1.0, -2.0]), np.zeros(2)
    params = jnp.asarray(weights, jnp.float32)
    state = tx.init(params)
    for grad in (np.array([0.5, 0.1]), np.array([-0.2, 0.3]), np.array([0.0, 1.0])):
      buffer = momentum * buffer + (grad + decay * weights)  # torch.optim.SGD, dampening 0
      weights = weights - lr * buffer
      updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, weights, rtol=1e-6)

  def test_losses(self):
    logits, labels = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([0])
    mse = step_lib.loss_function("mse")(logits, labels)
    assert float(mse[0]) == pytest.approx(((2 - 1) ** 2 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="unknown loss"):
      step_lib.loss_function("hinge")


@pytest.mark.parametrize("name,options", [
    ("mlp", {"width": 16, "depth": 2}), ("cnn", {"channels": (4, 4, 8), "width": 8}),
    ("vgg11", {"classifier_width": 8, "width_multiplier": 1 / 16}), ("resnet18", {"width": 4}),
    ("densenet40", {"growth_rate": 4, "block_sizes": (1, 1, 1)}),
])
def test_one_real_step_for_every_family_under_mock_data(name, options):
  with tfds.testing.mock_data(num_examples=16):
    dataset = data.load("cifar10", per_class=None)
  model = models.create(name, dataset.num_classes, **options)
  tx = schedule.sgd(optax.constant_schedule(0.05), 0.9, 5e-4)
  state = step_lib.create_state(model, tx, dataset.input_shape, seed=0)
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model, tx=tx,
                                                  loss_fn=step_lib.loss_function("cross_entropy")))
  new_state, metrics = step(state, (dataset.train_inputs[:8], dataset.train_labels[:8]))
  assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, new_state.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


class TestTrainAndEvaluate:

  def test_smoke_run_writes_outputs_and_nc1_decreases(self, tmp_path):
    config = smoke_config(num_epochs=12, measure_epochs=(1, 6, 12), lr_decay_epochs=(8,))
    last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
    records = read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 6, 12]
    assert records[-1]["nc1"] < records[0]["nc1"]
    for key in ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "nc1", "nc1_test",
                "ncc_accuracy_test", "self_duality", "ncc_mismatch", "wall_time", "images_per_sec"):
      assert key in records[-1], key
    assert json.loads((tmp_path / "config.json").read_text())["num_epochs"] == 12
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 6, 12]
    assert last["epoch"] == 12

  def test_tpt_start_is_the_first_epoch_reaching_the_threshold(self, tmp_path):
    # lr 0.0679 (the notebook's): the smoke run then crosses 45% train accuracy between epochs 2 and 5
    config = smoke_config(num_epochs=6, measure_epochs=tuple(range(1, 7)), tpt_threshold=0.45, lr=0.0679)
    train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
    records = read_metrics(tmp_path)
    expected = next(r["epoch"] for r in records if r["epoch_acc"] >= 0.45)
    assert records[-1]["tpt_start_epoch"] == expected
    assert json.loads((tmp_path / "tpt.json").read_text())["tpt_start_epoch"] == expected
    assert 1 < expected < 6  # else the next check shows nothing

    # Measured at the TPT start even when the schedule skips that epoch (Table 1 reads it there).
    sparse = smoke_config(num_epochs=6, measure_epochs=(1,), tpt_threshold=0.45, lr=0.0679)
    train_and_evaluate(sparse, str(tmp_path / "sparse"), log=lambda *a, **k: None)
    sparse_records = read_metrics(tmp_path / "sparse")
    assert [r["epoch"] for r in sparse_records] == [1, expected, 6]
    assert sparse_records[1]["test_acc"] == records[expected - 1]["test_acc"]

  def test_eight_devices_give_the_one_device_run(self, tmp_path):
    assert jax.device_count() == 8
    results = {}
    for devices in (1, 8):
      config = smoke_config(num_epochs=3, measure_epochs=(3,), num_devices=devices)
      results[devices] = train_and_evaluate(config, str(tmp_path / str(devices)), log=lambda *a, **k: None)
    for key in ("epoch_loss", "train_loss", "test_acc", "nc1", "equinorm_means", "self_duality", "ncc_mismatch"):
      np.testing.assert_allclose(results[8][key], results[1][key], rtol=2e-4, atol=1e-6, err_msg=key)

  def test_nan_loss_stops_with_the_epoch_and_keeps_the_last_good_checkpoint(self, tmp_path):
    config = smoke_config(num_epochs=6, measure_epochs=(1, 2, 3, 4, 5, 6), lr=0.05, lr_decay_epochs=(1,),
                          lr_decay_factor=1e6)
    with pytest.raises(FloatingPointError, match=r"at epoch \d+.*last good checkpoint is epoch") as error:
      train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert error.value.epoch > 1 and kept and max(kept) == error.value.epoch - 1 == error.value.last_good_epoch

  def test_different_config_in_workdir_is_refused_unless_overwrite(self, tmp_path):
    train_and_evaluate(smoke_config(num_epochs=1, measure_epochs=(1,)), str(tmp_path), log=lambda *a, **k: None)
    changed = smoke_config(num_epochs=1, measure_epochs=(1,), lr=0.01)
    with pytest.raises(ValueError, match="different config.*lr: 0.0255 -> 0.01"):
      train_and_evaluate(changed, str(tmp_path), log=lambda *a, **k: None)
    wider = smoke_config(num_epochs=1, measure_epochs=(1,))
    wider.model_options.width = 64
    with pytest.raises(ValueError, match=r"different config \(model_options.width: 32 -> 64\)"):
      train_and_evaluate(wider, str(tmp_path), log=lambda *a, **k: None)  # the nested key, not both dicts
    train_and_evaluate(changed, str(tmp_path), overwrite=True, log=lambda *a, **k: None)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01

  def test_corrupt_latest_checkpoint_falls_back_to_the_previous(self, tmp_path, capsys):
    config = smoke_config(num_epochs=3, measure_epochs=(1, 2, 3))
    train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
    latest = tmp_path / "checkpoints" / "3" / "state"
    for path in latest.rglob("*"):
      if path.is_file() and path.stat().st_size > 0:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model = models.create("mlp", 10, width=config.model_options.width, depth=config.model_options.depth)
    tx = schedule.sgd(optax.constant_schedule(0.1), 0.9, 5e-4)
    abstract = jax.eval_shape(lambda: step_lib.create_state(model, tx, (40,), 0))
    manager = checkpoints.Checkpoints(tmp_path / "checkpoints")
    epoch, state, _ = manager.restore_latest(abstract)
    assert manager.epochs() == [1, 2]  # the damaged one was moved aside
    manager.close()
    assert epoch == 2 and int(state.step) > 0
    assert "checkpoints/3 is damaged" in capsys.readouterr().err
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints" / "corrupt").iterdir()] == ["3"]

  def test_unknown_dataset_is_a_clear_cli_error(self, tmp_path):
    result = run_cli(tmp_path, "--config.dataset=cifar11", check=False)
    assert result.returncode == 1 and "config.dataset = 'cifar11': must be one of" in result.stderr


@pytest.mark.parametrize("arguments,code,expected", [
    # No --config: config_flags loads the default with the overrides while it defines the flag, at import.
    (["--config.no_such_key=3"], 2, ["--config.no_such_key: no such config key", "configs/default.py"]),
    (["--config.model_options.widht=3"], 2, ["--config.model_options.widht: no such config key",
                                              "did you mean --config.model_options.width?"]),
    (["--config.lr=abc"], 2, ["--config.lr=abc", "config.lr takes a number"]),
    (["--config.model_options.fixed_etf=maybe"], 2, ["fixed_etf=maybe", "takes True or False"]),
    (["--config.model=nosuch"], 1, ["config.model = 'nosuch': must be one of", "'resnet18'"]),
    (["--config.dataset=nosuch"], 1, ["config.dataset = 'nosuch': must be one of", "'cifar10'"]),
    (["--config=/no/such/file.py"], 2, ["cannot load the config", "/no/such/file.py", "--config=configs/NAME.py"]),
    (["--config=configs/default.py:nosuch"], 2, ["unknown variant 'nosuch'", "'smoke'"]),
    (["--config=configs/default.py", "--config.no_such_key=3"], 2, ["--config.no_such_key", "configs/default.py"]),
    (["--config.lr=0.1", "--config=configs/default.py"], 2, ["--config.lr=0.1", "put --config FILE before"]),
    (["--flagfile=/no/such/flags"], 2, ["/no/such/flags"]),
    # ':' then nothing (an unset ':$VARIANT') once ran the file's default, full-size job.
    (["--config=configs/default.py:"], 2, ["--config=configs/default.py: names an empty variant", "drop the ':'"]),
    # A group given a value once printed its YAML over a dozen lines.
    (["--config.model_options=3"], 2, ["config.model_options is a group", "--config.model_options.KEY=VALUE",
                                       "width"]),
    (["--config.lr=-1"], 1, ["config.lr = -1.0: must be a finite number > 0"]),
    (["--config.lr=nan"], 1, ["config.lr = nan: must be a finite number > 0"]),
    (["--config.epochs=0"], 2, ["--config.epochs: no such config key", "did you mean --config.num_epochs"]),
    (["--config.num_epochs=0"], 1, ["config.num_epochs = 0: must be an integer >= 1"]),
    (["--bogus=1"], 2, ["Unknown command line flag 'bogus'; --help lists the flags"]),
    (["--workdir=README.md"], 1, ["README.md is a file, not a directory; choose another --workdir"]),
    (["--resume_from="], 2, ["--resume_from is empty"]),
    (["--lrs=0.1,abc"], 2, ["--lrs '0.1,abc': give comma-separated positive learning rates"]),
    (["--lrs=0.1,-1"], 2, ["--lrs '0.1,-1'"]),
    (["--lrs="], 2, ["--lrs '': give comma-separated"]),
    (["--lrs=0.1", "--resume_from=/elsewhere"], 2, ["--lrs and --resume_from"]),
    (["--lrs=0.1,0.2", "--config.num_epochs=0"], 1, ["config.num_epochs = 0: must be an integer >= 1"]),
    (["--num_processes=2"], 2, ["go together: pass all three"]),
    # Once a traceback from jax.distributed.initialize.
    (["--process_id=5", "--num_processes=2", "--coordinator_address=127.0.0.1:1"], 2,
     ["--process_id=5 --num_processes=2: need", "0 <= process_id < num_processes"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_command_line_is_one_line_naming_the_key_or_value(arguments, code, expected, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "nc_jax.train", *arguments]
  if not any(argument.startswith("--workdir") for argument in arguments):
    command += ["--workdir", str(tmp_path / "run")]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
  assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  for part in expected:
    assert part in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


def test_an_empty_workdir_is_refused_not_the_current_folder(tmp_path):
  """pathlib reads '' as '.': `--workdir=` (an unset $RUN) once trained into the current folder."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "nc_jax.train", f"--config={REPO / 'configs' / 'default.py'}:smoke", "--workdir="]
  result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.strip().splitlines() == [
      "error: --workdir is empty: pass the run's folder, e.g. --workdir=workdirs/NAME"], result.stderr[-3000:]
  assert not list(tmp_path.iterdir())


def test_a_resume_from_that_is_not_a_run_is_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "nc_jax.train", "--config=configs/default.py:smoke", "--workdir",
             str(tmp_path / "run"), f"--resume_from={tmp_path}"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      f"error: --resume_from {tmp_path}: {tmp_path}/checkpoints does not exist"]


@pytest.mark.slow
def test_resume_after_kill_9_is_bit_identical(tmp_path):
  overrides = ["--config.num_epochs=24", "--config.measure_epochs=" + ",".join(map(str, range(1, 25))),
               "--config.model_options.width=256"]
  run_cli(tmp_path / "straight", *overrides)

  interrupted = tmp_path / "interrupted"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs/default.py:smoke"),
             "--workdir", str(interrupted), *overrides]
  process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (interrupted / "checkpoints" / "8").exists() and time.time() < deadline and process.poll() is None:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_after = max(int(p.name) for p in (interrupted / "checkpoints").iterdir() if p.name.isdigit())
  assert killed_after < 24, "the run finished before it could be killed; make it longer"
  run_cli(interrupted, *overrides)

  straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(interrupted)
  assert [r["epoch"] for r in resumed] == list(range(1, 25))
  drop = ("wall_time", "images_per_sec")
  for a, b in zip(straight, resumed):
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
  model = models.create("mlp", 10, width=256, depth=default_config.get_config("smoke").model_options.depth)
  tx = schedule.sgd(optax.constant_schedule(0.1), 0.9, 5e-4)
  abstract = jax.eval_shape(lambda: step_lib.create_state(model, tx, (40,), 0))
  finals = []
  for run in (tmp_path / "straight", interrupted):
    manager = checkpoints.Checkpoints(run / "checkpoints")
    epoch, state, _ = manager.restore_latest(abstract)
    manager.close()
    assert epoch == 24
    finals.append(state)
  for a, b in zip(jax.tree_util.tree_leaves(finals[0]), jax.tree_util.tree_leaves(finals[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  """Multi-host on one machine: gloo CPU collectives over 127.0.0.1."""
  run_cli(tmp_path / "single", env_extra={"JAX_NUM_CPU_DEVICES": "8"})
  address = f"127.0.0.1:{run_helpers.free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
  env.pop("XLA_FLAGS", None)
  processes = [subprocess.Popen(
      [sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs/default.py:smoke"),
       "--workdir", str(tmp_path / "multi"), "--coordinator_address", address, "--num_processes", "2",
       "--process_id", str(rank)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for rank in (0, 1)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert "epoch    6" in outputs[0] and "epoch" not in outputs[1].replace("Expected", "")  # only process 0 logs
  single, multi = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
  assert [r["epoch"] for r in multi] == [r["epoch"] for r in single]
  for key in ("epoch_loss", "train_loss", "test_acc", "nc1", "equinorm_means", "self_duality", "ncc_mismatch"):
    np.testing.assert_allclose(multi[-1][key], single[-1][key], rtol=2e-4, atol=1e-6, err_msg=key)


def test_per_layer_nc_is_logged(tmp_path):
  config = smoke_config(num_epochs=1, measure_epochs=(1,), per_layer_nc=True)
  last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  for layer in ("layer0", "layer1", "layer2"):
    assert np.isfinite(last[f"layer/{layer}/nc1"]) and 0 <= last[f"layer/{layer}/ncc_accuracy"] <= 1


# ---------------------------------------------------------------------------
# What the two command lines (nc_jax.train, nc_jax.collect) share: nc_jax.cli.
# ---------------------------------------------------------------------------


def test_cli_distributed_flags_are_defined_once_per_flag_values():
  from absl import flags
  from nc_jax import cli

  values = flags.FlagValues()
  assert cli.define_distributed_flags(values) is cli.define_distributed_flags(values)  # the second: nothing new
  values(["prog", "--coordinator_address", "10.0.0.1:1234", "--num_processes", "2", "--process_id", "1"])
  assert (values.coordinator_address, values.num_processes, values.process_id, values.cpu_collectives) == (
      "10.0.0.1:1234", 2, 1, "gloo")


def test_cli_errors_become_one_line():
  from nc_jax import cli

  try:
    try:
      raise OSError(28, "No space left on device", "/run/metrics.jsonl")
    except OSError as error:
      raise RuntimeError("the checkpoint could not be saved") from error
  except RuntimeError as wrapped:
    found = cli.os_error(wrapped)
  assert isinstance(found, OSError) and cli.describe_os_error(found) == "No space left on device (/run/metrics.jsonl)"
  assert cli.os_error(ValueError("no file here")) is None
  assert cli.one_line(ValueError("first\n  second\n")) == "first second"
  assert cli.one_line(RuntimeError("Traceback (most recent call last):\n  File 'x'\nKeyError: 'k'")) == "KeyError: 'k'"
  assert cli.one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("module", ["nc_jax.train", "nc_jax.collect"])
def test_both_command_lines_drop_closed_event_loop_tracebacks_from_stderr(module):
  """Each entry point runs absl's app with stderr through cli.WithoutClosedLoopTracebacks (orbax's threads print
  'Event loop is closed' tracebacks after a failed save or restore)."""
  code = ("import runpy, sys; from absl import app; "
          "app.run = lambda main, flags_parser: print(type(sys.stderr).__name__); "
          f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout.split() == ["WithoutClosedLoopTracebacks"], result.stderr


def test_the_stderr_filter_keeps_the_terminal_test():
  """collect's progress line is live by default when stderr is a terminal: the filter must say so."""
  import io
  from nc_jax import cli

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  assert cli.WithoutClosedLoopTracebacks(Terminal()).isatty()
  assert not cli.WithoutClosedLoopTracebacks(io.StringIO()).isatty()
