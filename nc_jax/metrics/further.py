"""Later Neural Collapse metrics: NC5, hyperspherical kernels, CDNV^k, log-norms, weak NC1, W M^T, test means.

The metrics that came after Papyan, Han & Donoho (2020) and that the PyTorch library
rhubarbwu/neural-collapse (Wu & Papyan 2024, "Linguistic Collapse") measures. Notation as
in ``collapse``: N samples, p features, C classes; mu_c class means (C, p), mu_G the global
mean (p,), M = mu - mu_G the centred means (C, p), W (C, p) and b (C,) the classifier,
V_c = (1/n_c) sum_{i: y_i = c} ||h_i - mu_c||^2 the class variances (C,).

Each function is pure and jittable; ``further_collapse`` computes them all from features
and labels with the two-pass accumulators of ``streaming``. Where the peer library and
the source paper disagree, the paper is followed and the docstring says so.

Pair statistics (kernels, CDNV^k) never form a (C, C) array beyond ``geometry.pair_sums``'s
dense limit: they are sums over c != c' of per-pair functions of one Gram entry <v_a, v_c>
and the two squared norms (plus per-row data), swept tile by tile by ``geometry.pair_sums``,
so C = 50 257 needs O(C p + tile^2) memory. Spreads are summed around a pilot value taken
over the pairs of an evenly strided subset of at most ``PILOT_ROWS`` classes (all of them up
to that C, where this is the exact two-pass algorithm), as in ``geometry.pair_geometry``.

Undefined is NaN, never a wrong finite number: an empty class or an unmasked label outside
[0, C) makes every key NaN; a class mean without a direction (zero) makes the keys that
need its direction NaN; pairs whose means coincide to float32 resolution give +inf log and
Riesz (s > 0) energies and a NaN CDNV (see each function).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import collapse
from nc_jax.metrics import geometry as geo
from nc_jax.metrics import streaming

KERNELS = ("distance", "log", "riesz")


# ----------------------------------------------------------------------------
# Pair statistics over c != c'.
# ----------------------------------------------------------------------------


PILOT_ROWS = 2048  # classes in the pilot subset that sets the shifts of the pair sums


def pair_distance_sq(gram: jax.Array, norm_sq_a: jax.Array, norm_sq_c: jax.Array) -> jax.Array:
  """Per pair: ||v_a - v_c||^2 = ||v_a||^2 + ||v_c||^2 - 2 <v_a, v_c>, clipped at 0.

  gram (A, B) tile of <v_a, v_c>; norm_sq_a (A,) and norm_sq_c (B,) the rows' squared norms.
  """
  return jnp.maximum(norm_sq_a[:, None] + norm_sq_c[None, :] - 2.0 * gram, 0.0)


def pair_unresolved(gram: jax.Array, norm_sq_a: jax.Array, norm_sq_c: jax.Array, feature_dim: int) -> jax.Array:
  """Per pair: True where ||v_a - v_c||^2 from the Gram lies within its float32 rounding,
  2 sqrt(p) eps (||v_a||^2 + ||v_c||^2), of zero: the two coincide as far as float32 can tell."""
  eps = float(jnp.finfo(gram.dtype).eps)
  tolerance = 2.0 * math.sqrt(feature_dim) * eps * (norm_sq_a[:, None] + norm_sq_c[None, :])
  return pair_distance_sq(gram, norm_sq_a, norm_sq_c) <= tolerance


def _spread(sum_1: jax.Array, sum_2: jax.Array, count: float, ddof: int) -> jax.Array:
  """Variance from sums of x - x0 and (x - x0)^2 over ``count`` terms; NaN when count <= ddof."""
  if count <= ddof:
    return jnp.full(jnp.shape(sum_2), jnp.nan, jnp.result_type(sum_2))
  return jnp.maximum(sum_2 - sum_1**2 / count, 0.0) / (count - ddof)


# ----------------------------------------------------------------------------
# The metrics, one function each.
# ----------------------------------------------------------------------------


def ood_orthogonality(class_means: jax.Array, ood_mean: jax.Array, centre: Optional[jax.Array] = None) -> jax.Array:
  """NC5 (Ammar et al. 2024, "NECO", ICLR, eq. 5): Avg_c |cos angle(mu_c - z, mu_OOD - z)|.

  Args:
    class_means: (C, p) in-distribution class means mu_c.
    ood_mean: (p,) mean of the out-of-distribution features mu_G^OOD (their sample mean, as in
      NECO; the peer's README passes its accumulator's unweighted mean of per-label OOD means,
      which differs when the OOD loader's labels are unbalanced).
    centre: (p,) z; None (the paper's and the peer's ``orthogonality_deviation``: neither
      mean is centred) or the ID global mean mu_G for the centred variant.

  0 when the OOD mean is orthogonal to every class mean. NaN when a mean (after centring)
  is zero: it has no direction (the peer adds eps to the norm and would return 0).
  """
  if centre is not None:
    class_means, ood_mean = class_means - centre, ood_mean - centre
  both = streaming.unit_scaled(jnp.concatenate([class_means, ood_mean[None, :]]))  # exact 2^k, no overflow
  means, ood = both[:-1], both[-1]
  norms = jnp.linalg.norm(means, axis=-1) * jnp.linalg.norm(ood)
  cosines = geo.matmul_highest(means, ood) / jnp.where(norms > 0, norms, jnp.nan)
  return jnp.mean(jnp.abs(cosines))


def default_riesz_s(feature_dim: int) -> float:
  """s = p - 2, the peer's ``riesz_kernel`` (the Newtonian energy on the sphere S^{p-1})."""
  return float(feature_dim - 2)


def kernel_sweep(
    vectors: jax.Array,
    *,
    normalize: bool = True,
    riesz_s: Optional[float] = None,
    ddof: int = 1,
    log_unit: float | jax.Array = 0.0,
    block_rows: Optional[int] = None,
) -> dict:
  """Mean and variance over pairs c != c' of three kernels of d = ||u_c - u_c'||, in one sweep.

  Hyperspherical energies (Liu et al. 2023, "Generalizing and decoupling neural collapse via
  hyperspherical uniformity gap", ICLR); the variance of each is GNC2 with that kernel
  (Wu & Papyan 2024, "Linguistic Collapse", NeurIPS; the peer's ``kernel_stats``):
    distance  K = d;
    log       K = log(1 / d)  (its variance is ``geometry.gnc2``);
    riesz     K = sign(s) d^(-s), s = ``riesz_s`` (default p - 2, as the peer's ``riesz_kernel``);
              NaN for s = 0 (e.g. the default with p = 2), whose limit is the log kernel.

  Args:
    vectors: (C, p) centred class means M_c (or any rows).
    normalize: u_c = v_c / ||v_c|| (the peer always normalises); False: u_c = v_c, lengths in
      the units of ``vectors`` times e^log_unit.
    ddof: 1 divides by C(C-1) - 1 (as ``geometry.gnc2``); 0 by C(C-1), which is also the peer's
      population variance over the C(C-1)/2 unordered pairs.
    log_unit: log of the length unit of ``vectors`` (e log 2 for vectors scaled by 2^-e).
    block_rows: tile rows for ``geometry.pair_sums`` (None: its default).

  Returns {'<kernel>_mean', '<kernel>_var'} for the three kernels, scalars. Powers d^a are
  summed as e^t0 sum e^(a log d - t0), t0 = the largest a log d over the pilot pairs (all
  pairs up to ``PILOT_ROWS`` classes), so a large s (p - 2 = 2046 for p = 2048) is exact
  wherever the result fits in float32 (else it is inf, or 0 when it underflows); beyond
  ``PILOT_ROWS`` classes a pair far closer than every pilot pair can overflow the shifted sum
  to inf. A pair whose vectors coincide to float32 resolution (``pair_unresolved``) has
  infinite log and Riesz (s > 0) energy: those means and variances are +inf (sign(s) inf for
  the Riesz mean); it contributes d = 0 to the distance kernel and to Riesz with s < 0.
  Normalising a zero row gives NaN everywhere.
  """
  num_classes, feature_dim = vectors.shape
  s = default_riesz_s(feature_dim) if riesz_s is None else float(riesz_s)
  if normalize:
    scaled = streaming.unit_scaled(vectors)
    norms = jnp.linalg.norm(scaled, axis=-1, keepdims=True)
    vectors = scaled / jnp.where(norms > 0, norms, jnp.nan)
    log_unit = 0.0
  norm_sq = jnp.sum(vectors**2, axis=-1)
  powers = {"distance": 1.0, "riesz": -s}

  def log_distance(gram, norm_sq_a, norm_sq_c):
    unresolved = pair_unresolved(gram, norm_sq_a, norm_sq_c, feature_dim)
    distance_sq = pair_distance_sq(gram, norm_sq_a, norm_sq_c)
    return 0.5 * jnp.log(jnp.where(unresolved, 1.0, distance_sq)) + log_unit, unresolved

  pilot = geo.pilot_rows(num_classes, PILOT_ROWS)  # evenly strided; all C up to PILOT_ROWS
  pilot_log, pilot_unresolved = log_distance(geo.matmul_highest(vectors[pilot], vectors[pilot].T),
                                             norm_sq[pilot], norm_sq[pilot])
  pilot_pairs = ~np.eye(len(pilot), dtype=bool)
  pilot_resolved = pilot_pairs & ~pilot_unresolved
  log_shift = geo.masked_mean(-pilot_log, pilot_resolved)
  top, value_shift = {}, {}
  for name, power in powers.items():
    exponent = jnp.where(pilot_resolved, power * pilot_log, -jnp.inf)
    top[name] = jnp.max(exponent)
    top[name] = jnp.where(jnp.isfinite(top[name]), top[name], 0.0)
    value_shift[name] = geo.masked_mean(jnp.exp(exponent - top[name]), pilot_pairs)

  def statistic(gram, norm_sq_a, norm_sq_c, mask):
    logs, unresolved = log_distance(gram, norm_sq_a, norm_sq_c)
    resolved = mask & ~unresolved
    centred_log = jnp.where(resolved, -logs - log_shift, 0.0)
    sums = {"unresolved": jnp.sum(mask & unresolved, dtype=jnp.int32),
            "log": jnp.sum(centred_log), "log_sq": jnp.sum(centred_log**2)}
    for name, power in powers.items():
      values = jnp.where(resolved, jnp.exp(power * logs - top[name]), 0.0)  # unresolved: d = 0
      centred = jnp.where(mask, values - value_shift[name], 0.0)
      sums[name], sums[name + "_sq"] = jnp.sum(centred), jnp.sum(centred**2)
    return sums

  sums = geo.pair_sums(statistic, vectors, norm_sq, block_rows=block_rows)
  count = num_classes * (num_classes - 1.0)  # a Python float: C(C-1) overflows int32 at C = 46 342
  infinite = sums["unresolved"] > 0
  out = {
      "log_mean": jnp.where(infinite, jnp.inf, log_shift + sums["log"] / count),
      "log_var": jnp.where(infinite, jnp.inf, _spread(sums["log"], sums["log_sq"], count, ddof)),
  }
  for name in powers:
    sign = math.copysign(1.0, s) if name == "riesz" else 1.0
    out[name + "_mean"] = sign * jnp.exp(top[name]) * (value_shift[name] + sums[name] / count)
    out[name + "_var"] = jnp.exp(2.0 * top[name]) * _spread(sums[name], sums[name + "_sq"], count, ddof)
  if s > 0:
    out["riesz_mean"] = jnp.where(infinite, jnp.inf, out["riesz_mean"])
    out["riesz_var"] = jnp.where(infinite, jnp.inf, out["riesz_var"])
  elif s == 0:  # the log kernel's limit, not a Riesz kernel (sign(0) d^0 would be a constant)
    out["riesz_mean"] = out["riesz_var"] = jnp.asarray(jnp.nan, vectors.dtype)
  return {f"{name}_{stat}": out[f"{name}_{stat}"] for name in KERNELS for stat in ("mean", "var")}


def kernel_statistics(vectors: jax.Array, kernel: str = "log", **options) -> tuple[jax.Array, jax.Array]:
  """(mean, var) of one kernel ('distance', 'log' or 'riesz') of ``kernel_sweep``, which see."""
  if kernel not in KERNELS:
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
  out = kernel_sweep(vectors, **options)
  return out[kernel + "_mean"], out[kernel + "_var"]


def cdnv(class_variances: jax.Array, centred_means: jax.Array, distance_exponent: float = 2.0,
         block_rows: Optional[int] = None) -> jax.Array:
  """Avg_{c != c'} (V_c + V_c') / (2 ||mu_c - mu_c'||^k), k = ``distance_exponent``.

  Galanti et al. 2022 ("On the role of neural collapse in transfer learning", ICLR)
  use k = 2 (the suite's ``cdnv`` key). The peer's ``variability_cdnv(..., dist_exp)`` raises
  the *squared* distance to dist_exp, so its dist_exp equals k / 2 here.

  Args:
    class_variances: (C,) V_c = (1/n_c) sum ||h - mu_c||^2.
    centred_means: (C, p) mu_c - mu_G (any common shift cancels; centring keeps the digits).
    block_rows: tile rows for ``geometry.pair_sums`` (None: its default).

  Returns NaN when two means coincide to float32 resolution (``pair_unresolved``): the ratio
  is then undefined or infinite. Units: those of h to the power 2 - k.
  """
  num_classes, feature_dim = centred_means.shape
  row_data = {"norm_sq": jnp.sum(centred_means**2, axis=-1), "variance": class_variances.astype(centred_means.dtype)}

  def statistic(gram, rows_a, rows_c, mask):
    unresolved = pair_unresolved(gram, rows_a["norm_sq"], rows_c["norm_sq"], feature_dim)
    distance_sq = jnp.where(unresolved, 1.0, pair_distance_sq(gram, rows_a["norm_sq"], rows_c["norm_sq"]))
    spread = rows_a["variance"][:, None] + rows_c["variance"][None, :]
    ratio = spread / (2.0 * distance_sq ** (0.5 * distance_exponent))
    return {"sum": jnp.sum(jnp.where(mask & ~unresolved, ratio, 0.0)),
            "unresolved": jnp.sum(mask & unresolved, dtype=jnp.int32)}

  sums = geo.pair_sums(statistic, centred_means, row_data, block_rows=block_rows)
  return jnp.where(sums["unresolved"] > 0, jnp.nan, sums["sum"] / (num_classes * (num_classes - 1.0)))


def log_norm_equinorm(vectors: jax.Array, ddof: int = 1,
                      log_unit: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
  """(Std_c log ||v_c||, Std_c log ||v_c|| / Avg_c log ||v_c||) for rows v_c of ``vectors`` (C, p).

  Equinormness on a log scale (Wu & Papyan 2024): the peer's ``mean_norms`` takes a log as
  post-function, and the study's own analysis code records the mean and the unbiased std of
  log ||M_c|| ("norms_log_mean", "norms_log_std"); its coefficient of variation is their ratio.
  The std is unit-free (a common scale shifts every log by one constant) and 0 exactly when
  all norms are equal: it is the metric, returned first. The coefficient of variation of the
  logs depends on the unit of length (``log_unit`` = log of the unit of ``vectors``) and is
  meaningless when Avg log ||v_c|| is near 0; it is returned second, for comparison with
  numbers reported that way. A zero row gives log 0 = -inf and so NaN.
  """
  exponent = streaming.scale_exponent(streaming.max_finite_abs(vectors))  # norms of v 2^-e cannot overflow
  scaled = vectors * streaming.power_of_two(-exponent, vectors.dtype)
  logs = jnp.log(jnp.linalg.norm(scaled, axis=-1)) + exponent * math.log(2.0) + log_unit
  logs = jnp.where(jnp.isfinite(logs), logs, jnp.nan)
  std = jnp.std(logs, ddof=ddof)
  return std, std / jnp.mean(logs)


def nc1_weak(class_variances: jax.Array, counts: jax.Array, centred_means: jax.Array) -> jax.Array:
  """Tr(Sigma_W) / Tr(Sigma_B) = [(1/N) sum_c n_c V_c] / [(1/C) sum_c ||M_c||^2].

  The trace-ratio ("weak") form of NC1 used for intermediate layers after Rangamani et al.
  2023 ("Feature learning in deep classifiers through Intermediate Neural Collapse", ICML);
  the paper's own text was not reachable here, so this follows the trace-ratio reading. It
  equals the suite's ``nc1_tirer`` key (Tirer et al. 2023). The peer has no "nc1_weak"; its
  ``covariance_ratio(..., metric="quotient")`` (Hui et al. 2022 / Tirer et al. 2023) is this
  same number with Sigma_B = M^T M / C (one stored older revision divided by p instead).

  Args: class_variances (C,), counts (C,) n_c, centred_means (C, p).
  """
  counts = counts.astype(class_variances.dtype)
  trace_within = jnp.sum(counts * class_variances) / jnp.sum(counts)
  trace_between = jnp.sum(centred_means**2) / centred_means.shape[0]
  return trace_within / trace_between


STRUCTURE_DENSE_MAX = 2048  # up to this C, W M^T is formed whole; beyond, in blocks of rows
STRUCTURE_BLOCK = 512


def structure_error(weights: jax.Array, centred_means: jax.Array, block_rows: Optional[int] = None) -> jax.Array:
  """NC3 as a structure error: || W M^T / ||W M^T||_F - E / ||E||_F ||_F, E = I - 11^T / C.

  W, M (C, p); W M^T is (C, C) with entry <w_a, M_c>. Zhu et al. 2021 ("A geometric analysis
  of neural collapse with unconstrained features", NeurIPS) and Rangamani et al. 2023
  measure NC3 this way; the peer's ``self_duality_error`` (after Kothapalli 2023) is the
  same number (||E||_F = sqrt(C - 1)). 0 when W and M are the same simplex ETF up to scale
  (any scales). NaN when W M^T = 0.

  Up to ``STRUCTURE_DENSE_MAX`` classes W M^T is formed whole; beyond, ``block_rows`` rows at a
  time (``lax.map``, (block, C) of memory), with ||W M^T||_F^2 = <W^T W, M^T M>_F from p x p
  matrices. The difference is summed entry by entry, never as 2 - 2 <S, E> / (..), which loses
  half the digits near 0.
  """
  weights, centred_means = streaming.unit_scaled(weights), streaming.unit_scaled(centred_means)
  num_classes = weights.shape[0]
  if block_rows is None:
    block_rows = num_classes if num_classes <= STRUCTURE_DENSE_MAX else STRUCTURE_BLOCK
  etf_norm = math.sqrt(num_classes - 1.0)  # ||E||_F
  if block_rows >= num_classes:
    product = geo.matmul_highest(weights, centred_means.T)
    target = geo.simplex_etf_gram(num_classes, product.dtype)
    return jnp.linalg.norm(product / jnp.linalg.norm(product) - target / etf_norm)

  weights_gram = geo.matmul_highest(weights.T, weights)  # (p, p)
  product_norm = jnp.sqrt(jnp.sum(weights_gram * geo.matmul_highest(centred_means.T, centred_means)))
  num_blocks = -(-num_classes // block_rows)
  padded = jnp.pad(weights, [(0, num_blocks * block_rows - num_classes), (0, 0)])
  columns = jnp.arange(num_classes)

  def block_sum(i):
    rows = i * block_rows + jnp.arange(block_rows)
    block = geo.matmul_highest(jax.lax.dynamic_slice_in_dim(padded, i * block_rows, block_rows), centred_means.T)
    target = (jnp.where(rows[:, None] == columns[None, :], 1.0, 0.0) - 1.0 / num_classes) / etf_norm
    return jnp.sum(jnp.where(rows[:, None] < num_classes, (block / product_norm - target) ** 2, 0.0))

  return jnp.sqrt(jnp.sum(jax.lax.map(block_sum, jnp.arange(num_blocks))))


def _norm(values: jax.Array) -> jax.Array:
  """||values||_2 (Frobenius) without overflow or underflow of the squares: exact power-of-two rescaling."""
  exponent = streaming.scale_exponent(streaming.max_finite_abs(values))
  return jnp.ldexp(jnp.linalg.norm(jnp.ldexp(values, -exponent)), exponent)


def global_logits(weights: jax.Array, bias: Optional[jax.Array], global_mean: jax.Array) -> dict:
  """The logits of the global mean, z = W mu_G + b (C,), and how far they are from collapse.

  Zhu et al. 2021 (Thm. 3.1): at every global minimiser of the regularised unconstrained-
  features cross-entropy, the features' global mean is 0 and b = b* 1, so z = b* 1: equal
  logits (only the common b* may be nonzero). Returns:
    global_logit_norm        ||z||_2, in logit units (raw, as asked of the "W mu_G + b" condition);
    global_logit_norm_rel    ||z|| / (||W||_F ||mu_G|| + ||b||), in [0, 1] (Cauchy-Schwarz and
                             the triangle inequality), 0 iff z = 0;
    global_logit_spread_rel  ||z - mean(z) 1|| / (||W||_F ||mu_G|| + ||b||): the part of z
                             that changes a decision; 0 at Zhu et al.'s minimisers.
  Both ratios are NaN when the denominator is 0.
  """
  bias = jnp.zeros(weights.shape[:1], weights.dtype) if bias is None else bias.astype(weights.dtype)
  logits = geo.matmul_highest(weights, global_mean.astype(weights.dtype)) + bias
  scale = _norm(weights) * _norm(global_mean) + _norm(bias)
  scale = jnp.where(scale > 0, scale, jnp.nan)
  return {
      "global_logit_norm": _norm(logits),
      "global_logit_norm_rel": _norm(logits) / scale,
      "global_logit_spread_rel": _norm(logits - jnp.mean(logits)) / scale,
  }


def mean_geometry(centred_means: jax.Array, weights: Optional[jax.Array] = None, ddof: int = 1,
                  suffix: str = "_test") -> dict:
  """NC2/NC3 of a set of centred class means (C, p) with ``geometry``'s functions, keys + suffix:
  equinorm_means, equiangular_means, max_angle_means, etf_deviation_means, and with W (C, p)
  self_duality (squared, the paper's NC3). For the test-set means (Hui, Belkin & Nakkiran 2022)."""
  centred = streaming.unit_scaled(centred_means)  # all four are scale-invariant
  pairs = geo.pair_geometry(centred, ddof=ddof)  # what equiangularity, max_angle and etf_deviation each sweep for
  out = {
      "equinorm_means": geo.equinorm(centred, ddof),
      "equiangular_means": pairs["equiangularity"],
      "max_angle_means": pairs["max_angle"],
      "etf_deviation_means": pairs["etf_deviation"],
  }
  if weights is not None:
    out["self_duality"] = geo.self_duality(streaming.unit_scaled(weights.astype(centred.dtype)), centred)
  return {key + suffix: value for key, value in out.items()}


# ----------------------------------------------------------------------------
# Everything from features and labels.
# ----------------------------------------------------------------------------


def _labels_ok(labels: jax.Array, num_classes: int, mask: Optional[jax.Array]) -> jax.Array:
  """True when no unmasked label lies outside [0, C) (such rows would otherwise be dropped silently)."""
  outside = (labels < 0) | (labels >= num_classes)
  if mask is not None:
    outside = outside & mask.astype(bool)
  return ~jnp.any(outside)


def class_statistics(features: jax.Array, labels: jax.Array, num_classes: int, mask: Optional[jax.Array] = None):
  """Two passes over features (N, p), labels (N,), optional mask (N,) bool.

  Pass 1 is ``streaming.update_class_means``; pass 2 takes the deviations d = h - mu_y in the
  power-of-two unit 2^e of ``streaming`` and corrects the means by their class averages (the
  corrected two-pass algorithm of Chan, Golub & LeVeque).

  Returns (means, variances, counts, exponent, ok): means (C, p) mu_c 2^-e; variances (C,)
  V_c 4^-e; counts (C,) float; exponent () int32 e; ok () bool, False when a class is empty
  or an unmasked label is outside [0, C).
  """
  dtype = streaming.float_dtype(features)
  features = features.astype(dtype)
  state = streaming.update_class_means(streaming.init_class_means(num_classes, features.shape[1], dtype),
                                       features, labels, mask)
  exponent = streaming.scale_exponent(jnp.maximum(state.max_abs, streaming.max_finite_abs(state.means)))
  unit = streaming.power_of_two(-exponent, dtype)
  ids = streaming.segment_ids(labels, num_classes, mask)
  means = state.means * unit
  deviations = features * unit - means[jnp.minimum(ids, num_classes - 1)]
  counts = state.counts.astype(dtype)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = streaming.class_sums(deviations, ids, num_classes) / safe_counts[:, None]
  deviation_sq = streaming.class_sums(jnp.sum(deviations**2, axis=-1), ids, num_classes)
  variances = jnp.maximum(deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0) / safe_counts
  ok = _labels_ok(labels, num_classes, mask) & jnp.all(state.counts > 0)
  return means + correction, variances, counts, exponent, ok


def _in_units(value: jax.Array, exponent: jax.Array, power: float) -> jax.Array:
  """value (2^e)^power: exact (ldexp) for integer powers, else by exp2."""
  if float(power).is_integer():
    return jnp.ldexp(value, int(power) * exponent)
  return value * jnp.exp2(power * exponent.astype(value.dtype))


def further_from_statistics(
    means: jax.Array,
    variances: jax.Array,
    counts: jax.Array,
    exponent: jax.Array,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    ok: jax.Array = True,
    kernel_normalize: bool = True,
    riesz_s: Optional[float] = None,
    cdnv_exponents: Sequence[float] = (1.0, 2.0),
    global_mean: str = "class_means",
    ddof: int = 1,
) -> dict:
  """The keys of ``further_collapse`` that depend on the class statistics only (all but nc5 and the
  *_test ones), from the output of ``class_statistics`` or any streaming pass that keeps the same sums:
  means (C, p) mu_c 2^-e, variances (C,) V_c 4^-e, counts (C,), exponent () int32 e, ok () bool
  (False makes every key NaN). W (C, p) and b (C,) in their own units."""
  centred = means - streaming.global_mean_of(means, counts, global_mean)
  log_unit = exponent.astype(means.dtype) * math.log(2.0)
  out = {}
  kernels = kernel_sweep(centred, normalize=kernel_normalize, riesz_s=riesz_s, ddof=ddof, log_unit=log_unit)
  out |= {f"kernel_{key}": value for key, value in kernels.items()}
  for k in cdnv_exponents:
    out[f"cdnv_k{float(k):g}"] = _in_units(cdnv(variances, centred, k), exponent, 2.0 - k)
  out["equinorm_log_means"], out["equinorm_log_means_cov"] = log_norm_equinorm(centred, ddof, log_unit)
  out["nc1_weak"] = nc1_weak(variances, counts, centred)
  if weights is not None:
    weights = weights.astype(means.dtype)
    out["nc3_wm_structure"] = structure_error(weights, centred)
    features_mean = _in_units(streaming.global_mean_of(means, counts, global_mean), exponent, 1.0)
    out |= global_logits(weights, bias, features_mean)
  return {key: jnp.where(ok, value, jnp.nan) for key, value in out.items()}


def _check_further_options(riesz_s, cdnv_exponents, ddof) -> None:
  """One-line ValueErrors for the static options of ``further_collapse``."""
  if riesz_s is not None and (not isinstance(riesz_s, numbers.Real) or isinstance(riesz_s, bool)
                              or not math.isfinite(riesz_s)):
    raise ValueError(f"riesz_s must be None (p - 2) or a finite number, got {riesz_s!r}")
  if isinstance(cdnv_exponents, (str, bytes)) or not isinstance(cdnv_exponents, Sequence) or not all(
      isinstance(k, numbers.Real) and not isinstance(k, bool) and math.isfinite(k) for k in cdnv_exponents):
    raise ValueError(f"cdnv_exponents must be a sequence of finite numbers, e.g. (1.0, 2.0), got {cdnv_exponents!r}")
  if not isinstance(ddof, (int, np.integer)) or isinstance(ddof, bool) or ddof < 0:
    raise ValueError(f"ddof must be a non-negative int, got {ddof!r}")


def further_collapse(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    mask: Optional[jax.Array] = None,
    ood_features: Optional[jax.Array] = None,
    ood_mask: Optional[jax.Array] = None,
    test_features: Optional[jax.Array] = None,
    test_labels: Optional[jax.Array] = None,
    test_mask: Optional[jax.Array] = None,
    kernel_normalize: bool = True,
    riesz_s: Optional[float] = None,
    cdnv_exponents: Sequence[float] = (1.0, 2.0),
    global_mean: str = "class_means",
    ddof: int = 1,
) -> dict:
  """The later NC metrics of (N, p) features with (N,) integer labels; jit with num_classes
  and every keyword but the arrays static. W (C, p), b (C,), masks (N,) bool.

  Keys (M = mu - mu_G, mu_G per ``global_mean`` as in ``streaming.global_mean_of``):
    kernel_{distance,log,riesz}_{mean,var}  ``kernel_sweep`` of M (normalised unless
        kernel_normalize=False, then in the features' units); *_var is GNC2 with that kernel,
        kernel_log_var = ``geometry.gnc2``(M) (Liu et al. 2023; Wu & Papyan 2024).
    cdnv_k{k}             ``cdnv`` with ||mu_c - mu_c'||^k for each k in cdnv_exponents
                          (cdnv_k2 = the suite's cdnv; Galanti et al. 2022); units h^(2-k).
    equinorm_log_means    Std_c log ||M_c|| (``log_norm_equinorm``; Wu & Papyan 2024).
    equinorm_log_means_cov  Std_c / Avg_c of log ||M_c||, ||M_c|| in the features' units.
    nc1_weak              Tr Sigma_W / Tr Sigma_B (Rangamani et al. 2023) = the suite's nc1_tirer.
  with weights:
    nc3_wm_structure      ``structure_error``(W, M) (Zhu et al. 2021).
    global_logit_norm, global_logit_norm_rel, global_logit_spread_rel  ``global_logits`` of mu_G.
  with ood_features (N_ood, p):
    nc5                   ``ood_orthogonality``(mu, mu_OOD) (NECO eq. 5, uncentred).
    nc5_centred           the same with both centred at the ID mu_G.
  with test_features, test_labels (N_test, p), (N_test,): the test set's own means, centred
  at their own global mean (Hui, Belkin & Nakkiran 2022), through ``mean_geometry``:
    equinorm_means_test, equiangular_means_test, max_angle_means_test, etf_deviation_means_test,
    and with weights self_duality_test.

  An empty class or an unmasked label outside [0, C) makes every key NaN (the test ones: in
  the test set); no unmasked OOD row makes nc5* NaN.
  """
  features, labels, weights, bias, mask = collapse._as_inputs(features, labels, weights, bias, mask)
  collapse.check_shapes(features, labels, num_classes, weights, bias, mask)
  _check_further_options(riesz_s, cdnv_exponents, ddof)
  feature_dim = features.shape[1]
  if ood_features is not None:
    ood_features = collapse.as_array(ood_features, "ood_features", "(N_ood, p)", floating=True)
    ood_mask = collapse.as_array(ood_mask, "ood_mask", "(N_ood,)")
    if ood_features.ndim != 2 or ood_features.shape[1] != feature_dim:
      raise ValueError(f"ood_features must have shape (N_ood, p) with p = {feature_dim} (the features' columns), "
                       f"got shape {tuple(ood_features.shape)}")
    if ood_mask is not None and tuple(ood_mask.shape) != ood_features.shape[:1]:
      raise ValueError(f"ood_mask must have shape (N_ood,) = {ood_features.shape[:1]}, got {tuple(ood_mask.shape)}")
  if test_features is not None or test_labels is not None:
    if test_features is None or test_labels is None:
      raise ValueError("test_features and test_labels must be given together")
    test_features, test_labels, _, _, test_mask = collapse._as_inputs(test_features, test_labels, None, None, test_mask)
    collapse.check_shapes(test_features, test_labels, num_classes, mask=test_mask)
    if test_features.shape[1] != feature_dim:
      raise ValueError(f"test_features have {test_features.shape[1]} columns, the features {feature_dim}; "
                       "pass held-out features of the same layer")
  means, variances, counts, exponent, ok = class_statistics(features, labels, num_classes, mask)
  out = further_from_statistics(means, variances, counts, exponent, weights, bias, ok=ok,
                                kernel_normalize=kernel_normalize, riesz_s=riesz_s, cdnv_exponents=cdnv_exponents,
                                global_mean=global_mean, ddof=ddof)
  if ood_features is not None:
    dtype = means.dtype
    ood_state = streaming.update_class_means(streaming.init_class_means(1, ood_features.shape[1], dtype),
                                             ood_features.astype(dtype), jnp.zeros(ood_features.shape[:1], jnp.int32),
                                             ood_mask)
    ood_ok = ood_state.counts[0] > 0
    centred = means - streaming.global_mean_of(means, counts, global_mean)
    id_means = _in_units(means, exponent, 1.0)  # the features' units, shared with the OOD mean
    id_centre = _in_units(means[0] - centred[0], exponent, 1.0)
    nc5 = {"nc5": ood_orthogonality(id_means, ood_state.means[0]),
           "nc5_centred": ood_orthogonality(id_means, ood_state.means[0], id_centre)}
    out |= {key: jnp.where(ok & ood_ok, value, jnp.nan) for key, value in nc5.items()}

  if test_features is not None:
    dtype = means.dtype
    test_state = streaming.update_class_means(
        streaming.init_class_means(num_classes, test_features.shape[1], dtype), test_features.astype(dtype),
        test_labels, test_mask)
    test_centred = test_state.means - streaming.global_mean_of(test_state.means, test_state.counts, global_mean)
    test_ok = _labels_ok(test_labels, num_classes, test_mask) & jnp.all(test_state.counts > 0)
    test = mean_geometry(test_centred, weights, ddof)
    out |= {key: jnp.where(test_ok, value, jnp.nan) for key, value in test.items()}
  return out
