"""nc-jax: Neural Collapse at accelerator scale, in JAX/Flax.

Submodules load on first use, so the light ones (``nc_jax.schema`` for configs,
``nc_jax.records`` for run records) can be imported without JAX.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["metrics", "neural_collapse"]


def __getattr__(name):
  if name == "neural_collapse":
    return importlib.import_module("nc_jax.metrics").neural_collapse
  if name in ("metrics", "models", "data", "training", "schema", "records"):
    return importlib.import_module(f"nc_jax.{name}")
  raise AttributeError(f"module 'nc_jax' has no attribute {name!r}")
