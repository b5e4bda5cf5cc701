"""The two passes' states: pass 1 (class means), between (their geometry), pass 2 (deviations, decisions).

Every NC quantity is a function of the class means mu_c and of the deviations
d_i = h_i - mu_{y_i}. The NCC rule (NC4) and the projection of d_i onto the span of the
centred means (NC1) need the *final* means, and float32 cannot get the deviations from raw
moments: with class-mean norms ~100 and spread ~1e-3, E[hh^T] - mu mu^T cancels every
significant digit and NC1 comes out negative. A one-pass alternative would keep a p x p
centred scatter (Chan et al.), costing O(N p^2) time and O(p^2) memory, against O(N p C)
and O(C p) here. So:

  pass 1  (``*_class_means``)  counts and class means, merged batch by batch with
           Chan's update  mu = mu_A + (n_B/n)(mu_B - mu_A), and the largest finite |h_ij|.
  between (``finalize_class_means``) centred means M = mu - mu_G and the
           rank-r factorisation M = U S V^T (r = min(p, C-1)), as ``ClassGeometry``
           (solver 'auto' on GPU/TPU: a factor of (M^T M)^+ without an SVD, ``_factorise_accelerated``).
  pass 2  (``*_deviations``)  per class: sum of d_i, sum of ||d_i||^2, sum of
           ||S^-1 V^T d_i||^2 (= ||S^-2 U^T M d_i||^2, the NC1 summand); and the
           counts of network / NCC decisions, from (B, C) products only.

The metrics from these sums are ``finalize``'s (``finalize_collapse``, ``finalize_transfer``).

Vocabulary-sized C. Nothing here holds a C x C array: ``ClassGeometry`` stores (C, p),
(C, r), (p, r) and (C,) arrays; pass 2 ranks classes by ||M_c||^2 - 2 <g_i, M_c> with the
centred feature g_i = d_i + M_{y_i} (a (B, C) product), and the logits are W' x_i + b'.

Pass 2 also corrects pass 1: the pass-1 means carry float32 summation error of
about one ulp of the raw features (1e-6 for features ~10), which can be as big
as the within-class spread. Deviations d_i from those means are exact
(Sterbenz), their class averages delta_c give the error, and finalize uses
mu_c + delta_c and sum ||d - delta||^2 = sum ||d||^2 - n ||delta||^2 (the
"corrected two-pass" algorithm of Chan, Golub & LeVeque).

Units (``scale``): pass 2 works on h 2^-e, e from pass 1's max |h_ij| (``finalize_class_means``),
so no square over- or underflows. The logits W h + b are compared in their own exact
power-of-two units (``logit_weights``, ``logit_bias``), so the network's decision never
changes. Class means stay in the features' units in pass 1 (its sums switch to scaled units
only for a batch whose sum could overflow); everything in ``ClassGeometry`` and
``DeviationState`` is in the scaled units.

All state is a pytree of arrays with static shapes, so every function works inside
``jax.jit`` and ``lax.scan``, and on inputs sharded along N; ``merge_*`` combines the states
of disjoint data (other hosts, other chunks) exactly. The conventions (global mean, solver,
rcond, min_count, ncc_use_bias) come as one ``NCOptions`` (``options=``) or as keywords.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from nc_jax.metrics.geometry import matmul_highest
from nc_jax.metrics.options import GLOBAL_MEANS, SOLVERS, UNSET, NCOptions, resolve
from nc_jax.metrics.scale import max_finite_abs, power_of_two, scale_exponent, scale_features
from nc_jax.metrics.sharding import explicit_mesh, run_auto

# ----------------------------------------------------------------------------
# solver='auto': one path per platform.
# ----------------------------------------------------------------------------

_SIMULATING = False  # set by simulate_accelerator (tests and benchmarks only)


def on_platform(cpu, accelerator, *operands):
  """``cpu(*operands)`` where the program is lowered for CPU, ``accelerator(*operands)`` for GPU and TPU.

  ``jax.lax.platform_dependent``: the choice is made when lowering (a program exported for 'cuda' on a CPU
  host takes the accelerator branch, and a CPU lowering contains only the CPU branch). Inside
  ``simulate_accelerator`` the accelerator branch is traced on any platform.
  """
  if _SIMULATING:
    return accelerator(*operands)
  return jax.lax.platform_dependent(*operands, cpu=cpu, default=accelerator)


@contextlib.contextmanager
def simulate_accelerator():
  """Within this context, solver='auto' traces its GPU/TPU factorisation on any platform (for tests on a CPU
  host). Only tracing inside the context is affected: jit a fresh function there (cached jitted functions keep
  what they were traced with)."""
  global _SIMULATING
  previous, _SIMULATING = _SIMULATING, True
  try:
    yield
  finally:
    _SIMULATING = previous


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
  axes (``jax.make_mesh``'s default) is folded in on Auto ones (``sharding.run_auto``).
  """
  explicit = explicit_mesh(state, features, labels, mask)
  if explicit is not None:
    return run_auto(lambda s, h, y, m: update_class_means(s, h, y, m, track_max_abs=track_max_abs), explicit,
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
  No C x C array is stored: at C = 50 257 one would be 10 GB. With solver 'auto' on an accelerator,
  ``basis``, ``feature_basis`` and ``inverse_sq_singular_values`` come from ``_factorise_accelerated``:
  ``feature_basis * sqrt(inverse_sq)`` is the factor F with F F^T = (M^T M)^+ that NC1 needs, equal to
  V S^-1 up to a rotation of its columns; basis spans M's columns (U up to the same rotation).
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


def _factorise(centred_means: jax.Array, rank: int, solver: str, rcond: Optional[float], *,
               deflate: bool = False, cholesky: bool = False):
  """Top-``rank`` singular vectors U (C, rank), V (p, rank) and 1/s^2 (rank,) of M (C, p).

  'svd' factorises M itself (through M = QR when C > 2p): singular values accurate to eps * s_max.
  'gram' takes eigh of M M^T (C, C): faster for large C on accelerators, but it
  squares the condition number, so a direction with s_k / s_max = 1e-3 gets
  s_k^2 only to ~10% in float32. Directions with s_k <= rcond * s_max are
  dropped (numpy's matrix_rank cutoff, rcond = max(C, p) * eps, by default),
  which is how the spurious C-th direction of a float32 M is never inverted.
  'gram' gets V = M^T U S^-1 (0 for dropped directions), and needs a (C, C) matrix: not for
  vocabulary-sized C. 'auto': 'svd' where the program is lowered for CPU, ``_factorise_accelerated``
  on GPU and TPU (``on_platform``); ``deflate``: the rows of M sum to 0 (mu_G the mean of the class means),
  ``cholesky``: its Cholesky path may be tried (every class kept, rcond not given).
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
  elif solver == "auto":
    return on_platform(lambda m: _factorise(m, rank, "svd", rcond),
                       lambda m: _factorise_accelerated(m, rank, rcond, deflate, cholesky), centred_means)
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


def _cholesky_qr2(tall: jax.Array):
  """(Q (m, k), R (k, k) upper triangular, ok ()) with tall (m, k) = Q R, m >= k, by CholeskyQR2 (Fukaya et al.
  2014): R1 = chol(X^T X)^T, Q1 = X R1^-1, then the same on Q1. Q is orthonormal to ~eps and R backward stable
  when cond(X) < ~eps^-1/2: the first pass squares the condition number, the second removes its error.
  ok: every entry finite, the pivots of both passes above sqrt(k eps) times their largest (no near-dependent
  column), and Q1^T Q1 within 1/2 of I (the first pass converged enough for the second)."""
  eps = float(jnp.finfo(tall.dtype).eps)
  rank = tall.shape[1]

  def one_pass(x):
    lower = jnp.linalg.cholesky(matmul_highest(x.T, x))  # X^T X = L L^T, R = L^T
    q = jax.lax.linalg.triangular_solve(lower, x, left_side=False, lower=True, transpose_a=True)  # X L^-T
    pivots = jnp.abs(jnp.diagonal(lower))
    sound = jnp.all(jnp.isfinite(lower)) & (jnp.min(pivots) > math.sqrt(rank * eps) * jnp.max(pivots))
    return q, lower, sound

  q1, lower1, sound1 = one_pass(tall)
  drift = jnp.max(jnp.abs(matmul_highest(q1.T, q1) - jnp.eye(rank, dtype=tall.dtype)))
  q, lower2, sound2 = one_pass(q1)
  upper = matmul_highest(lower2.T, lower1.T)  # R = R2 R1
  ok = sound1 & sound2 & (drift < 0.5) & jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(upper))
  return q, upper, ok


def _factorise_accelerated(centred_means: jax.Array, rank: int, rcond: Optional[float], deflate: bool,
                           cholesky: bool):
  """``_factorise`` on GPUs and TPUs (solver 'auto'): (basis (C, rank), feature_basis (p, rank), (rank,)) with
  F = feature_basis diag(sqrt(inverse_sq)) a factor of (M^T M)^+ (F F^T = (M^T M)^+), by the first of three
  paths that applies (``lax.cond``: only that one runs); each gives the SVD's NC1 to ~1e-6.

  1. Cholesky (tried when ``cholesky``: every class kept, rcond not given): M has full rank r = ``rank`` in most
     measurements. With A = the r rows of H M for the Householder reflection H that sends 1/sqrt(C) to e_C
     (``deflate``: M's rows sum to 0, so the dropped row is ~0 and A^T A = M^T M), or A = M otherwise,
     CholeskyQR2 (``_cholesky_qr2``) of the tall one of A^T (C <= p) or M (C > p) gives F = Q R^-T or R^-1:
     two Cholesky factorisations of an r x r matrix and triangular solves (cuSOLVER potrf, cuBLAS trsm), with
     the accuracy of a QR factorisation (~eps cond(M)). F's columns are returned normalised and their squared
     norms as inverse_sq (1/s^2 when F's columns are orthogonal, F = V S^-1); basis = M F (orthonormal, it
     spans M's columns: the left singular vectors up to a rotation).
  2. Gram (``_factorise_gram_refined``), when path 1 fails its checks (a rank-deficient M: dropped or coinciding
     classes, mu_G the sample mean of balanced classes; cond(M) beyond ~(r eps)^-1/2) or is not tried: eigh of
     the smaller Gram matrix and a Rayleigh-Ritz step, if it resolves every direction the SVD would keep: all
     but the known null ones (zero rows of M, and 1/sqrt(C) with ``deflate``) are above its sqrt(n eps) cutoff.
  3. SVD (``_factorise(..., 'svd', ...)``), otherwise: directions weaker than the Gram matrix resolves.
  Under ``jax.vmap`` (a population's evaluation) a ``lax.cond`` on a batched predicate becomes a select: every
  path runs and each member takes its own path's result (the same values, more work).
  """
  def general(centred):
    refined, complete = _factorise_gram_refined(centred, rank, rcond, deflate)
    return jax.lax.cond(complete, lambda c: refined, lambda c: _factorise(c, rank, "svd", rcond), centred)

  if not cholesky:
    return general(centred_means)
  factors, ok = _factorise_cholesky(centred_means, rank, deflate)
  return jax.lax.cond(ok, lambda factors, centred: factors, lambda factors, centred: general(centred), factors,
                      centred_means)


def _factorise_cholesky(centred_means: jax.Array, rank: int, deflate: bool):
  """((basis, feature_basis, inverse_sq), ok ()) of ``_factorise_accelerated``'s path 1 (CholeskyQR2)."""
  num_classes, feature_dim = centred_means.shape
  dtype = centred_means.dtype
  if num_classes <= feature_dim:
    rows = centred_means
    if deflate:  # H M with H = I - 2 w w^T / w^T w, w = 1/sqrt(C) - e_C: row C-1 becomes sum_c M_c / sqrt(C) ~ 0
      w = jnp.full((num_classes,), 1.0 / math.sqrt(num_classes), dtype).at[-1].add(-1.0)
      rows = centred_means - (2.0 / jnp.sum(w * w)) * w[:, None] * matmul_highest(w, centred_means)[None, :]
    q, upper, ok = _cholesky_qr2(rows[:rank].T)  # A^T (p, r) = Q R: (M^T M)^+ = Q R^-1 R^-T Q^T
    factor = jax.lax.linalg.triangular_solve(upper, q, left_side=False, lower=False, transpose_a=True)  # Q R^-T
  else:
    q, upper, ok = _cholesky_qr2(centred_means)  # M (C, p) = Q R: (M^T M)^-1 = R^-1 R^-T, r = p
    factor = jax.lax.linalg.triangular_solve(upper, jnp.eye(rank, dtype=dtype), left_side=True, lower=False)
  norms_sq = jnp.sum(factor**2, axis=0)
  ok = ok & jnp.all(jnp.isfinite(factor)) & jnp.all(norms_sq > 0)
  feature_basis = factor / jnp.sqrt(jnp.where(norms_sq > 0, norms_sq, 1.0))
  return (matmul_highest(centred_means, factor), feature_basis, norms_sq), ok


def _factorise_gram_refined(centred_means: jax.Array, rank: int, rcond: Optional[float], deflate: bool):
  """((basis (C, rank), feature_basis (p, rank), 1/s^2 (rank,)), complete ()) of M (C, p) by the eigendecomposition
  of the smaller Gram matrix and one Rayleigh-Ritz step, without an SVD (``_factorise_accelerated``'s path 2).

    1. G = M M^T (C x C) if C <= p, else M^T M (p x p), in float32 at full precision; Q, lambda = eigh(G).
       A direction is kept if lambda_k > rcond'^2 lambda_0 with rcond' = max(rcond, sqrt(n eps)), n = min(C, p):
       an eigenvalue of a float32 Gram matrix is only known to ~n eps lambda_0, so weaker directions
       (s_k < sqrt(n eps) s_max: 1.1e-3 at n = 10, 1.1e-2 at n = 1000) are dropped, as by 'gram'; the SVD
       keeps them down to rcond s_max.
    2. Ritz vectors Y = M^T Q (C <= p; columns ~ s_k v_k) or M Q (columns ~ s_k u_k), Ritz values
       d_k = ||y_k|| (accurate to ~eps s_max, like the SVD's: the square of the condition number is gone),
       and the overlap O = Yhat^T Yhat of the unit columns (= I when Q is exact). For C <= p,
       F = Yhat O^-1 D^-1 satisfies F F^T = (M^T P M)^+ with P = Q Q^T the kept subspace, whatever the mixing
       of Q within it; for C > p, F = Q D^-1 O^-1/2. O^-1 and O^-1/2 are Neumann series in E = O - I to E^3
       (error ~|E|^4; |E| ~ n eps kappa^2 <= ~1e-3 above the cutoff); max|E_jk| > 1/4 makes it incomplete.
  Against the float64 SVD the NC1 of this factor is within ~1e-6 (relative) wherever every direction is kept
  (tests/test_solver_backend.py); the plain Gram factor is off by ~eps kappa^2. Directions are returned in the
  order of the eigenvalues; Ritz values below rcond' d_max are dropped too. complete: no direction the SVD would
  keep was dropped for want of resolution (rcond' > rcond and fewer than r' kept, r' = ``rank`` less the zero
  rows of M and, with ``deflate``, the direction 1/sqrt(C)), and the series converged.
  """
  num_classes, feature_dim = centred_means.shape
  dtype = centred_means.dtype
  eps = float(jnp.finfo(dtype).eps)
  if rcond is None:
    rcond = max(num_classes, feature_dim) * eps
  classes_side = num_classes <= feature_dim
  resolution = math.sqrt(min(num_classes, feature_dim) * eps)
  expected = jnp.minimum(rank, num_classes - jnp.sum(jnp.all(centred_means == 0, axis=1)) - int(deflate))
  cut_by_resolution = resolution > rcond
  rcond = max(rcond, resolution)
  gram = (matmul_highest(centred_means, centred_means.T) if classes_side
          else matmul_highest(centred_means.T, centred_means))
  eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
  eigenvalues, eigenvectors = eigenvalues[::-1][:rank], eigenvectors[:, ::-1][:, :rank]
  keep = eigenvalues > (rcond**2) * jnp.maximum(eigenvalues[0], 0.0)
  eigenvectors = jnp.where(keep, eigenvectors, 0.0)
  ritz = matmul_highest(centred_means.T if classes_side else centred_means, eigenvectors)  # (p or C, rank)
  ritz_values = jnp.sqrt(jnp.sum(ritz**2, axis=0))
  keep = keep & (ritz_values > rcond * jnp.max(ritz_values))
  inverse_sq = jnp.where(keep, 1.0 / jnp.where(keep, ritz_values, 1.0) ** 2, 0.0)
  unit = jnp.where(keep, ritz, 0.0) * jnp.sqrt(inverse_sq)
  identity = jnp.eye(rank, dtype=dtype)
  error = jnp.where(keep[:, None] & keep[None, :], matmul_highest(unit.T, unit), 0.0) - jnp.where(keep, identity, 0.0)
  error_sq = matmul_highest(error, error)
  error_cubed = matmul_highest(error_sq, error)
  converged = jnp.max(jnp.abs(error)) <= 0.25
  if classes_side:
    feature_basis = matmul_highest(unit, identity - error + error_sq - error_cubed)  # Yhat O^-1; D^-1: inverse_sq
    basis = eigenvectors
  else:  # F = Q D^-1 O^-1/2 = (Q D^-1 O^-1/2 D) D^-1
    inverse_root = identity - error / 2 + 0.375 * error_sq - 0.3125 * error_cubed
    ritz_values_kept = jnp.where(keep, ritz_values, 1.0)
    feature_basis = matmul_highest(eigenvectors, inverse_root * (ritz_values_kept[None, :] / ritz_values_kept[:, None]))
    basis = unit
  feature_basis = jnp.where(keep, feature_basis, 0.0)
  complete = converged & ((jnp.sum(keep) >= expected) if cut_by_resolution else True)
  return (basis, feature_basis, inverse_sq), complete


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
    options: Optional[NCOptions] = None,
    exponent: Optional[jax.Array] = None,
    global_mean=UNSET,
    solver=UNSET,
    rcond=UNSET,
    min_count=UNSET,
) -> ClassGeometry:
  """Scales the pass-1 means by 2^-e, centres and factorises them; the reference for pass 2.

  e (``exponent``) defaults to the power of two of max(max_abs, max |mu_cj|). Of ``options``
  (``NCOptions``; or the keywords global_mean, solver, rcond, min_count) this uses global_mean,
  solver, rcond and min_count: with min_count k, classes with fewer than k samples are dropped
  (``ClassGeometry.kept``).
  """
  options = resolve(options, "finalize_class_means", global_mean=global_mean, solver=solver, rcond=rcond,
                    min_count=min_count)
  num_classes, feature_dim = state.means.shape
  if exponent is None:
    exponent = scale_exponent(jnp.maximum(state.max_abs, max_finite_abs(state.means)))
  kept = None if options.min_count is None else state.counts >= options.min_count
  means = state.means * power_of_two(-exponent, state.means.dtype)
  mu_global = global_mean_of(means, state.counts, options.global_mean, kept)
  centred = means - mu_global
  if kept is not None:
    centred = jnp.where(kept[:, None], centred, 0.0)
  rank = min(feature_dim, num_classes - 1 if options.global_mean == "class_means" else num_classes)
  basis, feature_basis, inverse_sq = _factorise(centred, rank, options.solver, options.rcond,
                                                deflate=options.global_mean == "class_means",
                                                cholesky=kept is None and options.rcond is None)
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


def _selected(geometry: ClassGeometry, labels: jax.Array, mask: Optional[jax.Array]):
  """(in_range, active, safe_labels, filtered) of a batch's labels (B,): labels in [0, C); unmasked rows
  of kept classes (or out of range); labels with 0 for the out-of-range ones (for gathers); and the
  count () int32 of unmasked samples of classes dropped by ``min_count``."""
  num_classes = geometry.means.shape[0]
  in_range = (labels >= 0) & (labels < num_classes)
  active = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
  safe_labels = jnp.where(in_range, labels, 0)
  filtered = jnp.zeros((), jnp.int32)
  if geometry.kept is not None:
    dropped = in_range & ~geometry.kept[safe_labels]
    filtered = jnp.sum(active & dropped, dtype=jnp.int32)
    active = active & ~dropped
  return in_range, active, safe_labels, filtered


def _ncc_decision(geometry: ClassGeometry, deviations: jax.Array, safe_labels: jax.Array) -> jax.Array:
  """argmin_c ||h_i - mu_c||^2 = argmin_c ||M_c||^2 - 2 <g_i, M_c> (B,), with g_i = d_i + M_{y_i}."""
  centred = deviations + geometry.centred_means[safe_labels]
  ncc_score = geometry.centred_norms_sq - 2.0 * matmul_highest(centred, geometry.centred_means.T)
  if geometry.kept is not None:
    ncc_score = jnp.where(geometry.kept, ncc_score, jnp.inf)
  return jnp.argmin(ncc_score, axis=-1)


def _network_decision(geometry: ClassGeometry, scaled: jax.Array, use_bias: bool) -> jax.Array:
  """argmax_c of the logits (B,), as W' x_i + b' in their power-of-two units (b' only if ``use_bias``)."""
  logits = matmul_highest(scaled, geometry.logit_weights.T)
  if use_bias and geometry.bias is not None:
    logits = logits + geometry.logit_bias
  if geometry.kept is not None:
    logits = jnp.where(geometry.kept, logits, -jnp.inf)
  return jnp.argmax(logits, axis=-1)


def update_deviations(
    state: DeviationState,
    geometry: ClassGeometry,
    features: jax.Array,
    labels: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    options: Optional[NCOptions] = None,
    ncc_use_bias=UNSET,
) -> DeviationState:
  """Folds a batch (features (B, p), labels (B,), optional mask (B,)) into pass 2.

  In scaled units x_i = h_i 2^-e (``scale_features``), with d_i = x_i - mu_{y_i} and
  g_i = d_i + M_{y_i} (the centred feature, formed without cancelling a common offset):
    NC1 summand  ||S^-1 V^T d_i||^2 (= ||S^-2 U^T M d_i||^2), a (B, r) product;
    NCC rule     argmin_c ||h_i - mu_c||^2 = argmin_c ||M_c||^2 - 2 <g_i, M_c>, from the (B, C)
                 product G M^T: the dropped term ||g_i||^2 is the same for every c;
    logits       (W h_i + b) 2^-(e+L) = W' x_i + b' with W' = ``logit_weights`` (b' dropped if
                 not ``options.ncc_use_bias``, or the keyword ``ncc_use_bias``), so the argmax is the network's.
  Only (B, C) and (B, p) temporaries: no C x C array. Classes not ``geometry.kept`` are never
  a decision, and their samples only count in ``filtered_samples``. Every product is at float32's full
  precision (``matmul_highest``), whatever the solver: the network's and the NCC's decisions are never
  approximated (TF32 candidates re-scored in float32 were found to change them: see BENCHMARKS.md). A batch
  typed on Explicit mesh axes is folded in on Auto ones (``sharding.run_auto``).
  """
  options = resolve(options, "update_deviations", ncc_use_bias=ncc_use_bias)
  explicit = explicit_mesh(state, geometry, features, labels, mask)
  if explicit is not None:
    return run_auto(lambda s, g, h, y, m: update_deviations(s, g, h, y, m, options=options), explicit,
                    state, geometry, features, labels, mask)
  num_classes = geometry.means.shape[0]
  dtype = geometry.means.dtype
  in_range, active, safe_labels, filtered = _selected(geometry, labels, mask)
  valid = active & in_range
  ids = segment_ids(labels, num_classes, active)

  reference = jnp.where(jnp.isfinite(geometry.means), geometry.means, 0.0)  # a NaN row's class: still count the rest
  scaled = scale_features(features, geometry.exponent, dtype)
  deviations = scaled - reference[safe_labels]
  deviation_sq = jnp.sum(deviations**2, axis=-1)  # finite for every finite row (|d| < 2), see nonfinite_rows
  whitened = matmul_highest(deviations, geometry.feature_basis) * jnp.sqrt(geometry.inverse_sq_singular_values)
  projected_sq = jnp.sum(whitened**2, axis=-1)
  ncc_decision = _ncc_decision(geometry, deviations, safe_labels)

  count_where = lambda condition: jnp.sum(valid & condition, dtype=jnp.int32)
  network_correct = mismatch = jnp.zeros((), jnp.int32)
  if geometry.weights is not None:
    network_decision = _network_decision(geometry, scaled, options.ncc_use_bias)
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
