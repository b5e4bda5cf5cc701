"""The Neural Collapse suite: NC1-NC4 and their later variants from features and labels.

This module holds the in-memory entry points (``neural_collapse``, ``class_geometry``,
``heldout_collapse``, ``per_layer_collapse``, ``filter_classes``) and the input checks
(``check_shapes``, ``validate_inputs``, ``raise_if_invalid``). The two passes' states live in
``accumulators``, the metrics from their sums (``finalize_collapse``, ``finalize_transfer``, the
diagnostics) in ``finalize``; the latter are re-exported here.

Definitions follow Papyan, Han & Donoho (PNAS 2020) and the authors' notebook;
each convention that sources disagree on is a field of ``NCOptions`` (``options=``), or the
keyword of the same name, with the paper's choice as default. Notation: N samples, p features, C classes; mu_c class means,
mu_G the global mean, M = [mu_c - mu_G] (C, p) the centred means,
Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T,
Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T.

Scale. Features are measured in exact power-of-two units (see ``scale``), so
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
  classes dropped by ``min_count`` (opt-in; ``FILTER_KEYS``): ``num_filtered_classes`` and
    ``num_filtered_samples`` count them; they are absent from every metric, not errors.
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

from nc_jax.metrics import accumulators as acc
from nc_jax.metrics.finalize import (  # re-exported for callers of collapse
    DEGENERACY_KEYS,
    DIAGNOSTIC_KEYS,
    FILTER_KEYS,
    finalize_collapse,
    finalize_transfer,
    mean_degeneracy,
    weight_diagnostics,
)
from nc_jax.metrics.options import UNSET, NCOptions, resolve
from nc_jax.metrics.scale import float_dtype, max_finite_abs, scale_exponent
from nc_jax.metrics.sharding import check_mesh, explicit_mesh, run_auto


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
  if not invalid:  # trace_within is NaN only for invalid inputs or, with min_count, fewer than 2 kept classes
    for key, value in metrics.items():
      prefix, _, name = key.rpartition("/")
      suffix = name[len("trace_within"):]
      filtered = f"{prefix + '/' if prefix else ''}num_filtered_classes"
      if name.startswith("trace_within") and suffix in ("", "_test") and filtered in metrics \
          and np.isnan(float(np.asarray(value))):
        reasons.append(f"min_count leaving fewer than 2 classes ({prefix + ': ' if prefix else ''}filtered "
                       f"classes: {int(np.asarray(metrics[filtered]))}; lower min_count)")
        break
  if invalid:
    reasons.append("invalid inputs (" + "; ".join(invalid) + ")")
  if degenerate:
    reasons.append("degenerate geometry (" + "; ".join(degenerate) + "; allow_degenerate=True accepts it)")
  if reasons:
    raise ValueError("Neural Collapse metrics are NaN because of " + " and ".join(reasons))


# ----------------------------------------------------------------------------
# In-memory entry points.
# ----------------------------------------------------------------------------


CHUNK_BYTES = 1 << 26  # per (rows, C) float32 temporary of pass 2, which keeps about four of them


def _chunk_rows(num_classes: int, chunk_rows, platform: Optional[str] = None) -> Optional[int]:
  """Rows per pass-2 chunk: 'auto' bounds each (rows, C) temporary by ``CHUNK_BYTES`` on every
  backend (C = 50 257: 333 rows), and on CPU also by 4096 rows (the (rows, p) deviations stay
  in cache); None: one chunk. ``platform``: the backend the rows are for (None: ``jax.default_backend()``;
  a program lowered for another platform passes the integer this gives for it as ``chunk_rows``)."""
  if chunk_rows != "auto":
    return chunk_rows
  rows = max(CHUNK_BYTES // (4 * num_classes), 64)
  return min(rows, 4096) if (platform or jax.default_backend()) == "cpu" else rows


def _chunking(num_samples: int, chunk_rows: Optional[int]) -> tuple[int, int]:
  """(d, N'): d chunks of N'/d rows each, N' >= N. A divisor d of N with N/d in [rows/2, rows]
  when there is one (N' = N), else d = ceil(N / rows) and N' = d ceil(N/d) (padding rows masked)."""
  if chunk_rows is None or num_samples <= chunk_rows:
    return 1, num_samples
  fewest = -(-num_samples // chunk_rows)
  divisor = next((d for d in range(fewest, 2 * fewest + 1) if num_samples % d == 0), None)
  if divisor is not None:
    return divisor, num_samples
  return fewest, fewest * -(-num_samples // fewest)


def deviations_pass(geometry, features, labels, mask=None, *, chunk_rows="auto", options: Optional[NCOptions] = None):
  """Pass 2 over in-memory features, in row chunks so the (rows, C) products stay bounded.

  Chunk c holds rows {j * d + c}: strided, so that every chunk is spread evenly over
  the devices of a mesh that shards N, and no chunk needs communication. On CPU,
  materialising all N x p deviations at once costs twice as much (fresh pages). When no
  divisor of N gives chunks of the right size, N is padded with masked rows. ``options``: as for
  ``accumulators.update_deviations`` (None: NCOptions()).
  """
  num_samples = features.shape[0]
  num_chunks, padded = _chunking(num_samples, _chunk_rows(geometry.means.shape[0], chunk_rows))
  update = functools.partial(acc.update_deviations, geometry=geometry, options=options)
  start = acc.init_deviations(geometry)
  if num_chunks == 1:
    return update(start, features=features, labels=labels, mask=mask)
  features, labels = jnp.asarray(features), jnp.asarray(labels)
  if padded > num_samples:
    extra = padded - num_samples
    mask = jnp.arange(padded) < num_samples if mask is None else jnp.pad(jnp.asarray(mask, bool), (0, extra))
    features, labels = jnp.pad(features, ((0, extra), (0, 0))), jnp.pad(labels, (0, extra))
  rows = padded // num_chunks
  features = features.reshape(rows, num_chunks, features.shape[1])
  labels = labels.reshape(rows, num_chunks)
  mask = None if mask is None else jnp.asarray(mask).reshape(rows, num_chunks)

  def body(chunk, state):
    return update(state, features=features[:, chunk], labels=labels[:, chunk],
                  mask=None if mask is None else mask[:, chunk])

  return jax.lax.fori_loop(0, num_chunks, body, start)


def _class_means(features, labels, num_classes, mask, track_max_abs=True) -> acc.ClassMeansState:
  state = acc.init_class_means(num_classes, features.shape[1], float_dtype(features))
  return acc.update_class_means(state, features, labels, mask, track_max_abs=track_max_abs)


def class_geometry(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
    options: Optional[NCOptions] = None,
    global_mean=UNSET,
    solver=UNSET,
    rcond=UNSET,
    min_count=UNSET,
) -> acc.ClassGeometry:
  """Pass 1 over in-memory features (N, p): class means, scale, centring, factorisation.

  Of ``options`` (``NCOptions``; or the keywords of the same names) this uses global_mean,
  solver, rcond and min_count (see ``neural_collapse``).
  """
  options = resolve(options, "class_geometry", global_mean=global_mean, solver=solver, rcond=rcond,
                    min_count=min_count)
  features, labels, weights, bias, mask = _as_inputs(features, labels, weights, bias, mask)
  check_shapes(features, labels, num_classes, weights, bias, mask)
  return acc.finalize_class_means(_class_means(features, labels, num_classes, mask), weights, bias, options=options)


def _both_passes(features, labels, num_classes, weights, bias, mask, *, options: NCOptions, chunk_rows):
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
  means_exponent = scale_exponent(max_finite_abs(means_state.means))

  def measure(round_):
    exponent = jax.lax.cond(round_ == 0, lambda: means_exponent, lambda: scale_exponent(
        acc.max_abs_of_rows(features, acc.segment_ids(labels, num_classes, mask), num_classes)))
    geometry = acc.finalize_class_means(means_state, weights, bias, options=options, exponent=exponent)
    # Not carried through the loop: U (C, r), which neither pass 2 nor finalize needs (so it is never
    # formed), and W, b, given (set again below); at C = 50 257 each (C, p) copy is 150 MB.
    geometry = geometry.replace(basis=None, weights=None if weights is None else jnp.zeros((0,)),
                                bias=None if bias is None else jnp.zeros((0,)))
    return geometry, deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows, options=options)

  def again(carry):
    round_, _, state = carry
    return (round_ == 0) | ((round_ == 1) & (state.nonfinite_rows > 0))

  def body(carry):
    return (carry[0] + 1, *measure(carry[0]))

  shapes = jax.eval_shape(measure, 0)
  start = (jnp.zeros((), jnp.int32), *jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
  _, geometry, state = jax.lax.while_loop(again, body, start)
  return geometry.replace(weights=weights, bias=bias), state


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
    options: Optional[NCOptions] = None,
    global_mean=UNSET,
    solver=UNSET,
    rcond=UNSET,
    divide_nc1_by_classes=UNSET,
    std_ddof=UNSET,
    self_duality_squared=UNSET,
    ncc_use_bias=UNSET,
    min_count=UNSET,
    chunk_rows: Union[int, None, str] = "auto",
    pair_block_rows: Optional[int] = None,
    pair_mesh: Optional[jax.sharding.Mesh] = None,
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
    options: the conventions as one ``NCOptions`` (hashable: static under jit), or None.
    global_mean, solver, rcond, divide_nc1_by_classes, std_ddof, self_duality_squared,
      ncc_use_bias, min_count: the same conventions one by one (see ``NCOptions``; defaults:
      the paper's). A keyword given with ``options`` must agree with it (else a ValueError).
      With min_count k, classes with fewer than k samples (empty ones included) are left out
      of every metric, as if the data had only the C' kept classes (labels remapped, rows of
      W and b dropped): C' replaces C in every formula (NC1's 1/C, Sigma_B, mu_G, the ETF
      target, max_angle's 1/(C'-1)), their samples are masked out, NCC and argmax run over
      the kept classes only; adds num_filtered_classes, num_filtered_samples. Fewer than 2
      kept classes make every metric NaN. ``filter_classes`` does the same on the host.
    chunk_rows: pass 2 runs over row chunks of at most this many rows (None: one
      chunk; 'auto': each (rows, C) temporary at most 64 MB on any backend, and at
      most 4096 rows on CPU; one chunk when that covers N). Only speed, memory and
      summation order depend on it.
    pair_block_rows: rows per tile of the pair statistics (None: one dense tile up to
      ``geometry.DENSE_MAX_CLASSES`` classes, else ``geometry.PAIR_BLOCK``).
    pair_mesh: a ``jax.sharding.Mesh`` (the one the features live on): beyond the dense
      threshold its devices share the tiles of the pair statistics, each sweeping ~1/D of
      them (``geometry.pair_sums``); None: one device sweeps them all. Inputs sharded on Explicit
      mesh axes (jax.make_mesh's default) are computed on Auto axes (``sharding.run_auto``).

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

  Cost: two passes over the features, O(N p C) time, plus O(C^2 p) for the pair
  statistics (two tiled sweeps over the Gram matrices of M and W); temporary memory
  O(C p) plus (rows, C) per chunk and one tile: no C x C array beyond the dense
  threshold. Use ``nc_jax.metrics.streaming`` when the features do not fit.
  """
  options = resolve(options, "neural_collapse", global_mean=global_mean, solver=solver, rcond=rcond,
                    divide_nc1_by_classes=divide_nc1_by_classes, std_ddof=std_ddof,
                    self_duality_squared=self_duality_squared, ncc_use_bias=ncc_use_bias, min_count=min_count)
  layout = {"chunk_rows": chunk_rows, "pair_block_rows": pair_block_rows, "pair_mesh": pair_mesh}
  return _collapse((features, labels, weights, bias, mask), (test_features, test_labels), num_classes, options, layout)


def _collapse(inputs: tuple, test: tuple, num_classes: int, options: NCOptions, layout: dict) -> dict:
  """``neural_collapse`` of ``inputs`` = (features, labels, weights, bias, mask) and ``test`` =
  (test_features, test_labels), with the conventions as ``options`` and ``layout`` = {chunk_rows,
  pair_block_rows, pair_mesh}."""
  features, labels, weights, bias, mask = _as_inputs(*inputs)
  check_shapes(features, labels, num_classes, weights, bias, mask)
  check_mesh(layout["pair_mesh"])
  if (test[0] is None) != (test[1] is None):
    raise ValueError("test_features and test_labels must be given together")
  explicit = explicit_mesh(features, labels, weights, bias, mask, *test)
  if explicit is not None:  # inputs typed on Explicit axes (jax.make_mesh's default): computed on Auto axes
    return run_auto(lambda h, y, w, b, m, th, ty: _collapse((h, y, w, b, m), (th, ty), num_classes, options, layout),
                    explicit, features, labels, weights, bias, mask, *test)
  geometry, state = _both_passes(features, labels, num_classes, weights, bias, mask, options=options,
                                 chunk_rows=layout["chunk_rows"])
  metrics = finalize_collapse(state, geometry, options=options, block_rows=layout["pair_block_rows"],
                              mesh=layout["pair_mesh"])
  if test[0] is not None:
    metrics |= heldout_collapse(*test, geometry, options=options, chunk_rows=layout["chunk_rows"])
  return metrics


def heldout_collapse(
    features: jax.Array,
    labels: jax.Array,
    geometry: acc.ClassGeometry,
    *,
    mask: Optional[jax.Array] = None,
    options: Optional[NCOptions] = None,
    chunk_rows: Union[int, None, str] = "auto",
    divide_nc1_by_classes=UNSET,
    ncc_use_bias=UNSET,
) -> dict:
  """Held-out features (N', p) against training ``geometry`` (from ``class_geometry``).

  Keys: nc1_test, trace_within_test, ncc_accuracy_test and, with weights,
  ncc_mismatch_test and accuracy_test; plus the diagnostic counts with _test
  (``finalize_transfer``). Held-out features are measured in the training scale. Of ``options``
  (or the keywords) this uses divide_nc1_by_classes and ncc_use_bias.
  """
  options = resolve(options, "heldout_collapse", divide_nc1_by_classes=divide_nc1_by_classes,
                    ncc_use_bias=ncc_use_bias)
  features = as_array(features, "test features", "(N', p)", floating=True)
  labels = as_array(labels, "test labels", "(N',)")
  mask = as_array(mask, "mask", "(N',)")
  check_shapes(features, labels, geometry.means.shape[0], mask=mask)
  if features.shape[1] != geometry.means.shape[1]:
    raise ValueError(f"test features have {features.shape[1]} columns, training means {geometry.means.shape[1]}")
  state = deviations_pass(geometry, features, labels, mask, chunk_rows=chunk_rows, options=options)
  return finalize_transfer(state, geometry, options=options)


def filter_classes(features, labels, num_classes: int, weights=None, bias=None, *, min_count: int, mask=None):
  """Host-side (eager, numpy) ``min_count`` filtering: drops classes with fewer than ``min_count``
  samples and remaps the labels of the C' kept classes to [0, C').

  Args: features (N, p), labels (N,), weights (C, p) or None, bias (C,) or None, mask (N,) or None
  (masked rows count for no class and are dropped too), as for ``neural_collapse``.
  Returns (features (N', p), labels (N',), C', weights (C', p) or None, bias (C',) or None,
  diagnostics {num_filtered_classes, num_filtered_samples}); labels outside [0, C) are kept,
  unchanged as -1, so ``neural_collapse`` still counts them as invalid.
  ``neural_collapse(..., min_count=k)`` gives the metrics of ``neural_collapse`` on these arrays.
  """
  acc.check_min_count(min_count)
  if min_count is None:
    raise ValueError("filter_classes needs min_count, a non-negative int: classes with fewer samples are dropped")
  features, labels, weights, bias, mask = _as_inputs(features, labels, weights, bias, mask)
  check_shapes(features, labels, num_classes, weights, bias, mask)
  features, labels, weights, bias, mask = (None if x is None else np.asarray(x)
                                           for x in (features, labels, weights, bias, mask))
  active = np.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  in_range = (labels >= 0) & (labels < num_classes)
  counts = np.bincount(labels[active & in_range], minlength=num_classes)
  kept = counts >= min_count
  new_label = np.cumsum(kept) - 1
  rows = active & (~in_range | kept[np.where(in_range, labels, 0)])
  remapped = np.where(in_range, new_label[np.where(in_range, labels, 0)], -1)[rows].astype(labels.dtype)
  diagnostics = {"num_filtered_classes": int(num_classes - kept.sum()),
                 "num_filtered_samples": int(np.sum(active & in_range & ~kept[np.where(in_range, labels, 0)]))}
  return (features[rows], remapped, int(kept.sum()), None if weights is None else weights[kept],
          None if bias is None else bias[kept], diagnostics)


def per_layer_collapse(
    features_by_layer: Mapping[str, jax.Array],
    labels: jax.Array,
    num_classes: int,
    *,
    options: Optional[NCOptions] = None,
    **keywords,
) -> dict[str, dict]:
  """``neural_collapse`` of every layer's features, each flattened to (N, -1).

  Args:
    features_by_layer: name -> (N, ...) activations (e.g. (N, H, W, C) conv maps).
    labels, num_classes, options, **keywords: as for ``neural_collapse`` (without weights).
  Returns:
    name -> metrics dict; NC1 and NCC accuracy across depth show where collapse starts.
  """
  layers = {name: as_array(value, f"features of layer {name!r}", "(N, ...)", floating=True)
            for name, value in features_by_layer.items()}
  return {name: neural_collapse(jnp.reshape(value, (value.shape[0], -1)), labels, num_classes, options=options,
                                **keywords)
          for name, value in layers.items()}
