"""Pair statistics of class means over c != c': hyperspherical kernel energies and CDNV^k.

Kernels of the distance d = ||u_c - u_c'|| between normalised centred means (Liu et al. 2023; the
variance of each is GNC2 with that kernel, Wu & Papyan 2024) and the class-distance normalised
variance with any power of the distance (Galanti et al. 2022). Re-exported by ``further``, whose
``further_collapse`` reports them.

They never form a (C, C) array beyond ``geometry.pair_sums``'s dense limit: they are sums over
c != c' of per-pair functions of one Gram entry <v_a, v_c> and the two squared norms (plus
per-row data), swept tile by tile by ``geometry.pair_sums``, so C = 50 257 needs O(C p + tile^2)
memory. Spreads are summed around a pilot value taken over the pairs of an evenly strided subset
of at most ``PILOT_ROWS`` classes (all of them up to that C, where this is the exact two-pass
algorithm), as in ``geometry.pair_geometry``. Pairs whose vectors coincide to float32 resolution
give +inf log and Riesz (s > 0) energies and a NaN CDNV (see each function).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import geometry as geo
from nc_jax.metrics.scale import unit_scaled

KERNELS = ("distance", "log", "riesz")
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


def default_riesz_s(feature_dim: int) -> float:
  """s = p - 2, the peer's ``riesz_kernel`` (the Newtonian energy on the sphere S^{p-1})."""
  return float(feature_dim - 2)


def _kernel_shifts(vectors: jax.Array, norm_sq: jax.Array, log_distance, powers: dict):
  """Pilot values of ``kernel_sweep``: (log_shift, top, value_shift) from the pairs of the evenly
  strided ``geometry.pilot_rows`` (all C up to ``PILOT_ROWS``): the mean of -log d over resolved
  pairs; per kernel the largest a log d (0 if none is finite) and the mean of e^(a log d - top)."""
  pilot = geo.pilot_rows(vectors.shape[0], PILOT_ROWS)
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
  return log_shift, top, value_shift


def _kernel_results(sums: dict, shifts: tuple, s: float, ddof: int, num_classes: int, dtype) -> dict:
  """``kernel_sweep``'s '<kernel>_{mean,var}' from the swept sums and the pilot ``shifts``."""
  log_shift, top, value_shift = shifts
  count = num_classes * (num_classes - 1.0)  # a Python float: C(C-1) overflows int32 at C = 46 342
  infinite = sums["unresolved"] > 0
  out = {
      "log_mean": jnp.where(infinite, jnp.inf, log_shift + sums["log"] / count),
      "log_var": jnp.where(infinite, jnp.inf, _spread(sums["log"], sums["log_sq"], count, ddof)),
  }
  for name in top:
    sign = math.copysign(1.0, s) if name == "riesz" else 1.0
    out[name + "_mean"] = sign * jnp.exp(top[name]) * (value_shift[name] + sums[name] / count)
    out[name + "_var"] = jnp.exp(2.0 * top[name]) * _spread(sums[name], sums[name + "_sq"], count, ddof)
  if s > 0:
    out["riesz_mean"] = jnp.where(infinite, jnp.inf, out["riesz_mean"])
    out["riesz_var"] = jnp.where(infinite, jnp.inf, out["riesz_var"])
  elif s == 0:  # the log kernel's limit, not a Riesz kernel (sign(0) d^0 would be a constant)
    out["riesz_mean"] = out["riesz_var"] = jnp.asarray(jnp.nan, dtype)
  return {f"{name}_{stat}": out[f"{name}_{stat}"] for name in KERNELS for stat in ("mean", "var")}


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
    scaled = unit_scaled(vectors)
    norms = jnp.linalg.norm(scaled, axis=-1, keepdims=True)
    vectors = scaled / jnp.where(norms > 0, norms, jnp.nan)
    log_unit = 0.0
  norm_sq = jnp.sum(vectors**2, axis=-1)
  powers = {"distance": 1.0, "riesz": -s}

  def log_distance(gram, norm_sq_a, norm_sq_c):
    unresolved = pair_unresolved(gram, norm_sq_a, norm_sq_c, feature_dim)
    distance_sq = pair_distance_sq(gram, norm_sq_a, norm_sq_c)
    return 0.5 * jnp.log(jnp.where(unresolved, 1.0, distance_sq)) + log_unit, unresolved

  log_shift, top, value_shift = shifts = _kernel_shifts(vectors, norm_sq, log_distance, powers)

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
  return _kernel_results(sums, shifts, s, ddof, num_classes, vectors.dtype)


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
  is then undefined or infinite. The distances of close pairs come from the differences
  (``geometry.refined_distance_sq``). Units: those of h to the power 2 - k.
  """
  num_classes, feature_dim = centred_means.shape
  row_data = {"norm_sq": jnp.sum(centred_means**2, axis=-1), "variance": class_variances.astype(centred_means.dtype),
              "vectors": centred_means}

  def statistic(gram, rows_a, rows_c, mask):
    unresolved = pair_unresolved(gram, rows_a["norm_sq"], rows_c["norm_sq"], feature_dim)
    distance_sq = geo.refined_distance_sq(pair_distance_sq(gram, rows_a["norm_sq"], rows_c["norm_sq"]),
                                          rows_a["norm_sq"], rows_c["norm_sq"], rows_a["vectors"], rows_c["vectors"],
                                          mask & ~unresolved)
    distance_sq = jnp.where(unresolved, 1.0, distance_sq)
    spread = rows_a["variance"][:, None] + rows_c["variance"][None, :]
    ratio = spread / (2.0 * distance_sq ** (0.5 * distance_exponent))
    return {"sum": jnp.sum(jnp.where(mask & ~unresolved, ratio, 0.0)),
            "unresolved": jnp.sum(mask & unresolved, dtype=jnp.int32)}

  sums = geo.pair_sums(statistic, centred_means, row_data, block_rows=block_rows)
  return jnp.where(sums["unresolved"] > 0, jnp.nan, sums["sum"] / (num_classes * (num_classes - 1.0)))
