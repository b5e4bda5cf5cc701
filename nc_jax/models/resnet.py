"""ResNet 18/34/50/101/152 (He et al. 2016; torchvision's v1.5, stride on the 3x3 conv).

stem='small': 3x3 stride-1 conv and no max-pool, as the notebook's ResNet18 on
32x32 images; stem='imagenet': 7x7 stride-2 conv and 3x3 stride-2 max-pool.
Returns (logits (B, C), features (B, 512 * expansion)); every stage's output is
sown into 'intermediates' as 'stage{i}'.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.head import Head, kaiming_fan_out
from nc_jax.models.small import BATCH_NORM
from nc_jax.names import STEMS


def _padding(kernel: int):
  return ((kernel // 2, kernel // 2),) * 2  # torch's symmetric padding


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kaiming_fan_out)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, dtype=self.dtype, **BATCH_NORM)
    residual = x
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides, _padding(3))(x)))
    y = norm()(conv(self.filters, (3, 3), 1, _padding(3))(y))
    if residual.shape != y.shape:
      residual = norm()(conv(self.filters, (1, 1), self.strides, name="downsample_conv")(residual))
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kaiming_fan_out)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, dtype=self.dtype, **BATCH_NORM)
    residual = x
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides, _padding(3))(y)))
    y = norm()(conv(self.filters * 4, (1, 1))(y))
    if residual.shape != y.shape:
      residual = norm()(conv(self.filters * 4, (1, 1), self.strides, name="downsample_conv")(residual))
    return nn.relu(y + residual)


class ResNet(nn.Module):
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Any = BasicBlock
  stem: str = "small"
  width: int = 64
  fixed_etf: bool = False
  head_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    if self.stem not in STEMS:
      raise ValueError(f"unknown stem {self.stem!r}; choose one of {STEMS}")
    x = x.astype(self.dtype)
    if self.stem == "small":
      x = nn.Conv(self.width, (3, 3), 1, _padding(3), use_bias=False, dtype=self.dtype,
                  kernel_init=kaiming_fan_out, name="stem_conv")(x)
    else:
      x = nn.Conv(self.width, (7, 7), 2, _padding(7), use_bias=False, dtype=self.dtype,
                  kernel_init=kaiming_fan_out, name="stem_conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="stem_bn", **BATCH_NORM)(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), (2, 2), padding=_padding(3))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, strides, self.dtype, name=f"stage{i}_block{j}")(x, train)
      self.sow("intermediates", f"stage{i}", x)
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    return Head(self.num_classes, self.fixed_etf, self.head_bias, name="head")(features), features


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
