"""Small nets for CPU runs and tests: an MLP (MNIST-1D, the default job) and a 3-conv CNN."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.head import Head, torch_linear_bias, torch_linear_kernel

BATCH_NORM = dict(momentum=0.9, epsilon=1e-5)  # torch's momentum 0.1, in Flax's convention


class MLP(nn.Module):
  """depth x (Dense(width) [-> BatchNorm] -> ReLU) -> Head. Input (B, ...) is flattened.

  Returns (logits (B, C) float32, features (B, p) float32), p = feature_dim (the last
  hidden layer's width; None = width, e.g. C for a fixed ETF with d = C); each hidden
  layer's output is sown into the 'intermediates' collection as 'layer{i}'.
  """

  num_classes: int
  width: int = 512
  depth: int = 3
  batch_norm: bool = True
  feature_dim: Optional[int] = None
  fixed_etf: bool = False
  head_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    if self.feature_dim and not self.depth:
      raise ValueError(f"feature_dim={self.feature_dim} sets the last hidden layer's width, but depth=0 has none")
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i in range(self.depth):
      width = self.feature_dim if self.feature_dim and i == self.depth - 1 else self.width
      x = nn.Dense(width, use_bias=not self.batch_norm, dtype=self.dtype, kernel_init=torch_linear_kernel,
                   bias_init=torch_linear_bias(x.shape[-1]), name=f"dense{i}")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}", **BATCH_NORM)(x)
      x = nn.relu(x)
      self.sow("intermediates", f"layer{i}", x)
    features = x.astype(jnp.float32)
    return Head(self.num_classes, self.fixed_etf, self.head_bias, name="head")(features), features


class SimpleCNN(nn.Module):
  """3 x (Conv3x3 -> BatchNorm -> ReLU -> MaxPool2) -> global average -> Dense(width) -> ReLU -> Head."""

  num_classes: int
  channels: tuple[int, ...] = (32, 64, 128)
  width: int = 128
  fixed_etf: bool = False
  head_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    x = x.astype(self.dtype)
    for i, channels in enumerate(self.channels):
      x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f"bn{i}", **BATCH_NORM)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
      self.sow("intermediates", f"stage{i}", x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.width, dtype=self.dtype, name="fc")(x))
    features = x.astype(jnp.float32)
    return Head(self.num_classes, self.fixed_etf, self.head_bias, name="head")(features), features
