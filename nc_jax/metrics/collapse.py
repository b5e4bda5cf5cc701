"""The Neural Collapse suite: NC1-NC4 and their later variants from features and labels.

Definitions follow Papyan, Han & Donoho (PNAS 2020) and the authors' notebook;
each convention that sources disagree on is a keyword option with the paper's
choice as default. Notation: N samples, p features, C classes; mu_c class means,
mu_G the global mean, M = [mu_c - mu_G] (C, p) the centred means,
Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T.

Bad values cannot raise inside ``jit``; they poison instead: if any unmasked
label lies outside [0, C), any class has no sample, or any unmasked feature row
holds a NaN or inf, *every* float metric is NaN and the integer counts
``num_invalid_labels``, ``num_empty_classes``, ``num_nonfinite_rows`` say why.
``raise_if_invalid(metrics)`` turns that into a ``ValueError`` on the host, and
``validate_inputs`` checks concrete arrays before any tracing.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import geometry as geo
from nc_jax.metrics import streaming

DIAGNOSTIC_KEYS = ("num_invalid_labels", "num_empty_classes", "num_nonfinite_rows")


# ----------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------


def check_shapes(features, labels, num_classes, weights=None, bias=None, mask=None) -> None:
  """Raises ValueError at trace time for wrong ranks, shapes, dtypes or C < 2."""
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool):
    raise ValueError(f"num_classes must be a Python int (static under jit), got {num_classes!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  if jnp.ndim(features) != 2:
    raise ValueError(f"features must have shape (N, p), got shape {jnp.shape(features)}")
  if jnp.ndim(labels) != 1:
    raise ValueError(f"labels must have shape (N,), got shape {jnp.shape(labels)}")
  num_samples, feature_dim = jnp.shape(features)
  if jnp.shape(labels)[0] != num_samples:
    raise ValueError(f"features have {num_samples} rows but labels have {jnp.shape(labels)[0]}")
  if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
    raise ValueError(f"features must be floating point, got dtype {jnp.result_type(features)}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")
  if weights is not None and jnp.shape(weights) != (num_classes, feature_dim):
    raise ValueError(
        f"weights must have shape (num_classes, p) = {(num_classes, feature_dim)}, got {jnp.shape(weights)}")
  if bias is not None and weights is None:
    raise ValueError("bias was given without weights")
  if bias is not None and jnp.shape(bias) != (num_classes,):
    raise ValueError(f"bias must have shape (num_classes,) = {(num_classes,)}, got {jnp.shape(bias)}")
  if mask is not None and jnp.shape(mask) != (num_samples,):
    raise ValueError(f"mask must have shape (N,) = {(num_samples,)}, got {jnp.shape(mask)}")


def validate_inputs(features, labels, num_classes: int, mask=None) -> None:
  """Eager check of concrete arrays; raises ValueError naming the first problem found."""
  check_shapes(features, labels, num_classes, mask=mask)
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


def raise_if_invalid(metrics: Mapping[str, jax.Array]) -> None:
  """Raises ValueError if a (jitted) result was poisoned by invalid inputs."""
  problems = [f"{key[4:].replace('_', ' ')}: {int(metrics[key])}"
              for key in DIAGNOSTIC_KEYS if key in metrics and int(metrics[key]) > 0]
  if problems:
    raise ValueError("Neural Collapse metrics are NaN because of invalid inputs (" + "; ".join(problems) + ")")


# ----------------------------------------------------------------------------
# Finalising pass 2 into metrics.
# ----------------------------------------------------------------------------


def _poison(metrics: dict, ok: jax.Array) -> dict:
  return {key: jnp.where(ok, value, jnp.nan) if jnp.issubdtype(value.dtype, jnp.floating) else value
          for key, value in metrics.items()}


def _diagnostics(state: streaming.DeviationState) -> dict:
  return {
      "num_samples": jnp.sum(state.counts),
      "num_invalid_labels": state.invalid_labels,
      "num_empty_classes": jnp.sum(state.counts == 0, dtype=jnp.int32),
      "num_nonfinite_rows": state.nonfinite_rows,
  }


def _is_valid(diagnostics: dict) -> jax.Array:
  return sum(diagnostics[key] for key in DIAGNOSTIC_KEYS) == 0


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

  Returns a dict of scalars; see ``neural_collapse`` for the keys.
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
  distance_sq = jnp.where(jnp.eye(num_classes, dtype=bool), 1.0, distance_sq)  # diagonal unused
  cdnv_pairs = (class_variance[:, None] + class_variance[None, :]) / (2.0 * distance_sq)

  metrics = {
      "nc1": nc1,
      "nc1_tirer": trace_within / trace_between,
      "cdnv": geo.off_diagonal_mean(cdnv_pairs),
      "trace_within": trace_within,
      "trace_between": trace_between,
      "equinorm_means": geo.equinorm(centred, std_ddof),
      "equiangular_means": geo.equiangularity(centred, std_ddof),
      "max_angle_means": geo.max_angle(centred),
      "etf_deviation_means": geo.etf_deviation(centred),
      "gnc2_means": geo.gnc2(centred, std_ddof),
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  if geometry.weights is not None:
    weights = geometry.weights.astype(centred.dtype)
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
  diagnostics = _diagnostics(state)
  return _poison(metrics, _is_valid(diagnostics)) | diagnostics


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
  ncc_accuracy{suffix} classifies by the nearest *training* class mean.
  """
  num_classes = geometry.means.shape[0]
  num_samples = jnp.sum(state.counts)
  nc1 = jnp.sum(state.projected_sq) / num_samples
  metrics = {
      "nc1": nc1 if divide_nc1_by_classes else nc1 * num_classes,
      "trace_within": jnp.sum(state.deviation_sq) / num_samples,
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  if geometry.weights is not None:
    metrics["ncc_mismatch"] = state.mismatch / num_samples
    metrics["accuracy"] = state.network_correct / num_samples
  diagnostics = _diagnostics(state)
  diagnostics["num_empty_classes"] = jnp.zeros((), jnp.int32)  # a test set may lack classes
  metrics = _poison(metrics, _is_valid(diagnostics)) | diagnostics
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
  """Pass 1 over in-memory features (N, p): class means, centring, factorisation."""
  check_shapes(features, labels, num_classes, weights, bias, mask)
  dtype = streaming.float_dtype(features)
  state = streaming.init_class_means(num_classes, features.shape[1], dtype)
  state = streaming.update_class_means(state, features, labels, mask)
  return streaming.finalize_class_means(
      state, weights, bias, global_mean=global_mean, solver=solver, rcond=rcond)


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
    features: (N, p) float features h_i of the (training) set.
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
      trace_within, trace_between   Tr Sigma_W, Tr Sigma_B;
      equinorm_means, equiangular_means, max_angle_means, etf_deviation_means
                   NC2 of the centred means (Figs. 2-4; ETF deviation, see geometry);
      gnc2_means   log-energy uniformity of the normalised centred means;
      ncc_accuracy fraction classified correctly by the nearest class mean;
      with weights: equinorm_weights, equiangular_weights, max_angle_weights,
      etf_deviation_weights (NC2 of W's rows), self_duality (NC3, Fig. 5),
      unc3, ncc_mismatch (NC4, Fig. 7), accuracy (of argmax(W h + b));
      num_samples, num_invalid_labels, num_empty_classes, num_nonfinite_rows (int).

  Cost: two passes over the features, O(N p C) time, O(N p) temporary memory
  for the deviations; use ``nc_jax.metrics.streaming`` when they do not fit.
  """
  geometry = class_geometry(features, labels, num_classes, weights, bias, mask=mask,
                            global_mean=global_mean, solver=solver, rcond=rcond)
  state = deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows, ncc_use_bias=ncc_use_bias)
  metrics = finalize_collapse(
      state, geometry, global_mean=global_mean, divide_nc1_by_classes=divide_nc1_by_classes,
      std_ddof=std_ddof, self_duality_squared=self_duality_squared)
  if (test_features is None) != (test_labels is None):
    raise ValueError("test_features and test_labels must be given together")
  if test_features is not None:
    metrics |= test_collapse(test_features, test_labels, geometry, divide_nc1_by_classes=divide_nc1_by_classes,
                             ncc_use_bias=ncc_use_bias, chunk_rows=chunk_rows)
  return metrics


def test_collapse(
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
  ncc_mismatch_test and accuracy_test; plus the diagnostic counts with _test.
  """
  check_shapes(features, labels, geometry.means.shape[0], mask=mask)
  if features.shape[1] != geometry.means.shape[1]:
    raise ValueError(f"test features have {features.shape[1]} columns, training means {geometry.means.shape[1]}")
  state = deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows, ncc_use_bias=ncc_use_bias)
  return finalize_transfer(state, geometry, divide_nc1_by_classes=divide_nc1_by_classes)


test_collapse.__test__ = False  # not a pytest test


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
  return {name: neural_collapse(jnp.reshape(value, (value.shape[0], -1)), labels, num_classes, **options)
          for name, value in features_by_layer.items()}
