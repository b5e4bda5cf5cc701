"""An independent float64 numpy reference, written from the paper's formulas (Papyan, Han & Donoho 2020, and its notebook).

Deliberately naive: explicit p x p covariance matrices, loops over classes and
pairs, a pseudo-inverse of Sigma_B truncated to its top C-1 eigen-directions
(the notebook's svds rule). It shares no code with nc_jax.metrics.
"""

from __future__ import annotations

import numpy as np


def class_means(features, labels, num_classes):
  return np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])


def reference_metrics(features, labels, num_classes, weights=None, bias=None, pinv_rcond=None):
  """Every metric of nc_jax.metrics.neural_collapse, in float64.

  Sigma_B^+ keeps the top min(p, C-1) eigen-directions (the notebook); with
  ``pinv_rcond`` only those of them with eigenvalue > pinv_rcond * the largest
  (for means of rank below C-1, where the notebook's rule would invert a zero).
  """
  h = np.asarray(features, np.float64)
  y = np.asarray(labels)
  C = num_classes
  N, p = h.shape
  mu = class_means(h, y, C)
  mu_g = mu.mean(axis=0)
  M = mu - mu_g  # (C, p)

  sigma_w = np.zeros((p, p))
  for i in range(N):
    d = h[i] - mu[y[i]]
    sigma_w += np.outer(d, d)
  sigma_w /= N
  sigma_b = sum(np.outer(M[c], M[c]) for c in range(C)) / C

  evals, evecs = np.linalg.eigh(sigma_b)
  order = np.argsort(evals)[::-1][: min(p, C - 1)]
  if pinv_rcond is not None:
    order = [k for k in order if evals[k] > pinv_rcond * evals.max()]
  sigma_b_pinv = sum(np.outer(evecs[:, k], evecs[:, k]) / evals[k] for k in order)
  out = {
      "nc1": np.trace(sigma_w @ sigma_b_pinv) / C,
      "nc1_tirer": np.trace(sigma_w) / np.trace(sigma_b),
      "trace_within": np.trace(sigma_w),
      "trace_between": np.trace(sigma_b),
  }

  variances = [np.mean(np.sum((h[y == c] - mu[c]) ** 2, axis=1)) for c in range(C)]
  pairs = [(a, b) for a in range(C) for b in range(C) if a != b]
  out["cdnv"] = np.mean([(variances[a] + variances[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2)) for a, b in pairs])

  def nc2(vectors):
    norms = np.linalg.norm(vectors, axis=1)
    cos = np.array([vectors[a] @ vectors[b] / (norms[a] * norms[b]) for a, b in pairs])
    gram = vectors @ vectors.T
    etf = np.eye(C) - np.ones((C, C)) / C
    unit = vectors / norms[:, None]
    log_energy = np.array([-np.log(np.linalg.norm(unit[a] - unit[b])) for a, b in pairs])
    return {
        "equinorm": np.std(norms, ddof=1) / np.mean(norms),
        "equiangular": np.std(cos, ddof=1),
        "max_angle": np.mean(np.abs(cos + 1.0 / (C - 1))),
        "etf_deviation": np.linalg.norm(gram / np.linalg.norm(gram) - etf / np.linalg.norm(etf)),
        "gnc2": np.var(log_energy, ddof=1),
    }

  for key, value in nc2(M).items():
    out[f"{key}_means"] = value

  distances = np.array([[np.linalg.norm(h[i] - mu[c]) for c in range(C)] for i in range(N)])
  ncc = distances.argmin(axis=1)
  out["ncc_accuracy"] = np.mean(ncc == y)
  if weights is not None:
    w = np.asarray(weights, np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    for key, value in nc2(w).items():
      if key != "gnc2":
        out[f"{key}_weights"] = value
    out["self_duality"] = np.sum((w / np.linalg.norm(w) - M / np.linalg.norm(M)) ** 2)
    cos_wm = np.array([w[c] @ M[c] / (np.linalg.norm(w[c]) * np.linalg.norm(M[c])) for c in range(C)])
    out["unc3"] = np.std(cos_wm, ddof=1) / np.mean(cos_wm)
    network = (h @ w.T + b).argmax(axis=1)
    out["ncc_mismatch"] = np.mean(network != ncc)
    out["accuracy"] = np.mean(network == y)
  return out


def reference_test_metrics(train_features, train_labels, test_features, test_labels, num_classes,
                           weights=None, bias=None):
  """NC1 and NCC of held-out features against the training means and Sigma_B."""
  h_train = np.asarray(train_features, np.float64)
  h = np.asarray(test_features, np.float64)
  y = np.asarray(test_labels)
  C = num_classes
  mu = class_means(h_train, np.asarray(train_labels), C)
  M = mu - mu.mean(axis=0)
  sigma_b = M.T @ M / C
  d = h - mu[y]
  sigma_w = d.T @ d / len(y)
  evals, evecs = np.linalg.eigh(sigma_b)
  top = np.argsort(evals)[::-1][: min(h.shape[1], C - 1)]
  pinv = (evecs[:, top] / evals[top]) @ evecs[:, top].T
  ncc = np.array([[np.sum((x - m) ** 2) for m in mu] for x in h]).argmin(axis=1)
  out = {"nc1_test": np.trace(sigma_w @ pinv) / C, "ncc_accuracy_test": np.mean(ncc == y)}
  if weights is not None:
    network = (h @ np.asarray(weights, np.float64).T + np.asarray(bias, np.float64)).argmax(axis=1)
    out["ncc_mismatch_test"] = np.mean(network != ncc)
    out["accuracy_test"] = np.mean(network == y)
  return out


def reference_mse_terms(features, labels, num_classes, weights, bias, weight_decay):
  """The regularised MSE loss straight from its definition, in float64."""
  h = np.asarray(features, np.float64)
  y = np.asarray(labels)
  w = np.asarray(weights, np.float64)
  b = np.asarray(bias, np.float64)
  targets = np.eye(num_classes)[y]
  fit = np.mean(np.sum((h @ w.T + b - targets) ** 2, axis=1))
  return 0.5 * (fit + (weight_decay / 2) * (np.sum(w**2) + np.sum(b**2)))


def simplex_etf(num_classes, dim, scale=1.0, seed=0):
  """Rows of a C-class simplex ETF embedded in R^dim by a random rotation (dim >= C)."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(dim, num_classes)))
  etf = np.sqrt(num_classes / (num_classes - 1)) * (np.eye(num_classes) - 1.0 / num_classes)
  return scale * etf @ basis.T



def reference_further(features, labels, num_classes, weights=None, bias=None, ood_features=None,
                      test_features=None, test_labels=None, riesz_s=None, cdnv_exponents=(1.0, 2.0),
                      normalize=True):
  """Every key of nc_jax.metrics.further.further_collapse, in float64, by loops over classes and pairs.

  Distances are ||u_a - u_b|| of the difference vectors themselves (never from a Gram matrix).
  Kernels (Liu et al. 2023): distance d, log 1/d, Riesz sign(s) d^-s (s = p - 2 by default);
  variances and stds with ddof = 1; mu_G = mean of the class means.
  """
  h = np.asarray(features, np.float64)
  y = np.asarray(labels)
  C = num_classes
  p = h.shape[1]
  mu = class_means(h, y, C)
  mu_g = mu.mean(axis=0)
  M = mu - mu_g
  pairs = [(a, b) for a in range(C) for b in range(C) if a != b]
  variances = np.array([np.mean(np.sum((h[y == c] - mu[c]) ** 2, axis=1)) for c in range(C)])
  out = {}

  u = M / np.linalg.norm(M, axis=1, keepdims=True) if normalize else M
  distances = np.array([np.linalg.norm(u[a] - u[b]) for a, b in pairs])
  s = p - 2.0 if riesz_s is None else float(riesz_s)
  kernels = {"distance": distances, "log": np.log(1.0 / distances), "riesz": np.sign(s) * distances ** (-s)}
  for name, values in kernels.items():
    out[f"kernel_{name}_mean"] = np.mean(values)
    out[f"kernel_{name}_var"] = np.var(values, ddof=1)

  for k in cdnv_exponents:
    ratios = [(variances[a] + variances[b]) / (2.0 * np.linalg.norm(mu[a] - mu[b]) ** k) for a, b in pairs]
    out[f"cdnv_k{float(k):g}"] = np.mean(ratios)

  logs = np.log(np.linalg.norm(M, axis=1))
  out["equinorm_log_means"] = np.std(logs, ddof=1)
  out["equinorm_log_means_cov"] = np.std(logs, ddof=1) / np.mean(logs)

  within = sum(np.sum((h[i] - mu[y[i]]) ** 2) for i in range(len(y))) / len(y)
  between = sum(np.sum(M[c] ** 2) for c in range(C)) / C
  out["nc1_weak"] = within / between

  if weights is not None:
    w = np.asarray(weights, np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    product = np.array([[w[a] @ M[c] for c in range(C)] for a in range(C)])
    etf = np.eye(C) - np.ones((C, C)) / C
    out["nc3_wm_structure"] = np.linalg.norm(product / np.linalg.norm(product) - etf / np.linalg.norm(etf))
    z = w @ mu_g + b
    scale = np.linalg.norm(w) * np.linalg.norm(mu_g) + np.linalg.norm(b)
    out["global_logit_norm"] = np.linalg.norm(z)
    out["global_logit_norm_rel"] = np.linalg.norm(z) / scale
    out["global_logit_spread_rel"] = np.linalg.norm(z - z.mean()) / scale

  if ood_features is not None:
    mu_ood = np.asarray(ood_features, np.float64).mean(axis=0)

    def mean_abs_cos(vectors, target):
      return np.mean([abs(v @ target) / (np.linalg.norm(v) * np.linalg.norm(target)) for v in vectors])

    out["nc5"] = mean_abs_cos(mu, mu_ood)
    out["nc5_centred"] = mean_abs_cos(M, mu_ood - mu_g)

  if test_features is not None:
    mu_t = class_means(np.asarray(test_features, np.float64), np.asarray(test_labels), C)
    M_t = mu_t - mu_t.mean(axis=0)
    norms = np.linalg.norm(M_t, axis=1)
    cos = np.array([M_t[a] @ M_t[b] / (norms[a] * norms[b]) for a, b in pairs])
    gram = M_t @ M_t.T
    etf = np.eye(C) - np.ones((C, C)) / C
    out["equinorm_means_test"] = np.std(norms, ddof=1) / np.mean(norms)
    out["equiangular_means_test"] = np.std(cos, ddof=1)
    out["max_angle_means_test"] = np.mean(np.abs(cos + 1.0 / (C - 1)))
    out["etf_deviation_means_test"] = np.linalg.norm(gram / np.linalg.norm(gram) - etf / np.linalg.norm(etf))
    if weights is not None:
      w = np.asarray(weights, np.float64)
      out["self_duality_test"] = np.sum((w / np.linalg.norm(w) - M_t / np.linalg.norm(M_t)) ** 2)
  return out
