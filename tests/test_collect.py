"""nc_jax.collect: Neural Collapse of a trained model in streaming passes, resumable, multi-process."""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from nc_jax import cli as cli_lib, collect as collect_lib, records
from nc_jax.collect import batches as batches_lib, outputs
from nc_jax.metrics import further, neural_collapse
from nc_jax.metrics.options import NCOptions
from nc_jax.training import train_and_evaluate
from configs import default as default_config
from tests import run_helpers

REPO = pathlib.Path(os.path.abspath(__file__)).parents[1]
QUIET = dict(quiet=True, warn=lambda message: None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 3-epoch smoke run of the main job (BatchNorm MLP on MNIST-1D), measured at its last epoch."""
  directory = tmp_path_factory.mktemp("run")
  config = default_config.get_config("smoke")
  config.update(num_epochs=3, measure_epochs=(3,), deepfool_samples=0)
  train_and_evaluate(config, str(directory), log=lambda *a, **k: None)
  return directory


def cli(*arguments, env_extra=None, timeout=300, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "nc_jax.collect", *map(str, arguments)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_same_metrics(actual: dict, expected: dict, keys, rtol=1e-5):
  for key in keys:
    a, b = actual[key], expected[key]
    if isinstance(b, int) and not isinstance(b, bool):
      assert a == b, key
    else:
      np.testing.assert_allclose(float(a), float(b), rtol=rtol, atol=1e-7, err_msg=key)


# ---------------------------------------------------------------------------
# The same numbers as the training run's own measurement.
# ---------------------------------------------------------------------------


def test_workdir_nc_equals_the_runs_last_measurement(workdir, tmp_path):
  result = collect_lib.collect_workdir(workdir, tmp_path / "nc", **QUIET)
  last = records.read(workdir)[-1]
  written = json.loads((tmp_path / "nc" / "nc.json").read_text())
  assert written == result and result["epoch"] == last["epoch"] == 3 and result["step"] == last["step"]
  assert result["checkpoint"] == str(workdir / "checkpoints" / "3")
  measured = [k for k in last if k not in ("epoch", "step", "lr", "epoch_loss", "epoch_acc", "tpt_start_epoch",
                                           "wall_time", "images_per_sec")]
  assert {"nc1", "cdnv", "equiangular_means", "self_duality", "ncc_mismatch", "accuracy", "nc1_test",
          "ncc_accuracy_test", "train_loss", "test_acc"} <= set(measured) <= set(result)
  assert_same_metrics(result, last, measured)
  stats = np.load(tmp_path / "nc" / "class_stats.npz")
  assert stats["counts"].sum() == result["num_samples"] and stats["means"].shape == (10, 32)
  assert np.isclose(stats["variances"] @ stats["counts"] / stats["counts"].sum(), result["trace_within"], rtol=1e-4)
  assert stats["weight_norms"].shape == (10,) and (stats["centred_mean_norms"] > 0).all()
  assert not (tmp_path / "nc" / "accumulators.npz").exists(), "removed once the outputs are written"

  own = collect_lib.collect_workdir(workdir, tmp_path / "test_split", split="test", **QUIET)  # the test set's own NC
  assert own["num_samples"] == result["num_samples_test"] and "nc1_test" not in own and own["split"] == "test"
  assert_same_metrics(own, result, ["test_acc", "test_loss"])
  assert own["ncc_accuracy"] != result["ncc_accuracy_test"]  # its own class means, not the training ones


def test_a_streamed_run_is_measured_from_the_stream(tmp_path):
  """A run trained with input_pipeline='stream' is measured batch by batch from its sources (the way ImageNet
  must be), and gives the run's own last measurement."""
  config = default_config.get_config("smoke")
  config.update(num_epochs=2, measure_epochs=(2,), deepfool_samples=0, input_pipeline="stream", epoch_loop="steps")
  train_and_evaluate(config, str(tmp_path / "run"), log=lambda *a, **k: None)
  restored = collect_lib.restore_workdir(tmp_path / "run")[1]
  assert not hasattr(restored, "train_inputs"), "the streamed dataset, not arrays"
  result = collect_lib.collect_workdir(tmp_path / "run", tmp_path / "nc", **QUIET)
  last = records.read(tmp_path / "run")[-1]
  assert_same_metrics(result, last, ["nc1", "cdnv", "equiangular_means", "self_duality", "ncc_mismatch",
                                     "accuracy", "nc1_test", "ncc_accuracy_test", "train_loss", "test_acc",
                                     "num_samples"])


# ---------------------------------------------------------------------------
# Any Flax model, any batches.
# ---------------------------------------------------------------------------


class TinyNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    features = nn.relu(nn.Dense(16)(nn.relu(nn.Dense(24)(x))))
    return nn.Dense(5, name="head")(features), features


@pytest.fixture(scope="module")
def user_model():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, 300).astype(np.int32)
  inputs = (rng.normal(size=(300, 8)) + 2.0 * np.eye(5, 8)[labels]).astype(np.float32)
  test_labels = rng.integers(0, 5, 70).astype(np.int32)
  test_inputs = (rng.normal(size=(70, 8)) + 2.0 * np.eye(5, 8)[test_labels]).astype(np.float32)
  model = TinyNet()
  params = model.init(jax.random.PRNGKey(1), inputs[:1])
  apply_fn = lambda p, x: model.apply(p, x)
  weights, bias = params["params"]["head"]["kernel"].T, params["params"]["head"]["bias"]
  return dict(apply_fn=apply_fn, params=params, data=(inputs, labels, test_inputs, test_labels),
              weights=np.asarray(weights), bias=np.asarray(bias))


def batch_list(inputs, labels, size):
  return [(inputs[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def test_user_model_equals_neural_collapse_in_one_go(user_model, tmp_path):
  inputs, labels, test_inputs, test_labels = user_model["data"]
  apply_fn, params = user_model["apply_fn"], user_model["params"]
  _, features = apply_fn(params, inputs)
  _, test_features = apply_fn(params, test_inputs)
  expected = {k: records.plain(np.asarray(v)) for k, v in jax.jit(neural_collapse, static_argnums=2)(
      features, labels, 5, user_model["weights"], user_model["bias"], test_features=test_features,
      test_labels=test_labels).items()}
  # a list of uneven batches (the last one short) and a callable returning a fresh generator
  result = collect_lib.collect(apply_fn, params, batch_list(inputs, labels, 64), 5, out_dir=tmp_path / "a",
                               weights=user_model["weights"], bias=user_model["bias"],
                               test_batches=lambda: iter(batch_list(test_inputs, test_labels, 32)), **QUIET)
  assert set(expected) <= set(result)
  assert_same_metrics(result, expected, expected)
  assert json.loads((tmp_path / "a" / "nc.json").read_text()) == result
  later = {k: records.plain(np.asarray(v)) for k, v in further.further_collapse(
      features, labels, 5, user_model["weights"], user_model["bias"]).items()}
  assert set(later) <= set(result)
  assert_same_metrics(result, later, later)

  without_classifier = collect_lib.collect(apply_fn, params, (inputs, labels), 5, batch_size=100, **QUIET)
  assert "self_duality" not in without_classifier and "ncc_mismatch" not in without_classifier
  assert_same_metrics(without_classifier, expected, ("nc1", "cdnv", "equinorm_means", "ncc_accuracy"))


def test_conventions_as_keywords_or_as_options_equal_neural_collapse_with_them(user_model):
  inputs, labels, _, _ = user_model["data"]
  apply_fn, params, weights, bias = (user_model[k] for k in ("apply_fn", "params", "weights", "bias"))
  conventions = dict(global_mean="samples", ncc_use_bias=False, divide_nc1_by_classes=False,
                     self_duality_squared=False, std_ddof=0)
  expected = {k: records.plain(np.asarray(v)) for k, v in neural_collapse(
      apply_fn(params, inputs)[1], labels, 5, weights, bias, **conventions).items()}
  run = lambda **kw: collect_lib.collect(apply_fn, params, batch_list(inputs, labels, 100), 5, weights=weights,
                                         bias=bias, **kw, **QUIET)
  by_keywords = run(**conventions)
  assert run(options=NCOptions(**conventions)) == by_keywords
  assert_same_metrics(by_keywords, expected, expected)
  # the result (what nc.json holds) names the conventions it was measured with, the library's defaults included
  assert by_keywords[outputs.OPTIONS_KEY] == {**dataclasses.asdict(NCOptions()), **conventions}
  assert run()[outputs.OPTIONS_KEY]["solver"] == NCOptions().solver
  with pytest.raises(TypeError, match="global_means"):
    run(global_means="samples")


class CrashingBatches:
  """Re-iterable batches that fail once, at batch ``after`` of the first iteration following a complete one
  (pass 2 of a measurement; with ``armed``, of the first iteration that gets that far: pass 1)."""

  def __init__(self, batches, after, armed=False):
    self.batches, self.after, self.armed, self.crashed = batches, after, armed, False

  def __len__(self):
    return len(self.batches)

  def __iter__(self):
    for i, batch in enumerate(self.batches):
      if i == self.after and self.armed and not self.crashed:
        self.crashed = True
        raise RuntimeError("the data source crashed")
      yield batch
    self.armed = True


def test_resume_after_a_crash_and_damaged_accumulators(user_model, tmp_path):
  inputs, labels, test_inputs, test_labels = user_model["data"]
  common = dict(weights=user_model["weights"], bias=user_model["bias"],
                test_batches=batch_list(test_inputs, test_labels, 32), checkpoint_every=1, **QUIET)
  run = lambda batches, out, **kw: collect_lib.collect(user_model["apply_fn"], user_model["params"], batches, 5,
                                                       out_dir=tmp_path / out, **{**common, **kw})
  batches = batch_list(inputs, labels, 40)  # 8 batches per pass
  run(batches, "straight")
  reference = (tmp_path / "straight" / "nc.json").read_bytes()

  crashing = CrashingBatches(batches, after=5)
  with pytest.raises(RuntimeError, match="crashed"):
    run(crashing, "resumed")
  path = tmp_path / "resumed" / "accumulators.npz"
  _, meta = collect_lib.load_accumulators(path)
  assert (meta["pass"], meta["position"]) == (1, 5) and not (tmp_path / "resumed" / "nc.json").exists()
  damaged_dir = tmp_path / "damaged"
  shutil.copytree(tmp_path / "resumed", damaged_dir)
  run(crashing, "resumed")
  assert (tmp_path / "resumed" / "nc.json").read_bytes() == reference, "resumed mid-pass: bit for bit"

  data = (damaged_dir / "accumulators.npz").read_bytes()
  (damaged_dir / "accumulators.npz").write_bytes(data[: len(data) // 2])
  warnings = []
  collect_lib.collect(user_model["apply_fn"], user_model["params"], batches, 5, out_dir=damaged_dir,
                      **{**common, "warn": warnings.append})
  assert len(warnings) == 1 and "is damaged" in warnings[0] and "measuring from the start" in warnings[0]
  assert (damaged_dir / "nc.json").read_bytes() == reference
  assert [p.name.split("-")[0] for p in (damaged_dir / "corrupt").iterdir()] == ["accumulators.npz"]

  with collect_lib.OutputLock(tmp_path / "busy"):  # one measurement per output folder
    with pytest.raises(collect_lib.CollectError, match="in use by another measurement"):
      run(batches, "busy")

  # accumulators of another model are refused, not mixed in
  other = jax.tree_util.tree_map(lambda x: x * 1.5, user_model["params"])
  with pytest.raises(RuntimeError):
    run(CrashingBatches(batches, after=3, armed=True), "other")
  with pytest.raises(collect_lib.CollectError, match="another measurement"):
    collect_lib.collect(user_model["apply_fn"], other, batches, 5, out_dir=tmp_path / "other", **common)


# ---------------------------------------------------------------------------
# The command line: kill -9 and resume; one-line errors.
# ---------------------------------------------------------------------------


def test_cli_kill_9_mid_pass_then_rerun_is_bit_identical(workdir, tmp_path):
  arguments = ["--workdir", workdir, "--batch_size", 256, "--checkpoint_every", 2]  # 16 + 16 + 4 batches
  straight = cli(*arguments, "--out", tmp_path / "straight")
  assert straight.returncode == 0, straight.stderr[-2000:]
  assert straight.stderr.startswith("collect: 3 passes") and "\x1b[K" not in straight.stderr  # no TTY: summary
  killed = cli(*arguments, "--out", tmp_path / "killed", env_extra={collect_lib.KILL_ENV: "1:7"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  meta = collect_lib.load_accumulators(tmp_path / "killed" / "accumulators.npz")[1]
  assert (meta["pass"], meta["position"]) == (1, 6) and not (tmp_path / "killed" / "nc.json").exists()
  resumed = cli(*arguments, "--out", tmp_path / "killed", "--progress")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "pass 2/3 deviations: 6/16 batches" in resumed.stderr and "\x1b[K" in resumed.stderr  # the live line
  for name in ("nc.json", "class_stats.npz"):
    assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def one_line_error(result, code):
  lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
  assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


def test_bad_inputs_are_one_line(workdir, tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "empty").mkdir()
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(workdir / "config.json", untrained / "config.json")
  other_model = tmp_path / "other_model"
  other_model.mkdir()
  (other_model / "checkpoints").symlink_to(workdir / "checkpoints")
  config = json.loads((workdir / "config.json").read_text())
  config["model_options"]["width"] = 48
  (other_model / "config.json").write_text(json.dumps(config))
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  (damaged / "checkpoints").symlink_to(workdir / "checkpoints")
  (damaged / "config.json").write_text('{"a":')
  cases = [
      # the fix named is the one that works: the train command rewrites a damaged config.json (test_reliability)
      (["--workdir", damaged, "--out", tmp_path / "o"], 1, "damaged (not JSON: Expecting value: line 1 column 6 "
       "(char 5)); rerun the run's python -m nc_jax.train command with the config it was trained with"),
      # config.json of another model than its checkpoints': refused by their config digest, before restoring
      (["--workdir", other_model, "--out", tmp_path / "o"], 1, "config.json is not the config its run was trained"),
      (["--workdir", workdir], 2, "--out must be given"),
      (["--workdir", tmp_path / "nowhere", "--out", tmp_path / "o"], 2, "does not exist"),
      (["--workdir", tmp_path / "empty", "--out", tmp_path / "o"], 1, "has no config.json"),
      (["--workdir", untrained, "--out", tmp_path / "o"], 1, "has no checkpoint"),
      (["--workdir", workdir, "--out", tmp_path / "file"], 2, "is a file"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--epoch", 99], 2, "it has epochs 3"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--split", "val"], 2, "split"),
      (["--out", tmp_path / "o"], 2, "--workdir must be given"),
      (["--workdir", tmp_path / "file", "--out", tmp_path / "o"], 2, "is a file, not a run directory"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--batch_size", 0], 2, "--batch_size 0: must be at least 1"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--batch_size", -1], 2, "--batch_size -1: must be at least 1"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--batch_size", "abc"], 2, "--batch_size=abc"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--bogus", 3], 2, "'bogus'; --help lists the flags"),
      (["--workdir", workdir, "--out", tmp_path / "o", "extra"], 2, "unexpected arguments ['extra']"),
      (["--workdir", workdir, "--out", tmp_path / "o", "--num_processes", 2], 2, "go together: pass all three"),
  ]
  for arguments, code, expected in cases:
    assert expected in one_line_error(cli(*arguments), code), arguments
  assert not (tmp_path / "o").exists()


def test_an_empty_workdir_or_out_is_refused_not_the_current_folder(workdir, tmp_path):
  """pathlib reads '' as '.': `--out ""` (an unset $OUT) once wrote nc.json and class_stats.npz into the
  current folder, and `--workdir ""` looked for a run there."""
  here = tmp_path / "cwd"
  here.mkdir()
  assert "--out is empty" in one_line_error(cli("--workdir", workdir, "--out", "", cwd=here), 2)
  assert "--workdir is empty" in one_line_error(cli("--workdir", "", "--out", tmp_path / "o", cwd=here), 2)
  assert not list(here.iterdir())
  for options, flag in ((dict(workdir=workdir, out_dir=""), "--out"),
                        (dict(workdir="", out_dir=tmp_path), "--workdir")):
    with pytest.raises(collect_lib.CollectError, match=f"{flag} is empty") as error:
      collect_lib.collect_workdir(**options, **QUIET)
    assert error.value.code == 2


def test_every_public_name_imports():
  """The package split from one module keeps its names: each of __all__ is there, ``import *`` gives them."""
  namespace = {}
  exec("from nc_jax.collect import *", namespace)  # noqa: S102
  assert set(collect_lib.__all__) <= set(namespace)
  assert all(getattr(collect_lib, name) is namespace[name] for name in collect_lib.__all__)
  assert issubclass(collect_lib.CollectError, ValueError) and issubclass(collect_lib.AccumulatorsDamaged, Exception)


def test_read_outputs_refuses_what_is_not_one_measurement(user_model, tmp_path):
  """Each damage is one CollectError line naming the file and the fix: never a traceback, never a wrong pair."""
  inputs, labels, _, _ = user_model["data"]
  good = tmp_path / "good"
  collect_lib.collect(user_model["apply_fn"], user_model["params"], batch_list(inputs, labels, 100), 5, out_dir=good,
                      **QUIET)
  (tmp_path / "file").write_text("x")

  def damaged(name, damage):
    folder = tmp_path / name
    shutil.copytree(good, folder)
    damage(folder / "nc.json", folder / "class_stats.npz")
    return folder

  def replace_with_folder(path):
    path.unlink()
    path.mkdir()

  cases = [
      (tmp_path / "nowhere", "has no nc.json: no measurement finished there"),
      (tmp_path / "file", "is a file, not a measurement's folder"),
      (damaged("no_stats", lambda nc, stats: stats.unlink()), "class_stats.npz is missing beside"),
      (damaged("other_stats", lambda nc, stats: stats.write_bytes(b"PK\x03\x04 another file")),
       "is not the one .*nc.json was written with .*: damaged or replaced since"),
      (damaged("stats_folder", lambda nc, stats: replace_with_folder(stats)), "class_stats.npz cannot be read"),
      (damaged("truncated", lambda nc, stats: nc.write_bytes(nc.read_bytes()[:100])), "cannot read the measurement"),
      (damaged("empty", lambda nc, stats: nc.write_bytes(b"")), "cannot read the measurement"),
      (damaged("json_list", lambda nc, stats: nc.write_text("[1, 2]")), "holds a JSON list, not a measurement"),
  ]
  for folder, message in cases:
    with pytest.raises(collect_lib.CollectError, match=message) as error:
      collect_lib.read_outputs(folder)
    assert "\n" not in str(error.value) and ("rerun" in str(error.value) or "pass" in str(error.value)), folder
  assert collect_lib.read_outputs(good)[0]["num_samples"] == 300


# ---------------------------------------------------------------------------
# Several processes.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one(workdir, tmp_path):
  """2 processes x 2 CPU devices (gloo over 127.0.0.1), each reading every other batch, merged in order."""
  arguments = ["--workdir", workdir, "--batch_size", 256, "--checkpoint_every", 3]
  single = cli(*arguments, "--out", tmp_path / "single")
  assert single.returncode == 0, single.stderr[-2000:]
  address = f"127.0.0.1:{run_helpers.free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
  env.pop("XLA_FLAGS", None)
  processes = [subprocess.Popen(
      [sys.executable, "-m", "nc_jax.collect", *map(str, arguments), "--out", str(tmp_path / "multi"),
       "--coordinator_address", address, "--num_processes", "2", "--process_id", str(rank)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert "collect: 3 passes, 18 batches" in outputs[0], outputs  # every other one of 16 + 16 + 4
  one = json.loads((tmp_path / "single" / "nc.json").read_text())
  two = json.loads((tmp_path / "multi" / "nc.json").read_text())
  assert set(one) == set(two)
  assert two["nc_options"] == one["nc_options"]  # the conventions measured with (a dict, not a metric)
  keys = [k for k in one if k not in ("workdir", "checkpoint", "split", "class_stats_sha256", "sha256", "nc_options")]
  # CDNV and the kernel statistics divide by squared distances between class means. The smoke net's means lie
  # close together (|mu_c - mu_c'|^2 << |mu_c|^2), which magnifies the last-bit differences that another merge order
  # leaves in the float32 means: measured up to 7e-5 relative (jax 0.10.2; 2e-5 on 0.12) where the rest agree to 5e-6.
  ratio_keys = [k for k in keys if k.startswith(("cdnv", "kernel_"))]
  assert_same_metrics(two, one, [k for k in keys if k not in ratio_keys])
  assert_same_metrics(two, one, ratio_keys, rtol=3e-4)
  assert not list((tmp_path / "multi").glob("accumulators*"))


def test_bad_user_inputs_are_one_line_collect_errors(user_model, tmp_path):
  inputs, labels, _, _ = user_model["data"]
  apply_fn, params = user_model["apply_fn"], user_model["params"]
  good = batch_list(inputs, labels, 100)
  cases = [
      (dict(batches=[(inputs[:10], labels[:10].astype(np.float32))]), "labels must be integers"),
      (dict(batches=[(inputs[:10], labels[:9])]), "but 9 labels"),
      (dict(batches=[inputs[:10]]), "must be an (inputs, labels) pair"),
      (dict(batches=(b for b in good)), "must be re-iterable"),
      (dict(batches=[]), "yield nothing"),
      (dict(apply_fn=lambda p, x: apply_fn(p, x)[1]), "must return (logits"),
      (dict(apply_fn=lambda p, x: (apply_fn(p, x)[0], x.sum())), "must return (logits"),
      (dict(apply_fn=lambda p, x: (apply_fn(p, x)[0], apply_fn(p, x)[1].astype(np.int32))), "floating point"),
      (dict(num_classes=1), "num_classes must be an int >= 2"),
      (dict(checkpoint_every="a"), "checkpoint_every must be an int"),
      (dict(out_dir=tmp_path / "file"), "is a file"),
      (dict(out_dir=""), "out_dir is empty"),
      (dict(solver="qr"), "solver='qr': choose one of svd, gram"),
      (dict(min_count=2), "min_count=2: collect measures every class"),
      (dict(options={"global_mean": "samples"}), "options must be an nc_jax.metrics.NCOptions"),
  ]
  (tmp_path / "file").write_text("x")
  for options, message in cases:
    arguments = dict(apply_fn=apply_fn, params=params, batches=good, num_classes=5) | options
    with pytest.raises(collect_lib.CollectError) as error:
      collect_lib.collect(**arguments, **QUIET)
    assert message in str(error.value) and "\n" not in str(error.value), (options, str(error.value))


def test_rank_1_features_are_refused_naming_the_shape(user_model):
  """Features of shape (B,) (one number per example) are not silently taken as p = 1."""
  inputs, labels, _, _ = user_model["data"]
  apply_fn = lambda p, x: (user_model["apply_fn"](p, x)[0], user_model["apply_fn"](p, x)[1][:, 0])
  with pytest.raises(collect_lib.CollectError) as error:
    collect_lib.collect(apply_fn, user_model["params"], batch_list(inputs, labels, 100), 5, **QUIET)
  message = str(error.value)
  assert "shape (100,)" in message and "shape (batch, p)" in message and "\n" not in message, message


class Killed(Exception):
  """Stands for a SIGKILL between two writes."""


def test_a_kill_between_the_two_output_writes_is_detected_and_rewritten(user_model, tmp_path, monkeypatch):
  """class_stats.npz is written first, nc.json last with the sha256 of class_stats.npz: a kill between the two
  leaves a new class_stats.npz beside an older nc.json, which read_outputs refuses and the next run rewrites."""
  inputs, labels, _, _ = user_model["data"]
  out = tmp_path / "out"
  run = lambda params, **kw: collect_lib.collect(user_model["apply_fn"], params, batch_list(inputs, labels, 100), 5,
                                                 out_dir=out, weights=user_model["weights"], bias=user_model["bias"],
                                                 **{**QUIET, **kw})
  first = run(user_model["params"])
  result, stats = collect_lib.read_outputs(out)
  assert result == first
  assert first[collect_lib.STATS_DIGEST_KEY] == outputs.sha256((out / "class_stats.npz").read_bytes())
  assert stats["counts"].sum() == first["num_samples"]

  write = outputs.write_atomically
  def killed_before_nc_json(path, payload):
    if path.name == collect_lib.NC_FILE:
      raise Killed
    write(path, payload)
  monkeypatch.setattr(outputs, "write_atomically", killed_before_nc_json)
  other = jax.tree_util.tree_map(lambda x: x * 1.5, user_model["params"])
  with pytest.raises(Killed):
    run(other)
  monkeypatch.undo()
  assert json.loads((out / "nc.json").read_text()) == first, "the older nc.json, beside a newer class_stats.npz"
  with pytest.raises(collect_lib.CollectError, match="stopped between writing the two") as error:
    collect_lib.read_outputs(out)
  assert "\n" not in str(error.value)

  warnings = []
  again = run(other, warn=warnings.append)
  assert len(warnings) == 1 and "measuring again rewrites both" in warnings[0], warnings
  result, stats = collect_lib.read_outputs(out)
  assert result == again and again["nc1"] != first["nc1"]
  assert again[collect_lib.STATS_DIGEST_KEY] != first[collect_lib.STATS_DIGEST_KEY]


def test_temporary_files_of_a_killed_writer_are_removed(user_model, tmp_path):
  inputs, labels, _, _ = user_model["data"]
  out = tmp_path / "out"
  out.mkdir()
  stale = [out / ".nc.json.tmp999999", out / ".class_stats.npz.tmp999999", out / ".accumulators.npz.tmp999999"]
  for path in stale:
    path.write_text("partial")
  collect_lib.collect(user_model["apply_fn"], user_model["params"], batch_list(inputs, labels, 100), 5,
                      out_dir=out, checkpoint_every=1, **QUIET)
  assert not any(path.exists() for path in stale) and (out / "nc.json").exists()


def test_a_stream_that_changes_between_passes_is_refused(user_model, tmp_path):
  """A callable handing back one generator (or a loader that drops random batches) gives pass 2 other
  samples than pass 1: the per-class counts differ, which is refused rather than measured."""
  inputs, labels, _, _ = user_model["data"]
  shared = iter(batch_list(inputs, labels, 50))
  with pytest.raises(collect_lib.CollectError, match="every read must yield the same data"):
    collect_lib.collect(user_model["apply_fn"], user_model["params"], lambda: shared, 5, out_dir=tmp_path / "o",
                        checkpoint_every=1, **QUIET)
  assert not (tmp_path / "o" / "accumulators.npz").exists()


def test_stderr_drops_only_the_closed_event_loop_tracebacks():
  """orbax's background threads print "Event loop is closed" tracebacks after a failed restore (under load);
  the CLI's stderr drops those and nothing else."""
  sink = io.StringIO()
  stderr = cli_lib.WithoutClosedLoopTracebacks(sink)
  closed = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nRuntimeError: Event loop is closed\n'
  other = 'Traceback (most recent call last):\n  File "y.py", line 2, in h\nValueError: a real one\n'
  stderr.write(closed + "error: the one line\n" + closed[:30])
  stderr.write(closed[30:] + other + "tail without newline")
  stderr.flush()
  assert sink.getvalue() == "error: the one line\n" + other + "tail without newline"


# ---------------------------------------------------------------------------
# Derived files checked, old runs readable, moved data, memory that follows the data.
# ---------------------------------------------------------------------------


def printed_command(line: str) -> list[str]:
  """The command an error line gives between backticks, as argv with this Python."""
  import shlex
  command = shlex.split(line.split("`")[1])
  assert command[:3] == ["python", "-m", "nc_jax.collect"], line
  return [sys.executable, *command[1:]]


def test_an_edited_nc_json_is_refused_naming_the_command_that_rewrites_it(workdir, tmp_path):
  """nc.json carries the sha256 of its own other keys: a value edited since (here NC1, which reads back as
  a plausible number) is refused on read with the collect command that rewrites it, and that command works."""
  out = tmp_path / "nc"
  first = collect_lib.collect_workdir(workdir, out, **QUIET)
  assert collect_lib.read_outputs(out)[0] == first
  edited = json.loads((out / "nc.json").read_text())
  edited["nc1"] = first["nc1"] / 10
  (out / "nc.json").write_text(json.dumps(edited, indent=1))
  with pytest.raises(collect_lib.CollectError, match="nc.json is not as it was written") as error:
    collect_lib.read_outputs(out)
  assert "\n" not in str(error.value)
  result = subprocess.run(printed_command(str(error.value)), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and "rewrites both" in result.stderr, result.stderr[-2000:]
  np.testing.assert_allclose(collect_lib.read_outputs(out)[0]["nc1"], first["nc1"], rtol=1e-5)  # 1 device, not 8
  reindented = json.loads((out / "nc.json").read_text())
  (out / "nc.json").write_text(json.dumps(reindented, indent=4, sort_keys=False))  # same values: still whole
  assert collect_lib.read_outputs(out)[0] == reindented


# The keys of a config.json written before streaming, the variants and resume_from existed (results/mnist1d/*).
OLD_CONFIG_KEYS = ("batch_size", "compute_dtype", "data_dir", "data_seed", "data_source", "dataset", "deepfool_samples",
                   "epoch_loop", "eval_batch_size", "keep_checkpoints", "loss", "lr", "lr_decay_epochs",
                   "lr_decay_factor", "measure_epochs", "model", "model_options", "momentum", "num_devices",
                   "num_epochs", "per_class", "per_layer_nc", "seed", "standardization", "tpt_threshold",
                   "weight_decay")


def test_a_run_whose_config_predates_todays_keys_is_measured(workdir, tmp_path):
  """Every committed run under results/ has a config.json without the streaming keys (input_pipeline, ...):
  collect fills today's defaults for them, as the trainer does, and measures what it measured before."""
  committed = json.loads((REPO / "results" / "mnist1d" / "w512_d3" / "config.json").read_text())
  assert sorted(committed) == sorted(OLD_CONFIG_KEYS) and "input_pipeline" not in committed
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("lock"))
  config = json.loads((old / "config.json").read_text())
  (old / "config.json").write_text(json.dumps({key: config[key] for key in OLD_CONFIG_KEYS}, indent=2))
  expected = collect_lib.collect_workdir(workdir, tmp_path / "new_nc", **QUIET)
  result = collect_lib.collect_workdir(old, tmp_path / "old_nc", **QUIET)
  assert_same_metrics(result, expected, ["nc1", "cdnv", "self_duality", "accuracy", "nc1_test", "train_loss"],
                      rtol=0)
  (old / "config.json").write_text("[1]")
  assert "holds a JSON list, not a run's config" in one_line_error(cli("--workdir", old, "--out", tmp_path / "o"), 1)


def test_a_streamed_run_whose_data_moved_prints_a_collect_command_that_works(tmp_path):
  """The error for data that is no longer where config.json says gives the collect command with --data_dir;
  run as printed (NEW_FOLDER filled in), it measures the run."""
  from tests.test_data import write_fake_idx_folder
  (tmp_path / "mnist").mkdir()
  write_fake_idx_folder(tmp_path / "mnist")
  config = default_config.get_config("smoke")
  config.update(dataset="mnist", data_source="idx", data_dir=str(tmp_path / "mnist"), per_class="10", num_epochs=1,
                measure_epochs=(1,), deepfool_samples=0, input_pipeline="stream", epoch_loop="steps", batch_size=40,
                eval_batch_size=40)
  train_and_evaluate(config, str(tmp_path / "run"), log=lambda *a, **k: None)
  (tmp_path / "mnist").rename(tmp_path / "moved")
  line = one_line_error(cli("--workdir", tmp_path / "run", "--out", tmp_path / "nc", "--split", "train"), 1)
  assert str(tmp_path / "mnist") in line and "--data_dir NEW_FOLDER" in line, line
  command = [str(tmp_path / "moved") if part == "NEW_FOLDER" else part for part in printed_command(line)]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  measured = collect_lib.read_outputs(tmp_path / "nc")[0]
  assert measured["split"] == "train" and measured["num_samples"] == 100
  generated = one_line_error(cli("--workdir", tmp_path / "run", "--out", tmp_path / "nc", "--data_dir",
                                 tmp_path / "nowhere"), 1)
  assert "--data_dir" in generated and "is not a folder" in generated


def test_a_batch_larger_than_the_data_is_capped_at_the_data(user_model, workdir, tmp_path):
  """--batch_size 10**6 once padded every batch to a million rows (memory followed the flag): the batch is at
  most the split's size, and the numbers are the default batch's."""
  inputs, labels, _, _ = user_model["data"]
  batches = batches_lib.array_batches(inputs, labels, 10**6)
  assert batches.pad_to == len(labels) == 300 and [len(b[1]) for b in batches.read(0)] == [300]
  padded_inputs, _, mask = batches_lib.padded(*next(batches.read(0)), batches.pad_to)
  assert len(padded_inputs) == 300 and mask.all()
  expected = collect_lib.collect_workdir(workdir, tmp_path / "default", **QUIET)
  result = collect_lib.collect_workdir(workdir, tmp_path / "huge", batch_size=10**6, **QUIET)
  assert result["batch_size"] == expected["num_samples"] < 10**6
  assert_same_metrics(result, expected, ["nc1", "accuracy", "train_loss", "nc1_test"], rtol=1e-4)


def test_a_config_json_edited_after_training_is_refused_not_measured(workdir, tmp_path):
  # adversarial finding 3: data_seed edited in config.json measured the checkpoint on other data (nc1 114 vs 116)
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  path = run / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "data_seed": 1}))
  with pytest.raises(collect_lib.CollectError, match=r"config.json is not the config its run was trained with.*"
                     r"epoch 3.*restore it"):
    collect_lib.collect_workdir(run, tmp_path / "out", **QUIET)
  assert not (tmp_path / "out" / "nc.json").exists()
