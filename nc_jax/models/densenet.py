"""DenseNet (Huang et al. 2017): 40 (k = 12), BC-250 (k = 24) for small images, 121/201 (ImageNet).

Each dense layer is BN-ReLU-[Conv1x1(bn_size * k)-BN-ReLU]-Conv3x3(k), its output
concatenated to its input; transitions are BN-ReLU-Conv1x1(compression * c)-AvgPool2.
Dropout is 0, as in the paper. Features are the globally pooled output of the
final BN-ReLU (B, c). Each block's output is sown into 'intermediates' as 'block{i}'.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.head import Head, kaiming_fan_in
from nc_jax.models.small import BATCH_NORM


class DenseLayer(nn.Module):
  growth_rate: int
  bottleneck: bool
  bn_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kaiming_fan_in)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, dtype=self.dtype, **BATCH_NORM)
    y = nn.relu(norm()(x))
    if self.bottleneck:
      y = nn.relu(norm()(conv(self.bn_size * self.growth_rate, (1, 1))(y)))
    y = conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)))(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseNet(nn.Module):
  num_classes: int
  block_sizes: Sequence[int] = (12, 12, 12)
  growth_rate: int = 12
  bottleneck: bool = False
  compression: float = 1.0
  init_features: int = 16
  stem: str = "small"
  fixed_etf: bool = False
  head_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kaiming_fan_in)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, dtype=self.dtype, **BATCH_NORM)
    x = x.astype(self.dtype)
    if self.stem == "small":
      x = conv(self.init_features, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
    elif self.stem == "imagenet":
      x = conv(self.init_features, (7, 7), 2, padding=((3, 3), (3, 3)), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; choose one of ('small', 'imagenet')")
    for i, num_layers in enumerate(self.block_sizes):
      for j in range(num_layers):
        x = DenseLayer(self.growth_rate, self.bottleneck, dtype=self.dtype, name=f"block{i}_layer{j}")(x, train)
      self.sow("intermediates", f"block{i}", x)
      if i < len(self.block_sizes) - 1:
        x = nn.relu(norm(name=f"transition{i}_bn")(x))
        x = conv(int(x.shape[-1] * self.compression), (1, 1), name=f"transition{i}_conv")(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(norm(name="final_bn")(x))
    features = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    head = Head(self.num_classes, self.fixed_etf, self.head_bias, bias_init=nn.initializers.zeros, name="head")
    return head(features), features


DenseNet40 = functools.partial(DenseNet, block_sizes=(12, 12, 12), growth_rate=12, bottleneck=False,
                               compression=1.0, init_features=16, stem="small")
DenseNet250 = functools.partial(DenseNet, block_sizes=(41, 41, 41), growth_rate=24, bottleneck=True,
                                compression=0.5, init_features=48, stem="small")
DenseNet121 = functools.partial(DenseNet, block_sizes=(6, 12, 24, 16), growth_rate=32, bottleneck=True,
                                compression=0.5, init_features=64, stem="imagenet")
DenseNet201 = functools.partial(DenseNet, block_sizes=(6, 12, 48, 32), growth_rate=32, bottleneck=True,
                                compression=0.5, init_features=64, stem="imagenet")
