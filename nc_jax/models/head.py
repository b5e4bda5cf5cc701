"""The last layer every nc-jax model ends with, and the initialisers of the reference nets.

The classifier is a plain linear map logits = W h + b with W (C, p) the paper's
W (stored as Flax's (p, C) kernel). ``fixed_etf=True`` replaces W by a frozen
simplex ETF, sqrt(C/(C-1)) U (I - 11^T/C) with U (p, C) orthonormal from a fixed
seed, as in the fixed-ETF-classifier literature; b is still trained.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torchvision's initialisers, in Flax terms.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # ResNet, VGG convs
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # DenseNet convs
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # nn.Linear default


def torch_linear_bias(fan_in: int):
  """nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def simplex_etf_weights(num_classes: int, feature_dim: int, seed: int = 0) -> np.ndarray:
  """W (C, p) = sqrt(C/(C-1)) (I - 11^T/C) U^T: unit-norm rows at cosines -1/(C-1)."""
  if feature_dim < num_classes:
    raise ValueError(f"a fixed simplex ETF classifier needs feature_dim >= num_classes, got {feature_dim} < {num_classes}")
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(feature_dim, num_classes)))
  centring = np.eye(num_classes) - 1.0 / num_classes
  return (np.sqrt(num_classes / (num_classes - 1)) * centring @ basis.T).astype(np.float32)


class Head(nn.Module):
  """logits = W h + b. features (B, p) -> logits (B, C), computed in float32."""

  num_classes: int
  fixed_etf: bool = False
  kernel_init: Any = torch_linear_kernel
  bias_init: Any = None  # None: torch's U(-1/sqrt(p), 1/sqrt(p))

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    feature_dim = features.shape[-1]
    features = features.astype(jnp.float32)
    bias_init = self.bias_init or torch_linear_bias(feature_dim)
    if self.fixed_etf:
      weights = jnp.asarray(simplex_etf_weights(self.num_classes, feature_dim))
      bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
      return features @ weights.T + bias
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init, bias_init=bias_init, name="dense")(features)


def classifier_weights(params, feature_dim: int | None = None, head_name: str = "head"):
  """(W (C, p), b (C,)) of an nc-jax model's head, from its params.

  A fixed-ETF head has no W parameter; pass ``feature_dim`` (p) to get its frozen W.
  """
  head = params[head_name]
  if "dense" in head:
    return head["dense"]["kernel"].T, head["dense"]["bias"]
  if feature_dim is None:
    raise ValueError("this head is a fixed simplex ETF, so W is not a parameter: pass feature_dim to rebuild it")
  return jnp.asarray(simplex_etf_weights(head["bias"].shape[0], feature_dim)), head["bias"]
