"""config.nc and collect's convention flags: the metric conventions (nc_jax.metrics.NCOptions) where users run things.

The digest pins below were computed with the code before config.nc existed (the tree of commit 164d4c0, its
``schema.config_digest`` and ``program.run_digest`` of configs/default.py's config): a run at the default
conventions must keep the digests its checkpoints carry.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from nc_jax import cli, schema
from nc_jax.collect import outputs
from nc_jax.collect.errors import CollectError
from nc_jax.collect.workdir import collect_workdir, workdir_options
from nc_jax.data import device
from nc_jax.metrics import options as options_lib
from nc_jax.metrics.options import NCOptions
from nc_jax.training import program as program_lib, train_and_evaluate
from configs import default as default_config

REPO = pathlib.Path(os.path.abspath(__file__)).parents[1]
SMOKE = str(REPO / "configs" / "default.py") + ":smoke"
# Computed on the tree before config.nc (see the module docstring), not by the code under test.
DEFAULT_DIGESTS = {"": ("726c5850a99ee1d1499720de53eb3f6be6656c8a8afc718c2c56dc6d50a0ad64",
                        "2a98c0c6f531cebea07e9594e21338d45800dc3529ab9a044b14b53e87d0c4a8"),
                   "smoke": ("d0678cd25d8e95e9d74bbe67af7540176f4d24d71ba3e9293572e8a5cfc4fd84",
                             "e04558c0ba93779c3fe5ae789556380c3d9bd61b6ad54aaa153fcb524518adb5")}


def parse_command_line(*overrides: str) -> ml_collections.ConfigDict:
  """The config ``--config SMOKE --config.KEY=VALUE ...`` gives, parsed as nc_jax.train parses it."""
  argv = cli.last_values(["train", f"--config={SMOKE}", *overrides])
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# ------------------------------------------------------------------ the schema's group


def test_the_schema_declares_every_convention_at_ncoptions_defaults_but_the_solver():
  # One documented exception: the library's solver default is 'auto' (the SVD's program on CPU), the trainer's
  # stays 'svd' so that no run directory's config digest changes.
  assert schema.NC_OPTIONS == {**dataclasses.asdict(NCOptions()), "solver": "svd"}
  assert NCOptions().solver == "auto"
  assert schema.NC_GLOBAL_MEANS == options_lib.GLOBAL_MEANS and schema.NC_SOLVERS == options_lib.SOLVERS
  config = default_config.get_config()
  assert config.nc.to_dict() == schema.NC_OPTIONS
  assert program_lib.nc_options(config) == NCOptions(solver="svd")


def test_the_trainer_opts_into_the_accelerator_solver():
  config = parse_command_line("--config.nc.solver=auto")
  schema.validate(config)
  assert program_lib.nc_options(config) == NCOptions(solver="auto")
  assert schema.non_default_nc(config.nc.to_dict()) == {"solver": "auto"}  # a digest of its own


def test_the_command_line_sets_conventions_and_config_json_keeps_them():
  config = parse_command_line("--config.nc.min_count=5", "--config.nc.divide_nc1_by_classes=False",
                              "--config.nc.solver=gram", "--config.nc.rcond=1e-6", "--config.nc.std_ddof=0")
  schema.validate(config)
  expected = NCOptions(min_count=5, divide_nc1_by_classes=False, solver="gram", rcond=1e-6, std_ddof=0)
  assert program_lib.nc_options(config) == expected
  stored = json.loads(json.dumps(program_lib.config_values(config)))  # what config.json holds
  assert stored["nc"]["min_count"] == 5 and stored["nc"]["rcond"] == 1e-6
  read = ml_collections.ConfigDict(schema.fill_defaults(stored))  # as train and collect read config.json back
  schema.validate(read)
  assert program_lib.nc_options(read) == expected
  default = json.loads(json.dumps(program_lib.config_values(default_config.get_config("smoke"))))
  assert default["nc"]["min_count"] is None and default["nc"]["rcond"] is None  # None as null, not 0 or -1


def test_an_older_config_json_reads_as_the_default_conventions():
  stored = program_lib.config_values(default_config.get_config("smoke"))
  older = {k: v for k, v in stored.items() if k != "nc"}
  read = ml_collections.ConfigDict(schema.fill_defaults(older))
  schema.validate(read)
  assert program_lib.nc_options(read) == NCOptions(solver="svd")  # the trainer's default (schema.NC_OPTIONS)
  partial = {**older, "nc": {"solver": "gram"}}  # a group written before a later convention existed
  assert program_lib.nc_options(ml_collections.ConfigDict(schema.fill_defaults(partial))) == NCOptions(solver="gram")


@pytest.mark.parametrize("override,names", [
    ("--config.nc.solver=xyz", "config.nc.solver = 'xyz': must be one of 'svd', 'gram'"),
    ("--config.nc.global_mean=median", "config.nc.global_mean = 'median': must be one of"),
    ("--config.nc.min_count=-1", "config.nc.min_count = -1: must be an integer >= 0, or None"),
    ("--config.nc.std_ddof=-2", "config.nc.std_ddof = -2: must be an integer >= 0"),
    ("--config.nc.rcond=-0.5", "config.nc.rcond = -0.5: must be a finite number >= 0"),
])
def test_a_bad_convention_is_one_line_naming_the_key(override, names):
  with pytest.raises(schema.ConfigError) as error:
    schema.validate(parse_command_line(override))
  assert str(error.value).startswith(names) and "\n" not in str(error.value)


def test_none_given_to_a_placeholder_says_to_leave_the_flag_out(capsys, monkeypatch):
  argv = ["train", f"--config={SMOKE}", "--config.nc.min_count=None"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags declares the overrides it finds in sys.argv
  values = cli.define_config_flag(SMOKE, flags.FlagValues())
  with pytest.raises(SystemExit) as exit_:
    cli.parse_config_flags(argv, values, default=SMOKE)
  assert exit_.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "--config.nc.min_count=None" in lines[0], lines
  assert "leave the flag out to keep None" in lines[0]


def test_a_misspelt_or_missing_convention_is_named():
  values = default_config.get_config("smoke").to_dict()
  values["nc"]["solvr"] = "gram"
  with pytest.raises(schema.ConfigError, match=r"config.nc.solvr = 'gram': not a metric convention; did you mean "
                                               r"nc.solver\?"):
    schema.validate(ml_collections.ConfigDict(values))
  values["nc"].pop("solvr"), values["nc"].pop("ncc_use_bias")
  with pytest.raises(schema.ConfigError, match=r"config.nc.ncc_use_bias is missing"):
    schema.validate(ml_collections.ConfigDict(values))
  values.pop("nc")
  with pytest.raises(schema.ConfigError, match=r"^config.nc is missing: add it \(default: config.nc = "
                                               r"nc_jax.schema.nc_config\(\)\)"):
    schema.validate(ml_collections.ConfigDict(values))


def test_the_train_command_refuses_a_bad_convention_in_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "nc_jax.train", f"--config={SMOKE}", "--config.nc.solver=xyz",
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "config.nc.solver = 'xyz'" in lines[0], result.stderr
  assert not (tmp_path / "run" / "config.json").exists()


# ------------------------------------------------------------------ digests


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_the_digests_of_a_default_config_are_those_before_config_nc(variant):
  config = default_config.get_config(variant)
  assert (schema.config_digest(program_lib.config_values(config)), program_lib.run_digest(config)) == \
      DEFAULT_DIGESTS[variant]


@pytest.mark.parametrize("key,value", [("divide_nc1_by_classes", False), ("min_count", 3), ("solver", "gram"),
                                       ("rcond", 1e-7)])
def test_a_changed_convention_changes_both_digests(key, value):
  base = default_config.get_config("smoke")
  changed = default_config.get_config("smoke")
  changed.nc[key] = value
  assert schema.config_digest(program_lib.config_values(changed)) != DEFAULT_DIGESTS["smoke"][0]
  assert program_lib.run_digest(changed) != program_lib.run_digest(base)
  assert schema.changed_keys(program_lib.config_values(base), program_lib.config_values(changed)) == ["nc"]


def test_a_default_made_explicit_leaves_the_digests():
  config = default_config.get_config("smoke")
  config.nc.std_ddof = 1
  config.nc.solver = "svd"
  assert program_lib.run_digest(config) == DEFAULT_DIGESTS["smoke"][1]
  values = program_lib.config_values(config)
  values["nc"] = {"std_ddof": 1.0}  # an nc group of fewer conventions, 1.0 for 1: still the defaults
  assert schema.config_digest(values) == DEFAULT_DIGESTS["smoke"][0]


def test_the_reports_title_names_conventions_off_the_papers():
  from nc_jax import report
  assert report._variant_suffix({"lr": 0.1, "nc": {**schema.NC_OPTIONS, "divide_nc1_by_classes": False}}) == \
      ", nc.divide_nc1_by_classes False"
  assert report._variant_suffix({"lr": 0.1, "nc": schema.NC_OPTIONS}) == ""


# ------------------------------------------------------------------ the in-memory evaluation


NUM_CLASSES, INPUT_SHAPE = 10, (40,)


def evaluate(config, labels):
  """``program.build_program(config).evaluate`` of the freshly initialised MLP on inputs drawn around its labels."""
  rng = np.random.default_rng(0)
  inputs = (rng.normal(size=(len(labels), *INPUT_SHAPE)) + 3 * np.eye(NUM_CLASSES, INPUT_SHAPE[0])[labels])
  program = program_lib.build_program(config, device.data_mesh(), NUM_CLASSES, INPUT_SHAPE, steps_per_epoch=1)
  state = program.init()
  inputs, labels = jax.numpy.asarray(inputs, jax.numpy.float32), jax.numpy.asarray(labels, jax.numpy.int32)
  return jax.device_get(program.evaluate(state, inputs, labels, inputs[:40], labels[:40]))


def test_config_nc_reaches_every_nc_call_of_the_in_memory_evaluation():
  labels = np.arange(80) % NUM_CLASSES
  default = default_config.get_config("smoke")
  default.per_layer_nc = True
  notebook = default_config.get_config("smoke")
  notebook.per_layer_nc = True
  notebook.nc.divide_nc1_by_classes = False
  a, b = evaluate(default, labels), evaluate(notebook, labels)
  # NC1 without the 1/C is C times NC1 with it; the keys that do not divide by C are untouched.
  np.testing.assert_allclose(b["nc1"], NUM_CLASSES * a["nc1"], rtol=1e-5)
  np.testing.assert_allclose(b["nc1_test"], NUM_CLASSES * a["nc1_test"], rtol=1e-5)
  layers = [key for key in a if key.startswith("layer/") and key.endswith("/nc1")]
  assert layers
  for key in layers:
    np.testing.assert_allclose(b[key], NUM_CLASSES * a[key], rtol=1e-5)
  np.testing.assert_allclose(b["nc1_tirer"], a["nc1_tirer"], rtol=1e-6)


def test_the_streamed_evaluator_gets_config_nc(monkeypatch):
  seen = []

  class Built(Exception):
    pass

  def constructor(measurement):  # stands in for evaluate.StreamedEvaluator: records what it is built with
    seen.append(measurement)
    raise Built

  config = default_config.get_config("smoke")
  config.nc.solver, config.nc.min_count = "gram", 3
  program = program_lib.build_program(config, device.data_mesh(), NUM_CLASSES, (40,), steps_per_epoch=1)
  assert program.measurement.options == NCOptions(solver="gram", min_count=3)
  monkeypatch.setattr(program_lib.evaluate_lib, "StreamedEvaluator", constructor)
  with pytest.raises(Built):
    program_lib.streamed_evaluator(config, None, types.SimpleNamespace(num_classes=NUM_CLASSES), program)
  assert seen == [program.measurement]


def test_config_nc_min_count_filters_a_class_of_an_imbalanced_config():
  counts = [12] * 5 + [4] * 4 + [1]  # the last class has 1 example: left out under min_count = 2
  labels = np.repeat(np.arange(NUM_CLASSES), counts)
  config = default_config.get_config("smoke")
  config.update(imbalance="step", imbalance_ratio=3.0, per_class="12")
  config.nc.min_count = 2
  schema.validate(config)
  result = evaluate(config, labels)
  assert int(result["num_filtered_classes"]) == 1 and int(result["num_filtered_samples"]) == 1
  assert np.isfinite(result["nc1"]) and np.isfinite(result["minority_w_cosine"])  # the minority keys, all classes
  unfiltered = default_config.get_config("smoke")
  unfiltered.update(imbalance="step", imbalance_ratio=3.0, per_class="12")
  assert "num_filtered_classes" not in evaluate(unfiltered, labels)


# ------------------------------------------------------------------ training and collect


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> a 1-epoch smoke run of the main job, trained on first use: 'paper' at the default conventions,
  'notebook' the same but for config.nc.divide_nc1_by_classes = False."""
  made = {}

  def run(name: str) -> pathlib.Path:
    if name not in made:
      directory = tmp_path_factory.mktemp(name)
      config = default_config.get_config("smoke")
      config.update(num_epochs=1, measure_epochs=(1,), deepfool_samples=0)
      config.nc.divide_nc1_by_classes = name == "paper"
      train_and_evaluate(config, str(directory), log=lambda *a, **k: None)
      made[name] = directory
    return made[name]

  return run


def logged(directory) -> dict:
  return json.loads((directory / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow  # two trainings
def test_a_run_logs_nc1_with_its_conventions_and_keeps_them_in_config_json(runs):
  paper, notebook = logged(runs("paper")), logged(runs("notebook"))
  np.testing.assert_allclose(notebook["nc1"], NUM_CLASSES * paper["nc1"], rtol=1e-5)
  np.testing.assert_allclose(notebook["test_acc"], paper["test_acc"])  # the same training, only the measure differs
  stored = json.loads((runs("notebook") / "config.json").read_text())
  assert stored["nc"] == {**schema.NC_OPTIONS, "divide_nc1_by_classes": False}


@pytest.mark.slow  # a training and a measurement
def test_collect_measures_with_the_runs_conventions_by_default(runs, tmp_path):
  result = collect_workdir(runs("notebook"), tmp_path, quiet=True, warn=lambda message: None)
  assert result[outputs.OPTIONS_KEY] == dataclasses.asdict(NCOptions(divide_nc1_by_classes=False, solver="svd"))
  np.testing.assert_allclose(result["nc1"], logged(runs("notebook"))["nc1"], rtol=1e-4)


def test_a_runs_min_count_is_not_applied_by_collect_with_a_warning():
  warnings = []
  config = ml_collections.ConfigDict({"nc": {**schema.NC_OPTIONS, "min_count": 4, "solver": "gram"}})
  assert workdir_options(config, {"std_ddof": 0}, warnings.append) == NCOptions(solver="gram", std_ddof=0)
  assert len(warnings) == 1 and "min_count = 4 is not applied" in warnings[0]
  with pytest.raises(CollectError, match=r"^--std_ddof -1: must be an int >= 0") as error:
    workdir_options(config, {"std_ddof": -1}, warnings.append)
  assert error.value.code == 2
  assert workdir_options(ml_collections.ConfigDict({"lr": 0.1}), {}) == NCOptions(solver="svd")  # older than config.nc


def collect_cli(*arguments):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "nc_jax.collect", *map(str, arguments)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_collects_flags_reach_nc_json(runs, tmp_path):
  paper = runs("paper")
  result = collect_cli("--workdir", paper, "--out", tmp_path, "--nodivide_nc1_by_classes", "--solver", "gram",
                       "--std_ddof", "0", "--noncc_use_bias")
  assert result.returncode == 0, result.stderr
  stored, _ = outputs.read_outputs(tmp_path)  # nc.json's own sha256 covers the record
  assert stored[outputs.OPTIONS_KEY] == dataclasses.asdict(
      NCOptions(divide_nc1_by_classes=False, solver="gram", std_ddof=0, ncc_use_bias=False))
  # the run logged the paper's NC1; measured without the 1/C (and by the Gram solver) it is C times that
  np.testing.assert_allclose(stored["nc1"], NUM_CLASSES * logged(paper)["nc1"], rtol=1e-3)
  command = outputs.rerun_command(tmp_path, stored)
  assert "--nodivide_nc1_by_classes" in command and "--solver gram" in command


@pytest.mark.parametrize("arguments,message", [(["--std_ddof", "-1"], "--std_ddof=-1"),
                                               (["--global_mean", "median"], "--global_mean=median")])
def test_a_bad_convention_flag_is_one_line_and_exit_2(tmp_path, arguments, message):
  result = collect_cli("--workdir", tmp_path / "run", "--out", tmp_path / "out", *arguments)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
