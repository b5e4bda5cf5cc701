"""In-graph measurement: eval-mode features of the whole balanced training set -> NC metrics.

One jitted function: forward passes over the train and test sets (device
resident, batched with lax.map), then ``nc_jax.metrics.neural_collapse`` on the
features without leaving the device; only scalars come back to the host.
"""

from __future__ import annotations

import jax.numpy as jnp

from nc_jax import metrics as nc_metrics
from nc_jax import models
from nc_jax.metrics import deepfool
from nc_jax.training import step as step_lib


def evaluate(state: step_lib.TrainState, train_inputs, train_labels, test_inputs, test_labels, deepfool_inputs=None,
             *, model, loss_fn, num_classes: int, batch_size: int, mesh, per_layer: bool = False) -> dict:
  """Scalars: train/test loss and accuracy (eval mode), every NC key, the *_test NC keys,
  and with ``per_layer`` 'layer/<name>/nc1' and 'layer/<name>/ncc_accuracy' for each sown
  layer (conv maps globally average-pooled to (N, channels) first), and with
  ``deepfool_inputs`` (M, ...) 'deepfool_robustness' = mean ||r(x)|| / ||x|| (eval mode)."""
  outputs = step_lib.forward_all(state.variables, train_inputs, model=model, batch_size=batch_size, mesh=mesh,
                                 per_layer=per_layer)
  train_logits, train_features = outputs[:2]
  test_logits, test_features = step_lib.forward_all(state.variables, test_inputs, model=model,
                                                    batch_size=batch_size, mesh=mesh)
  weights, bias = models.classifier_weights(state.params, feature_dim=train_features.shape[-1])
  result = nc_metrics.neural_collapse(train_features, train_labels, num_classes, weights, bias,
                                      test_features=test_features, test_labels=test_labels)
  result["train_loss"], result["train_acc"] = step_lib.mean_loss_and_accuracy(train_logits, train_labels, loss_fn)
  result["test_loss"], result["test_acc"] = step_lib.mean_loss_and_accuracy(test_logits, test_labels, loss_fn)
  if per_layer:
    pooled = {name: jnp.mean(value, axis=tuple(range(1, value.ndim - 1))) if value.ndim > 2 else value
              for name, value in outputs[2].items()}
    for name, layer in nc_metrics.per_layer_collapse(pooled, train_labels, num_classes).items():
      result[f"layer/{name}/nc1"] = layer["nc1"]
      result[f"layer/{name}/ncc_accuracy"] = layer["ncc_accuracy"]
  if deepfool_inputs is not None:
    logits_fn = lambda x: model.apply(state.variables, x[None], train=False)[0][0]
    result["deepfool_robustness"] = deepfool.robustness(logits_fn, deepfool_inputs)
  return result
