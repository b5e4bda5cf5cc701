"""The last layer every nc-jax model ends with, and the initialisers of the reference nets.

The classifier is a plain linear map logits = W h + b with W (C, p) the paper's
W (stored as Flax's (p, C) kernel). ``fixed_etf=True`` replaces W by a frozen
simplex ETF (``simplex_etf_weights``; any p >= C - 1), as in the fixed-ETF-classifier
literature; b is still trained. ``use_bias=False`` drops b (logits = W h).
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
  """W (C, p) = sqrt(C/(C-1)) V Q^T: unit-norm rows at cosines -1/(C-1), W W^T = C/(C-1) (I - 11^T/C).

  V (C, C-1) is an orthonormal basis of the centred simplex (the vectors orthogonal to 1) and
  Q (p, C-1) has orthonormal columns drawn from a fixed seed, so the frame fits any p >= C - 1
  (p = C - 1 is the smallest dimension holding a simplex ETF).
  """
  if feature_dim < num_classes - 1:
    raise ValueError(f"a fixed simplex ETF classifier needs feature_dim >= num_classes - 1, got {feature_dim} < "
                     f"{num_classes - 1}")
  centring = np.eye(num_classes) - 1.0 / num_classes
  simplex_basis, _ = np.linalg.qr(centring[:, :-1])  # its first C-1 columns span the centred simplex
  rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(feature_dim, num_classes - 1)))
  return (np.sqrt(num_classes / (num_classes - 1)) * simplex_basis @ rotation.T).astype(np.float32)


class Head(nn.Module):
  """logits = W h + b. features (B, p) -> logits (B, C), computed in float32."""

  num_classes: int
  fixed_etf: bool = False
  use_bias: bool = True
  kernel_init: Any = torch_linear_kernel
  bias_init: Any = None  # None: torch's U(-1/sqrt(p), 1/sqrt(p))

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    feature_dim = features.shape[-1]
    features = features.astype(jnp.float32)
    bias_init = self.bias_init or torch_linear_bias(feature_dim)
    if self.fixed_etf:
      logits = features @ jnp.asarray(simplex_etf_weights(self.num_classes, feature_dim)).T
      if self.use_bias:
        logits = logits + self.param("bias", nn.initializers.zeros, (self.num_classes,))
      return logits
    return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=self.kernel_init, bias_init=bias_init,
                    name="dense")(features)


def classifier_weights(params, feature_dim: int | None = None, head_name: str = "head",
                       num_classes: int | None = None):
  """(W (C, p), b (C,)) of an nc-jax model's head, from its params; b = 0 for a head without bias.

  A fixed-ETF head has no W parameter; pass ``feature_dim`` (p) to get its frozen W, and
  ``num_classes`` too when it has no bias either (it then has no parameters at all).
  """
  head = params.get(head_name, {})
  if "dense" in head:
    weights = head["dense"]["kernel"].T
    return weights, head["dense"].get("bias", jnp.zeros((weights.shape[0],), weights.dtype))
  if feature_dim is None:
    raise ValueError("this head is a fixed simplex ETF, so W is not a parameter: pass feature_dim to rebuild it")
  num_classes = head["bias"].shape[0] if "bias" in head else num_classes
  if num_classes is None:
    raise ValueError("this head is a fixed simplex ETF without bias, so it has no parameters: pass num_classes")
  bias = head.get("bias", jnp.zeros((num_classes,), jnp.float32))
  return jnp.asarray(simplex_etf_weights(num_classes, feature_dim)), bias
