"""nc_jax.schema: every config validates, every bad value is refused naming its key, every model option is
settable from the command line, and the schema's tables stay in step with the models and the data."""

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs.paper import common as paper
from nc_jax import schema

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted([REPO / "configs" / "default.py", REPO / "configs" / "fashion_mnist_mlp.py",
                       *(p for p in (REPO / "configs" / "paper").glob("*.py") if p.stem != "common")])
# config_flags loads config files with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
NEW_KEYS = {"checkpoint_every_epochs": 10, "checkpoint_every_seconds": 600.0, "resume_from": ""}


def load_config(path, variant=""):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def parse_command_line(config_file: str, *overrides: str) -> ml_collections.ConfigDict:
  """The config ``--config config_file --config.KEY=VALUE ...`` gives, parsed as nc_jax.train parses it."""
  from nc_jax import cli
  argv = cli.last_values(["train", f"--config={config_file}", *overrides])
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


class _Delete:
  def __repr__(self):  # a stable test id (pytest-xdist workers must collect the same ids)
    return "DELETE"


DELETE = _Delete()


def changed(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``changes`` (nested keys: model_options__width; DELETE removes the key),
  rebuilt from plain values, so it may hold what ml_collections' type checks would refuse on assignment."""
  values = config.to_dict()
  for name, value in changes.items():
    *parents, key = name.split("__")
    target = values
    for parent in parents:
      target = target[parent]
    if value is DELETE:
      del target[key]
    else:
      target[key] = value
  return ml_collections.ConfigDict(values)


# ----------------------------------------------------------------------------- light and complete


def test_importing_the_schema_does_not_import_jax():
  code = "import sys, nc_jax.schema; assert not {'jax', 'flax', 'numpy'} & set(sys.modules), sorted(sys.modules)"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("variant", ["", "smoke"])
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_validates_and_has_the_new_keys(path, variant):
  config = load_config(path, variant)
  schema.validate(config)
  assert {key: config[key] for key in NEW_KEYS} == NEW_KEYS
  assert isinstance(config.checkpoint_every_seconds, float)
  assert set(config.model_options.keys()) == set(schema.MODEL_OPTIONS[config.model])


def test_paper_config_refuses_what_is_not_a_cell_or_a_variant():
  assert len(paper.cells()) == 21
  with pytest.raises(ValueError, match="not a cell"):
    paper.load("cifar10", "resnet50")
  with pytest.raises(ValueError, match="unknown variant 'tiny' of configs/paper/cifar10_resnet18.py"):
    paper.load("cifar10", "resnet18", "tiny")


# --------------------------------------------------------------------------------- bad values

DEFAULT = load_config(REPO / "configs" / "default.py")
SMOKE = load_config(REPO / "configs" / "default.py", "smoke")
DENSENET = paper.load("cifar10", "densenet40")
RESNET = paper.load("cifar10", "resnet18")
VGG = paper.load("mnist", "vgg11")
NAN, INF = math.nan, math.inf

BAD = [  # (config, {key: value}, the key the message must name)
    (DEFAULT, {"num_epochs": -3}, "num_epochs"),
    (DEFAULT, {"num_epochs": 0}, "num_epochs"),
    (DEFAULT, {"num_epochs": 3.0}, "num_epochs"),
    (DEFAULT, {"num_epochs": True}, "num_epochs"),
    (DEFAULT, {"num_epochs": "350"}, "num_epochs"),
    (DEFAULT, {"batch_size": 0}, "batch_size"),
    (DEFAULT, {"batch_size": 12.5}, "batch_size"),
    (DEFAULT, {"eval_batch_size": 0}, "eval_batch_size"),
    (DEFAULT, {"eval_batch_size": -1024}, "eval_batch_size"),
    (DEFAULT, {"lr": 0.0}, "lr"),
    (DEFAULT, {"lr": -0.1}, "lr"),
    (DEFAULT, {"lr": NAN}, "lr"),
    (DEFAULT, {"lr": INF}, "lr"),
    (DEFAULT, {"lr": "0.1"}, "lr"),
    (DEFAULT, {"momentum": 1.0}, "momentum"),
    (DEFAULT, {"momentum": -0.1}, "momentum"),
    (DEFAULT, {"weight_decay": -5e-4}, "weight_decay"),
    (DEFAULT, {"weight_decay": NAN}, "weight_decay"),
    (DEFAULT, {"lr_decay_factor": 0.0}, "lr_decay_factor"),
    (DEFAULT, {"lr_decay_factor": INF}, "lr_decay_factor"),
    (DEFAULT, {"lr_decay_epochs": (0,)}, "lr_decay_epochs"),
    (DEFAULT, {"lr_decay_epochs": (351,)}, "lr_decay_epochs"),
    (DEFAULT, {"lr_decay_epochs": (233, 116)}, "lr_decay_epochs"),
    (DEFAULT, {"lr_decay_epochs": (116, 116)}, "lr_decay_epochs"),
    (DEFAULT, {"lr_decay_epochs": (116.5,)}, "lr_decay_epochs"),
    (DEFAULT, {"lr_decay_epochs": 116}, "lr_decay_epochs"),
    (DEFAULT, {"measure_epochs": (0, 5)}, "measure_epochs"),
    (SMOKE, {"measure_epochs": (1, 7)}, "measure_epochs"),
    (DEFAULT, {"measure_epochs": ("1",)}, "measure_epochs"),
    (DEFAULT, {"tpt_threshold": 0.0}, "tpt_threshold"),
    (DEFAULT, {"tpt_threshold": 99.9}, "tpt_threshold"),
    (DEFAULT, {"deepfool_samples": -1}, "deepfool_samples"),
    (DEFAULT, {"keep_checkpoints": 0}, "keep_checkpoints"),
    (DEFAULT, {"num_devices": -1}, "num_devices"),
    (DEFAULT, {"checkpoint_every_epochs": -1}, "checkpoint_every_epochs"),
    (DEFAULT, {"checkpoint_every_epochs": 2.5}, "checkpoint_every_epochs"),
    (DEFAULT, {"checkpoint_every_seconds": -1.0}, "checkpoint_every_seconds"),
    (DEFAULT, {"checkpoint_every_seconds": NAN}, "checkpoint_every_seconds"),
    (DEFAULT, {"epoch_loop": "fast"}, "epoch_loop"),
    (DEFAULT, {"loss": "hinge"}, "loss"),
    (DEFAULT, {"compute_dtype": "float16"}, "compute_dtype"),
    (DEFAULT, {"per_layer_nc": 1}, "per_layer_nc"),
    (DEFAULT, {"per_class": "lots"}, "per_class"),
    (DEFAULT, {"per_class": "0"}, "per_class"),
    (DEFAULT, {"per_class": "-5"}, "per_class"),
    (DEFAULT, {"per_class": 0}, "per_class"),
    (DEFAULT, {"per_class": 2.5}, "per_class"),
    (DEFAULT, {"dataset": "cifar11"}, "dataset"),
    (DEFAULT, {"data_source": "web"}, "data_source"),
    (RESNET, {"data_source": "generated"}, "data_source"),
    (RESNET, {"data_source": "idx"}, "data_source"),
    (DEFAULT, {"data_dir": None}, "data_dir"),
    (DEFAULT, {"standardization": "zscore"}, "standardization"),
    (DEFAULT, {"data_seed": -1}, "data_seed"),
    (DEFAULT, {"seed": -1}, "seed"),
    (DEFAULT, {"seed": 2**63}, "seed"),
    (DEFAULT, {"resume_from": "runs/a:"}, "resume_from"),
    (DEFAULT, {"resume_from": ":3"}, "resume_from"),
    (DEFAULT, {"resume_from": "runs/a:0"}, "resume_from"),
    (DEFAULT, {"resume_from": "runs/a:last"}, "resume_from"),
    (DEFAULT, {"resume_from": 3}, "resume_from"),
    (DEFAULT, {"lr_rate": 0.1}, "lr_rate"),
    (DEFAULT, {"resume_from": DELETE}, "resume_from"),
    (DEFAULT, {"model": "resnet19"}, "model"),
    (DEFAULT, {"model": "resnet18"}, "model_options."),  # the mlp's options are not resnet18's
    (DEFAULT, {"model_options": 512}, "model_options"),
    (DEFAULT, {"model_options__width": 0}, "model_options.width"),
    (DEFAULT, {"model_options__width": 2.5}, "model_options.width"),
    (DEFAULT, {"model_options__depth": -1}, "model_options.depth"),
    (DEFAULT, {"model_options__batch_norm": 1}, "model_options.batch_norm"),
    (DEFAULT, {"model_options__fixed_etf": "yes"}, "model_options.fixed_etf"),
    (DEFAULT, {"model_options__colour": 3}, "model_options.colour"),
    (DEFAULT, {"model_options__fixed_etf": DELETE}, "model_options.fixed_etf"),
    (DENSENET, {"model_options__block_sizes": ()}, "model_options.block_sizes"),
    (DENSENET, {"model_options__block_sizes": (1, 0, 1)}, "model_options.block_sizes"),
    (DENSENET, {"model_options__block_sizes": "(1,1,1)"}, "model_options.block_sizes"),
    (DENSENET, {"model_options__compression": 1.5}, "model_options.compression"),
    (DENSENET, {"model_options__compression": 0.0}, "model_options.compression"),
    (DENSENET, {"model_options__stem": "tiny"}, "model_options.stem"),
    (DENSENET, {"model_options__growth_rate": 0}, "model_options.growth_rate"),
    (RESNET, {"model_options__stage_sizes": (2, "2")}, "model_options.stage_sizes"),
    (RESNET, {"model_options__width": -4}, "model_options.width"),
    (RESNET, {"model_options__block_cls": "Bottleneck"}, "model_options.block_cls"),
    (VGG, {"model_options__config": (64, "X")}, "model_options.config"),
    (VGG, {"model_options__config": ("(64,M,32)",)}, "model_options.config"),  # the command line without quotes
    (VGG, {"model_options__classifier_width": 0}, "model_options.classifier_width"),
    (VGG, {"model_options__width_multiplier": 0.0}, "model_options.width_multiplier"),
]


@pytest.mark.parametrize("config,changes,key", BAD, ids=[f"{k}={next(iter(c.values()))!r}"[:50] for _, c, k in BAD])
def test_a_bad_value_is_refused_in_one_line_naming_its_key(config, changes, key):
  with pytest.raises(schema.ConfigError) as error:
    schema.validate(changed(config, **changes))
  message = str(error.value)
  assert isinstance(error.value, ValueError)
  assert message.startswith(f"config.{key}") and "\n" not in message, message


def test_a_misspelt_key_is_refused_with_a_suggestion():
  with pytest.raises(schema.ConfigError, match=r"config.num_epoch = 3: not a config key; did you mean 'num_epochs'"):
    schema.validate(changed(DEFAULT, num_epoch=3))
  with pytest.raises(schema.ConfigError, match=r"config.num_epochs = -3: must be an integer >= 1"):
    schema.validate(changed(DEFAULT, num_epochs=-3))


GOOD = [
    {"per_class": None}, {"per_class": "None"}, {"per_class": "none"}, {"per_class": "100"}, {"per_class": 5},
    {"lr": 1}, {"momentum": 0.0}, {"weight_decay": 0.0}, {"lr_decay_factor": 1.0}, {"tpt_threshold": 1.0},
    {"lr_decay_epochs": (1, 350)}, {"lr_decay_epochs": [100, 200]}, {"measure_epochs": (350, 1, 1)},
    {"checkpoint_every_epochs": 0, "checkpoint_every_seconds": 0}, {"checkpoint_every_seconds": 60},
    {"resume_from": "runs/a"}, {"resume_from": "runs/a:12"}, {"deepfool_samples": 0}, {"num_devices": 2},
    {"dataset": "synthetic", "data_source": "tfds"}, {"compute_dtype": "bfloat16", "loss": "mse"},
    {"model_options__depth": 0, "model_options__batch_norm": False, "model_options__fixed_etf": True},
    {"epoch_loop": "steps", "per_layer_nc": True, "standardization": "pixel"},
]


@pytest.mark.parametrize("changes", GOOD, ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items())[:60])
def test_edge_values_the_trainer_handles_are_accepted(changes):
  schema.validate(changed(DEFAULT, **changes))


def test_good_model_options_are_accepted():
  schema.validate(changed(VGG, model_options__classifier_width=8, model_options__config=(8, "M", 16, "M")))
  schema.validate(changed(DENSENET, model_options__block_sizes=[1, 1], model_options__compression=1))


# ------------------------------------------------------------------------- sizes, once data are loaded

SIZES = dict(num_train=4000, num_test=1000, num_devices=8)
BAD_SIZES = [  # ({key: value}, sizes, the key the message must name)
    ({"batch_size": 100}, {}, "batch_size"),
    ({"batch_size": 4}, {}, "batch_size"),
    ({"batch_size": 8192}, {}, "batch_size"),
    ({"batch_size": 8}, {"num_train": 4, "num_devices": 8}, "batch_size"),
    ({"eval_batch_size": 1000}, {"num_devices": 16}, "eval_batch_size"),
    ({"eval_batch_size": 6}, {}, "eval_batch_size"),
    ({"deepfool_samples": 10**6}, {}, "deepfool_samples"),
    ({"deepfool_samples": 101}, {"num_test": 100}, "deepfool_samples"),
    ({"num_devices": 16}, {}, "num_devices"),
]


@pytest.mark.parametrize("changes,sizes,key", BAD_SIZES, ids=[k for _, _, k in BAD_SIZES])
def test_sizes_that_do_not_fit_the_data_or_the_devices_are_refused(changes, sizes, key):
  config = changed(DEFAULT, **changes)
  schema.validate(config)
  with pytest.raises(schema.ConfigError) as error:
    schema.validate_sizes(config, **{**SIZES, **sizes})
  assert str(error.value).startswith(f"config.{key}") and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("path", [REPO / "configs" / "default.py", REPO / "configs" / "paper" / "cifar10_resnet18.py"],
                         ids=lambda p: p.stem)
@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_the_shipped_sizes_fit_one_to_eight_devices(path, num_devices):
  for variant, num_train in (("", 4000), ("smoke", 200)):
    config = load_config(path, variant)
    schema.validate_sizes(config, num_train=num_train, num_test=max(config.deepfool_samples, 100),
                          num_devices=num_devices)
  schema.validate_sizes(changed(DEFAULT, num_devices=num_devices), num_train=4000, num_test=1000,
                        num_devices=num_devices)


# -------------------------------------------------------------------------------- the command line


def test_the_issues_examples_set_model_options_from_the_command_line():
  config = parse_command_line(str(REPO / "configs" / "default.py"), "--config.model_options.fixed_etf=True")
  assert config.model_options.fixed_etf is True
  schema.validate(config)
  config = parse_command_line(str(REPO / "configs" / "paper" / "cifar10_densenet40.py") + ":smoke",
                              '--config.model_options.block_sizes=(1,1,1)', "--config.model_options.bottleneck=True")
  assert config.model_options.block_sizes == (1, 1, 1) and config.model_options.bottleneck is True
  schema.validate(config)
  config = parse_command_line(str(REPO / "configs" / "paper" / "mnist_vgg11.py"),
                              "--config.model_options.classifier_width=64", "--config.model_options.config=(8,'M',16)")
  assert config.model_options.classifier_width == 64 and config.model_options.config == (8, "M", 16)
  schema.validate(config)


SMOKE = str(REPO / "configs" / "default.py") + ":smoke"


@pytest.mark.parametrize("overrides,key,expected", [
    (["--config.lr=0.1", "--config.lr=0.2"], "lr", 0.2),
    (["--config.lr_decay_epochs=(2,)", "--config.lr_decay_epochs=(4,)"], "lr_decay_epochs", (4,)),
    (["--config.lr_decay_epochs", "2,3", "--config.lr_decay_epochs", "4"], "lr_decay_epochs", (4,)),
    (["--config.measure_epochs=1,2", "--config.measure_epochs=3"], "measure_epochs", (3,)),
    (["--config.adam_betas=(0.9,0.99)", "--config.adam_betas=(0.8,0.9)"], "adam_betas", (0.8, 0.9)),
    (["--config.optimizer=adam", "--config.optimizer=sgd"], "optimizer", "sgd"),
    (["--config.per_layer_nc", "--noconfig.per_layer_nc"], "per_layer_nc", False),
    (["--noconfig.per_layer_nc", "--config.per_layer_nc=true"], "per_layer_nc", True),
    (["--config.per_layer_nc=false", "--config.per_layer_nc", "--config.lr", "0.3"], "per_layer_nc", True),
    (["--config.model_options.width=8", "--config.model_options.width=16"], "model_options.width", 16),
], ids=lambda v: None if isinstance(v, list) else str(v))
def test_a_repeated_flag_takes_its_last_value_for_every_type(overrides, key, expected):
  config = parse_command_line(SMOKE, *overrides)
  value = config
  for part in key.split("."):
    value = value[part]
  assert value == expected
  others = {"lr": 0.3} if "0.3" in overrides else {}  # the arguments around a repeated key stay as given
  assert all(config[k] == v for k, v in others.items())


def test_config_digest_changes_exactly_with_the_keys_that_change_results():
  base = json.loads(DEFAULT.to_json())
  digest = schema.config_digest(base)
  assert schema.config_digest({**base, "lr": base["lr"] * 2}) != digest
  assert schema.config_digest({**base, "model_options": {**base["model_options"], "width": 7}}) != digest
  assert schema.config_digest({**base, "measure_epochs": [1]}) != digest
  for key, value in {"keep_checkpoints": 9, "resume_from": "elsewhere:3", "checkpoint_every_seconds": 1.0}.items():
    assert schema.config_digest({**base, key: value}) == digest, key  # OPERATIONAL_KEYS: how a run is kept
  older = {k: v for k, v in base.items() if k not in NEW_KEYS}  # a config.json from before those keys
  older["model_options"] = {"width": base["model_options"]["width"], "depth": base["model_options"]["depth"]}
  assert schema.config_digest(older) == digest
  assert schema.config_digest({**base, "num_epochs": float(base["num_epochs"])}) == digest  # 350.0 is 350


def other_value(name, default):
  """A value unlike ``default`` of the same kind, and how the command line spells it."""
  if name in schema.OPTIONAL_OPTIONS:
    return 8, "8"
  if isinstance(default, bool):
    return not default, str(not default)
  if isinstance(default, (int, float)):
    return default / 2 if isinstance(default, float) else default + 1, str(default / 2 if isinstance(
        default, float) else default + 1)
  if name == "stem":
    value = next(s for s in schema.STEMS if s != default)
    return value, value
  if name == "config":
    return (8, "M", 16, "M"), "(8,'M',16,'M')"
  value = (1,) * len(default)
  return value, str(value)


@pytest.mark.parametrize("model", schema.MODELS)
def test_every_model_option_can_be_set_from_the_command_line(model, tmp_path):
  config_file = tmp_path / "model_config.py"
  config_file.write_text("from nc_jax import schema\n\n\ndef get_config(model):\n"
                         "  return schema.base_config(dataset='synthetic', data_source='generated', model=model)\n")
  expected, arguments = {}, []
  for name, default in schema.MODEL_OPTIONS[model].items():
    expected[name], spelt = other_value(name, default)
    arguments.append(f"--config.model_options.{name}={spelt}")
  config = parse_command_line(f"{config_file}:{model}", *arguments)
  assert config.model_options.to_dict() == expected
  schema.validate(config)


# ------------------------------------------------------------------------- in step with the code


def constructor_options(factory) -> dict:
  """A model name's constructor options: its flax dataclass fields (but num_classes, dtype) with its defaults."""
  cls, keywords = (factory.func, factory.keywords) if isinstance(factory, functools.partial) else (factory, {})
  fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in ("parent", "name", "num_classes",
                                                                                   "dtype")}
  return {**fields, **keywords}


@pytest.mark.parametrize("model", schema.MODELS)
def test_the_option_table_equals_the_models_constructors(model):
  from nc_jax import models

  options = constructor_options(models.REGISTRY[model])
  assert dataclasses.MISSING not in options.values()
  declared = {name: value for name, value in options.items() if name not in schema.FIXED_BY_NAME}
  assert declared == schema.MODEL_OPTIONS[model]
  assert {name: type(value) for name, value in declared.items()} == {
      name: type(value) for name, value in schema.MODEL_OPTIONS[model].items()}
  for name in set(options) & set(schema.FIXED_BY_NAME):  # not a value a config can hold: a class
    assert isinstance(options[name], type)
  for name, default in schema.MODEL_OPTIONS[model].items():
    if default is None:
      assert name in schema.OPTIONAL_OPTIONS
  model_options = schema.model_options_for(model)
  models.create(model, 10, **model_options)  # every declared option is one its constructor takes


def test_every_name_a_config_may_use_is_one_the_code_acts_on():
  """schema's names are nc_jax.names' (one table); each is one the owning code accepts, and the model names are
  the registry's (a copy: nc_jax.models imports flax)."""
  import numpy as np

  from nc_jax import data, models
  from nc_jax.data import preprocess
  from nc_jax.training import schedule, step

  assert schema.MODELS == models.NAMES
  assert set(schema.GENERATED_DATASETS) | set(schema.IDX_DATASETS) <= set(data.DATASETS)
  assert {dataset for dataset, _ in paper.cells()} <= set(data.PAPER_PER_CLASS)
  images = np.random.default_rng(0).uniform(size=(4, 3, 3, 1)).astype(np.float32)
  for name in schema.STANDARDIZATIONS:
    preprocess.statistics(images, name)
  for name in schema.IMBALANCES:
    preprocess.imbalanced_counts(10, 4, name, 2.0)
  for name in schema.LOSSES:
    step.loss_function(name)
  for name in schema.OPTIMIZERS:
    schedule.optimizer(name, 0.1, momentum=0.9, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
  for stem in schema.STEMS:
    models.create("resnet18", 10, stem=stem)


# ----------------------------------------------------------------------------- older run directories


def test_an_older_config_json_filled_with_defaults_is_todays_config():
  today = json.loads(DEFAULT.to_json())
  older = {key: value for key, value in today.items() if key not in NEW_KEYS}
  older["model_options"] = {k: today["model_options"][k] for k in ("width", "depth")}  # before every option was declared
  assert schema.fill_defaults(older) == today
  assert set(schema.OPERATIONAL_KEYS) <= set(today)


@pytest.mark.parametrize("path", sorted((REPO / "results").glob("**/config.json")),
                         ids=lambda p: str(p.parent.relative_to(REPO / "results")))
def test_committed_runs_configs_filled_with_defaults_validate(path):
  schema.validate(ml_collections.ConfigDict(schema.fill_defaults(json.loads(path.read_text()))))
