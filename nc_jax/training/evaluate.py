"""In-graph measurement: eval-mode features of the whole balanced training set -> NC metrics.

One jitted function: forward passes over the train and test sets (device
resident, batched with lax.map), then ``nc_jax.metrics.neural_collapse`` on the
features without leaving the device; only scalars come back to the host.

The measurement computes in float32 whatever the training precision (``eval_dtype``, config.eval_dtype):
the trained params (float32 under mixed precision too) go through a float32 copy of the model, because
NC1 near collapse is a ratio of a tiny within-class spread to a large between-class spread, and bf16
(8 significant bits) rounds every activation by up to 2^-8 of its size: a within-class spread of that
order appears where the net has none, and NC1 cannot fall below ~(2^-8 |h| / between-class spread)^2
(tests/test_eval_dtype.py: a collapsed net's NC1 is 6e-12 in float32, 2e-6 measured in bf16).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nc_jax import metrics as nc_metrics
from nc_jax import models
from nc_jax.metrics import deepfool, engine, imbalance
from nc_jax.metrics.options import NCOptions
from nc_jax.names import EVAL_DTYPES
from nc_jax.training import step as step_lib

# The NC suite logged per stage: NC1 (three forms), NC2 of the class means, NC4 as NCC accuracy. NC3
# (self-duality) and the NCC mismatch need a classifier, which only the penultimate layer (the main keys) has.
PER_LAYER_KEYS = ("nc1", "nc1_tirer", "cdnv", "equinorm_means", "equiangular_means", "max_angle_means",
                  "etf_deviation_means", "ncc_accuracy")
# nc_jax.metrics.mse_decomposition's terms -> their logged keys.
MSE_KEYS = {"lnc1": "mse_lnc1", "lnc23": "mse_lnc23", "lperp": "mse_lperp", "mse_loss": "mse_total"}


def eval_model(model, eval_dtype: str = "float32"):
  """The module the measurement runs: ``model`` computing in ``eval_dtype`` ('same': ``model`` itself).

  nc-jax models keep params and BatchNorm statistics in float32 whatever their compute ``dtype``, so the
  copy (``model.clone(dtype=...)``, a flax dataclass) takes the trained variables as they are: a bf16-trained
  net is measured as the float32 net of the same parameters.
  """
  if eval_dtype not in EVAL_DTYPES:
    raise ValueError(f"eval_dtype={eval_dtype!r}: choose one of {', '.join(EVAL_DTYPES)}")
  if eval_dtype == "same":
    return model
  if not hasattr(model, "dtype"):
    raise ValueError(f"eval_dtype={eval_dtype!r} needs a model with a compute `dtype` field (every nc_jax.models "
                     f"model has one); {type(model).__name__} has none: pass eval_dtype='same'")
  if jnp.dtype(model.dtype) == jnp.dtype(eval_dtype):
    return model  # the same module, so jitted functions of it are not traced again
  return model.clone(dtype=jnp.dtype(eval_dtype))


@dataclasses.dataclass(frozen=True)
class Measurement:
  """What a run measures and how: one frozen (hashable) value, the static half of ``evaluate``.

  model: the trained module (its forward passes run ``eval_model(model, eval_dtype)``);
  loss_fn: (logits (B, C), labels (B,)) -> (B,) losses; num_classes: C; batch_size: the forward passes' batch;
  mesh: the devices that share the batches and, beyond C = 256, the pair statistics' tiles (or None);
  per_layer: also the NC keys of every sown layer; mse_weight_decay: lam of an MSE run's decomposition
  (None: no decomposition); minority_classes: the minority of an imbalanced run (() if balanced);
  eval_dtype: config.eval_dtype; options: the metric conventions (config.nc).
  """

  model: Any
  loss_fn: Callable
  num_classes: int
  batch_size: int = 256
  mesh: Any = None
  per_layer: bool = False
  mse_weight_decay: float | None = None
  minority_classes: tuple = ()
  eval_dtype: str = "float32"
  options: NCOptions = NCOptions()

  @property
  def needs_every_feature(self) -> bool:
    """Whether a key needs the whole feature matrix at once (per layer, the MSE decomposition, the minority
    keys): such a measurement runs in memory only (``StreamedEvaluator`` refuses it)."""
    return bool(self.per_layer or self.mse_weight_decay is not None or self.minority_classes)


def deepfool_keys(model, variables, inputs) -> dict:
  """'deepfool_robustness' = mean ||r(x)|| / ||x|| over ``inputs`` (M, ...) and 'deepfool_unfooled' (the
  fraction whose decision never changed), of ``model`` (the measured module, ``eval_model``) in eval mode."""
  logits_fn = lambda x: model.apply(variables, x[None], train=False)[0][0]
  robustness, unfooled = deepfool.robustness_and_failures(logits_fn, inputs)
  return {"deepfool_robustness": robustness, "deepfool_unfooled": unfooled}


def evaluate(state: step_lib.TrainState, train_inputs, train_labels, test_inputs, test_labels, deepfool_inputs=None,
             *, measurement: Measurement) -> dict:
  """Scalars: train/test loss and accuracy (eval mode), every NC key, the *_test NC keys, and:

  every NC call (the main suite, its *_test keys, each layer's) measures with the conventions
  ``measurement.options`` (config.nc); the MSE decomposition and the minority keys have none to choose and
  keep every class;

  every forward pass (features, logits, per-layer activations, DeepFool) runs
  ``eval_model(measurement.model, measurement.eval_dtype)``: float32 by default whatever the compute dtype;

  with ``per_layer``, 'layer/<name>/<key>' for each sown layer and each key of ``PER_LAYER_KEYS``
  (conv maps globally average-pooled to (N, channels) first);
  with ``mse_weight_decay`` lam (MSE runs), Han et al.'s split of the last layer's regularised MSE on
  the training features, 'mse_total' = 0.5 [(1/N) sum ||W h + b - e_y||^2 + (lam/2)(||W||^2 + ||b||^2)]
  = 'mse_lnc1' + 'mse_lnc23' + 'mse_lperp' (``nc_jax.metrics.mse_decomposition``; the total is computed
  from the samples, so the sum is a check);
  with ``minority_classes`` (imbalanced runs), ``nc_jax.metrics.imbalance.minority_collapse``'s keys
  (cosines of the minority's and majority's classifier rows and centred means, per-class norms for C <= 100);
  with ``deepfool_inputs`` (M, ...) 'deepfool_robustness' = mean ||r(x)|| / ||x|| (eval mode).

  Arrays: train_inputs (N, ...), train_labels (N,), test_inputs (M, ...), test_labels (M,), on device."""
  m = measurement
  model = eval_model(m.model, m.eval_dtype)
  outputs = step_lib.forward_all(state.variables, train_inputs, model=model, batch_size=m.batch_size, mesh=m.mesh,
                                 per_layer=m.per_layer)
  train_logits, train_features = outputs[:2]
  test_logits, test_features = step_lib.forward_all(state.variables, test_inputs, model=model,
                                                    batch_size=m.batch_size, mesh=m.mesh)
  weights, bias = models.classifier_weights(state.params, feature_dim=train_features.shape[-1],
                                            num_classes=m.num_classes)
  result = nc_metrics.neural_collapse(train_features, train_labels, m.num_classes, weights, bias,
                                      test_features=test_features, test_labels=test_labels,
                                      pair_mesh=m.mesh, options=m.options)  # beyond C = 256 the devices share the tiles
  result["train_loss"], result["train_acc"] = step_lib.mean_loss_and_accuracy(train_logits, train_labels, m.loss_fn)
  result["test_loss"], result["test_acc"] = step_lib.mean_loss_and_accuracy(test_logits, test_labels, m.loss_fn)
  if m.per_layer:
    pooled = {name: jnp.mean(value, axis=tuple(range(1, value.ndim - 1))) if value.ndim > 2 else value
              for name, value in outputs[2].items()}
    for name, layer in nc_metrics.per_layer_collapse(pooled, train_labels, m.num_classes, options=m.options).items():
      result |= {f"layer/{name}/{key}": layer[key] for key in PER_LAYER_KEYS}
  if m.mse_weight_decay is not None:
    terms = nc_metrics.mse_decomposition(train_features, train_labels, m.num_classes, weights, bias,
                                         m.mse_weight_decay)
    result |= {logged: terms[key] for key, logged in MSE_KEYS.items()}
  if m.minority_classes:
    result |= imbalance.minority_collapse(train_features, train_labels, m.num_classes, weights, m.minority_classes,
                                          per_class=m.num_classes <= 100)
  if deepfool_inputs is not None:
    result |= deepfool_keys(model, state.variables, deepfool_inputs)
  return result


class StreamedEvaluator:
  """The measurement of ``evaluate`` from batches, for sets that are not on the device (``input_pipeline='stream'``).

  ``nc_jax.metrics.engine.measure`` over the training batches (eval mode, BatchNorm running averages), as the
  notebook: pass 1 class means (masked padding rows), then ``finalize_class_means`` with W, b in units of the
  largest |class mean| (``neural_collapse``'s first round); pass 2 deviations from those means, loss and correct
  counts -> ``finalize_collapse``; and one pass over the test batches: deviations from the *training* geometry
  -> ``finalize_transfer`` (the ``*_test`` keys), loss and accuracy. Keys: those of ``evaluate`` without
  per-layer, MSE-decomposition and minority keys (which need every feature at once); train/test loss and
  accuracy are means over the set. Each batch's features leave the jitted forward only as the accumulators'
  sums; nothing of size N is kept. ``batches(split)`` yields (inputs (B, ...), labels (B,), mask (B,)) sharded
  along 'data'. The forward passes run ``eval_model(model, eval_dtype)``, float32 by default, as ``evaluate``'s.
  """

  def __init__(self, measurement: Measurement):
    """``measurement``: what to measure (its ``mesh``: the devices that share the pair statistics' tiles,
    ``geometry.pair_sums``); one without ``needs_every_feature`` (batch_size is the batches' own)."""
    if measurement.needs_every_feature:
      raise ValueError("per-layer, MSE-decomposition and minority keys need every feature at once: measure them "
                       "with evaluate (in memory), not from streamed batches")
    self.measurement = measurement
    model = eval_model(measurement.model, measurement.eval_dtype)
    # One function object per evaluator, so the engine's cached steps compile once for it.
    self._apply = lambda variables, inputs: model.apply(variables, inputs, train=False)
    self._classifier = jax.jit(functools.partial(models.classifier_weights, num_classes=measurement.num_classes),
                               static_argnames="feature_dim")
    self._deepfool = jax.jit(functools.partial(deepfool_keys, model))

  def __call__(self, state: step_lib.TrainState, batches, feature_dim: int, deepfool_inputs=None) -> dict:
    """The measurement; with ``deepfool_inputs`` (M, ...) on device also deepfool_robustness / _unfooled."""
    weights, bias = self._classifier(state.params, feature_dim=feature_dim)
    m = self.measurement
    result = engine.measure(self._apply, state.variables, lambda: batches("train"), m.num_classes,
                            weights=weights, bias=bias, test_batches=lambda: batches("test"), loss_fn=m.loss_fn,
                            options=m.options, mesh=m.mesh, feature_dim=feature_dim, track_max_abs=False)
    if deepfool_inputs is not None:
      result |= self._deepfool(state.variables, deepfool_inputs)
    return result
