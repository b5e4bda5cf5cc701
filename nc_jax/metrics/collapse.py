"""The Neural Collapse suite: NC1-NC4 and their later variants from features and labels.

Definitions follow Papyan, Han & Donoho (PNAS 2020) and the authors' notebook;
each convention that sources disagree on is a keyword option with the paper's
choice as default. Notation: N samples, p features, C classes; mu_c class means,
mu_G the global mean, M = [mu_c - mu_G] (C, p) the centred means,
Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T.

Scale. Features are measured in exact power-of-two units (see ``streaming``), so
every scale-invariant key (nc1, nc1_tirer, cdnv, the NC2 numbers, self_duality,
unc3, ncc_accuracy) is the same for h and for 10^k h, k in [-30, 30], in float32;
accuracy and ncc_mismatch use the network's own decision argmax(W h + b). Only
trace_within and trace_between carry units (those of h squared): beyond float32's
range they are honestly inf (|h| ~ 1e19 and up) or 0 (|h| ~ 1e-19 and down).

Metrics never lie silently. Bad values cannot raise inside ``jit``; they poison
instead, and an integer count says why:
  invalid inputs (``DIAGNOSTIC_KEYS``): an unmasked label outside [0, C)
    (``num_invalid_labels``), a class without samples (``num_empty_classes``), an
    unmasked feature row holding a NaN or inf (``num_nonfinite_rows``) make *every*
    float metric NaN; rows of W or entries of b holding a NaN or inf
    (``num_nonfinite_weights``) make what depends on W NaN: the weights' NC2,
    self_duality, unc3, ncc_mismatch, accuracy.
  degenerate geometry (``DEGENERACY_KEYS``), from valid inputs:
    ``num_degenerate_means``: classes whose centred mean M_c is zero to float32
      resolution (||M_c|| <= max(C, p, 16) eps max_c ||mu_c||), so it has no direction:
      equiangular_means, max_angle_means, gnc2_means, unc3 are NaN; when it is every
      class, Sigma_B = 0 and nc1, nc1_tirer, cdnv, every *_means key, ncc_accuracy,
      self_duality, ncc_mismatch (and nc1_test, ncc_accuracy_test, ncc_mismatch_test) are NaN;
    ``num_coincident_means``: pairs c < c' whose means coincide to the resolution of
      ||mu_c - mu_c'||^2 from the Gram matrix: cdnv and gnc2_means are NaN;
    ``num_zero_weight_rows``: rows w_c = 0 (||w_c|| < ~1e-19 max |W|), which have no
      direction: equiangular_weights, max_angle_weights, unc3 are NaN; when it is
      every row, also equinorm_weights, etf_deviation_weights, self_duality.
``raise_if_invalid(metrics)`` turns any of these counts, the ``*_test`` ones
included, into a ``ValueError`` on the host (``allow_degenerate=True`` lets the
degenerate-geometry ones pass), and ``validate_inputs`` checks concrete arrays
before any tracing.
"""

from __future__ import annotations

import functools
import numbers
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import geometry as geo
from nc_jax.metrics import streaming

DIAGNOSTIC_KEYS = ("num_invalid_labels", "num_empty_classes", "num_nonfinite_rows", "num_nonfinite_weights")
DEGENERACY_KEYS = ("num_degenerate_means", "num_coincident_means", "num_zero_weight_rows")
_SAMPLE_KEYS = DIAGNOSTIC_KEYS[:3]  # the ones that poison every metric


# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------


def as_array(value, name: str, shape: str, floating: bool = False):
  """``value`` as an array: jax/numpy arrays (and tracers) and None pass through,
  nested lists/tuples of numbers are converted (to float if ``floating``); anything
  else is a one-line ValueError naming ``name`` and the ``shape`` it should have."""
  if value is None or isinstance(value, (jax.Array, np.ndarray)):
    return value
  if not isinstance(value, (list, tuple, numbers.Number)):
    raise ValueError(f"{name} must be an array of shape {shape}, got a {type(value).__name__}; "
                     "pass a jax or numpy array (or a nested list of numbers)")
  try:
    return jnp.asarray(value, dtype=float if floating else None)
  except (TypeError, ValueError) as error:
    reason = (str(error).splitlines() or [""])[0]
    raise ValueError(f"{name} must be numbers of shape {shape}; the {type(value).__name__} given "
                     f"cannot be converted ({reason})") from None


def _require_array(value, name: str, shape: str) -> None:
  if isinstance(value, (str, bytes)) or not (hasattr(value, "shape") and hasattr(value, "dtype")):
    got = "None" if value is None else f"a {type(value).__name__}"
    raise ValueError(f"{name} must be an array of shape {shape}, got {got}; pass a jax or numpy array")


def check_shapes(features, labels, num_classes, weights=None, bias=None, mask=None) -> None:
  """Raises ValueError at trace time for non-arrays, wrong ranks, shapes, dtypes, p = 0 or C < 2."""
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool):
    raise ValueError(f"num_classes must be a Python int (static under jit), got {num_classes!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  _require_array(features, "features", "(N, p)")
  _require_array(labels, "labels", "(N,)")
  if features.ndim != 2:
    raise ValueError(f"features must have shape (N, p), got shape {tuple(features.shape)}")
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape (N,), got shape {tuple(labels.shape)}")
  num_samples, feature_dim = features.shape
  if feature_dim == 0:
    raise ValueError(f"features have shape {tuple(features.shape)}, p = 0 columns; "
                     "pass at least one feature per sample, shape (N, p) with p >= 1")
  if labels.shape[0] != num_samples:
    raise ValueError(f"features have {num_samples} rows but labels have {labels.shape[0]}")
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"features must be floating point, got dtype {features.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if weights is not None:
    _require_array(weights, "weights", "(num_classes, p)")
    if tuple(weights.shape) != (num_classes, feature_dim):
      raise ValueError(
          f"weights must have shape (num_classes, p) = {(num_classes, feature_dim)}, got {tuple(weights.shape)}")
  if bias is not None and weights is None:
    raise ValueError("bias was given without weights")
  if bias is not None:
    _require_array(bias, "bias", "(num_classes,)")
    if tuple(bias.shape) != (num_classes,):
      raise ValueError(f"bias must have shape (num_classes,) = {(num_classes,)}, got {tuple(bias.shape)}")
  if mask is not None:
    _require_array(mask, "mask", "(N,)")
    if tuple(mask.shape) != (num_samples,):
      raise ValueError(f"mask must have shape (N,) = {(num_samples,)}, got {tuple(mask.shape)}")


def _as_inputs(features, labels, weights=None, bias=None, mask=None):
  """The in-memory entry points' arguments as arrays (see ``as_array``)."""
  return (as_array(features, "features", "(N, p)", floating=True), as_array(labels, "labels", "(N,)"),
          as_array(weights, "weights", "(num_classes, p)", floating=True),
          as_array(bias, "bias", "(num_classes,)", floating=True), as_array(mask, "mask", "(N,)"))


def validate_inputs(features, labels, num_classes: int, mask=None, *, weights=None, bias=None) -> None:
  """Eager check of concrete arrays; raises ValueError naming the first problem found."""
  features, labels, weights, bias, mask = _as_inputs(features, labels, weights, bias, mask)
  check_shapes(features, labels, num_classes, weights, bias, mask=mask)
  features, labels = np.asarray(features), np.asarray(labels)
  active = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
  outside = active & ((labels < 0) | (labels >= num_classes))
  if outside.any():
    raise ValueError(
        f"{int(outside.sum())} labels lie outside [0, {num_classes}), e.g. {int(labels[outside][0])}")
  counts = np.bincount(labels[active], minlength=num_classes)
  if (counts == 0).any():
    raise ValueError(f"classes with no samples: {np.flatnonzero(counts == 0).tolist()}")
  nonfinite = active & ~np.isfinite(features).all(axis=1)
  if nonfinite.any():
    raise ValueError(
        f"{int(nonfinite.sum())} feature rows contain NaN or inf, first at row {int(np.flatnonzero(nonfinite)[0])}")
  for name, value in (("weights", weights), ("bias", bias)):
    if value is not None and not np.isfinite(np.asarray(value)).all():
      raise ValueError(f"{name} contain NaN or inf")


def _nonzero_counts(metrics: Mapping[str, jax.Array], keys: tuple) -> list[str]:
  """'what: count' for every key of ``metrics`` that is one of ``keys``, bare, with a
  suffix (``num_nonfinite_rows_test``) or under a prefix (``layer/x/num_...``), and not 0."""
  found = []
  for key, value in metrics.items():
    prefix, _, name = key.rpartition("/")
    if not any(name == base or name.startswith(base + "_") for base in keys):
      continue
    count = float(np.asarray(value))
    if count != 0:  # NaN counts too
      what = name[len("num_"):].replace("_", " ")
      found.append(f"{prefix + ': ' if prefix else ''}{what}: {int(count) if count == int(count) else count}")
  return found


def raise_if_invalid(metrics: Mapping[str, jax.Array], *, allow_degenerate: bool = False) -> None:
  """Raises ValueError if a (jitted) result holds metrics made NaN by a diagnostic.

  Checks every key of ``DIAGNOSTIC_KEYS`` (invalid inputs) and, unless
  ``allow_degenerate``, of ``DEGENERACY_KEYS`` (degenerate geometry, e.g. all class
  means equal), with or without a suffix such as ``_test``; the message names each
  non-zero count. Host-side: call it on the result of a jitted function.
  """
  invalid = _nonzero_counts(metrics, DIAGNOSTIC_KEYS)
  degenerate = [] if allow_degenerate else _nonzero_counts(metrics, DEGENERACY_KEYS)
  reasons = []
  if invalid:
    reasons.append("invalid inputs (" + "; ".join(invalid) + ")")
  if degenerate:
    reasons.append("degenerate geometry (" + "; ".join(degenerate) + "; allow_degenerate=True accepts it)")
  if reasons:
    raise ValueError("Neural Collapse metrics are NaN because of " + " and ".join(reasons))


# ----------------------------------------------------------------------------
# Diagnostics: what makes which metric undefined.
# ----------------------------------------------------------------------------


def _sample_diagnostics(state: streaming.DeviationState) -> dict:
  return {
      "num_samples": jnp.sum(state.counts),
      "num_invalid_labels": state.invalid_labels,
      "num_empty_classes": jnp.sum(state.counts == 0, dtype=jnp.int32),
      "num_nonfinite_rows": state.nonfinite_rows,
  }


def mean_degeneracy(means: jax.Array, centred: jax.Array, distance_sq: jax.Array) -> dict:
  """Counts of class-mean geometry that float32 cannot resolve, from (C, p) means and
  centred means and the (C, C) Gram-based ||M_a - M_c||^2 (any common units).

  With r = max(C, p, 16) eps and floor = r max_c ||mu_c|| (the rounding of means
  that may carry a large common offset):
    num_degenerate_means  #{c : ||M_c|| <= floor}: M_c has no direction;
    num_coincident_means  #{c < c' : ||M_c - M_c'||^2 <= floor^2 + 2 sqrt(p) eps (||M_c||^2 + ||M_c'||^2)},
                          the second term being the Gram formula's rounding.
  """
  num_classes, feature_dim = means.shape
  eps = float(jnp.finfo(means.dtype).eps)
  floor_sq = (max(num_classes, feature_dim, 16) * eps) ** 2 * jnp.max(jnp.sum(means**2, axis=-1))
  norm_sq = jnp.sum(centred**2, axis=-1)
  gram_rounding = 2.0 * np.sqrt(feature_dim) * eps * (norm_sq[:, None] + norm_sq[None, :])
  upper = jnp.triu(jnp.ones((num_classes, num_classes), bool), k=1)
  return {
      "num_degenerate_means": jnp.sum(norm_sq <= floor_sq, dtype=jnp.int32),
      "num_coincident_means": jnp.sum(upper & (distance_sq <= floor_sq + gram_rounding), dtype=jnp.int32),
  }


def weight_diagnostics(weights: jax.Array, bias: Optional[jax.Array]) -> dict:
  """num_nonfinite_weights: #{c : w_c or b_c holds a NaN or inf};
  num_zero_weight_rows: #{c : ||w_c||^2 underflows}, computed on W scaled to max |W_ij| ~ 1."""
  finite = jnp.all(jnp.isfinite(weights), axis=-1)
  if bias is not None:
    finite = finite & jnp.isfinite(bias)
  norm_sq = jnp.sum(streaming.unit_scaled(weights) ** 2, axis=-1)
  return {
      "num_nonfinite_weights": jnp.sum(~finite, dtype=jnp.int32),
      "num_zero_weight_rows": jnp.sum(norm_sq < jnp.finfo(weights.dtype).tiny, dtype=jnp.int32),
  }


def _defined(diagnostics: dict, num_classes: int) -> dict:
  """metric key -> bool scalar, False where the diagnostics make that metric undefined."""
  inputs = sum(diagnostics[key] for key in _SAMPLE_KEYS) == 0
  spread = diagnostics["num_degenerate_means"] < num_classes  # Sigma_B != 0
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
    some_rows = weights_ok & (diagnostics["num_zero_weight_rows"] < num_classes)
    all_rows = weights_ok & (diagnostics["num_zero_weight_rows"] == 0)
    defined |= {
        "equinorm_weights": some_rows, "equiangular_weights": all_rows, "max_angle_weights": all_rows,
        "etf_deviation_weights": some_rows, "self_duality": some_rows & spread,
        "unc3": all_rows & directions, "ncc_mismatch": weights_ok & spread, "accuracy": weights_ok,
    }
  return {key: jnp.logical_and(inputs, ok) for key, ok in defined.items()}


def _poison(metrics: dict, defined: dict) -> dict:
  return {key: jnp.where(defined[key], value, jnp.nan) for key, value in metrics.items()}


def _in_feature_units_sq(value: jax.Array, exponent: jax.Array) -> jax.Array:
  """A squared length measured in units of 2^e back in the features' units: value 4^e,
  exact, inf or 0 where float32 cannot hold the result."""
  return jnp.ldexp(value, 2 * exponent)


# ----------------------------------------------------------------------------
# Finalising pass 2 into metrics.
# ----------------------------------------------------------------------------


def finalize_collapse(
    state: streaming.DeviationState,
    geometry: streaming.ClassGeometry,
    *,
    global_mean: str = "class_means",
    divide_nc1_by_classes: bool = True,
    std_ddof: int = 1,
    self_duality_squared: bool = True,
) -> dict:
  """Metrics of the data seen in pass 2, with its own (corrected) class means.

  Everything is computed in pass 2's units (h 2^-e); only trace_within and
  trace_between are brought back to the features' units. Returns a dict of
  scalars; see ``neural_collapse`` for the keys.
  """
  num_classes = geometry.means.shape[0]
  counts = state.counts.astype(geometry.means.dtype)
  num_samples = jnp.sum(counts)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = state.deviation_sums / safe_counts[:, None]  # delta_c: pass-1 mean error
  means = geometry.means + correction
  centred = means - streaming.global_mean_of(means, state.counts, global_mean)

  within_sq = jnp.maximum(state.deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0)
  class_variance = within_sq / safe_counts  # (1/n_c) sum ||h - mu_c||^2
  trace_within = jnp.sum(within_sq) / num_samples
  trace_between = jnp.sum(centred**2) / num_classes

  correction_projected = geo.matmul_highest(
      geo.matmul_highest(correction, geometry.centred_means.T), geometry.basis
  ) * geometry.inverse_sq_singular_values
  nc1_sum = jnp.sum(state.projected_sq) - jnp.sum(counts * jnp.sum(correction_projected**2, axis=-1))
  nc1 = jnp.maximum(nc1_sum, 0.0) / num_samples  # = Tr(Sigma_W Sigma_B^+) / C
  if not divide_nc1_by_classes:
    nc1 = nc1 * num_classes

  distance_sq = geo.pairwise_distance_sq(centred)
  cdnv_pairs = (class_variance[:, None] + class_variance[None, :]) / (
      2.0 * jnp.where(jnp.eye(num_classes, dtype=bool), 1.0, distance_sq))  # diagonal unused

  metrics = {
      "nc1": nc1,
      "nc1_tirer": trace_within / trace_between,
      "cdnv": geo.off_diagonal_mean(cdnv_pairs),
      "trace_within": _in_feature_units_sq(trace_within, geometry.exponent),
      "trace_between": _in_feature_units_sq(trace_between, geometry.exponent),
      "equinorm_means": geo.equinorm(centred, std_ddof),
      "equiangular_means": geo.equiangularity(centred, std_ddof),
      "max_angle_means": geo.max_angle(centred),
      "etf_deviation_means": geo.etf_deviation(centred),
      "gnc2_means": geo.gnc2(centred, std_ddof),
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  diagnostics = _sample_diagnostics(state) | mean_degeneracy(means, centred, distance_sq)
  if geometry.weights is not None:
    weights = streaming.unit_scaled(geometry.weights.astype(centred.dtype))  # scale-free geometry of W
    metrics.update({
        "equinorm_weights": geo.equinorm(weights, std_ddof),
        "equiangular_weights": geo.equiangularity(weights, std_ddof),
        "max_angle_weights": geo.max_angle(weights),
        "etf_deviation_weights": geo.etf_deviation(weights),
        "self_duality": geo.self_duality(weights, centred, self_duality_squared),
        "unc3": geo.unc3(weights, centred, std_ddof),
        "ncc_mismatch": state.mismatch / num_samples,
        "accuracy": state.network_correct / num_samples,
    })
    diagnostics |= weight_diagnostics(geometry.weights, geometry.bias)
  return _poison(metrics, _defined(diagnostics, num_classes)) | diagnostics


def finalize_transfer(
    state: streaming.DeviationState,
    geometry: streaming.ClassGeometry,
    *,
    divide_nc1_by_classes: bool = True,
    suffix: str = "_test",
) -> dict:
  """Metrics of held-out data against the *reference* (training) means and Sigma_B.

  nc1{suffix} = Tr(Sigma_W' Sigma_B^+)/C with Sigma_W' = (1/N') sum_i (h_i - mu_{y_i})(...)^T
  over the held-out samples and the training mu_c, Sigma_B (Hui, Belkin & Nakkiran 2022);
  ncc_accuracy{suffix} classifies by the nearest *training* class mean. Diagnostics:
  the sample counts of the held-out data (a test set may lack classes, so
  num_empty_classes is 0), num_degenerate_means of the training means and, with
  weights, num_nonfinite_weights, all with the suffix.
  """
  num_classes = geometry.means.shape[0]
  num_samples = jnp.sum(state.counts)
  nc1 = jnp.sum(state.projected_sq) / num_samples
  metrics = {
      "nc1": nc1 if divide_nc1_by_classes else nc1 * num_classes,
      "trace_within": _in_feature_units_sq(jnp.sum(state.deviation_sq) / num_samples, geometry.exponent),
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  diagnostics = _sample_diagnostics(state)
  diagnostics["num_empty_classes"] = jnp.zeros((), jnp.int32)  # a test set may lack classes
  degeneracy = mean_degeneracy(geometry.means, geometry.centred_means, geometry.mean_distance_sq)
  diagnostics["num_degenerate_means"] = degeneracy["num_degenerate_means"]
  inputs = sum(diagnostics[key] for key in _SAMPLE_KEYS) == 0
  spread = inputs & (diagnostics["num_degenerate_means"] < num_classes)
  defined = {"nc1": spread, "trace_within": inputs, "ncc_accuracy": spread}
  if geometry.weights is not None:
    metrics["ncc_mismatch"] = state.mismatch / num_samples
    metrics["accuracy"] = state.network_correct / num_samples
    diagnostics["num_nonfinite_weights"] = weight_diagnostics(geometry.weights, geometry.bias)["num_nonfinite_weights"]
    weights_ok = diagnostics["num_nonfinite_weights"] == 0
    defined |= {"ncc_mismatch": spread & weights_ok, "accuracy": inputs & weights_ok}
  metrics = _poison(metrics, defined) | diagnostics
  return {key + suffix: value for key, value in metrics.items()}


# ----------------------------------------------------------------------------
# In-memory entry points.
# ----------------------------------------------------------------------------


def _num_chunks(num_samples: int, chunk_rows) -> int:
  """Smallest divisor d of N with N/d <= chunk_rows (1 when chunking is off or impossible)."""
  if chunk_rows == "auto":
    chunk_rows = 4096 if jax.default_backend() == "cpu" else None
  if chunk_rows is None or num_samples <= chunk_rows:
    return 1
  return next((d for d in range(2, num_samples + 1) if num_samples % d == 0 and num_samples // d <= chunk_rows), 1)


def deviations_pass(geometry, features, labels, mask=None, *, chunk_rows="auto", ncc_use_bias=True):
  """Pass 2 over in-memory features, in row chunks so the (rows, p) deviations stay in cache.

  Chunk c holds rows {j * d + c}: strided, so that every chunk is spread evenly over
  the devices of a mesh that shards N, and no chunk needs communication. On CPU,
  materialising all N x p deviations at once costs twice as much (fresh pages).
  """
  num_chunks = _num_chunks(features.shape[0], chunk_rows)
  update = functools.partial(streaming.update_deviations, geometry=geometry, ncc_use_bias=ncc_use_bias)
  start = streaming.init_deviations(geometry)
  if num_chunks == 1:
    return update(start, features=features, labels=labels, mask=mask)
  rows = features.shape[0] // num_chunks
  features = jnp.asarray(features).reshape(rows, num_chunks, features.shape[1])
  labels = jnp.asarray(labels).reshape(rows, num_chunks)
  mask = None if mask is None else jnp.asarray(mask).reshape(rows, num_chunks)

  def body(chunk, state):
    return update(state, features=features[:, chunk], labels=labels[:, chunk],
                  mask=None if mask is None else mask[:, chunk])

  return jax.lax.fori_loop(0, num_chunks, body, start)


def _class_means(features, labels, num_classes, mask, track_max_abs=True) -> streaming.ClassMeansState:
  state = streaming.init_class_means(num_classes, features.shape[1], streaming.float_dtype(features))
  return streaming.update_class_means(state, features, labels, mask, track_max_abs=track_max_abs)


def class_geometry(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
    global_mean: str = "class_means",
    solver: str = "svd",
    rcond: Optional[float] = None,
) -> streaming.ClassGeometry:
  """Pass 1 over in-memory features (N, p): class means, scale, centring, factorisation."""
  features, labels, weights, bias, mask = _as_inputs(features, labels, weights, bias, mask)
  check_shapes(features, labels, num_classes, weights, bias, mask)
  return streaming.finalize_class_means(_class_means(features, labels, num_classes, mask), weights, bias,
                                        global_mean=global_mean, solver=solver, rcond=rcond)


def _both_passes(features, labels, num_classes, weights, bias, mask, *, global_mean, solver, rcond,
                 chunk_rows, ncc_use_bias):
  """``class_geometry`` and ``deviations_pass``, without pass 1's max |h_ij| read in the common case.

  Round 1 measures in units of the largest |class mean| (known after pass 1, free).
  A finite row can overflow there only if it is ~1e18 times larger than every class
  mean; any row whose squared deviation is not finite (that, or a real NaN/inf)
  starts round 2, in units of the largest finite |h_ij|, where no finite row can
  overflow, so ``nonfinite_rows`` counts only NaN/inf rows. Both rounds give
  bit-identical results wherever neither over- nor underflows (powers of two).
  One ``lax.while_loop``, so pass 2 is compiled once.
  """
  means_state = _class_means(features, labels, num_classes, mask, track_max_abs=False)
  means_exponent = streaming.scale_exponent(streaming.max_finite_abs(means_state.means))

  def measure(round_):
    exponent = jax.lax.cond(round_ == 0, lambda: means_exponent, lambda: streaming.scale_exponent(
        streaming.max_abs_of_rows(features, streaming.segment_ids(labels, num_classes, mask), num_classes)))
    geometry = streaming.finalize_class_means(means_state, weights, bias, global_mean=global_mean,
                                              solver=solver, rcond=rcond, exponent=exponent)
    return geometry, deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows,
                                     ncc_use_bias=ncc_use_bias)

  def again(carry):
    round_, _, state = carry
    return (round_ == 0) | ((round_ == 1) & (state.nonfinite_rows > 0))

  def body(carry):
    return (carry[0] + 1, *measure(carry[0]))

  shapes = jax.eval_shape(measure, 0)
  start = (jnp.zeros((), jnp.int32), *jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
  _, geometry, state = jax.lax.while_loop(again, body, start)
  return geometry, state


def neural_collapse(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
    test_features: Optional[jax.Array] = None,
    test_labels: Optional[jax.Array] = None,
    global_mean: str = "class_means",
    solver: str = "svd",
    rcond: Optional[float] = None,
    divide_nc1_by_classes: bool = True,
    std_ddof: int = 1,
    self_duality_squared: bool = True,
    ncc_use_bias: bool = True,
    chunk_rows: Union[int, None, str] = "auto",
) -> dict:
  """All Neural Collapse metrics of penultimate-layer features; pure and jittable.

  Args:
    features: (N, p) float features h_i of the (training) set, p >= 1 (a jax or
      numpy array, or a nested list of numbers).
    labels: (N,) int labels in [0, C).
    num_classes: C >= 2, a Python int (mark it static under jit).
    weights: (C, p) last-layer W (logits = W h + b), or None.
    bias: (C,) last-layer b, or None.
    mask: (N,) bool, False for padding rows, or None.
    test_features, test_labels: optional held-out set (N', p), (N',): adds the
      ``*_test`` keys, measured against the training means (``finalize_transfer``).
    global_mean: 'class_means' (the notebook: mu_G = (1/C) sum_c mu_c) or
      'samples' (mu_G = (1/N) sum_i h_i); equal on balanced data.
    solver: 'svd' (default, accurate) or 'gram' (eigh of M M^T; faster for large
      C on accelerators, squares the condition number of M).
    rcond: directions of M with s_k <= rcond * s_max are not inverted in
      Sigma_B^+; default max(C, p) * eps.
    divide_nc1_by_classes: NC1 = Tr(Sigma_W Sigma_B^+)/C (paper) or without /C (notebook).
    std_ddof: 1 = unbiased std in equinorm/equiangularity (notebook), 0 = population.
    self_duality_squared: NC3 as the squared Frobenius distance (paper) or its root.
    ncc_use_bias: NC4 compares the NCC rule with argmax(W h + b) (paper) or argmax(W h).
    chunk_rows: pass 2 runs over row chunks of at most this many rows (None: one
      chunk; 'auto': 4096 on CPU, one chunk on accelerators). Only speed and
      summation order depend on it.

  Returns:
    dict of scalar arrays:
      nc1          Tr(Sigma_W Sigma_B^+)/C, never negative (paper Fig. 6);
      nc1_tirer    Tr Sigma_W / Tr Sigma_B (Tirer et al. 2023);
      cdnv         Avg_{c != c'} (V_c + V_c') / (2 ||mu_c - mu_c'||^2), V_c = (1/n_c) sum ||h - mu_c||^2;
      trace_within, trace_between   Tr Sigma_W, Tr Sigma_B, in the features' units squared
                   (the only keys that change with the scale of h: inf or 0 beyond float range);
      equinorm_means, equiangular_means, max_angle_means, etf_deviation_means
                   NC2 of the centred means (Figs. 2-4; ETF deviation, see geometry);
      gnc2_means   log-energy uniformity of the normalised centred means;
      ncc_accuracy fraction classified correctly by the nearest class mean;
      with weights: equinorm_weights, equiangular_weights, max_angle_weights,
      etf_deviation_weights (NC2 of W's rows), self_duality (NC3, Fig. 5),
      unc3, ncc_mismatch (NC4, Fig. 7), accuracy (of argmax(W h + b));
      int diagnostics: num_samples; invalid inputs (``DIAGNOSTIC_KEYS``)
      num_invalid_labels, num_empty_classes, num_nonfinite_rows and, with weights,
      num_nonfinite_weights; degenerate geometry (``DEGENERACY_KEYS``)
      num_degenerate_means, num_coincident_means and, with weights,
      num_zero_weight_rows. Each makes exactly the metrics it affects NaN (see the
      module docstring); ``raise_if_invalid`` reads them.
    With test_features: nc1_test, trace_within_test, ncc_accuracy_test (and
    ncc_mismatch_test, accuracy_test) and their diagnostics (see ``heldout_collapse``).

  Every key but trace_within/trace_between is unchanged when h is scaled by any
  10^k, |k| <= 30 (features are measured in exact power-of-two units), and
  accuracy / ncc_mismatch follow the network's own argmax(W h + b).

  Cost: two passes over the features, O(N p C) time, O(N p) temporary memory
  for the deviations; use ``nc_jax.metrics.streaming`` when they do not fit.
  """
  features, labels, weights, bias, mask = _as_inputs(features, labels, weights, bias, mask)
  check_shapes(features, labels, num_classes, weights, bias, mask)
  geometry, state = _both_passes(features, labels, num_classes, weights, bias, mask, global_mean=global_mean,
                                 solver=solver, rcond=rcond, chunk_rows=chunk_rows, ncc_use_bias=ncc_use_bias)
  metrics = finalize_collapse(
      state, geometry, global_mean=global_mean, divide_nc1_by_classes=divide_nc1_by_classes,
      std_ddof=std_ddof, self_duality_squared=self_duality_squared)
  if (test_features is None) != (test_labels is None):
    raise ValueError("test_features and test_labels must be given together")
  if test_features is not None:
    metrics |= heldout_collapse(test_features, test_labels, geometry, divide_nc1_by_classes=divide_nc1_by_classes,
                             ncc_use_bias=ncc_use_bias, chunk_rows=chunk_rows)
  return metrics


def heldout_collapse(
    features: jax.Array,
    labels: jax.Array,
    geometry: streaming.ClassGeometry,
    *,
    mask: Optional[jax.Array] = None,
    divide_nc1_by_classes: bool = True,
    ncc_use_bias: bool = True,
    chunk_rows: Union[int, None, str] = "auto",
) -> dict:
  """Held-out features (N', p) against training ``geometry`` (from ``class_geometry``).

  Keys: nc1_test, trace_within_test, ncc_accuracy_test and, with weights,
  ncc_mismatch_test and accuracy_test; plus the diagnostic counts with _test
  (``finalize_transfer``). Held-out features are measured in the training scale.
  """
  features = as_array(features, "test features", "(N', p)", floating=True)
  labels = as_array(labels, "test labels", "(N',)")
  mask = as_array(mask, "mask", "(N',)")
  check_shapes(features, labels, geometry.means.shape[0], mask=mask)
  if features.shape[1] != geometry.means.shape[1]:
    raise ValueError(f"test features have {features.shape[1]} columns, training means {geometry.means.shape[1]}")
  state = deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows, ncc_use_bias=ncc_use_bias)
  return finalize_transfer(state, geometry, divide_nc1_by_classes=divide_nc1_by_classes)




def per_layer_collapse(
    features_by_layer: Mapping[str, jax.Array],
    labels: jax.Array,
    num_classes: int,
    **options,
) -> dict[str, dict]:
  """``neural_collapse`` of every layer's features, each flattened to (N, -1).

  Args:
    features_by_layer: name -> (N, ...) activations (e.g. (N, H, W, C) conv maps).
    labels, num_classes, **options: as for ``neural_collapse`` (without weights).
  Returns:
    name -> metrics dict; NC1 and NCC accuracy across depth show where collapse starts.
  """
  layers = {name: as_array(value, f"features of layer {name!r}", "(N, ...)", floating=True)
            for name, value in features_by_layer.items()}
  return {name: neural_collapse(jnp.reshape(value, (value.shape[0], -1)), labels, num_classes, **options)
          for name, value in layers.items()}
