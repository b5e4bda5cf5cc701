"""nc-jax: Neural Collapse at accelerator scale, in JAX/Flax."""

from nc_jax import metrics
from nc_jax.metrics import neural_collapse

__version__ = "0.1.0"
__all__ = ["metrics", "neural_collapse"]
