"""nc_jax.training: the pure train step, in-graph evaluation, checkpoints, the run directory and the loop.

The loop (and JAX with it) loads on first use of its names, so ``nc_jax.training.workdir`` (config.json checked
against the checkpoints' digest) serves light readers such as experiments/grid.py without importing JAX.
"""

import importlib

__all__ = ["Diverged", "Preempted", "train_and_evaluate"]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("nc_jax.training.loop"), name)
  raise AttributeError(f"module 'nc_jax.training' has no attribute {name!r}")
