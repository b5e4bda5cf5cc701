"""Two-pass streaming statistics for Neural Collapse: init / update / merge / finalize.

The complete two-pass API, for data that does not fit in memory:

    state = init_class_means(C, p)                    # pass 1, batch by batch (merge_* across hosts)
    state = update_class_means(state, h, y, mask)
    geometry = finalize_class_means(state, W, b)      # optional min_count=k drops classes with < k samples
    dev = init_deviations(geometry)                   # pass 2, over the same batches
    dev = update_deviations(dev, geometry, h, y, mask)
    metrics = finalize_collapse(dev, geometry)        # or finalize_transfer for held-out data

Why two passes over the data. Every NC quantity is a function of the class
means mu_c and of the deviations d_i = h_i - mu_{y_i}. The NCC rule (NC4) and the
projection of d_i onto the span of the centred means (NC1) need the *final*
means, and float32 cannot get the deviations from raw moments: with class-mean
norms ~100 and spread ~1e-3, E[hh^T] - mu mu^T cancels every significant digit
and NC1 comes out negative. A one-pass alternative would keep a p x p centred
scatter (Chan et al.), costing O(N p^2) time and O(p^2) memory, against
O(N p C) and O(C p) here. So:

  pass 1  (``*_class_means``)  counts and class means, merged batch by batch with
           Chan's update  mu = mu_A + (n_B/n)(mu_B - mu_A).
  between (``finalize_class_means``) centred means M = mu - mu_G and the
           rank-r factorisation M = U S V^T (r = min(p, C-1)), as ``ClassGeometry``.
  pass 2  (``*_deviations``)  per class: sum of d_i, sum of ||d_i||^2, sum of
           ||S^-1 V^T d_i||^2 (= ||S^-2 U^T M d_i||^2, the NC1 summand); and the
           counts of network / NCC decisions, from (B, C) products only.
  finalize (``finalize_collapse``, ``finalize_transfer``) the metrics and the
           diagnostic counts that poison the undefined ones (see ``collapse``).

Vocabulary-sized C. Nothing here holds a C x C array: ``ClassGeometry`` stores (C, p),
(C, r), (p, r) and (C,) arrays; pass 2 ranks classes by ||M_c||^2 - 2 <g_i, M_c> with the
centred feature g_i = d_i + M_{y_i} (a (B, C) product), and the logits are W' x_i + b';
``collapse.neural_collapse`` chunks N so each (B, C) temporary stays within 64 MB; the
pair statistics of ``finalize_collapse`` are swept tile by tile (``geometry.pair_sums``).

Pass 2 also corrects pass 1: the pass-1 means carry float32 summation error of
about one ulp of the raw features (1e-6 for features ~10), which can be as big
as the within-class spread. Deviations d_i from those means are exact
(Sterbenz), their class averages delta_c give the error, and finalize uses
mu_c + delta_c and sum ||d - delta||^2 = sum ||d||^2 - n ||delta||^2 (the
"corrected two-pass" algorithm of Chan, Golub & LeVeque).

Scale. NC1, NC2, NC3, CDNV and the NCC rule do not change when every feature is
multiplied by the same positive number, but float32 squares overflow above
~1.8e19 and flush to zero below ~1e-19. So pass 1 also keeps the largest finite
|h_ij| it has seen (merged by max), and ``finalize_class_means`` picks the
exponent e with max |h_ij| 2^-e in [0.5, 1). Pass 2 works on h 2^-e: a power of
two, so the scaled numbers are exactly the unscaled ones wherever those did not
over- or underflow, and ordinary data gives bit-identical results. The logits
W h + b are compared in their own exact power-of-two units (``logit_weights``,
``logit_bias``), so the network's decision never changes. Class means stay in
the features' units in pass 1 (its sums switch to scaled units only for a batch
whose sum could overflow); everything in ``ClassGeometry`` and ``DeviationState``
is in the scaled units.

All state is a pytree of arrays with static shapes, so every function works
inside ``jax.jit`` and ``lax.scan``, and on inputs sharded along N. ``merge_*``
combines the states of disjoint data (other hosts, other chunks) exactly.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from nc_jax.metrics import geometry as geo
from nc_jax.metrics.geometry import matmul_highest

GLOBAL_MEANS = ("class_means", "samples")
SOLVERS = ("svd", "gram")
DIAGNOSTIC_KEYS = ("num_invalid_labels", "num_empty_classes", "num_nonfinite_rows", "num_nonfinite_weights")
DEGENERACY_KEYS = ("num_degenerate_means", "num_coincident_means", "num_zero_weight_rows")
FILTER_KEYS = ("num_filtered_classes", "num_filtered_samples")  # only with min_count
_SAMPLE_KEYS = DIAGNOSTIC_KEYS[:3]  # the ones that poison every metric


def float_dtype(features: jax.Array):
  """float32 for bfloat16/float16/float32 inputs; float64 only where jax_enable_x64 allows it."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(features.dtype, jnp.float32))


def scale_exponent(max_abs: jax.Array) -> jax.Array:
  """The int32 e with max_abs * 2^-e in [0.5, 1); 0 when max_abs is 0 or not finite.

  Clipped to the normal range (float32: -126 <= e <= 126), so 2^-e is an exact,
  normal float and multiplying by it loses nothing.
  """
  info = jnp.finfo(max_abs.dtype)
  _, exponent = jnp.frexp(max_abs)
  exponent = jnp.where(jnp.isfinite(max_abs) & (max_abs > 0), exponent, 0)
  return jnp.clip(exponent, info.minexp, info.maxexp - 2).astype(jnp.int32)


def power_of_two(exponent: jax.Array, dtype) -> jax.Array:
  """2^exponent as a ``dtype`` scalar, exact for exponents in the normal range."""
  return jnp.ldexp(jnp.ones((), dtype), exponent)


def max_finite_abs(values: jax.Array) -> jax.Array:
  """max |v_ij| over the finite entries of ``values`` (any shape), 0 if there are none."""
  magnitude = jnp.abs(values)
  return jnp.max(jnp.where(jnp.isfinite(magnitude), magnitude, 0.0), initial=0.0)


def unit_scaled(vectors: jax.Array) -> jax.Array:
  """``vectors`` times the power of two that brings max |v_ij| into [0.5, 1) (NaN and inf stay).

  For the scale-invariant geometry of classifier rows: exact, and no square can overflow.
  """
  return vectors * power_of_two(-scale_exponent(max_finite_abs(vectors)), vectors.dtype)


def segment_ids(labels: jax.Array, num_classes: int, mask: Optional[jax.Array] = None) -> jax.Array:
  """Labels (N,) with masked and out-of-range entries set to C, which ``class_sums`` drops."""
  valid = (labels >= 0) & (labels < num_classes)
  if mask is not None:
    valid = valid & mask.astype(bool)
  return jnp.where(valid, labels, num_classes)


def class_sums(values: jax.Array, ids: jax.Array, num_classes: int) -> jax.Array:
  """sum_{i: ids_i = c} values_i for c < C, (C, ...); rows with id C are dropped, not multiplied
  by zero, so NaN in padding rows cannot leak. A scatter-add is O(N p), against O(N p C) for a
  one-hot matmul (3x faster on CPU already at C = 10)."""
  return jax.ops.segment_sum(values, ids, num_segments=num_classes)


# ----------------------------------------------------------------------------
# Pass 1: class means.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class ClassMeansState:
  """Pass-1 state, in the features' own units.

  Attributes:
    counts: (C,) int32 samples per class.
    means: (C, p) class means (0 for classes not yet seen).
    max_abs: () the largest |h_ij| of the finite unmasked rows (0 before any, or when
      not tracked): with the means, it sets the scale of pass 2.
  """

  counts: jax.Array
  means: jax.Array
  max_abs: jax.Array


def init_class_means(num_classes: int, feature_dim: int, dtype=jnp.float32) -> ClassMeansState:
  return ClassMeansState(
      counts=jnp.zeros((num_classes,), jnp.int32),
      means=jnp.zeros((num_classes, feature_dim), dtype),
      max_abs=jnp.zeros((), dtype),
  )


def merge_class_means(a: ClassMeansState, b: ClassMeansState) -> ClassMeansState:
  """Means of the union of two disjoint sets: mu = mu_a + (n_b / n)(mu_b - mu_a); max_abs = max."""
  counts = a.counts + b.counts
  weight_b = b.counts / jnp.maximum(counts, 1)
  means = a.means + weight_b[:, None].astype(a.means.dtype) * (b.means - a.means)
  return ClassMeansState(counts=counts, means=means, max_abs=jnp.maximum(a.max_abs, b.max_abs))


def max_abs_of_rows(features: jax.Array, ids: jax.Array, num_classes: int) -> jax.Array:
  """max |h_ij| over the rows of ``features`` (B, p) with ids < C and no NaN or inf (0 if none)."""
  if features.size == 0:
    return jnp.zeros((), features.dtype)
  row_max = jnp.max(jnp.abs(features), axis=-1)  # NaN or inf iff the row holds one
  return jnp.max(jnp.where((ids < num_classes) & jnp.isfinite(row_max), row_max, 0.0))


def _batch_max_abs(features: jax.Array, ids: jax.Array, num_classes: int, masked: bool) -> jax.Array:
  """``max_abs_of_rows``, by one reduction over the whole batch where that is exact.

  Without a mask the plain max is right whenever it is finite (rows with
  out-of-range labels then count too; they poison the result anyway); the
  row-wise form runs only otherwise (``lax.cond``).
  """
  if masked or features.size == 0:
    return max_abs_of_rows(features, ids, num_classes)
  whole = jnp.max(jnp.abs(features))
  return jax.lax.cond(jnp.isfinite(whole), lambda: whole, lambda: max_abs_of_rows(features, ids, num_classes))


def _batch_means(features: jax.Array, ids: jax.Array, counts: jax.Array) -> jax.Array:
  """(C, p) class means of a batch (B, p), exact as long as every mean is representable.

  Raw sums overflow once B max|h| passes the float range (~3.4e38 in float32);
  only then (``lax.cond``, so ordinary batches pay nothing) the sums are taken
  again of h 2^-e and the means scaled back by 2^e.
  """
  num_classes = counts.shape[0]
  dtype = features.dtype
  per_sample = jnp.maximum(counts, 1)[:, None].astype(dtype)
  means = class_sums(features, ids, num_classes) / per_sample

  def rescaled():
    exponent = scale_exponent(max_abs_of_rows(features, ids, num_classes))
    sums = class_sums(features * power_of_two(-exponent, dtype), ids, num_classes)
    return jnp.ldexp(sums / per_sample, exponent)

  return jax.lax.cond(jnp.any(jnp.isinf(means)), rescaled, lambda: means)


def update_class_means(
    state: ClassMeansState,
    features: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    track_max_abs: bool = True,
) -> ClassMeansState:
  """Folds a batch (features (B, p), labels (B,), optional mask (B,) bool) into the means.

  ``track_max_abs=False`` skips the max |h_ij| reduction (one more read of the
  batch); the scale then comes from the largest |class mean|, which suffices
  unless a row is ~1e18 times larger than every class mean (``neural_collapse``
  detects that case and measures again; a stream cannot). A batch typed on Explicit mesh
  axes (``jax.make_mesh``'s default) is folded in on Auto ones (``geometry.run_auto``).
  """
  explicit = geo.explicit_mesh(state, features, labels, mask)
  if explicit is not None:
    return geo.run_auto(lambda s, h, y, m: update_class_means(s, h, y, m, track_max_abs=track_max_abs), explicit,
                        state, features, labels, mask)
  num_classes = state.counts.shape[0]
  features = features.astype(state.means.dtype)
  ids = segment_ids(labels, num_classes, mask)
  max_abs = (_batch_max_abs(features, ids, num_classes, masked=mask is not None) if track_max_abs
             else jnp.zeros((), features.dtype))
  batch_counts = class_sums(jnp.ones(labels.shape, jnp.int32), ids, num_classes)
  batch_means = _batch_means(features, ids, batch_counts)
  batch = ClassMeansState(counts=batch_counts, means=batch_means, max_abs=max_abs)
  return merge_class_means(state, batch)


# ----------------------------------------------------------------------------
# Between the passes: the geometry of the means.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class ClassGeometry:
  """Class means and their factorisation, the reference pass 2 measures against.

  Lengths are in scaled units: a feature h enters pass 2 as h 2^-e, e = ``exponent``.

  Attributes:
    counts: (C,) int32 samples per class (pass 1).
    means: (C, p) class means mu_c 2^-e.
    global_mean: (p,) mu_G 2^-e (mean of class means, or of samples; see ``global_mean``).
    centred_means: (C, p) M = (mu - mu_G) 2^-e, the paper's M-dot transposed.
    basis: (C, r) U, left singular vectors of M, r = min(p, C-1) (min(p, C) when
      mu_G is the sample mean, where M need not have rank C-1).
    feature_basis: (p, r) V, the right singular vectors (M = U S V^T): pass 2's NC1 summand
      ||S^-2 U^T M d||^2 = ||S^-1 V^T d||^2 costs O(p r) per sample, not O(p C + C r).
    inverse_sq_singular_values: (r,) 1/s_k^2, 0 for s_k below the numerical-rank cutoff.
    exponent: () int32 e: pass 2's unit is 2^e (by default, max |h_ij| 2^-e in [0.5, 1)).
    centred_norms_sq: (C,) ||M_c||^2, for the NCC rule.
    weights: (C, p) classifier W as given, or None.
    bias: (C,) classifier b as given, or None.
    logit_weights: (C, p) W 2^-L, and logit_bias: (C,) b 2^-(e+L), with L chosen so that
      W (h 2^-e) 2^-L + b 2^-(e+L) = (W h + b) 2^-(e+L) has entries of at most ~1: the
      network's logits in exact power-of-two units, so their argmax is the network's.
    kept: (C,) bool, the classes with at least ``min_count`` samples (None: every class).
      A dropped class is absent: no weight in mu_G, a zero row of M, no pairs, its samples
      masked out of pass 2, never an NCC or network decision.
  No C x C array is stored: at C = 50 257 one would be 10 GB.
  """

  counts: jax.Array
  means: jax.Array
  global_mean: jax.Array
  centred_means: jax.Array
  basis: jax.Array
  inverse_sq_singular_values: jax.Array
  exponent: jax.Array
  feature_basis: Optional[jax.Array] = None
  centred_norms_sq: Optional[jax.Array] = None
  weights: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None
  logit_weights: Optional[jax.Array] = None
  logit_bias: Optional[jax.Array] = None
  kept: Optional[jax.Array] = None


def global_mean_of(means: jax.Array, counts: jax.Array, kind: str, kept: Optional[jax.Array] = None) -> jax.Array:
  """mu_G (p,) of means (C, p): 'class_means' = (1/C') sum_c mu_c (the notebook), 'samples' =
  sum_c (n_c/N) mu_c; sums over the ``kept`` classes (C,) bool only, C' of them (None: all C)."""
  if kind == "class_means":
    if kept is None:
      return jnp.mean(means, axis=0)
    return jnp.sum(jnp.where(kept[:, None], means, 0.0), axis=0) / jnp.maximum(jnp.sum(kept, dtype=means.dtype), 1.0)
  if kind == "samples":
    counts = counts if kept is None else jnp.where(kept, counts, 0)
    weights = counts / jnp.maximum(jnp.sum(counts), 1)
    return matmul_highest(weights.astype(means.dtype), jnp.where(weights[:, None] > 0, means, 0.0))
  raise ValueError(f"unknown global_mean {kind!r}; choose one of {GLOBAL_MEANS}")


def _factorise(centred_means: jax.Array, rank: int, solver: str, rcond: Optional[float]):
  """Top-``rank`` singular vectors U (C, rank), V (p, rank) and 1/s^2 (rank,) of M (C, p).

  'svd' factorises M itself (through M = QR when C > 2p): singular values accurate to eps * s_max.
  'gram' takes eigh of M M^T (C, C): faster for large C on accelerators, but it
  squares the condition number, so a direction with s_k / s_max = 1e-3 gets
  s_k^2 only to ~10% in float32. Directions with s_k <= rcond * s_max are
  dropped (numpy's matrix_rank cutoff, rcond = max(C, p) * eps, by default),
  which is how the spurious C-th direction of a float32 M is never inverted.
  'gram' gets V = M^T U S^-1 (0 for dropped directions), and needs a (C, C) matrix: not for
  vocabulary-sized C.
  """
  num_classes, feature_dim = centred_means.shape
  eps = jnp.finfo(centred_means.dtype).eps
  if rcond is None:
    rcond = max(num_classes, feature_dim) * float(eps)
  if solver == "svd" and num_classes > 2 * feature_dim:
    # Many classes: the SVD of the wide M^T is slow (62 s at C = 50 257, p = 768 on 2 CPU cores),
    # M = Q R (C x p and p x p) then R = U_R S V^T is as accurate (orthogonal steps) and 8x faster.
    orthonormal, triangular = jnp.linalg.qr(centred_means)
    left, singular_values, feature_basis_t = jnp.linalg.svd(triangular)
    basis, feature_basis, singular_sq = matmul_highest(orthonormal, left), feature_basis_t.T, singular_values**2
  elif solver == "svd":
    # Factorising M^T (p, C) keeps M row-major: LAPACK's column-major operand layout would
    # otherwise propagate back into the class-sum scatter and slow it 4x on CPU.
    feature_basis, singular_values, basis_t = jnp.linalg.svd(centred_means.T, full_matrices=False)
    basis, singular_sq = basis_t.T, singular_values**2
  elif solver == "gram":
    eigenvalues, eigenvectors = jnp.linalg.eigh(matmul_highest(centred_means, centred_means.T))
    singular_sq, basis = jnp.maximum(eigenvalues[::-1], 0.0), eigenvectors[:, ::-1]
    rcond = max(rcond, math.sqrt(num_classes * float(eps)))
    feature_basis = None
  else:
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
  basis, singular_sq = basis[:, :rank], singular_sq[:rank]
  keep = singular_sq > (rcond**2) * singular_sq[0]
  inverse_sq = jnp.where(keep, 1.0 / jnp.where(keep, singular_sq, 1.0), 0.0)
  if feature_basis is None:
    feature_basis = matmul_highest(centred_means.T, basis) * jnp.sqrt(inverse_sq)
  return basis, feature_basis[:, :rank], inverse_sq


def _logit_units(weights: jax.Array, bias: Optional[jax.Array], exponent: jax.Array):
  """(W 2^-L, b 2^-(e+L)) with L = max(exponent of p max|W|, exponent of max|b| 2^-e).

  Pass 2 feeds h 2^-e with |h 2^-e| < 1, so |W h 2^-e| <= p max|W| and both parts
  of the logits stay below ~1 after 2^-L: nothing overflows, and since every term
  carries the same power of two, the argmax is that of W h + b.
  """
  dtype = weights.dtype
  feature_dim = weights.shape[1]
  bias = jnp.zeros(weights.shape[:1], dtype) if bias is None else bias.astype(dtype)
  weights_exponent = scale_exponent(max_finite_abs(weights)) + math.ceil(math.log2(max(feature_dim, 1)))
  bias_exponent = scale_exponent(max_finite_abs(bias)) - exponent
  logit_exponent = jnp.maximum(weights_exponent, bias_exponent)
  return jnp.ldexp(weights, -logit_exponent), jnp.ldexp(bias, -(exponent + logit_exponent))


def check_min_count(min_count) -> None:
  """Raises ValueError unless ``min_count`` is None or a non-negative Python int (not a bool)."""
  if min_count is not None and (not isinstance(min_count, (int, jnp.integer)) or isinstance(min_count, bool)
                                or min_count < 0):
    raise ValueError(f"min_count must be None or a non-negative Python int (classes with fewer samples are "
                     f"left out), got {min_count!r}")


def finalize_class_means(
    state: ClassMeansState,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    global_mean: str = "class_means",
    solver: str = "svd",
    rcond: Optional[float] = None,
    exponent: Optional[jax.Array] = None,
    min_count: Optional[int] = None,
) -> ClassGeometry:
  """Scales the pass-1 means by 2^-e, centres and factorises them; the reference for pass 2.

  e (``exponent``) defaults to the power of two of max(max_abs, max |mu_cj|). With
  ``min_count`` k, classes with fewer than k samples are dropped (``ClassGeometry.kept``).
  """
  check_min_count(min_count)
  num_classes, feature_dim = state.means.shape
  if exponent is None:
    exponent = scale_exponent(jnp.maximum(state.max_abs, max_finite_abs(state.means)))
  kept = None if min_count is None else state.counts >= min_count
  means = state.means * power_of_two(-exponent, state.means.dtype)
  mu_global = global_mean_of(means, state.counts, global_mean, kept)
  centred = means - mu_global
  if kept is not None:
    centred = jnp.where(kept[:, None], centred, 0.0)
  rank = min(feature_dim, num_classes - 1 if global_mean == "class_means" else num_classes)
  basis, feature_basis, inverse_sq = _factorise(centred, rank, solver, rcond)
  logit_weights = logit_bias = None
  if weights is not None:
    logit_weights, logit_bias = _logit_units(weights.astype(means.dtype), bias, exponent)
  return ClassGeometry(
      counts=state.counts,
      means=means,
      global_mean=mu_global,
      centred_means=centred,
      basis=basis,
      inverse_sq_singular_values=inverse_sq,
      exponent=exponent,
      feature_basis=feature_basis,
      centred_norms_sq=jnp.sum(centred**2, axis=-1),
      weights=weights,
      bias=bias,
      logit_weights=logit_weights,
      logit_bias=logit_bias,
      kept=kept,
  )


# ----------------------------------------------------------------------------
# Pass 2: deviations from the means, and decisions.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class DeviationState:
  """Pass-2 state; d_i = (h_i - mu_{y_i}) 2^-e with the pass-1 means. All per class (C,...).

  Attributes:
    counts: (C,) int32 valid samples.
    deviation_sums: (C, p) sum of d_i.
    deviation_sq: (C,) sum of ||d_i||^2.
    projected_sq: (C,) sum of ||S^-2 U^T M d_i||^2 (NC1 summands before the mean correction).
    network_correct: () int32, #{argmax_c (W h + b)_c == y} (0 without W).
    ncc_correct: () int32, #{argmin_c ||h - mu_c|| == y}.
    mismatch: () int32, #{network decision != NCC decision} (0 without W).
    invalid_labels: () int32, unmasked labels outside [0, C).
    nonfinite_rows: () int32, unmasked rows holding a NaN or inf. Features of pass 1's
      data are below 1 in pass 2's units, so none of its finite rows is ever counted;
      only a held-out row ~1e18 times larger than every pass-1 feature could overflow
      and count.
    filtered_samples: () int32, unmasked samples of classes dropped by ``min_count``
      (``ClassGeometry.kept``); they count nowhere else.
  """

  counts: jax.Array
  deviation_sums: jax.Array
  deviation_sq: jax.Array
  projected_sq: jax.Array
  network_correct: jax.Array
  ncc_correct: jax.Array
  mismatch: jax.Array
  invalid_labels: jax.Array
  nonfinite_rows: jax.Array
  filtered_samples: jax.Array


def init_deviations(geometry: ClassGeometry) -> DeviationState:
  num_classes, feature_dim = geometry.means.shape
  dtype = geometry.means.dtype
  zero = jnp.zeros((), jnp.int32)
  return DeviationState(
      counts=jnp.zeros((num_classes,), jnp.int32),
      deviation_sums=jnp.zeros((num_classes, feature_dim), dtype),
      deviation_sq=jnp.zeros((num_classes,), dtype),
      projected_sq=jnp.zeros((num_classes,), dtype),
      network_correct=zero,
      ncc_correct=zero,
      mismatch=zero,
      invalid_labels=zero,
      nonfinite_rows=zero,
      filtered_samples=zero,
  )


def merge_deviations(a: DeviationState, b: DeviationState) -> DeviationState:
  """Pass-2 statistics are plain sums: merging adds them."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def scale_features(features: jax.Array, exponent: jax.Array, dtype) -> jax.Array:
  """h 2^-e (B, p), pass 2's units: exact, and below 1 in magnitude for the data of pass 1."""
  return features.astype(dtype) * power_of_two(-exponent, dtype)


def update_deviations(
    state: DeviationState,
    geometry: ClassGeometry,
    features: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    ncc_use_bias: bool = True,
) -> DeviationState:
  """Folds a batch (features (B, p), labels (B,), optional mask (B,)) into pass 2.

  In scaled units x_i = h_i 2^-e (``scale_features``), with d_i = x_i - mu_{y_i} and
  g_i = d_i + M_{y_i} (the centred feature, formed without cancelling a common offset):
    NC1 summand  ||S^-1 V^T d_i||^2 (= ||S^-2 U^T M d_i||^2), a (B, r) product;
    NCC rule     argmin_c ||h_i - mu_c||^2 = argmin_c ||M_c||^2 - 2 <g_i, M_c>, from the (B, C)
                 product G M^T: the dropped term ||g_i||^2 is the same for every c;
    logits       (W h_i + b) 2^-(e+L) = W' x_i + b' with W' = ``logit_weights`` (b' dropped if
                 not ``ncc_use_bias``), so the argmax is the network's.
  Only (B, C) and (B, p) temporaries: no C x C array. Classes not ``geometry.kept`` are never
  a decision, and their samples only count in ``filtered_samples``. A batch typed on Explicit
  mesh axes is folded in on Auto ones (``geometry.run_auto``).
  """
  explicit = geo.explicit_mesh(state, geometry, features, labels, mask)
  if explicit is not None:
    return geo.run_auto(lambda s, g, h, y, m: update_deviations(s, g, h, y, m, ncc_use_bias=ncc_use_bias), explicit,
                        state, geometry, features, labels, mask)
  num_classes = geometry.means.shape[0]
  dtype = geometry.means.dtype
  in_range = (labels >= 0) & (labels < num_classes)
  active = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  safe_labels = jnp.where(in_range, labels, 0)
  filtered = jnp.zeros((), jnp.int32)
  if geometry.kept is not None:
    dropped = in_range & ~geometry.kept[safe_labels]
    filtered = jnp.sum(active & dropped, dtype=jnp.int32)
    active = active & ~dropped
  valid = active & in_range
  ids = segment_ids(labels, num_classes, active)

  reference = jnp.where(jnp.isfinite(geometry.means), geometry.means, 0.0)  # a NaN row's class: still count the rest
  scaled = scale_features(features, geometry.exponent, dtype)
  deviations = scaled - reference[safe_labels]
  deviation_sq = jnp.sum(deviations**2, axis=-1)  # finite for every finite row (|d| < 2), see nonfinite_rows

  whitened = matmul_highest(deviations, geometry.feature_basis) * jnp.sqrt(geometry.inverse_sq_singular_values)
  projected_sq = jnp.sum(whitened**2, axis=-1)

  centred = deviations + geometry.centred_means[safe_labels]
  ncc_score = geometry.centred_norms_sq - 2.0 * matmul_highest(centred, geometry.centred_means.T)
  if geometry.kept is not None:
    ncc_score = jnp.where(geometry.kept, ncc_score, jnp.inf)
  ncc_decision = jnp.argmin(ncc_score, axis=-1)

  count_where = lambda condition: jnp.sum(valid & condition, dtype=jnp.int32)
  network_correct = mismatch = jnp.zeros((), jnp.int32)
  if geometry.weights is not None:
    logits = matmul_highest(scaled, geometry.logit_weights.T)
    if ncc_use_bias and geometry.bias is not None:
      logits = logits + geometry.logit_bias
    if geometry.kept is not None:
      logits = jnp.where(geometry.kept, logits, -jnp.inf)
    network_decision = jnp.argmax(logits, axis=-1)
    network_correct = count_where(network_decision == labels)
    mismatch = count_where(network_decision != ncc_decision)

  per_class = class_sums(jnp.stack([deviation_sq, projected_sq], axis=-1), ids, num_classes)
  batch = DeviationState(
      counts=class_sums(jnp.ones(labels.shape, jnp.int32), ids, num_classes),
      deviation_sums=class_sums(deviations, ids, num_classes),
      deviation_sq=per_class[:, 0],
      projected_sq=per_class[:, 1],
      network_correct=network_correct,
      ncc_correct=count_where(ncc_decision == labels),
      mismatch=mismatch,
      invalid_labels=jnp.sum(active & ~in_range, dtype=jnp.int32),
      nonfinite_rows=jnp.sum(active & ~jnp.isfinite(deviation_sq), dtype=jnp.int32),
      filtered_samples=filtered,
  )
  return merge_deviations(state, batch)


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
    result["num_coincident_means"] = geo.pair_geometry(centred, valid=kept, coincident_floor_sq=floor_sq,
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


def _in_feature_units_sq(value: jax.Array, exponent: jax.Array) -> jax.Array:
  """A squared length measured in units of 2^e back in the features' units: value 4^e,
  exact, inf or 0 where float32 cannot hold the result."""
  return jnp.ldexp(value, 2 * exponent)


# ----------------------------------------------------------------------------
# Finalising pass 2 into metrics.
# ----------------------------------------------------------------------------


def finalize_collapse(
    state: DeviationState,
    geometry: ClassGeometry,
    *,
    global_mean: str = "class_means",
    divide_nc1_by_classes: bool = True,
    std_ddof: int = 1,
    self_duality_squared: bool = True,
    block_rows: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> dict:
  """Metrics of the data seen in pass 2, with its own (corrected) class means.

  Everything is computed in pass 2's units (h 2^-e); only trace_within and
  trace_between are brought back to the features' units. Every pair statistic
  (CDNV, the NC2 of means and of W, num_coincident_means) comes from the tiled
  ``geometry.pair_geometry`` (``block_rows`` rows per tile, default: dense up to
  ``geometry.DENSE_MAX_CLASSES`` classes): two sweeps over C x C tiles, no C x C array;
  with a ``mesh`` the tiles of each sweep are shared by its devices (``geometry.pair_sums``).
  With ``geometry.kept``, C is C' = the number kept in every formula. Returns a dict of
  scalars; see ``collapse.neural_collapse`` for the keys.
  """
  geo.check_mesh(mesh)
  kept = geometry.kept
  num_kept = _num_kept(geometry)
  kept_float = num_kept.astype(geometry.means.dtype)
  counts = state.counts.astype(geometry.means.dtype)
  num_samples = jnp.sum(counts)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = state.deviation_sums / safe_counts[:, None]  # delta_c: pass-1 mean error
  means = geometry.means + correction
  centred = _kept_rows(means - global_mean_of(means, state.counts, global_mean, kept), kept)

  within_sq = jnp.maximum(state.deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0)
  class_variance = within_sq / safe_counts  # (1/n_c) sum ||h - mu_c||^2
  trace_within = jnp.sum(within_sq) / num_samples
  trace_between = jnp.sum(centred**2) / kept_float

  correction_projected = matmul_highest(correction, geometry.feature_basis) * jnp.sqrt(
      geometry.inverse_sq_singular_values)  # S^-1 V^T delta_c, (C, r)
  nc1_sum = jnp.sum(state.projected_sq) - jnp.sum(counts * jnp.sum(correction_projected**2, axis=-1))
  nc1 = jnp.maximum(nc1_sum, 0.0) / num_samples  # = Tr(Sigma_W Sigma_B^+) / C
  if not divide_nc1_by_classes:
    nc1 = nc1 * kept_float

  degeneracy = mean_degeneracy(means, centred, kept=kept, pairs=False)
  pairs = geo.pair_geometry(centred, ddof=std_ddof, valid=kept, variances=class_variance,
                            coincident_floor_sq=_degeneracy_floor_sq(means, kept), block_rows=block_rows,
                            mesh=mesh)
  degeneracy["num_coincident_means"] = pairs["num_coincident"]
  metrics = {
      "nc1": nc1,
      "nc1_tirer": trace_within / trace_between,
      "cdnv": pairs["cdnv"],
      "trace_within": _in_feature_units_sq(trace_within, geometry.exponent),
      "trace_between": _in_feature_units_sq(trace_between, geometry.exponent),
      "equinorm_means": geo.equinorm(centred, std_ddof, valid=kept),
      "equiangular_means": pairs["equiangularity"],
      "max_angle_means": pairs["max_angle"],
      "etf_deviation_means": pairs["etf_deviation"],
      "gnc2_means": pairs["gnc2"],
      "ncc_accuracy": state.ncc_correct / num_samples,
  }
  diagnostics = _sample_diagnostics(state, kept) | degeneracy
  if geometry.weights is not None:
    weights = unit_scaled(_kept_rows(geometry.weights.astype(centred.dtype), kept))  # scale-free geometry of W
    weight_pairs = geo.pair_geometry(weights, ddof=std_ddof, valid=kept, block_rows=block_rows, mesh=mesh)
    metrics.update({
        "equinorm_weights": geo.equinorm(weights, std_ddof, valid=kept),
        "equiangular_weights": weight_pairs["equiangularity"],
        "max_angle_weights": weight_pairs["max_angle"],
        "etf_deviation_weights": weight_pairs["etf_deviation"],
        "self_duality": geo.self_duality(weights, centred, self_duality_squared, valid=kept),
        "unc3": geo.unc3(weights, centred, std_ddof, valid=kept),
        "ncc_mismatch": state.mismatch / num_samples,
        "accuracy": state.network_correct / num_samples,
    })
    diagnostics |= weight_diagnostics(geometry.weights, geometry.bias, kept)
  return _poison(metrics, _defined(diagnostics, num_kept)) | diagnostics | _filter_diagnostics(state, geometry)


def finalize_transfer(
    state: DeviationState,
    geometry: ClassGeometry,
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
  weights, num_nonfinite_weights, all with the suffix (and, with ``geometry.kept``,
  num_filtered_classes and num_filtered_samples: held-out samples of dropped classes).
  """
  kept = geometry.kept
  num_kept = _num_kept(geometry)
  num_samples = jnp.sum(state.counts)
  nc1 = jnp.sum(state.projected_sq) / num_samples
  metrics = {
      "nc1": nc1 if divide_nc1_by_classes else nc1 * num_kept.astype(nc1.dtype),
      "trace_within": _in_feature_units_sq(jnp.sum(state.deviation_sq) / num_samples, geometry.exponent),
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
