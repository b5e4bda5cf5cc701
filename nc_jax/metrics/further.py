"""Later Neural Collapse metrics: NC5, hyperspherical kernels, CDNV^k, log-norms, weak NC1, W M^T, test means.

The metrics that came after Papyan, Han & Donoho (2020) and that the PyTorch library
rhubarbwu/neural-collapse (Wu & Papyan 2024, "Linguistic Collapse") measures. Notation as
in ``collapse``: N samples, p features, C classes; mu_c class means (C, p), mu_G the global
mean (p,), M = mu - mu_G the centred means (C, p), W (C, p) and b (C,) the classifier,
V_c = (1/n_c) sum_{i: y_i = c} ||h_i - mu_c||^2 the class variances (C,).

Each function is pure and jittable; ``further_collapse`` computes them all from features
and labels with the two passes of ``accumulators``. Where the peer library and
the source paper disagree, the paper is followed and the docstring says so.

The pair statistics (kernels, CDNV^k: ``kernel_sweep``, ``kernel_statistics``, ``cdnv``) live in
``kernels`` and are re-exported here.

Undefined is NaN, never a wrong finite number: an empty class or an unmasked label outside
[0, C) makes every key NaN; a class mean without a direction (zero) makes the keys that
need its direction NaN; pairs whose means coincide to float32 resolution give +inf log and
Riesz (s > 0) energies and a NaN CDNV (see each function).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import collapse
from nc_jax.metrics import geometry as geo
from nc_jax.metrics.accumulators import class_sums, global_mean_of, init_class_means, segment_ids, update_class_means
from nc_jax.metrics.kernels import (  # re-exported: the pair statistics among the later metrics
    KERNELS,
    PILOT_ROWS,
    cdnv,
    default_riesz_s,
    kernel_statistics,
    kernel_sweep,
    pair_distance_sq,
    pair_unresolved,
)
from nc_jax.metrics.options import UNSET, NCOptions, resolve
from nc_jax.metrics.scale import float_dtype, max_finite_abs, power_of_two, scale_exponent, unit_scaled


# ----------------------------------------------------------------------------
# The metrics, one function each (the pair statistics: ``kernels``).
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
  both = unit_scaled(jnp.concatenate([class_means, ood_mean[None, :]]))  # exact 2^k, no overflow
  means, ood = both[:-1], both[-1]
  norms = jnp.linalg.norm(means, axis=-1) * jnp.linalg.norm(ood)
  cosines = geo.matmul_highest(means, ood) / jnp.where(norms > 0, norms, jnp.nan)
  return jnp.mean(jnp.abs(cosines))


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
  exponent = scale_exponent(max_finite_abs(vectors))  # norms of v 2^-e cannot overflow
  scaled = vectors * power_of_two(-exponent, vectors.dtype)
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
  weights, centred_means = unit_scaled(weights), unit_scaled(centred_means)
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
  exponent = scale_exponent(max_finite_abs(values))
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
  centred = unit_scaled(centred_means)  # all four are scale-invariant
  pairs = geo.pair_geometry(centred, ddof=ddof)  # what equiangularity, max_angle and etf_deviation each sweep for
  out = {
      "equinorm_means": geo.equinorm(centred, ddof),
      "equiangular_means": pairs["equiangularity"],
      "max_angle_means": pairs["max_angle"],
      "etf_deviation_means": pairs["etf_deviation"],
  }
  if weights is not None:
    out["self_duality"] = geo.self_duality(unit_scaled(weights.astype(centred.dtype)), centred)
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

  Pass 1 is ``accumulators.update_class_means``; pass 2 takes the deviations d = h - mu_y in the
  power-of-two unit 2^e of ``scale`` and corrects the means by their class averages (the
  corrected two-pass algorithm of Chan, Golub & LeVeque).

  Returns (means, variances, counts, exponent, ok): means (C, p) mu_c 2^-e; variances (C,)
  V_c 4^-e; counts (C,) float; exponent () int32 e; ok () bool, False when a class is empty
  or an unmasked label is outside [0, C).
  """
  dtype = float_dtype(features)
  features = features.astype(dtype)
  state = update_class_means(init_class_means(num_classes, features.shape[1], dtype),
                                       features, labels, mask)
  exponent = scale_exponent(jnp.maximum(state.max_abs, max_finite_abs(state.means)))
  unit = power_of_two(-exponent, dtype)
  ids = segment_ids(labels, num_classes, mask)
  means = state.means * unit
  deviations = features * unit - means[jnp.minimum(ids, num_classes - 1)]
  counts = state.counts.astype(dtype)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = class_sums(deviations, ids, num_classes) / safe_counts[:, None]
  deviation_sq = class_sums(jnp.sum(deviations**2, axis=-1), ids, num_classes)
  variances = jnp.maximum(deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0) / safe_counts
  ok = _labels_ok(labels, num_classes, mask) & jnp.all(state.counts > 0)
  return means + correction, variances, counts, exponent, ok


def _in_units(value: jax.Array, exponent: jax.Array, power: float) -> jax.Array:
  """value (2^e)^power: exact (ldexp) for integer powers, else by exp2."""
  if float(power).is_integer():
    return jnp.ldexp(value, int(power) * exponent)
  return value * jnp.exp2(power * exponent.astype(value.dtype))


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


@dataclasses.dataclass(frozen=True)
class FurtherOptions:
  """The options of the later metrics alone (hashable: static under ``jit``); the shared conventions
  (global_mean, std_ddof) are ``NCOptions``'.

  Attributes:
    kernel_normalize: the kernels of u_c = M_c/||M_c|| (the peer) or, False, of M_c in the features' units.
    riesz_s: the Riesz kernel's s (None: p - 2).
    cdnv_exponents: k of each cdnv_k{k} key (a tuple; any sequence is turned into one).
  """

  kernel_normalize: bool = True
  riesz_s: Optional[float] = None
  cdnv_exponents: Sequence[float] = (1.0, 2.0)

  def __post_init__(self):
    _check_further_options(self.riesz_s, self.cdnv_exponents, 0)
    object.__setattr__(self, "cdnv_exponents", tuple(self.cdnv_exponents))


def further_from_statistics(
    means: jax.Array,
    variances: jax.Array,
    counts: jax.Array,
    exponent: jax.Array,
    weights: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    ok: jax.Array = True,
    options: NCOptions = NCOptions(),
    further: FurtherOptions = FurtherOptions(),
) -> dict:
  """The keys of ``further_collapse`` that depend on the class statistics only (all but nc5 and the
  *_test ones), from the output of ``class_statistics`` or any streaming pass that keeps the same sums:
  means (C, p) mu_c 2^-e, variances (C,) V_c 4^-e, counts (C,), exponent () int32 e, ok () bool
  (False makes every key NaN). W (C, p) and b (C,) in their own units. Of ``options`` this uses global_mean
  and std_ddof; ``further``: the kernels'."""
  centred = means - global_mean_of(means, counts, options.global_mean)
  log_unit = exponent.astype(means.dtype) * math.log(2.0)
  out = {}
  kernels = kernel_sweep(centred, normalize=further.kernel_normalize, riesz_s=further.riesz_s, ddof=options.std_ddof,
                         log_unit=log_unit)
  out |= {f"kernel_{key}": value for key, value in kernels.items()}
  for k in further.cdnv_exponents:
    out[f"cdnv_k{float(k):g}"] = _in_units(cdnv(variances, centred, k), exponent, 2.0 - k)
  out["equinorm_log_means"], out["equinorm_log_means_cov"] = log_norm_equinorm(centred, options.std_ddof, log_unit)
  out["nc1_weak"] = nc1_weak(variances, counts, centred)
  if weights is not None:
    weights = weights.astype(means.dtype)
    out["nc3_wm_structure"] = structure_error(weights, centred)
    features_mean = _in_units(global_mean_of(means, counts, options.global_mean), exponent, 1.0)
    out |= global_logits(weights, bias, features_mean)
  return {key: jnp.where(ok, value, jnp.nan) for key, value in out.items()}


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
    options: Optional[NCOptions] = None,
    global_mean=UNSET,
    ddof=UNSET,
) -> dict:
  """The later NC metrics of (N, p) features with (N,) integer labels; jit with num_classes
  and every keyword but the arrays static. W (C, p), b (C,), masks (N,) bool.

  Of ``options`` (``NCOptions``) this uses global_mean and std_ddof; the keywords global_mean and
  ddof (= std_ddof) give them one by one (default: 'class_means', 1), and must agree with ``options``.

  Keys (M = mu - mu_G, mu_G per ``global_mean`` as in ``accumulators.global_mean_of``):
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
  _check_further_options(riesz_s, cdnv_exponents, 1 if ddof is UNSET else ddof)
  options = resolve(options, "further_collapse", global_mean=global_mean, std_ddof=ddof)
  further = FurtherOptions(kernel_normalize=kernel_normalize, riesz_s=riesz_s, cdnv_exponents=cdnv_exponents)
  ood = _checked_ood(ood_features, ood_mask, features.shape[1])
  test = _checked_test(test_features, test_labels, test_mask, num_classes, features.shape[1])
  means, variances, counts, exponent, ok = class_statistics(features, labels, num_classes, mask)
  out = further_from_statistics(means, variances, counts, exponent, weights, bias, ok=ok, options=options,
                                further=further)
  if ood is not None:
    out |= _nc5((means, counts, exponent, ok), ood, options.global_mean)
  if test is not None:
    out |= _test_means_geometry(test, num_classes, weights, options, means.dtype)
  return out


def _checked_ood(ood_features, ood_mask, feature_dim: int):
  """(ood_features (N_ood, p), ood_mask (N_ood,) or None) as arrays, or None without OOD features;
  a one-line ValueError for a wrong shape."""
  if ood_features is None:
    return None
  ood_features = collapse.as_array(ood_features, "ood_features", "(N_ood, p)", floating=True)
  ood_mask = collapse.as_array(ood_mask, "ood_mask", "(N_ood,)")
  if ood_features.ndim != 2 or ood_features.shape[1] != feature_dim:
    raise ValueError(f"ood_features must have shape (N_ood, p) with p = {feature_dim} (the features' columns), "
                     f"got shape {tuple(ood_features.shape)}")
  if ood_mask is not None and tuple(ood_mask.shape) != ood_features.shape[:1]:
    raise ValueError(f"ood_mask must have shape (N_ood,) = {ood_features.shape[:1]}, got {tuple(ood_mask.shape)}")
  return ood_features, ood_mask


def _checked_test(test_features, test_labels, test_mask, num_classes: int, feature_dim: int):
  """(test_features, test_labels, test_mask) as checked arrays, or None without a test set."""
  if test_features is None and test_labels is None:
    return None
  if test_features is None or test_labels is None:
    raise ValueError("test_features and test_labels must be given together")
  test_features, test_labels, _, _, test_mask = collapse._as_inputs(test_features, test_labels, None, None, test_mask)
  collapse.check_shapes(test_features, test_labels, num_classes, mask=test_mask)
  if test_features.shape[1] != feature_dim:
    raise ValueError(f"test_features have {test_features.shape[1]} columns, the features {feature_dim}; "
                     "pass held-out features of the same layer")
  return test_features, test_labels, test_mask


def _nc5(statistics: tuple, ood: tuple, global_mean: str) -> dict:
  """nc5 and nc5_centred of the class ``statistics`` (means 2^-e, counts, e, ok; see ``class_statistics``)
  against the mean of the OOD features ``ood`` = (features, mask), both in the features' units."""
  means, counts, exponent, ok = statistics
  ood_features, ood_mask = ood
  dtype = means.dtype
  ood_state = update_class_means(init_class_means(1, ood_features.shape[1], dtype), ood_features.astype(dtype),
                                 jnp.zeros(ood_features.shape[:1], jnp.int32), ood_mask)
  ood_ok = ood_state.counts[0] > 0
  centred = means - global_mean_of(means, counts, global_mean)
  id_means = _in_units(means, exponent, 1.0)  # the features' units, shared with the OOD mean
  id_centre = _in_units(means[0] - centred[0], exponent, 1.0)
  nc5 = {"nc5": ood_orthogonality(id_means, ood_state.means[0]),
         "nc5_centred": ood_orthogonality(id_means, ood_state.means[0], id_centre)}
  return {key: jnp.where(ok & ood_ok, value, jnp.nan) for key, value in nc5.items()}


def _test_means_geometry(test: tuple, num_classes: int, weights, options: NCOptions, dtype) -> dict:
  """``mean_geometry`` of the test set's own means (``test`` = (features, labels, mask), taken in ``dtype``),
  NaN when a test class is empty or an unmasked test label is outside [0, C)."""
  test_features, test_labels, test_mask = test
  test_state = update_class_means(init_class_means(num_classes, test_features.shape[1], dtype),
                                  test_features.astype(dtype), test_labels, test_mask)
  test_centred = test_state.means - global_mean_of(test_state.means, test_state.counts, options.global_mean)
  test_ok = _labels_ok(test_labels, num_classes, test_mask) & jnp.all(test_state.counts > 0)
  geometry = mean_geometry(test_centred, weights, options.std_ddof)
  return {key: jnp.where(test_ok, value, jnp.nan) for key, value in geometry.items()}
