"""What the finished passes' sums give besides ``neural_collapse``'s keys: the per-class statistics of
``class_stats.npz`` (numpy, on the host) and the later metrics of ``nc_jax.metrics.further`` (jittable)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nc_jax import metrics as nc_metrics
from nc_jax.metrics import streaming
from nc_jax.metrics.options import NCOptions


def per_class_statistics(geometry: streaming.ClassGeometry, state: streaming.DeviationState,
                         global_mean: str = "class_means") -> dict[str, np.ndarray]:
  """The arrays of ``class_stats.npz``: per-class statistics in the features' units, from pass 1's geometry
  and pass 2's sums (unlike ``nc_jax.metrics.further.class_statistics``, which gives power-of-two-scaled
  means and variances of features held in memory).

  With delta_c = (1/n_c) sum_{y_i = c} d_i (pass 1's float error, as ``finalize_collapse`` corrects it):
    counts (C,) n_c; means (C, p) mu_c = (mu_c' + delta_c) 2^e;
    variances (C,) (1/n_c) sum ||h_i - mu_c||^2 = (sum ||d_i||^2 / n_c - ||delta_c||^2) 2^(2e);
    centred_mean_norms (C,) ||mu_c - mu_G||; weight_norms (C,) ||w_c|| when W is known.
  """
  counts = np.asarray(state.counts)
  exponent = int(np.asarray(geometry.exponent))
  safe = np.maximum(counts, 1).astype(np.float64)
  correction = np.asarray(state.deviation_sums, np.float64) / safe[:, None]
  scaled_means = np.asarray(geometry.means, np.float64) + correction
  means = np.ldexp(scaled_means, exponent)
  variances = np.maximum(np.asarray(state.deviation_sq, np.float64) / safe - np.sum(correction**2, -1), 0.0)
  weights = counts / max(counts.sum(), 1)
  centre = means.mean(0) if global_mean == "class_means" else weights @ means
  stats = {"counts": counts.astype(np.int64), "means": means.astype(np.float32),
           "variances": np.ldexp(variances, 2 * exponent).astype(np.float32),
           "centred_mean_norms": np.linalg.norm(means - centre, axis=-1).astype(np.float32)}
  if geometry.weights is not None:
    stats["weight_norms"] = np.linalg.norm(np.asarray(geometry.weights, np.float64), axis=-1).astype(np.float32)
  return stats


def further_keys(state: streaming.DeviationState, geometry: streaming.ClassGeometry, *,
                 options: NCOptions = NCOptions()) -> dict:
  """The later metrics of ``nc_jax.metrics.further`` that pass 2's sums determine (kernel statistics,
  cdnv_k*, equinorm_log_means*, nc1_weak and, with W, nc3_wm_structure and global_logit_*), from the
  corrected means mu_c 2^-e = mu'_c + delta_c and variances V_c 4^-e = sum ||d||^2 / n_c - ||delta_c||^2."""
  counts = state.counts.astype(geometry.means.dtype)
  safe_counts = jnp.maximum(counts, 1.0)
  correction = state.deviation_sums / safe_counts[:, None]
  variances = jnp.maximum(state.deviation_sq - counts * jnp.sum(correction**2, axis=-1), 0.0) / safe_counts
  ok = (state.invalid_labels == 0) & (state.nonfinite_rows == 0) & jnp.all(state.counts > 0)
  return nc_metrics.further.further_from_statistics(
      geometry.means + correction, variances, counts, geometry.exponent, geometry.weights, geometry.bias, ok=ok,
      options=options)
