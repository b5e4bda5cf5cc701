"""Two-pass streaming statistics for Neural Collapse: init / update / merge / finalize.

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
           ||S^-2 U^T M d_i||^2 (= ||S^-1 V^T d_i||^2, the NC1 summand); and the
           counts of network / NCC decisions.

Pass 2 also corrects pass 1: the pass-1 means carry float32 summation error of
about one ulp of the raw features (1e-6 for features ~10), which can be as big
as the within-class spread. Deviations d_i from those means are exact
(Sterbenz), their class averages delta_c give the error, and finalize uses
mu_c + delta_c and sum ||d - delta||^2 = sum ||d||^2 - n ||delta||^2 (the
"corrected two-pass" algorithm of Chan, Golub & LeVeque).

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

from nc_jax.metrics.geometry import matmul_highest, pairwise_distance_sq

GLOBAL_MEANS = ("class_means", "samples")
SOLVERS = ("svd", "gram")


def float_dtype(features: jax.Array):
  """float32 for bfloat16/float16/float32 inputs; float64 only where jax_enable_x64 allows it."""
  return jax.dtypes.canonicalize_dtype(jnp.promote_types(features.dtype, jnp.float32))


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
  """Pass-1 state. counts (C,) int32; means (C, p) float (0 for classes not yet seen)."""

  counts: jax.Array
  means: jax.Array


def init_class_means(num_classes: int, feature_dim: int, dtype=jnp.float32) -> ClassMeansState:
  return ClassMeansState(
      counts=jnp.zeros((num_classes,), jnp.int32),
      means=jnp.zeros((num_classes, feature_dim), dtype),
  )


def merge_class_means(a: ClassMeansState, b: ClassMeansState) -> ClassMeansState:
  """Means of the union of two disjoint sets: mu = mu_a + (n_b / n)(mu_b - mu_a)."""
  counts = a.counts + b.counts
  weight_b = b.counts / jnp.maximum(counts, 1)
  means = a.means + weight_b[:, None].astype(a.means.dtype) * (b.means - a.means)
  return ClassMeansState(counts=counts, means=means)


def update_class_means(
    state: ClassMeansState,
    features: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
) -> ClassMeansState:
  """Folds a batch (features (B, p), labels (B,), optional mask (B,) bool) into the means."""
  num_classes = state.counts.shape[0]
  ids = segment_ids(labels, num_classes, mask)
  batch_counts = class_sums(jnp.ones(labels.shape, jnp.int32), ids, num_classes)
  batch_sums = class_sums(features.astype(state.means.dtype), ids, num_classes)
  batch_means = batch_sums / jnp.maximum(batch_counts, 1)[:, None].astype(batch_sums.dtype)
  batch = ClassMeansState(counts=batch_counts, means=batch_means)
  return merge_class_means(state, batch)


# ----------------------------------------------------------------------------
# Between the passes: the geometry of the means.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class ClassGeometry:
  """Class means and their factorisation, the reference pass 2 measures against.

  Attributes:
    counts: (C,) int32 samples per class.
    means: (C, p) class means mu_c.
    global_mean: (p,) mu_G (mean of class means, or of samples; see ``global_mean``).
    centred_means: (C, p) M = mu - mu_G, the paper's M-dot transposed.
    basis: (C, r) U, left singular vectors of M, r = min(p, C-1) (min(p, C) when
      mu_G is the sample mean, where M need not have rank C-1).
    inverse_sq_singular_values: (r,) 1/s_k^2, 0 for s_k below the numerical-rank cutoff.
    weights: (C, p) classifier W, or None.
    bias: (C,) classifier b, or None.
    mean_distance_sq: (C, C) ||M_a - M_c||^2, for the NCC rule.
    mean_logits: (C, C) W mu_a (row a = logits of class a's mean, no bias), or None.
  """

  counts: jax.Array
  means: jax.Array
  global_mean: jax.Array
  centred_means: jax.Array
  basis: jax.Array
  inverse_sq_singular_values: jax.Array
  mean_distance_sq: Optional[jax.Array] = None
  weights: Optional[jax.Array] = None
  bias: Optional[jax.Array] = None
  mean_logits: Optional[jax.Array] = None


def global_mean_of(means: jax.Array, counts: jax.Array, kind: str) -> jax.Array:
  """mu_G: 'class_means' = (1/C) sum_c mu_c (the notebook), 'samples' = sum_c (n_c/N) mu_c."""
  if kind == "class_means":
    return jnp.mean(means, axis=0)
  if kind == "samples":
    weights = counts / jnp.maximum(jnp.sum(counts), 1)
    return matmul_highest(weights.astype(means.dtype), means)
  raise ValueError(f"unknown global_mean {kind!r}; choose one of {GLOBAL_MEANS}")


def _factorise(centred_means: jax.Array, rank: int, solver: str, rcond: Optional[float]):
  """Top-``rank`` left singular vectors U (C, rank) and 1/s^2 (rank,) of M (C, p).

  'svd' factorises M itself: singular values accurate to eps * s_max.
  'gram' takes eigh of M M^T (C, C): faster for large C on accelerators, but it
  squares the condition number, so a direction with s_k / s_max = 1e-3 gets
  s_k^2 only to ~10% in float32. Directions with s_k <= rcond * s_max are
  dropped (numpy's matrix_rank cutoff, rcond = max(C, p) * eps, by default),
  which is how the spurious C-th direction of a float32 M is never inverted.
  """
  num_classes, feature_dim = centred_means.shape
  eps = jnp.finfo(centred_means.dtype).eps
  if rcond is None:
    rcond = max(num_classes, feature_dim) * float(eps)
  if solver == "svd":
    # Factorising M^T (p, C) keeps M row-major: LAPACK's column-major operand layout would
    # otherwise propagate back into the class-sum scatter and slow it 4x on CPU.
    _, singular_values, basis_t = jnp.linalg.svd(centred_means.T, full_matrices=False)
    basis, singular_sq = basis_t.T, singular_values**2
  elif solver == "gram":
    eigenvalues, eigenvectors = jnp.linalg.eigh(matmul_highest(centred_means, centred_means.T))
    singular_sq, basis = jnp.maximum(eigenvalues[::-1], 0.0), eigenvectors[:, ::-1]
    rcond = max(rcond, math.sqrt(num_classes * float(eps)))
  else:
    raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
  basis, singular_sq = basis[:, :rank], singular_sq[:rank]
  keep = singular_sq > (rcond**2) * singular_sq[0]
  inverse_sq = jnp.where(keep, 1.0 / jnp.where(keep, singular_sq, 1.0), 0.0)
  return basis, inverse_sq


def finalize_class_means(
    state: ClassMeansState,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    global_mean: str = "class_means",
    solver: str = "svd",
    rcond: Optional[float] = None,
) -> ClassGeometry:
  """Centres the pass-1 means and factorises them; the reference for pass 2."""
  num_classes, feature_dim = state.means.shape
  mu_global = global_mean_of(state.means, state.counts, global_mean)
  centred = state.means - mu_global
  rank = min(feature_dim, num_classes - 1 if global_mean == "class_means" else num_classes)
  basis, inverse_sq = _factorise(centred, rank, solver, rcond)
  return ClassGeometry(
      counts=state.counts,
      means=state.means,
      global_mean=mu_global,
      centred_means=centred,
      basis=basis,
      inverse_sq_singular_values=inverse_sq,
      mean_distance_sq=pairwise_distance_sq(centred),
      weights=weights,
      bias=bias,
      mean_logits=None if weights is None else matmul_highest(state.means, weights.T.astype(state.means.dtype)),
  )


# ----------------------------------------------------------------------------
# Pass 2: deviations from the means, and decisions.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class DeviationState:
  """Pass-2 state; d_i = h_i - mu_{y_i} with the pass-1 means. All per class (C,...).

  Attributes:
    counts: (C,) int32 valid samples.
    deviation_sums: (C, p) sum of d_i.
    deviation_sq: (C,) sum of ||d_i||^2.
    projected_sq: (C,) sum of ||S^-2 U^T M d_i||^2 (NC1 summands before the mean correction).
    network_correct: () int32, #{argmax_c (W h + b)_c == y} (0 without W).
    ncc_correct: () int32, #{argmin_c ||h - mu_c|| == y}.
    mismatch: () int32, #{network decision != NCC decision} (0 without W).
    invalid_labels: () int32, unmasked labels outside [0, C).
    nonfinite_rows: () int32, unmasked rows with a NaN or inf feature (or whose
      squared deviation overflows float32).
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
  )


def merge_deviations(a: DeviationState, b: DeviationState) -> DeviationState:
  """Pass-2 statistics are plain sums: merging adds them."""
  return jax.tree_util.tree_map(jnp.add, a, b)


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

  One product D [M^T | W^T] (B x p times p x 2C) serves everything:
    NC1 summand  ||S^-2 U^T (M d_i)||^2;
    NCC distance ||h_i - mu_c||^2 = ||d_i||^2 + 2 (M d_i)_{y_i} - 2 (M d_i)_c + ||M_{y_i} - M_c||^2,
      all centred, so no cancellation against a large common offset;
    logits       W h_i + b = W d_i + (W mu_{y_i}) + b  (bias dropped if not ``ncc_use_bias``).
  """
  num_classes = geometry.means.shape[0]
  dtype = geometry.means.dtype
  in_range = (labels >= 0) & (labels < num_classes)
  active = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  valid = active & in_range
  ids = segment_ids(labels, num_classes, mask)
  safe_labels = jnp.where(in_range, labels, 0)

  deviations = features.astype(dtype) - geometry.means[safe_labels]
  deviation_sq = jnp.sum(deviations**2, axis=-1)  # NaN/inf here iff the row has one (or overflows)
  centred = geometry.centred_means
  has_weights = geometry.weights is not None
  right = jnp.concatenate([centred, geometry.weights.astype(dtype)], 0) if has_weights else centred
  product = matmul_highest(deviations, right.T)
  along_means = product[:, :num_classes]  # (B, C): M d_i

  whitened = matmul_highest(along_means, geometry.basis) * geometry.inverse_sq_singular_values
  projected_sq = jnp.sum(whitened**2, axis=-1)

  own = jnp.take_along_axis(along_means, safe_labels[:, None], axis=1)
  ncc_score = -2.0 * along_means + geometry.mean_distance_sq[safe_labels] + 2.0 * own  # ||h - mu_c||^2 - ||d||^2
  ncc_decision = jnp.argmin(ncc_score, axis=-1)

  count_where = lambda condition: jnp.sum(valid & condition, dtype=jnp.int32)
  network_correct = mismatch = jnp.zeros((), jnp.int32)
  if has_weights:
    logits = product[:, num_classes:] + geometry.mean_logits[safe_labels]
    if ncc_use_bias and geometry.bias is not None:
      logits = logits + geometry.bias.astype(dtype)
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
  )
  return merge_deviations(state, batch)
