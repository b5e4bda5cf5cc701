"""Getting NC inputs out of Flax models: per-layer activations, and (h, W, b) from any model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def apply_with_intermediates(model: nn.Module, variables, inputs: jax.Array, **apply_kwargs):
  """(logits, features, {name: activations}) of an nc-jax model, in eval mode by default.

  The dict holds what the model sowed into 'intermediates' (one entry per
  stage/block/hidden layer), ready for ``nc_jax.metrics.per_layer_collapse``.
  """
  apply_kwargs.setdefault("train", False)
  (logits, features), state = model.apply(variables, inputs, mutable=["intermediates"], **apply_kwargs)
  intermediates = {name: values[0] for name, values in state["intermediates"].items()}
  return logits, features, intermediates


def final_layer_features(model: nn.Module, variables, inputs: jax.Array, dense_name: str, *args: Any,
                         **apply_kwargs):
  """Features h (B, p), W (C, p) and b (C,) of any Flax model whose classifier is an nn.Dense.

  ``dense_name`` names the final Dense submodule (its last path component, e.g.
  'head' or 'classifier'). Its input is recorded with ``nn.intercept_methods``
  while the model runs; W and b are read from the Dense's params. Jittable.
  """
  captured = {}

  def record_input(next_fun, call_args, call_kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and module.name == dense_name and context.method_name == "__call__":
      captured["features"] = call_args[0]
      captured["path"] = module.scope.path
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record_input):
    model.apply(variables, inputs, *args, **apply_kwargs)
  if "features" not in captured:
    raise ValueError(f"the model ran no nn.Dense named {dense_name!r}; name its final Dense layer")
  params = variables["params"]
  for name in captured["path"]:
    params = params[name]
  features = captured["features"].reshape((captured["features"].shape[0], -1))
  bias = params["bias"] if "bias" in params else jax.numpy.zeros((params["kernel"].shape[-1],))
  return features, params["kernel"].T, bias
