"""The one config schema: every key of a training config, what it means, its default, and the checks on its value.

``base_config`` declares every key (commented below, in one place) at the paper's protocol values; every
training config in configs/ is built from it and states its own values there (the paper's 21 cells in
configs/paper/, what they share in configs/paper/common.py). ``model_options`` holds every constructor option of
the configured model, so each one can be set on the command line (``--config.model_options.fixed_etf=True``,
``--config.model_options.block_sizes="(1,1,1)"``); ml_collections refuses keys a config does not declare.

The trainer calls ``validate(config)`` before it writes anything and ``validate_sizes(config, ...)`` once the
data are loaded (still before writing). A refused value raises ``ConfigError`` with one line that names the key,
says what is wrong and what to set instead, e.g. ``config.num_epochs = -3: must be an integer >= 1``.

Light: imports ml_collections and the standard library only (no JAX), so launchers and tests can build and check
configs in milliseconds. The names the code knows are ``nc_jax.names``' (light too, imported by the modules that act
on them); its model options and the metric conventions below copy what nc_jax.models and nc_jax.metrics define
(those import flax and JAX); tests/test_schema.py and tests/test_nc_options.py keep them equal.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Union

import ml_collections
from ml_collections import config_dict

from nc_jax.names import (  # re-exported: schema.DATASETS etc. are the names a config may use
    COMPUTE_DTYPES, DATA_SOURCES, DATASETS, EPOCH_LOOPS, EVAL_DTYPES, GENERATED_DATASETS, IDX_DATASETS, IMBALANCES,
    INPUT_PIPELINES, LOSSES, MODEL_OPTIONS, MODELS, OPTIMIZERS, STANDARDIZATIONS, STEMS, VGG_POOL)


class ConfigError(ValueError):
  """A config value the trainer cannot use; the message is one line: the key, what is wrong, what to set."""


# ------------------------------------------------------------- every model and its options (names.MODEL_OPTIONS)
# Constructor fields a config cannot hold: ResNet's block class (BasicBlock or Bottleneck) is picked by the name.
FIXED_BY_NAME = ("block_cls",)
# Options whose default None means "the model decides" (VGG: 512 wide with the small stem, 4096 with imagenet's;
# the MLP's feature_dim: its width); declared as ml_collections placeholders of this type, so the command line
# can still set them.
OPTIONAL_OPTIONS = {"classifier_width": int, "feature_dim": int}
_OPTION_MINIMUM = {"depth": 0}  # every other integer option (and tuple entry) must be >= 1

# ------------------------------------------------------------- the metric conventions (config.nc)
# nc_jax.metrics.NCOptions' fields at its defaults and its choices (metrics.options.GLOBAL_MEANS / SOLVERS; kept
# equal by tests/test_nc_options.py). rcond and min_count default to None: ml_collections placeholders of their
# type, so config.json holds null and the command line can set a value (--config.nc.min_count=5).
NC_OPTIONS: dict[str, Any] = {"global_mean": "class_means", "solver": "svd", "rcond": None,
                              "divide_nc1_by_classes": True, "std_ddof": 1, "self_duality_squared": True,
                              "ncc_use_bias": True, "min_count": None}
NC_GLOBAL_MEANS = ("class_means", "samples")
NC_SOLVERS = ("svd", "gram", "auto")
OPTIONAL_NC_OPTIONS = {"rcond": float, "min_count": int}

# ------------------------------------------------------------------------- building
def model_options_for(model: str, values: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """Every constructor option of ``model`` at the model's default, overridden by ``values``."""
  if model not in MODEL_OPTIONS:
    raise ConfigError(f"config.model = {model!r}: unknown model; choose one of {', '.join(MODELS)}")
  values = dict(values or {})
  for name, value in values.items():
    if name not in MODEL_OPTIONS[model]:
      raise ConfigError(f"config.model_options.{name} = {value!r}: not an option of {model}; "
                        f"its options are {', '.join(MODEL_OPTIONS[model])}")
  options = {}
  for name, default in MODEL_OPTIONS[model].items():
    value = values.get(name, default)
    options[name] = config_dict.placeholder(OPTIONAL_OPTIONS[name]) if value is None else value
  return ml_collections.ConfigDict(options)


def nc_config(values: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """``config.nc``: every metric convention (``NC_OPTIONS``) at its default, overridden by ``values``."""
  values = dict(values or {})
  for name, value in values.items():
    if name not in NC_OPTIONS:
      raise ConfigError(f"config.nc.{name} = {value!r}: not a metric convention; the conventions are "
                        f"{', '.join(NC_OPTIONS)}")
  options = {}
  for name, default in NC_OPTIONS.items():
    value = values.get(name, default)
    options[name] = config_dict.placeholder(OPTIONAL_NC_OPTIONS[name]) if value is None else value
  return ml_collections.ConfigDict(options)


def nc_values(config) -> dict:
  """``config.nc`` as plain values by field name (``NCOptions(**nc_values(config))`` is what every measurement
  of the run uses); a config (or config.json) without the group reads as every convention at its default."""
  group = config.get("nc") if isinstance(config, Mapping) else getattr(config, "nc", None)
  if group is None:
    return dict(NC_OPTIONS)
  group = group.to_dict() if isinstance(group, ml_collections.ConfigDict) else dict(group)
  return {**NC_OPTIONS, **group}


def base_config(*, dataset: str, data_source: str, model: str,
                model_options: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """Every key of a training config at the paper's protocol values, for one dataset and model.

  ``model_options`` override the model's defaults; every option of the model is declared either way.
  """
  options = model_options_for(model, model_options)
  config = ml_collections.ConfigDict()
  # --- data (nc_jax.data.load)
  config.dataset = dataset  # one of DATASETS
  config.data_source = data_source  # "tfds" (prepared ArrayRecord data), "idx" (MNIST-format files), "generated"
  config.data_dir = ""  # tfds data_dir or IDX folder; "" = the source's default
  config.per_class = "paper"  # int, "paper" (the paper's counts; smallest class for generated data) or None
  #   (every example, unbalanced); from the command line as strings: --config.per_class=500 or =None
  config.standardization = "global"  # "global" (the notebook's one mean/std), "channel", "pixel" or "none"
  config.data_seed = 0  # seed of the balanced subsample (and of synthetic data)
  # --- data variants: unequal class sizes (minority collapse, Fang et al. 2021) and random labels
  config.imbalance = "none"  # "step": the last minority_classes keep per_class / ratio; "exponential":
  #   class c keeps per_class * ratio^(-c / (C - 1)); "none" = the paper's balanced classes
  config.imbalance_ratio = 1.0  # largest class / smallest class (>= 1)
  config.minority_classes = 0  # the last this many classes are the minority (kept at per_class / ratio under
  #   "step"; measured as the minority under both); 0 = C // 2
  config.random_label_fraction = 0.0  # this fraction of training labels permuted among itself (seeded)
  # "memory": the standardised sets on every device, batches gathered there (nc_jax.data.device); "stream": each
  # process reads, decodes and standardises its rows of every batch on the host (nc_jax.data.stream, grain), the
  # same batches in the same order; "auto": stream when the standardised train + test sets would take more than
  # a quarter of one device's memory (ImageNet), else memory.
  config.input_pipeline = "auto"
  config.input_workers = 0  # grain worker processes decoding for the stream (0 = in the training process)

  # --- model (nc_jax.models.create)
  config.model = model  # one of MODELS
  config.model_options = options  # every constructor option of the model (MODEL_OPTIONS), overridable
  config.compute_dtype = "float32"  # or "bfloat16" (params and BatchNorm statistics stay float32)
  # The NC measurement's forward passes (features, logits, eval-mode loss/accuracy) compute in float32 whatever
  # compute_dtype: bf16 rounding (8 significant bits) would floor NC1 near collapse. "same" = compute_dtype.
  config.eval_dtype = "float32"

  # --- optimisation: SGD with momentum, coupled weight decay, step decay (nc_jax.training.schedule)
  config.loss = "cross_entropy"  # or "mse" (one-hot targets, mean over B x C as torch's MSELoss)
  config.num_epochs = 350
  config.batch_size = 128  # global, split over the devices: a multiple of their number
  config.lr = 0.0679  # the notebook's (MNIST / ResNet18, cross-entropy)
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.lr_decay_factor = 0.1  # lr is multiplied by this after each of lr_decay_epochs (> 1 raises it)
  config.lr_decay_epochs = ()  # () = the paper's (num_epochs // 3, 2 * num_epochs // 3)
  config.seed = 0  # init, batch order and the DeepFool inputs
  # --- protocol variants (the defaults are the paper's): optimiser, decay on the features.
  # "sgd": torch SGD with coupled weight decay (the paper's); "adam": torch Adam (weight_decay as coupled L2);
  # "adamw": torch AdamW (decoupled decay). All follow the same lr schedule (nc_jax.training.schedule).
  config.optimizer = "sgd"
  config.adam_betas = (0.9, 0.999)  # Adam/AdamW's (beta1, beta2), torch's defaults; momentum is SGD's only
  config.adam_eps = 1e-8
  # lambda_H of the unconstrained features model (nc_jax/ufm.py): the objective gains (lambda_H/2) ||H||_F^2 over
  # the N training features, next to weight_decay's (lambda_W/2) ||theta||^2; 0 = off (nc_jax.training.step)
  config.feature_decay = 0.0

  # --- measurement (nc_jax.training.evaluate)
  config.measure_epochs = ()  # () = the notebook's schedule, rescaled to num_epochs
  # TPT starts at the first epoch whose training accuracy, accumulated in train mode over that
  # epoch's batches (free; no extra pass), is >= this; that epoch is also measured.
  config.tpt_threshold = 0.999
  config.eval_batch_size = 1024  # batch of the eval-mode passes over train and test sets; a multiple of the devices
  config.per_layer_nc = False  # also the NC suite of every stage (evaluate.PER_LAYER_KEYS: NC1, NC2 of means, NCC)
  config.deepfool_samples = 100  # DeepFool robustness on this many fixed test inputs per measurement (0 = off)
  # The metric conventions of every NC measurement of the run (in memory, streamed, per layer, the test set, and
  # python -m nc_jax.collect of its workdir): nc_jax.metrics.NCOptions' fields at the paper's defaults (its
  # docstring says what each means), e.g. nc.divide_nc1_by_classes=False for the notebook's NC1 without the 1/C,
  # nc.min_count=k to leave out classes with fewer than k training samples (the MSE and minority keys keep them).
  config.nc = nc_config()

  # --- checkpoints: at every measurement, at the last epoch, on SIGTERM, and on this cadence (whichever first)
  config.keep_checkpoints = 3  # the newest this many are kept
  config.checkpoint_every_epochs = 10  # epochs since the last checkpoint (0 disables this trigger)
  config.checkpoint_every_seconds = 600.0  # wall seconds since the last checkpoint (0 disables this trigger)
  # "DIR" or "DIR:EPOCH": when --workdir has no checkpoint of its own, start from that workdir's checkpoint of EPOCH
  # (without it, its latest good one); "" = start afresh.
  config.resume_from = ""
  # The records also as TensorBoard event files in the workdir (nc_jax.events): tensorboard --logdir DIR
  config.tensorboard = True

  # --- devices
  config.num_devices = 0  # 0 = every device of every process; n = the first n (tests)
  config.epoch_loop = "auto"  # "scan" (one lax.scan per epoch), "steps" (host loop; auto on CPU for conv nets)
  return config


def mlp_variant(config: ml_collections.ConfigDict, variant: str, config_file: str,
                **smoke_overrides: Any) -> ml_collections.ConfigDict:
  """The variants of the MLP config files: '' (``config`` as built) or 'smoke' (the few-second run the tests
  make of each: 6 epochs, width 32, measured at epochs 1, 3 and 6, 8 DeepFool inputs, then
  ``smoke_overrides``); anything else is refused naming ``config_file``."""
  if variant == "smoke":
    config.num_epochs = 6
    config.model_options.width = 32
    config.measure_epochs = (1, 3, 6)
    config.deepfool_samples = 8
    config.update(smoke_overrides)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of {config_file}; choose '' or 'smoke'")
  return config


# ----------------------------------------------------------------------- validation
_REFERENCE = base_config(dataset="mnist1d", data_source="generated", model="mlp")  # the keys and their defaults
_KEYS = tuple(_REFERENCE.keys())
_MAX_SEED = 2**63 - 1  # jax.random.PRNGKey takes a C long


def _fail(key: str, value: Any, requirement: str):
  raise ConfigError(f"config.{key} = {value!r}: {requirement}")


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(key: str, value, minimum: int, maximum: Optional[int] = None, note: str = "") -> None:
  bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
  if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
    _fail(key, value, f"must be an integer {bound}{note}")


def _real(key: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
          high_open: bool = False, note: str = "") -> None:
  """A finite number within the bounds; ints count (a config file may write lr = 1)."""
  if high == math.inf:
    bound = f"> {low:g}" if low_open else f">= {low:g}"
  else:
    bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  ok = (_is_real(value) and math.isfinite(value) and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high))
  if not ok:
    _fail(key, value, f"must be a finite number {bound}{note}")


def _choice(key: str, value, choices: tuple[str, ...], note: str = "") -> None:
  if not isinstance(value, str) or value not in choices:
    _fail(key, value, f"must be one of {', '.join(repr(c) for c in choices)}{note}")


def _boolean(key: str, value) -> None:
  if not isinstance(value, bool):
    _fail(key, value, "must be True or False")


def _string(key: str, value, note: str = "") -> None:
  if not isinstance(value, str):
    _fail(key, value, f"must be a string{note}")


def _epochs(key: str, value, num_epochs: int, *, ascending: bool, meaning: str) -> None:
  order = "strictly increasing " if ascending else ""
  requirement = f"must be a tuple of {order}integers in [1, num_epochs={num_epochs}], or () for {meaning}"
  if not isinstance(value, (tuple, list)) or not all(_is_int(e) and 1 <= e <= num_epochs for e in value):
    _fail(key, value, requirement)
  if ascending and any(a >= b for a, b in zip(value, value[1:])):
    _fail(key, value, requirement)


def parse_per_class(value) -> Union[int, str, None]:
  """``config.per_class`` as nc_jax.data takes it: an int >= 1, 'paper' or None (every example).

  The command line gives strings ('500', 'None', 'none', 'paper'); they read as the value they spell. Anything
  else raises ConfigError naming the key.
  """
  if value is None or value == "paper":
    return value
  if isinstance(value, str) and value.lower() == "none":
    return None
  if isinstance(value, str) and value.isdigit():
    value = int(value)
  if not _is_int(value) or value < 1:
    _fail("per_class", value, "must be an integer >= 1 (examples per class), 'paper' (the paper's counts) or None "
          "(every example, unbalanced)")
  return int(value)


def _resume_from(value) -> None:
  _string("resume_from", value, ": '' (off), 'DIR' or 'DIR:EPOCH'")
  if ":" not in value:
    return
  directory, _, epoch = value.rpartition(":")
  if not directory or not epoch.isdigit() or int(epoch) < 1:
    _fail("resume_from", value, "must be '' (off), 'DIR' (its latest good checkpoint) or 'DIR:EPOCH' with EPOCH an "
          "integer >= 1 (a workdir whose name holds ':' cannot be named here: link it under another name)")


def _option(model: str, name: str, value, default) -> None:
  key = f"model_options.{name}"
  minimum = _OPTION_MINIMUM.get(name, 1)
  if name in OPTIONAL_OPTIONS:
    if value is not None:
      _integer(key, value, minimum, note=f", or None ({model} decides)")
  elif isinstance(default, bool):
    _boolean(key, value)
  elif isinstance(default, int):
    _integer(key, value, minimum)
  elif isinstance(default, float):
    _real(key, value, 0.0, low_open=True)
  elif name == "stem":
    _choice(key, value, STEMS)
  elif isinstance(default, str):
    _string(key, value)
  elif name == "config":  # VGG's layer list
    if (not isinstance(value, (tuple, list)) or not value
        or not all(e == VGG_POOL or (_is_int(e) and e >= 1) for e in value)):
      _fail(key, value, f"must be a non-empty tuple of conv widths (integers >= 1) and {VGG_POOL!r} (a max-pool), "
            f"e.g. --config.{key}=\"(64,'M',128,'M')\"")
  elif isinstance(default, tuple):
    if not isinstance(value, (tuple, list)) or not value or not all(_is_int(e) and e >= minimum for e in value):
      _fail(key, value, f"must be a non-empty tuple of integers >= {minimum}, e.g. --config.{key}=\"{default}\"")
  else:  # a default of a kind the checks above do not know: the table and this function are out of step
    raise TypeError(f"nc_jax.schema has no check for option {name!r} = {default!r}")
  if name == "compression" and value > 1:
    _fail(key, value, "must be in (0, 1] (the fraction of channels a DenseNet transition keeps)")


def _model_options(model: str, options) -> None:
  if not isinstance(options, Mapping) and not isinstance(options, ml_collections.ConfigDict):
    _fail("model_options", options, f"must be a ConfigDict of {model}'s options (nc_jax.schema.model_options_for({model!r}))")
  declared = MODEL_OPTIONS[model]
  for name in options.keys():
    if name not in declared:
      _fail(f"model_options.{name}", options[name],
            f"not an option of {model} (its options: {', '.join(declared)}); model_options come with the config "
            f"file's model, so for another model use a config file of it or nc_jax.schema.model_options_for({model!r})")
  for name, default in declared.items():
    if name not in options.keys():
      raise ConfigError(f"config.model_options.{name} is missing: declare every option of {model} "
                        f"(build model_options with nc_jax.schema.model_options_for({model!r}, ...))")
    _option(model, name, options[name], default)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line: key, what is wrong, the fix) for the first value the trainer cannot use.

  Checks every key's type and range, the choices (dataset, source, model and its options, loss, ...), the
  epochs lists against num_epochs, and that the config has exactly the keys of ``base_config``. Checks that
  need the data (sizes) are ``validate_sizes``'s.
  """
  keys = list(config.keys())
  for key in keys:
    if key not in _KEYS:
      close = difflib.get_close_matches(key, _KEYS, n=1)
      hint = f"did you mean {close[0]!r}? " if close else ""
      _fail(key, config[key], f"not a config key; {hint}the keys are nc_jax.schema.base_config's")
  for key in _KEYS:
    if key not in keys:
      default = {"model_options": "nc_jax.schema.model_options_for(model)",
                 "nc": "nc_jax.schema.nc_config()"}.get(key, repr(_REFERENCE[key]))
      raise ConfigError(f"config.{key} is missing: add it (default: config.{key} = {default}); "
                        "nc_jax.schema.base_config declares every key")
  c = {key: config[key] for key in keys}
  for check in (_data, _model, _optimisation, _measurement):
    check(c)


def _data(c: dict) -> None:
  """The data keys: which examples, which labels, how they are read."""
  _choice("dataset", c["dataset"], DATASETS)
  _choice("data_source", c["data_source"], DATA_SOURCES)
  if c["dataset"] not in GENERATED_DATASETS and c["data_source"] == "generated":
    _fail("data_source", c["data_source"], f"only {' and '.join(GENERATED_DATASETS)} are generated; for "
          f"{c['dataset']} choose 'tfds'" + (" or 'idx'" if c["dataset"] in IDX_DATASETS else ""))
  if c["dataset"] not in GENERATED_DATASETS and c["data_source"] == "idx" and c["dataset"] not in IDX_DATASETS:
    _fail("data_source", c["data_source"], f"'idx' reads MNIST-format files ({', '.join(IDX_DATASETS)}); "
          f"for {c['dataset']} choose 'tfds'")
  _string("data_dir", c["data_dir"], " ('' = the source's default folder)")
  parse_per_class(c["per_class"])
  _choice("standardization", c["standardization"], STANDARDIZATIONS)
  _integer("data_seed", c["data_seed"], 0, _MAX_SEED)
  _choice("imbalance", c["imbalance"], IMBALANCES)
  _real("imbalance_ratio", c["imbalance_ratio"], 1.0, note=" (largest class / smallest class)")
  _integer("minority_classes", c["minority_classes"], 0, note=" (0 = half the classes)")
  _real("random_label_fraction", c["random_label_fraction"], 0.0, 1.0)
  _choice("input_pipeline", c["input_pipeline"], INPUT_PIPELINES)
  _integer("input_workers", c["input_workers"], 0, note=" (0 = decode in the training process)")
  if c["imbalance"] != "none" and parse_per_class(c["per_class"]) is None:
    _fail("per_class", c["per_class"], f"imbalance={c['imbalance']!r} needs the largest class's count: set "
          "per_class to an integer or 'paper'")


def _model(c: dict) -> None:
  """The model, its options and the dtypes it computes in."""
  _choice("model", c["model"], MODELS)
  _model_options(c["model"], c["model_options"])
  _choice("compute_dtype", c["compute_dtype"], COMPUTE_DTYPES)
  _choice("eval_dtype", c["eval_dtype"], EVAL_DTYPES, note=" ('same' = compute_dtype)")


def _optimisation(c: dict) -> None:
  """The loss, the optimiser and its schedule."""
  _choice("loss", c["loss"], LOSSES)
  _integer("num_epochs", c["num_epochs"], 1)
  _integer("batch_size", c["batch_size"], 1)
  _real("lr", c["lr"], 0.0, low_open=True)
  _real("momentum", c["momentum"], 0.0, 1.0, high_open=True)
  _real("weight_decay", c["weight_decay"], 0.0)
  _real("lr_decay_factor", c["lr_decay_factor"], 0.0, low_open=True, note=" (0.1 = the paper's; 1 = no decay)")
  _epochs("lr_decay_epochs", c["lr_decay_epochs"], c["num_epochs"], ascending=True,
          meaning="the paper's (num_epochs // 3, 2 * num_epochs // 3)")
  _integer("seed", c["seed"], 0, _MAX_SEED)
  _choice("optimizer", c["optimizer"], OPTIMIZERS)
  betas = c["adam_betas"]
  if (not isinstance(betas, (tuple, list)) or len(betas) != 2
      or not all(_is_real(b) and 0 <= b < 1 for b in betas)):
    _fail("adam_betas", betas, "must be a pair (beta1, beta2) of numbers in [0, 1), e.g. \"(0.9,0.999)\"")
  _real("adam_eps", c["adam_eps"], 0.0, low_open=True)
  _real("feature_decay", c["feature_decay"], 0.0, note=" (lambda_H; 0 = off)")


def _measurement(c: dict) -> None:
  """What is measured, when checkpoints are kept, and on which devices."""
  _epochs("measure_epochs", c["measure_epochs"], c["num_epochs"], ascending=False,
          meaning="the notebook's schedule")
  _real("tpt_threshold", c["tpt_threshold"], 0.0, 1.0, low_open=True, note=" (a training accuracy)")
  _integer("eval_batch_size", c["eval_batch_size"], 1)
  _boolean("per_layer_nc", c["per_layer_nc"])
  _integer("deepfool_samples", c["deepfool_samples"], 0, note=" (0 = off)")
  _nc(c["nc"])

  # checkpoints
  _integer("keep_checkpoints", c["keep_checkpoints"], 1)
  _integer("checkpoint_every_epochs", c["checkpoint_every_epochs"], 0, note=" (0 = no epoch cadence)")
  _real("checkpoint_every_seconds", c["checkpoint_every_seconds"], 0.0, note=" (0 = no time cadence)")
  _resume_from(c["resume_from"])
  _boolean("tensorboard", c["tensorboard"])

  # devices
  _integer("num_devices", c["num_devices"], 0, note=" (0 = every device)")
  _choice("epoch_loop", c["epoch_loop"], EPOCH_LOOPS)


def _nc(group) -> None:
  """config.nc: exactly the conventions of ``NC_OPTIONS``, each a value ``nc_jax.metrics.NCOptions`` takes."""
  if not isinstance(group, (Mapping, ml_collections.ConfigDict)):
    _fail("nc", group, "must be a ConfigDict of the metric conventions (nc_jax.schema.nc_config())")
  for name in group.keys():
    if name not in NC_OPTIONS:
      close = difflib.get_close_matches(name, NC_OPTIONS, n=1)
      hint = f"did you mean nc.{close[0]}? " if close else ""
      _fail(f"nc.{name}", group[name], f"not a metric convention; {hint}the conventions are {', '.join(NC_OPTIONS)}")
  for name in NC_OPTIONS:
    if name not in group.keys():
      raise ConfigError(f"config.nc.{name} is missing: declare every convention (build config.nc with "
                        f"nc_jax.schema.nc_config(); default: {NC_OPTIONS[name]!r})")
  _choice("nc.global_mean", group["global_mean"], NC_GLOBAL_MEANS,
          note=" ('class_means': the mean of the class means, the notebook's; 'samples': of every feature)")
  _choice("nc.solver", group["solver"], NC_SOLVERS, note=" ('gram' is faster for many classes; 'auto' is 'svd' on CPU and the "
          "accelerator path on GPU/TPU)")
  if group["rcond"] is not None:
    _real("nc.rcond", group["rcond"], 0.0, note=", or None (max(C, p) x machine epsilon)")
  for name in ("divide_nc1_by_classes", "self_duality_squared", "ncc_use_bias"):
    _boolean(f"nc.{name}", group[name])
  _integer("nc.std_ddof", group["std_ddof"], 0, note=" (1: unbiased, the notebook's; 0: population)")
  if group["min_count"] is not None:
    _integer("nc.min_count", group["min_count"], 0, note=", or None (every class is measured)")


def validate_sizes(config: ml_collections.ConfigDict, *, num_train: int, num_test: int, num_devices: int) -> None:
  """Raises ConfigError for sizes that do not fit the loaded data and the mesh (after ``validate``).

  num_train / num_test: examples in the (balanced) training set and the test set; num_devices: the mesh's size.
  Training batches (batch_size) and eval batches (eval_batch_size; the last one is padded, so N need not divide)
  are split along the mesh, so both must be multiples of the device count.
  """
  if config.num_devices and config.num_devices != num_devices:
    _fail("num_devices", config.num_devices, f"only {num_devices} devices are visible; set 0 (all) or at most "
          f"{num_devices}")

  def multiple(key: str, value: int) -> None:
    if value % num_devices:
      lower, upper = value // num_devices * num_devices, -(-value // num_devices) * num_devices
      choices = f"{lower} or {upper}" if lower else f"{upper}"
      _fail(key, value, f"must be a multiple of the {num_devices} devices it is split over, e.g. {choices}")

  multiple("batch_size", config.batch_size)
  if config.batch_size > num_train:
    largest = num_train // num_devices * num_devices
    _fail("batch_size", config.batch_size, f"the training set has only {num_train} examples; " + (
        f"choose at most {largest} (or more per_class)" if largest else
        f"that is fewer than the {num_devices} devices: use more per_class or fewer num_devices"))
  multiple("eval_batch_size", config.eval_batch_size)
  if config.deepfool_samples > num_test:
    _fail("deepfool_samples", config.deepfool_samples, f"the test set has only {num_test} examples; choose at most "
          f"{num_test} (0 = off)")


# ------------------------------------------------------------------- keys that leave results alone
# Keys that say how a run is kept, not what it computes: changing them between a run and its rerun leaves the
# results as they are. ``changed_keys`` and ``config_digest`` ignore them (a workdir resumes under a new value,
# a launcher comparing a workdir's config.json with a new command may ignore them).
OPERATIONAL_KEYS = ("keep_checkpoints", "checkpoint_every_epochs", "checkpoint_every_seconds", "resume_from",
                    "input_workers", "tensorboard")
# Keys the compiled functions (model, steps, evaluation) never read: the operational ones, and what a run does
# around those functions (which epochs it measures, where TPT starts, how many DeepFool inputs, which folder
# the data come from). They may change a run's records, so a changed value is still a changed config; the
# trainer caches its program on the config without them, and a mid-epoch checkpoint resumes across them
# (training.program's run digest).
PROGRAM_NEUTRAL_KEYS = OPERATIONAL_KEYS + ("measure_epochs", "tpt_threshold", "deepfool_samples", "data_dir")


# Keys that say which examples a run trains and is measured on, with which labels: a --resume_from may not change
# them (its records so far came from the source's data), unlike the lr, the schedule or what is measured.
DATA_KEYS = ("dataset", "data_source", "per_class", "standardization", "data_seed", "imbalance", "imbalance_ratio",
             "minority_classes", "random_label_fraction")


def data_changes(previous: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' for each of ``DATA_KEYS`` where ``requested`` reads other data than ``previous`` (an older
  config.json read with today's defaults; 1.0 and 1 are the same value)."""
  previous, requested = fill_defaults(previous), fill_defaults(requested)
  return [f"{k}: {previous[k]!r} -> {requested[k]!r}" for k in DATA_KEYS
          if _canonical(previous[k]) != _canonical(requested[k])]


def fill_defaults(values: Mapping[str, Any]) -> dict:
  """A config as JSON-ready values (e.g. an older run's config.json) with every key it lacks at its default.

  Top-level keys come from ``base_config``; model options the dict lacks, at its model's defaults (for a known
  model). Values it has are kept as they are.
  """
  filled = dict(values)
  for key, default in json.loads(_REFERENCE.to_json()).items():
    filled.setdefault(key, default)
  if filled["model"] in MODEL_OPTIONS and isinstance(filled["model_options"], Mapping):
    defaults = json.loads(model_options_for(filled["model"]).to_json())
    filled["model_options"] = {**defaults, **filled["model_options"]}
  if isinstance(filled["nc"], Mapping):  # conventions a later version added, at their defaults
    filled["nc"] = {**NC_OPTIONS, **filled["nc"]}
  return filled


def changed_keys(previous: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
  """Top-level keys whose values differ in a way that changes a run's results.

  ``previous`` (e.g. an older config.json) is read with today's defaults for the keys
  it lacks; ``OPERATIONAL_KEYS`` (checkpointing, resume_from) never count.
  """
  previous = fill_defaults(previous) if "model" in previous and "model_options" in previous else dict(previous)
  return sorted(k for k in set(previous) | set(requested)
                if k not in OPERATIONAL_KEYS and previous.get(k) != requested.get(k))


def _canonical(value):
  """JSON values with integral floats as ints (1.0 and 1 are the same lr, as ``changed_keys`` compares them)."""
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, Mapping):
    return {k: _canonical(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_canonical(v) for v in value]
  return value


def non_default_nc(group: Mapping[str, Any]) -> dict:
  """The conventions of a config.nc (plain values) that differ from ``NC_OPTIONS`` (1 and 1.0 the same): what the
  digests hold of the group, so a run at the defaults keeps the digests it had before config.nc existed."""
  return {k: v for k, v in _canonical(dict(group)).items() if k not in NC_OPTIONS or v != _canonical(NC_OPTIONS[k])}


def config_digest(values: Mapping[str, Any]) -> str:
  """sha256 of what makes a run's results: every key but ``OPERATIONAL_KEYS``, each left out where it has its
  default (model options at their model's), so a key added by a later version at its default, or a default made
  explicit, leaves the digest as it was. Two configs have the same digest exactly when ``changed_keys`` finds
  no key between them. Each checkpoint carries the digest of the config that wrote it (training.resume)."""
  filled = _canonical(fill_defaults(values) if "model" in values and "model_options" in values else dict(values))
  reference = _canonical(json.loads(_REFERENCE.to_json()))
  kept = {k: v for k, v in filled.items() if k not in OPERATIONAL_KEYS and (k not in reference or v != reference[k])}
  if isinstance(filled.get("model_options"), Mapping) and filled.get("model") in MODEL_OPTIONS:
    defaults = _canonical(json.loads(model_options_for(filled["model"]).to_json()))
    kept["model_options"] = {k: v for k, v in filled["model_options"].items() if k not in defaults or v != defaults[k]}
  if isinstance(kept.get("nc"), Mapping):  # the conventions set away from their defaults, as model_options'
    kept["nc"] = non_default_nc(kept["nc"])
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


__all__ = ["COMPUTE_DTYPES", "ConfigError", "DATASETS", "DATA_KEYS", "DATA_SOURCES", "EPOCH_LOOPS", "EVAL_DTYPES", "IMBALANCES",
           "INPUT_PIPELINES", "LOSSES", "MODELS", "MODEL_OPTIONS", "NC_OPTIONS", "OPERATIONAL_KEYS", "OPTIMIZERS",
           "PROGRAM_NEUTRAL_KEYS", "STANDARDIZATIONS", "STEMS", "base_config", "changed_keys", "config_digest",
           "data_changes", "fill_defaults", "mlp_variant", "model_options_for", "nc_config", "nc_values",
           "non_default_nc", "parse_per_class", "validate", "validate_sizes"]
