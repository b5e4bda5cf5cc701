"""Is a jitted bfloat16 ResNet18 eval forward finite and close to float32's on this backend?

    python benchmarks/bf16_check.py

Prints one line. Same float32 parameters, 64 random 32x32x3 inputs; the relative difference
is ||h_bf16 - h_f32|| / ||h_f32|| over the penultimate features. Found on jax 0.11.2's XLA:CPU:
the bf16 eval forward of ResNet18 (3+ stages at width 64) returns NaN when jitted, though it is
finite eagerly and in train mode; jax 0.10.2 is fine. Exit status 1 when not finite.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax import models


def main():
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32, 32, 3)), jnp.float32)
  variables = models.create("resnet18", 10).init(jax.random.PRNGKey(0), inputs)
  features = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.create("resnet18", 10, dtype=dtype)
    features[dtype] = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False)[1])(variables, inputs)
  finite = bool(jnp.all(jnp.isfinite(features[jnp.bfloat16])))
  difference = jnp.linalg.norm(features[jnp.bfloat16] - features[jnp.float32]) / jnp.linalg.norm(features[jnp.float32])
  print(f"bf16 ResNet18 eval forward (jitted, {jax.default_backend()}, jax {jax.__version__}): finite {finite}, "
        f"relative difference to float32 {float(difference):.2e}")
  sys.exit(0 if finite else 1)


if __name__ == "__main__":
  main()
