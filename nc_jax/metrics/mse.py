"""Decomposition of the weight-decayed MSE loss for fixed features (Han, Papyan & Donoho, ICLR 2022).

With h~ = [h; 1], W~ = [W b] (C, p+1), one-hot targets e_y and weight decay lam,
the loss the paper's PyTorch setup minimises for the last layer is

  L(W~) = 0.5 * [ (1/N) sum_i ||W h_i + b - e_{y_i}||^2 + (lam/2) (||W||^2 + ||b||^2) ],

a quadratic with Hessian A = (1/N) sum_i h~ h~^T + rho I (rho = lam/2) and
minimiser W~_LS = B^T A^-1, B = (1/N) sum_i h~_i e_{y_i}^T. Exactly:

  L(W~)   = L_NC1 + L_NC2/3 + L_perp,
  L_perp  = 0.5 Tr((W~ - W~_LS) A (W~ - W~_LS)^T)                distance from the central path,
  L_NC1   = 0.5 [Tr(W_LS (Sigma_W + rho I) W_LS^T) + rho ||b_LS||^2]   within-class part,
  L_NC2/3 = 0.5 sum_c pi_c ||W_LS mu_c + b_LS - e_c||^2             class-mean part,

with pi_c = n_c / N (= 1/C on balanced data, the paper's form). The split of
L(W~_LS) uses only sum_{i in c}(h_i - mu_c) = 0, so it holds for any counts.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from nc_jax.metrics import collapse
from nc_jax.metrics.accumulators import class_sums, segment_ids
from nc_jax.metrics.geometry import matmul_highest
from nc_jax.metrics.scale import float_dtype


def mse_decomposition(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    weights: jax.Array,
    bias: jax.Array,
    weight_decay: float,
    *,
    mask: Optional[jax.Array] = None,
) -> dict:
  """L_NC1, L_NC2/3, L_perp and the regularised MSE loss of a last layer on fixed features.

  Args:
    features: (N, p) features; labels: (N,) ints in [0, C); weights: (C, p); bias: (C,).
    weight_decay: lam as passed to the optimiser (the penalty is (lam/2)||theta||^2
      inside the 0.5 [...] above, i.e. rho = lam/2 per the notebook).
    mask: optional (N,) bool, False for padding rows.

  Returns:
    dict with 'lnc1', 'lnc23', 'lperp' and 'mse_loss' = L(W~) computed directly
    from the samples (so lnc1 + lnc23 + lperp == mse_loss is a real check).
    Costs O(N p^2) for Sigma_W, plus a (p+1) x (p+1) Cholesky solve.
  """
  collapse.check_shapes(features, labels, num_classes, weights, bias, mask)
  dtype = float_dtype(features)
  features, weights, bias = (x.astype(dtype) for x in (features, weights, bias))
  rho = 0.5 * weight_decay
  feature_dim = features.shape[1]
  ids = segment_ids(labels, num_classes, mask)
  valid = ids < num_classes
  safe_labels = jnp.where(valid, labels, 0)
  counts = class_sums(jnp.ones(labels.shape, dtype), ids, num_classes)
  num_samples = jnp.sum(counts)

  # Two-pass class means with the corrected second pass (see accumulators.py).
  means = class_sums(features, ids, num_classes) / counts[:, None]
  deviations = features - means[safe_labels]
  means = means + class_sums(deviations, ids, num_classes) / counts[:, None]
  deviations = jnp.where(valid[:, None], features - means[safe_labels], 0.0)
  sigma_w = matmul_highest(deviations.T, deviations) / num_samples

  priors = counts / num_samples
  sample_mean = matmul_highest(priors, means)
  second_moment = sigma_w + matmul_highest(means.T * priors, means)  # (1/N) sum h h^T
  eye = jnp.eye(feature_dim, dtype=dtype)
  hessian = jnp.block([
      [second_moment + rho * eye, sample_mean[:, None]],
      [sample_mean[None, :], jnp.full((1, 1), 1.0 + rho, dtype)],
  ])
  cross = jnp.concatenate([means.T * priors, priors[None, :]], axis=0)  # (p+1, C)
  augmented_ls = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), cross).T
  weights_ls, bias_ls = augmented_ls[:, :feature_dim], augmented_ls[:, feature_dim]

  lnc1 = 0.5 * (jnp.sum(matmul_highest(weights_ls, sigma_w + rho * eye) * weights_ls) + rho * jnp.sum(bias_ls**2))
  class_residual = matmul_highest(means, weights_ls.T) + bias_ls - jnp.eye(num_classes, dtype=dtype)
  lnc23 = 0.5 * jnp.sum(priors * jnp.sum(class_residual**2, axis=-1))
  offset = jnp.concatenate([weights, bias[:, None]], axis=1) - augmented_ls
  lperp = 0.5 * jnp.sum(matmul_highest(offset, hessian) * offset)

  residual = matmul_highest(features, weights.T) + bias - jax.nn.one_hot(safe_labels, num_classes, dtype=dtype)
  fit = jnp.sum(jnp.where(valid[:, None], residual**2, 0.0)) / num_samples
  mse_loss = 0.5 * (fit + rho * (jnp.sum(weights**2) + jnp.sum(bias**2)))
  return {"lnc1": lnc1, "lnc23": lnc23, "lperp": lperp, "mse_loss": mse_loss}
