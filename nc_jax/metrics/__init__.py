"""nc_jax.metrics: Neural Collapse metrics as pure, jittable JAX functions.

This package imports nothing else of nc_jax, so it can be used on its own:

    from nc_jax.metrics import neural_collapse
    metrics = jax.jit(neural_collapse, static_argnums=2)(features, labels, 10, W, b)

Modules: ``options`` (``NCOptions``: the conventions sources disagree on, one frozen value
every entry point takes as ``options=``), ``collapse`` (the in-memory suite, test-set and
per-layer variants, input checks), ``accumulators`` (the two passes' states: class means,
their geometry, deviations and decisions; init / update / merge), ``finalize`` (the metrics
from the two passes' sums: where NC1-NC4 are computed, and the diagnostics), ``streaming``
(the complete two-pass API in one namespace, re-exported from those two), ``scale`` (the
exact power-of-two units), ``geometry`` (NC2/NC3 of (C, p) arrays, and ``pair_sums``, the
tiled primitive behind every pair statistic), ``sharding`` (meshes, Explicit axes, tiles dealt
to devices), ``mse`` (the MSE-loss decomposition), ``further`` (the later metrics: NC5, kernel
statistics / GNC2 by kernel, CDNV^k, log-norm equinorm, weak NC1, W M^T structure error,
||W mu_G + b||, the test means' NC2/NC3; ``further_collapse``).
"""

from nc_jax.metrics import further, geometry, streaming
from nc_jax.metrics.collapse import (
    DEGENERACY_KEYS,
    DIAGNOSTIC_KEYS,
    FILTER_KEYS,
    check_shapes,
    class_geometry,
    filter_classes,
    finalize_collapse,
    finalize_transfer,
    heldout_collapse,
    neural_collapse,
    per_layer_collapse,
    raise_if_invalid,
    validate_inputs,
)
from nc_jax.metrics.further import further_collapse
from nc_jax.metrics.mse import mse_decomposition
from nc_jax.metrics.options import NCOptions
from nc_jax.metrics.streaming import ClassGeometry, ClassMeansState, DeviationState

__all__ = [
    "ClassGeometry",
    "ClassMeansState",
    "DEGENERACY_KEYS",
    "DIAGNOSTIC_KEYS",
    "DeviationState",
    "FILTER_KEYS",
    "NCOptions",
    "check_shapes",
    "class_geometry",
    "filter_classes",
    "finalize_collapse",
    "finalize_transfer",
    "further",
    "further_collapse",
    "geometry",
    "heldout_collapse",
    "mse_decomposition",
    "neural_collapse",
    "per_layer_collapse",
    "raise_if_invalid",
    "streaming",
    "validate_inputs",
]
