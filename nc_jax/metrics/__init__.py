"""nc_jax.metrics: Neural Collapse metrics as pure, jittable JAX functions.

This package imports nothing else of nc_jax, so it can be used on its own:

    from nc_jax.metrics import neural_collapse
    metrics = jax.jit(neural_collapse, static_argnums=2)(features, labels, 10, W, b)

Modules: ``collapse`` (the suite, test-set and per-layer variants, input checks),
``geometry`` (NC2/NC3 of (C, p) arrays), ``streaming`` (two-pass accumulators
for data that does not fit in memory), ``mse`` (the MSE-loss decomposition).
"""

from nc_jax.metrics import geometry, streaming
from nc_jax.metrics.collapse import (
    DEGENERACY_KEYS,
    DIAGNOSTIC_KEYS,
    check_shapes,
    class_geometry,
    finalize_collapse,
    finalize_transfer,
    heldout_collapse,
    neural_collapse,
    per_layer_collapse,
    raise_if_invalid,
    validate_inputs,
)
from nc_jax.metrics.mse import mse_decomposition
from nc_jax.metrics.streaming import ClassGeometry, ClassMeansState, DeviationState

__all__ = [
    "ClassGeometry",
    "ClassMeansState",
    "DEGENERACY_KEYS",
    "DIAGNOSTIC_KEYS",
    "DeviationState",
    "check_shapes",
    "class_geometry",
    "finalize_collapse",
    "finalize_transfer",
    "geometry",
    "heldout_collapse",
    "mse_decomposition",
    "neural_collapse",
    "per_layer_collapse",
    "raise_if_invalid",
    "streaming",
    "validate_inputs",
]
