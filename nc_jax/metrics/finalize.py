"""The Neural Collapse metrics from the two passes' sums: where NC1-NC4 are computed.

``finalize_collapse`` turns pass 2's ``DeviationState`` and the ``ClassGeometry`` of pass 1 (see
``accumulators``) into every key of ``collapse.neural_collapse``: NC1 (Tr(Sigma_W Sigma_B^+)/C, from
the NC1 summands and the corrected means), nc1_tirer, CDNV, the traces, NC2 of the means and of W
(``geometry.pair_geometry``), NC3 (self_duality, unc3), NC4 (ncc_accuracy, ncc_mismatch) and the
accuracy. ``finalize_transfer`` measures held-out data against the training means.

Undefined metrics are NaN, never a wrong number: the diagnostic counts (``DIAGNOSTIC_KEYS``,
``DEGENERACY_KEYS``, ``FILTER_KEYS``; see ``collapse``) say which input or geometry made them so.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nc_jax.metrics.accumulators import ClassGeometry, DeviationState, global_mean_of
from nc_jax.metrics.geometry import equinorm, matmul_highest, pair_geometry, self_duality, unc3
from nc_jax.metrics.options import UNSET, NCOptions, resolve
from nc_jax.metrics.scale import in_feature_units_sq, unit_scaled
from nc_jax.metrics.sharding import check_mesh

DIAGNOSTIC_KEYS = ("num_invalid_labels", "num_empty_classes", "num_nonfinite_rows", "num_nonfinite_weights")
DEGENERACY_KEYS = ("num_degenerate_means", "num_coincident_means", "num_zero_weight_rows")
FILTER_KEYS = ("num_filtered_classes", "num_filtered_samples")  # only with min_count
_SAMPLE_KEYS = DIAGNOSTIC_KEYS[:3]  # the ones that poison every metric

# ----------------------------------------------------------------------------
# Diagnostics: what makes which metric undefined.
# ----------------------------------------------------------------------------


def _num_kept(geometry: ClassGeometry) -> jax.Array:
  """C' (int32): the classes that take part, all C unless ``min_count`` dropped some."""
  num_classes = geometry.means.shape[0]
  return jnp.asarray(num_classes, jnp.int32) if geometry.kept is None else jnp.sum(geometry.kept, dtype=jnp.int32)


def _sample_diagnostics(state: DeviationState, kept: Optional[jax.Array]) -> dict:
  empty = state.counts == 0 if kept is None else kept & (state.counts == 0)
  return {
      "num_samples": jnp.sum(state.counts),
      "num_invalid_labels": state.invalid_labels,
      "num_empty_classes": jnp.sum(empty, dtype=jnp.int32),
      "num_nonfinite_rows": state.nonfinite_rows,
  }


def _filter_diagnostics(state: DeviationState, geometry: ClassGeometry) -> dict:
  if geometry.kept is None:
    return {}
  return {"num_filtered_classes": geometry.means.shape[0] - _num_kept(geometry),
          "num_filtered_samples": state.filtered_samples}


def _degeneracy_floor_sq(means: jax.Array, kept: Optional[jax.Array]) -> jax.Array:
  """floor^2 = (max(C, p, 16) eps)^2 max_c ||mu_c||^2: the rounding of means that may carry a large offset."""
  num_classes, feature_dim = means.shape
  eps = float(jnp.finfo(means.dtype).eps)
  norm_sq = jnp.sum(means**2, axis=-1)
  if kept is not None:
    norm_sq = jnp.where(kept, norm_sq, 0.0)
  return (max(num_classes, feature_dim, 16) * eps) ** 2 * jnp.max(norm_sq)


def mean_degeneracy(means: jax.Array, centred: jax.Array, *, kept: Optional[jax.Array] = None,
                    pairs: bool = True, block_rows: Optional[int] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """Counts of class-mean geometry that float32 cannot resolve, from (C, p) means and centred
  means (any common units), over the ``kept`` classes (C,) bool (None: all).

  With r = max(C, p, 16) eps and floor = r max_c ||mu_c|| (the rounding of means
  that may carry a large common offset):
    num_degenerate_means  #{c : ||M_c|| <= floor}: M_c has no direction;
    num_coincident_means  #{c < c' : ||M_c - M_c'||^2 <= floor^2 + 2 sqrt(p) eps (||M_c||^2 + ||M_c'||^2)},
                          the second term being the Gram formula's rounding (only if ``pairs``;
                          tiled by ``geometry.pair_geometry``, no C x C array).
  """
  floor_sq = _degeneracy_floor_sq(means, kept)
  degenerate = jnp.sum(centred**2, axis=-1) <= floor_sq
  if kept is not None:
    degenerate = degenerate & kept
  result = {"num_degenerate_means": jnp.sum(degenerate, dtype=jnp.int32)}
  if pairs:
    result["num_coincident_means"] = pair_geometry(centred, valid=kept, coincident_floor_sq=floor_sq,
                                                       block_rows=block_rows, mesh=mesh)["num_coincident"]
  return result


def _kept_rows(vectors: jax.Array, kept: Optional[jax.Array]) -> jax.Array:
  return vectors if kept is None else jnp.where(kept.reshape(kept.shape + (1,) * (vectors.ndim - 1)), vectors, 0.0)


def weight_diagnostics(weights: jax.Array, bias: Optional[jax.Array], kept: Optional[jax.Array] = None) -> dict:
  """num_nonfinite_weights: #{c : w_c or b_c holds a NaN or inf};
  num_zero_weight_rows: #{c : ||w_c||^2 underflows}, computed on W scaled to max |W_ij| ~ 1;
  both over the ``kept`` rows (C,) bool (None: all)."""
  finite = jnp.all(jnp.isfinite(weights), axis=-1)
  if bias is not None:
    finite = finite & jnp.isfinite(bias)
  norm_sq = jnp.sum(unit_scaled(_kept_rows(weights, kept)) ** 2, axis=-1)
  zero = norm_sq < jnp.finfo(weights.dtype).tiny
  if kept is not None:
    finite, zero = finite | ~kept, zero & kept
  return {
      "num_nonfinite_weights": jnp.sum(~finite, dtype=jnp.int32),
      "num_zero_weight_rows": jnp.sum(zero, dtype=jnp.int32),
  }


def _defined(diagnostics: dict, num_kept: jax.Array) -> dict:
  """metric key -> bool scalar, False where the diagnostics make that metric undefined."""
  inputs = (sum(diagnostics[key] for key in _SAMPLE_KEYS) == 0) & (num_kept >= 2)
  spread = diagnostics["num_degenerate_means"] < num_kept  # Sigma_B != 0
  directions = diagnostics["num_degenerate_means"] == 0  # every M_c has a direction
  separated = diagnostics["num_coincident_means"] == 0
  defined = {
      "nc1": spread, "nc1_tirer": spread, "cdnv": spread & separated,
      "trace_within": True, "trace_between": True,
      "equinorm_means": spread, "equiangular_means": directions, "max_angle_means": directions,
      "etf_deviation_means": spread, "gnc2_means": directions & separated, "ncc_accuracy": spread,
  }
  if "num_nonfinite_weights" in diagnostics:
    weights_ok = diagnostics["num_nonfinite_weights"] == 0
    some_rows = weights_ok & (diagnostics["num_zero_weight_rows"] < num_kept)
    all_rows = weights_ok & (diagnostics["num_zero_weight_rows"] == 0)
    defined |= {
        "equinorm_weights": some_rows, "equiangular_weights": all_rows, "max_angle_weights": all_rows,
        "etf_deviation_weights": some_rows, "self_duality": some_rows & spread,
        "unc3": all_rows & directions, "ncc_mismatch": weights_ok & spread, "accuracy": weights_ok,
    }
  return {key: jnp.logical_and(inputs, ok) for key, ok in defined.items()}


def _poison(metrics: dict, defined: dict) -> dict:
  return {key: jnp.where(defined[key], value, jnp.nan) for key, value in metrics.items()}


# ----------------------------------------------------------------------------
# Finalising pass 2 into metrics.
# ----------------------------------------------------------------------------


def _corrected_means(state: DeviationState, geometry: ClassGeometry, global_mean: str):
  """(correction, means, centred): delta_c (C, p), the pass-1 mean error from pass 2's sums; the corrected
  means mu_c + delta_c (C, p); and M (C, p) centred at their ``global_mean``, 0 on dropped rows."""
  kept = geometry.kept
  safe_counts = jnp.maximum(state.counts.astype(geometry.means.dtype), 1.0)
  correction = state.deviation_sums / safe_counts[:, None]  # delta_c: pass-1 mean error
  means = geometry.means + correction
  centred = _kept_rows(means - global_mean_of(means, state.counts, global_mean, kept), kept)
  return correction, means, centred


def _within_class_sq(state: DeviationState, correction: jax.Array) -> jax.Array:
  """(C,) sum_{i in c} ||h_i - mu_c||^2 about the corrected means: sum ||d||^2 - n_c ||delta_c||^2."""
  counts = state.counts.astype(correction.dtype)
  return jnp.maximum(state.deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0)


def _nc1(state: DeviationState, geometry: ClassGeometry, correction: jax.Array, divide_by_classes: bool):
  """NC1 = Tr(Sigma_W Sigma_B^+)/C = (1/N) sum_i ||S^-1 V^T (d_i - delta_{y_i})||^2 (never negative),
  from pass 2's projected sums less the mean correction's share; times C' if not ``divide_by_classes``."""
  counts = state.counts.astype(geometry.means.dtype)
  correction_projected = matmul_highest(correction, geometry.feature_basis) * jnp.sqrt(
      geometry.inverse_sq_singular_values)  # S^-1 V^T delta_c, (C, r)
  nc1_sum = jnp.sum(state.projected_sq) - jnp.sum(counts * jnp.sum(correction_projected**2, axis=-1))
  nc1 = jnp.maximum(nc1_sum, 0.0) / jnp.sum(counts)
  if not divide_by_classes:
    nc1 = nc1 * _num_kept(geometry).astype(geometry.means.dtype)
  return nc1


def _weight_metrics(state: DeviationState, geometry: ClassGeometry, centred: jax.Array, options: NCOptions,
                    block_rows: Optional[int], mesh) -> dict:
  """The keys that need W: its NC2 (scale-free rows), NC3 against ``centred``, unc3, and the decisions' rates."""
  kept, ddof = geometry.kept, options.std_ddof
  num_samples = jnp.sum(state.counts.astype(geometry.means.dtype))
  weights = unit_scaled(_kept_rows(geometry.weights.astype(centred.dtype), kept))  # scale-free geometry of W
  weight_pairs = pair_geometry(weights, ddof=ddof, valid=kept, block_rows=block_rows, mesh=mesh)
  return {
      "equinorm_weights": equinorm(weights, ddof, valid=kept),
      "equiangular_weights": weight_pairs["equiangularity"],
      "max_angle_weights": weight_pairs["max_angle"],
      "etf_deviation_weights": weight_pairs["etf_deviation"],
      "self_duality": self_duality(weights, centred, options.self_duality_squared, valid=kept),
      "unc3": unc3(weights, centred, ddof, valid=kept),
      "ncc_mismatch": state.mismatch / num_samples,
      "accuracy": state.network_correct / num_samples,
  }


def finalize_collapse(
    state: DeviationState,
    geometry: ClassGeometry,
    *,
    options: Optional[NCOptions] = None,
    block_rows: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    global_mean=UNSET,
    divide_nc1_by_classes=UNSET,
    std_ddof=UNSET,
    self_duality_squared=UNSET,
) -> dict:
  """Metrics of the data seen in pass 2, with its own (corrected) class means: where NC1-NC4 are computed.

  Everything is computed in pass 2's units (h 2^-e); only trace_within and
  trace_between are brought back to the features' units. Every pair statistic
  (CDNV, the NC2 of means and of W, num_coincident_means) comes from the tiled
  ``geometry.pair_geometry`` (``block_rows`` rows per tile, default: dense up to
  ``geometry.DENSE_MAX_CLASSES`` classes): two sweeps over C x C tiles, no C x C array;
  with a ``mesh`` the tiles of each sweep are shared by its devices (``geometry.pair_sums``).
  With ``geometry.kept``, C is C' = the number kept in every formula. Of ``options`` (``NCOptions``;
  or the keywords global_mean, divide_nc1_by_classes, std_ddof, self_duality_squared) this uses
  those four; pass the ``options`` of ``finalize_class_means``. Returns a dict of scalars; see
  ``collapse.neural_collapse`` for the keys.
  """
  options = resolve(options, "finalize_collapse", global_mean=global_mean, divide_nc1_by_classes=divide_nc1_by_classes,
                    std_ddof=std_ddof, self_duality_squared=self_duality_squared)
  check_mesh(mesh)
  kept, ddof = geometry.kept, options.std_ddof
  num_kept = _num_kept(geometry)
  num_samples = jnp.sum(state.counts.astype(geometry.means.dtype))
  correction, means, centred = _corrected_means(state, geometry, options.global_mean)
  within_sq = _within_class_sq(state, correction)
  class_variance = within_sq / jnp.maximum(state.counts.astype(within_sq.dtype), 1.0)  # (1/n_c) sum ||h - mu_c||^2
  trace_within = jnp.sum(within_sq) / num_samples
  trace_between = jnp.sum(centred**2) / num_kept.astype(geometry.means.dtype)

  degeneracy = mean_degeneracy(means, centred, kept=kept, pairs=False)
  pairs = pair_geometry(centred, ddof=ddof, valid=kept, variances=class_variance,
                        coincident_floor_sq=_degeneracy_floor_sq(means, kept), block_rows=block_rows, mesh=mesh)
  degeneracy["num_coincident_means"] = pairs["num_coincident"]
  metrics = {
      "nc1": _nc1(state, geometry, correction, options.divide_nc1_by_classes),
      "nc1_tirer": trace_within / trace_between,
      "cdnv": pairs["cdnv"],
      "trace_within": in_feature_units_sq(trace_within, geometry.exponent),
      "trace_between": in_feature_units_sq(trace_between, geometry.exponent),
      "equinorm_means": equinorm(centred, ddof, valid=kept),
      "equiangular_means": pairs["equiangularity"],
      "max_angle_means": pairs["max_angle"],
      "etf_deviation_means": pairs["etf_deviation"],
      "gnc2_means": pairs["gnc2"],
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  diagnostics = _sample_diagnostics(state, kept) | degeneracy
  if geometry.weights is not None:
    metrics |= _weight_metrics(state, geometry, centred, options, block_rows, mesh)
    diagnostics |= weight_diagnostics(geometry.weights, geometry.bias, kept)
  return _poison(metrics, _defined(diagnostics, num_kept)) | diagnostics | _filter_diagnostics(state, geometry)


def finalize_transfer(
    state: DeviationState,
    geometry: ClassGeometry,
    *,
    options: Optional[NCOptions] = None,
    suffix: str = "_test",
    divide_nc1_by_classes=UNSET,
) -> dict:
  """Metrics of held-out data against the *reference* (training) means and Sigma_B.

  nc1{suffix} = Tr(Sigma_W' Sigma_B^+)/C with Sigma_W' = (1/N') sum_i (h_i - mu_{y_i})(...)^T
  over the held-out samples and the training mu_c, Sigma_B (Hui, Belkin & Nakkiran 2022);
  ncc_accuracy{suffix} classifies by the nearest *training* class mean. Diagnostics:
  the sample counts of the held-out data (a test set may lack classes, so
  num_empty_classes is 0), num_degenerate_means of the training means and, with
  weights, num_nonfinite_weights, all with the suffix (and, with ``geometry.kept``,
  num_filtered_classes and num_filtered_samples: held-out samples of dropped classes).
  Of ``options`` (or the keyword) this uses divide_nc1_by_classes.
  """
  options = resolve(options, "finalize_transfer", divide_nc1_by_classes=divide_nc1_by_classes)
  kept = geometry.kept
  num_kept = _num_kept(geometry)
  num_samples = jnp.sum(state.counts)
  nc1 = jnp.sum(state.projected_sq) / num_samples
  metrics = {
      "nc1": nc1 if options.divide_nc1_by_classes else nc1 * num_kept.astype(nc1.dtype),
      "trace_within": in_feature_units_sq(jnp.sum(state.deviation_sq) / num_samples, geometry.exponent),
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  diagnostics = _sample_diagnostics(state, kept)
  diagnostics["num_empty_classes"] = jnp.zeros((), jnp.int32)  # a test set may lack classes
  diagnostics |= mean_degeneracy(geometry.means, geometry.centred_means, kept=kept, pairs=False)
  inputs = (sum(diagnostics[key] for key in _SAMPLE_KEYS) == 0) & (num_kept >= 2)
  spread = inputs & (diagnostics["num_degenerate_means"] < num_kept)
  defined = {"nc1": spread, "trace_within": inputs, "ncc_accuracy": spread}
  if geometry.weights is not None:
    metrics["ncc_mismatch"] = state.mismatch / num_samples
    metrics["accuracy"] = state.network_correct / num_samples
    diagnostics["num_nonfinite_weights"] = weight_diagnostics(geometry.weights, geometry.bias,
                                                              kept)["num_nonfinite_weights"]
    weights_ok = diagnostics["num_nonfinite_weights"] == 0
    defined |= {"ncc_mismatch": spread & weights_ok, "accuracy": inputs & weights_ok}
  metrics = _poison(metrics, defined) | diagnostics | _filter_diagnostics(state, geometry)
  return {key + suffix: value for key, value in metrics.items()}
