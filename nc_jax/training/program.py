"""A validated config -> its model, data and compiled functions: what training and ``nc_jax.collect`` share.

``build_program`` makes the model, the lr schedule, the optimizer and the jitted init / train step / train
epoch / in-memory evaluation of a config, cached on ``program_key(config)``: the config without
``schema.PROGRAM_NEUTRAL_KEYS`` as a hashable frozen value, so reruns in one process (and configs that differ
only in what the compiled functions never read) reuse the compiled code. ``load_dataset`` gives a run's data,
``streamed_evaluator`` its measurement over streamed batches. Neither imports the training loop.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import types
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nc_jax import data, models, schema
from nc_jax.data import device, stream as stream_lib
from nc_jax.metrics.options import NCOptions
from nc_jax.training import evaluate as evaluate_lib, schedule, step as step_lib

CACHE_SIZE = 4  # programs kept compiled per process (a sweep in one process reuses them)


class Program(NamedTuple):
  """What a config compiles to: the model, its lr schedule, and the jitted functions of a run."""

  model: Any
  learning_rate: Any
  init: Any
  abstract_state: Any
  train_epoch: Any
  evaluate: Any
  all_finite: Any
  train_step: Any  # jitted (state, (inputs (B, ...), labels (B,))) -> (state, sums), state donated
  measurement: evaluate_lib.Measurement  # what ``evaluate`` (and a streamed run's evaluator) measures


# ------------------------------------------------------------------ the config as values

def config_values(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (lists, dicts): what config.json holds and ``schema.config_digest`` reads."""
  return json.loads(config.to_json_best_effort())


def program_values(config: ml_collections.ConfigDict) -> dict:
  """The keys the compiled functions depend on: every key but ``schema.PROGRAM_NEUTRAL_KEYS``."""
  return {k: v for k, v in config.to_dict().items() if k not in schema.PROGRAM_NEUTRAL_KEYS}


def _freeze(value):
  """A hashable copy: mappings become sorted tuples of (key, value) pairs, lists and tuples become tuples."""
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


def program_key(config: ml_collections.ConfigDict) -> tuple:
  """``program_values`` frozen: equal exactly when two configs compile to the same functions."""
  return _freeze(program_values(config))


def run_digest(config: ml_collections.ConfigDict) -> str:
  """sha256 of the program keys as sorted JSON: a mid-epoch checkpoint carries it and is resumed only under a
  config of the same digest (every checkpoint also carries ``schema.config_digest`` of the whole config).

  Of config.nc only the conventions set away from their defaults count (``schema.non_default_nc``; the group
  is left out when none is): a run at the defaults keeps the digest its checkpoints carried before the group."""
  values = {k: v for k, v in config_values(config).items() if k not in schema.PROGRAM_NEUTRAL_KEYS}
  if "nc" in values:
    values["nc"] = schema.non_default_nc(values["nc"])
    if not values["nc"]:
      del values["nc"]
  return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def nc_options(config) -> NCOptions:
  """The metric conventions of a run: ``config.nc`` (a ConfigDict, or the program keys' plain dict) as the
  ``NCOptions`` every measurement of it uses; a config without the group (an older config.json): the defaults."""
  return NCOptions(**schema.nc_values(config))


# ------------------------------------------------------------------ devices and data

def data_mesh(config) -> jax.sharding.Mesh:
  """The data-parallel mesh: config.num_devices devices, or every device (0; always so on several processes)."""
  if config.num_devices and jax.process_count() > 1:
    raise schema.ConfigError(f"config.num_devices = {config.num_devices}: must be 0 (every device) in a "
                             f"multi-process run ({jax.process_count()} processes)")
  return device.data_mesh(jax.devices()[: config.num_devices] if config.num_devices else None)


def deepfool_indices(config, num_test: int):
  """The test examples DeepFool measures: config.deepfool_samples of the num_test, drawn with config.seed and
  sorted (M,) int, or None when it is 0."""
  if not config.deepfool_samples:
    return None
  return np.sort(np.random.default_rng(config.seed).choice(num_test, config.deepfool_samples, replace=False))


def pipeline(config) -> str:
  """'memory' or 'stream': ``config.input_pipeline``, with 'auto' decided by the size of the data it keeps."""
  return stream_lib.choose_pipeline(config.input_pipeline, config.dataset, schema.parse_per_class(config.per_class))


def load_dataset(config: ml_collections.ConfigDict, kind: str = ""):
  """A run's data as training loads it: the in-memory ``data.Dataset``, or a ``stream.StreamedDataset`` (same
  subset and statistics, read batch by batch) where the run streams (``kind``, default ``pipeline(config)``:
  ``config.input_pipeline``, whose 'auto' streams what does not fit in memory)."""
  common = dict(source=config.data_source, data_dir=config.data_dir or None,
                per_class=schema.parse_per_class(config.per_class), standardization=config.standardization,
                seed=config.data_seed, imbalance=config.imbalance, imbalance_ratio=config.imbalance_ratio,
                minority_classes=config.minority_classes, random_label_fraction=config.random_label_fraction)
  if (kind or pipeline(config)) == "stream":
    return stream_lib.open_dataset(config.dataset, worker_count=config.input_workers, **common)
  return data.load(config.dataset, **common)


def minority_classes(config, num_classes: int) -> tuple:
  """The classes an imbalanced run keeps fewer of (the last minority_classes, or the last half); () if balanced."""
  if config.imbalance == "none" or config.imbalance_ratio == 1:
    return ()
  return tuple(range(num_classes - (config.minority_classes or num_classes // 2), num_classes))


# ------------------------------------------------------------------ program

_CACHE: collections.OrderedDict = collections.OrderedDict()


def build_program(config: ml_collections.ConfigDict, mesh, num_classes: int, input_shape: tuple,
                  steps_per_epoch: int, num_train: int = 0) -> Program:
  """A config's ``Program`` (model, lr schedule, jitted init/steps/evaluation, the state's abstract shapes
  with their shardings on ``mesh``), cached per (``program_key``, mesh, shapes). input_shape is one example's
  (no batch axis); num_train (N, the training set's size) scales feature_decay's penalty, needed only with it.

  The functions are built from ``program_values`` alone, so a cached program never depends on a neutral key.
  """
  values = program_values(config)
  key = (_freeze(values), mesh, num_classes, tuple(input_shape), steps_per_epoch, num_train)
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  program = _compile(types.SimpleNamespace(**values), mesh, num_classes, tuple(input_shape), steps_per_epoch,
                     num_train)
  _CACHE[key] = program
  while len(_CACHE) > CACHE_SIZE:
    _CACHE.popitem(last=False)
  return program


def lr_schedule(config, base_lr, steps_per_epoch: int):
  """lr(step) of a run of ``config`` with base lr ``base_lr``: config.lr for a single run, a traced scalar for a
  population member (``training.population``); decayed by config.lr_decay_factor at config.lr_decay_epochs."""
  decay_after = schedule.decay_epochs(config.num_epochs, config.lr_decay_epochs)
  return schedule.learning_rate(base_lr, steps_per_epoch, decay_after, config.lr_decay_factor)


def optimizer(config, learning_rate):
  """The optax optimizer of ``config`` (config.optimizer and its settings) on the schedule ``learning_rate``."""
  return schedule.optimizer(config.optimizer, learning_rate, momentum=config.momentum,
                            weight_decay=config.weight_decay, betas=tuple(config.adam_betas), eps=config.adam_eps)


def epoch_loop(config) -> str:
  """'scan' (one jitted lax.scan per epoch) or 'steps' (the host loops over the jitted step): config.epoch_loop,
  'auto' choosing 'steps' for conv nets on CPU, where XLA:CPU runs convolutions inside a scan ~90x slower
  (step.stepwise_epoch)."""
  if config.epoch_loop != "auto":
    return config.epoch_loop
  return "steps" if jax.default_backend() == "cpu" and config.model != "mlp" else "scan"


def _compile(config, mesh, num_classes: int, input_shape: tuple, steps_per_epoch: int, num_train: int) -> Program:
  """The model, optimizer and jitted functions of ``config`` (the program keys, as attributes)."""
  model = models.create(config.model, num_classes, dtype=jnp.dtype(config.compute_dtype),
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in config.model_options.items()})
  learning_rate = lr_schedule(config, config.lr, steps_per_epoch)
  tx = optimizer(config, learning_rate)
  loss_fn = step_lib.loss_function(config.loss)
  replicated = device.replicated(mesh)
  init = jax.jit(functools.partial(step_lib.create_state, model, tx, input_shape, config.seed),
                 out_shardings=replicated)
  abstract_state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), jax.eval_shape(init))
  train_step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, loss_fn=loss_fn,
                                         feature_decay=config.feature_decay, num_train=num_train), donate_argnums=0)
  if epoch_loop(config) == "scan":
    train_epoch = jax.jit(functools.partial(
        step_lib.train_epoch, model=model, tx=tx, loss_fn=loss_fn, batch_size=config.batch_size,
        seed=config.seed, mesh=mesh, feature_decay=config.feature_decay), donate_argnums=0)
  else:
    train_epoch = functools.partial(
        step_lib.stepwise_epoch,
        draw_batches=jax.jit(functools.partial(device.epoch_batches, seed=config.seed,
                                               batch_size=config.batch_size, mesh=mesh)),
        step=train_step)
  measurement = evaluate_lib.Measurement(
      model=model, loss_fn=loss_fn, num_classes=num_classes, batch_size=config.eval_batch_size, mesh=mesh,
      per_layer=config.per_layer_nc, mse_weight_decay=config.weight_decay if config.loss == "mse" else None,
      minority_classes=minority_classes(config, num_classes), eval_dtype=config.eval_dtype,
      options=nc_options(config))
  evaluate = jax.jit(functools.partial(evaluate_lib.evaluate, measurement=measurement))
  all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(
      tree) if jnp.issubdtype(x.dtype, jnp.inexact)])))
  return Program(model, learning_rate, init, abstract_state, train_epoch, evaluate, all_finite, train_step,
                 measurement)


def streamed_evaluator(config, mesh, dataset, program: Program, deepfool_indices=None):
  """state -> the measurement's dict, from streamed batches (``evaluate.StreamedEvaluator``): two passes over
  the training set, one over the test set; DeepFool on the test examples ``deepfool_indices`` (or none)."""
  evaluator = evaluate_lib.StreamedEvaluator(program.measurement)
  feature_dim = jax.eval_shape(lambda variables: program.model.apply(
      variables, jnp.zeros((1, *dataset.input_shape)), train=False), program.abstract_state.variables)[1].shape[-1]
  deepfool_inputs = None
  if deepfool_indices is not None:
    images = [image for image, _ in dataset.test_source.read(deepfool_indices)]
    deepfool_inputs = device.put_replicated(dataset.transform.batch(images), mesh)

  def batches(split):
    return stream_lib.eval_batches(dataset, split, config.eval_batch_size, mesh=mesh,
                                   worker_count=config.input_workers)

  return lambda state: evaluator(state, batches, feature_dim, deepfool_inputs)


__all__ = ["Program", "build_program", "config_values", "data_mesh", "deepfool_indices", "epoch_loop", "load_dataset", "lr_schedule", "minority_classes",
           "nc_options", "optimizer", "pipeline",
           "program_key", "program_values", "run_digest", "streamed_evaluator"]
