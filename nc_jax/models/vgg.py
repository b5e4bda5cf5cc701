"""VGG 11/13/16/19 with BatchNorm and no dropout (Simonyan & Zisserman 2015; torchvision's vgg*_bn).

stem='imagenet': average-pool to 7x7 and two 4096-wide hidden layers (torchvision's
classifier, dropout removed: same parameters); stem='small': global average pool
and two ``classifier_width``-wide hidden layers (512 by default), for 28-96 px images.
Features are the last hidden layer's ReLU output (B, classifier_width).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from nc_jax.models.head import Head, kaiming_fan_out
from nc_jax.models.small import BATCH_NORM
from nc_jax.names import VGG_POOL as POOL
CONFIGS = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL),
}
linear_init = nn.initializers.normal(0.01)  # torchvision VGG: N(0, 0.01), bias 0


def adaptive_average_pool(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C) for H, W multiples of size (torch's AdaptiveAvgPool2d)."""
  height, width = x.shape[1:3]
  if height % size or width % size:
    raise ValueError(f"adaptive pooling of {height}x{width} maps to {size}x{size} needs multiples of {size}")
  return nn.avg_pool(x, (height // size, width // size), (height // size, width // size))


class VGG(nn.Module):
  num_classes: int
  config: Sequence[Union[int, str]] = CONFIGS[11]
  stem: str = "small"
  classifier_width: Optional[int] = None  # None: 4096 (imagenet) or 512 (small)
  width_multiplier: float = 1.0  # scales every conv's channels (< 1 for fast CPU tests)
  fixed_etf: bool = False
  head_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    x = x.astype(self.dtype)
    stage = 0
    for item in self.config:
      if item == POOL:
        x = nn.max_pool(x, (2, 2), (2, 2))
        self.sow("intermediates", f"stage{stage}", x)
        stage += 1
        continue
      x = nn.Conv(max(1, int(item * self.width_multiplier)), (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, kernel_init=kaiming_fan_out)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype, **BATCH_NORM)(x))
    if self.stem == "imagenet":
      x = adaptive_average_pool(x, 7).reshape((x.shape[0], -1))
      width = self.classifier_width or 4096
    elif self.stem == "small":
      x = jnp.mean(x, axis=(1, 2))
      width = self.classifier_width or 512
    else:
      raise ValueError(f"unknown stem {self.stem!r}; choose one of ('small', 'imagenet')")
    for i in range(2):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, kernel_init=linear_init, name=f"fc{i}")(x))
    features = x.astype(jnp.float32)
    head = Head(self.num_classes, self.fixed_etf, self.head_bias, kernel_init=linear_init,
                bias_init=nn.initializers.zeros, name="head")
    return head(features), features


VGG11, VGG13, VGG16, VGG19 = (functools.partial(VGG, config=CONFIGS[depth]) for depth in (11, 13, 16, 19))
