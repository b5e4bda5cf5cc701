"""The complete two-pass API, for data that does not fit in memory: init / update / merge / finalize.

A face: the functions live in ``accumulators`` (the pass-1 and pass-2 states, their updates and
merges, ``finalize_class_means``), ``finalize`` (the metrics from the sums: ``finalize_collapse``,
``finalize_transfer``, the diagnostics) and ``scale`` (the power-of-two units); this module
re-exports them under the names callers have always used.

    state = init_class_means(C, p)                    # pass 1, batch by batch (merge_* across hosts)
    state = update_class_means(state, h, y, mask)
    geometry = finalize_class_means(state, W, b, options=opts)   # opts: NCOptions (or the keywords)
    dev = init_deviations(geometry)                   # pass 2, over the same batches
    dev = update_deviations(dev, geometry, h, y, mask, options=opts)
    metrics = finalize_collapse(dev, geometry, options=opts)    # or finalize_transfer for held-out data

Why two passes, the corrected means and the units: see ``accumulators``. ``collapse.neural_collapse``
runs the same two passes over in-memory features, in row chunks so each (rows, C) temporary stays
within 64 MB; the pair statistics of ``finalize_collapse`` are swept tile by tile (``geometry.pair_sums``).
"""

from nc_jax.metrics.accumulators import (
    ClassGeometry,
    ClassMeansState,
    DeviationState,
    check_min_count,
    class_sums,
    finalize_class_means,
    global_mean_of,
    init_class_means,
    init_deviations,
    max_abs_of_rows,
    merge_class_means,
    merge_deviations,
    segment_ids,
    update_class_means,
    update_deviations,
)
from nc_jax.metrics.finalize import (
    DEGENERACY_KEYS,
    DIAGNOSTIC_KEYS,
    FILTER_KEYS,
    finalize_collapse,
    finalize_transfer,
    mean_degeneracy,
    weight_diagnostics,
)
from nc_jax.metrics.geometry import matmul_highest
from nc_jax.metrics.options import GLOBAL_MEANS, SOLVERS, NCOptions
from nc_jax.metrics.scale import float_dtype, max_finite_abs, power_of_two, scale_exponent, scale_features, unit_scaled

__all__ = [
    "ClassGeometry", "ClassMeansState", "DEGENERACY_KEYS", "DIAGNOSTIC_KEYS", "DeviationState", "FILTER_KEYS",
    "GLOBAL_MEANS", "NCOptions", "SOLVERS", "check_min_count", "class_sums", "finalize_class_means",
    "finalize_collapse", "finalize_transfer", "float_dtype", "global_mean_of", "init_class_means", "init_deviations",
    "matmul_highest", "max_abs_of_rows", "max_finite_abs", "mean_degeneracy", "merge_class_means", "merge_deviations", "power_of_two",
    "scale_exponent", "scale_features", "segment_ids", "unit_scaled", "update_class_means", "update_deviations",
    "weight_diagnostics",
]
