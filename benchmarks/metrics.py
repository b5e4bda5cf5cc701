"""Speed of the jitted NC suite against a floor and two baselines, in one run.

    python benchmarks/metrics.py [--sizes small|all] [--no-baselines] [--no-append]

For each (N, p, C) it times, on the same features:
  floor     one jitted pass argmax(H W^T + b) (what any NC4 evaluation must at least do);
  suite     jax.jit(neural_collapse) with W, b (solver 'svd', and 'gram');
  numpy64   an efficient numpy float64 implementation of the same formulas
            (one-hot means, centred deviations, rank-(C-1) projection);
  notebook  the authors' notebook algorithm in numpy float32: per batch of 128 and
            per class, per-sample outer products summed into Sigma_W (p x p), then
            scipy.sparse.linalg.svds(Sigma_B, k=C-1), Tr(Sigma_W Sigma_B^+), and an
            NCC pass with (B, C, p) distances. Timed on a subset of the samples and
            scaled linearly to N (its per-sample work is the same for every sample);
            the one-off svds/trace is timed once and added.
numpy64 and notebook run on the host CPU whatever the device; --no-baselines skips them
(on an accelerator, where the host's time is not what is being measured).
Prints a markdown table and appends it, with the machine and versions, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import common
from nc_jax.metrics import neural_collapse

SIZES = {"small": [(50_000, 512, 10), (50_000, 512, 100)],
         "all": [(50_000, 512, 10), (50_000, 512, 100), (200_000, 2048, 1000)]}


def make_data(num_samples, feature_dim, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int32)
  means = rng.normal(size=(num_classes, feature_dim)).astype(np.float32)
  features = means[labels]
  features += 0.5 * rng.standard_normal(size=features.shape, dtype=np.float32)
  features += 1.0  # a common offset, like ReLU features
  weights = rng.normal(size=(num_classes, feature_dim)).astype(np.float32) / np.sqrt(feature_dim)
  bias = np.zeros(num_classes, np.float32)
  return features, labels, weights, bias


def numpy_float64(features, labels, num_classes, weights, bias):
  h = features.astype(np.float64)
  onehot = np.eye(num_classes)[labels]
  counts = onehot.sum(0)
  means = onehot.T @ h / counts[:, None]
  deviations = h - means[labels]
  within_sq = np.einsum("ij,ij->i", deviations, deviations)
  centred = means - means.mean(0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  u, s = u[:, : num_classes - 1], s[: num_classes - 1]
  along = deviations @ centred.T
  nc1 = np.sum((along @ u / s**2) ** 2) / len(labels)
  gram = centred @ centred.T
  sq = np.diag(gram)
  ncc = np.argmin(-2 * along + (sq[:, None] + sq[None, :] - 2 * gram)[labels] + 2 * along[np.arange(len(labels)), labels][:, None], axis=1)
  network = np.argmax(h @ weights.T.astype(np.float64) + bias, axis=1)
  norms = np.linalg.norm(centred, axis=1)
  cos = gram / np.outer(norms, norms)
  off = ~np.eye(num_classes, dtype=bool)
  return {"nc1": nc1, "trace_within": within_sq.sum() / len(labels), "equinorm": norms.std(ddof=1) / norms.mean(),
          "equiangular": cos[off].std(ddof=1), "max_angle": np.abs(cos[off] + 1 / (num_classes - 1)).mean(),
          "mismatch": np.mean(ncc != network)}


def notebook_per_sample_work(features, labels, num_classes, weights, bias, means, batch_size=128):
  """The notebook's second pass: per-batch, per-class outer products and NCC distances."""
  feature_dim = features.shape[1]
  sigma_w = np.zeros((feature_dim, feature_dim), np.float32)
  mismatches = 0
  for start in range(0, len(labels), batch_size):
    h, y = features[start:start + batch_size], labels[start:start + batch_size]
    for c in range(num_classes):
      z = h[y == c] - means[c]
      if len(z):
        sigma_w += np.sum(z[:, :, None] * z[:, None, :], axis=0)  # torch: z.unsqueeze(-1) @ z.unsqueeze(1)
    network = np.argmax(h @ weights.T + bias, axis=1)
    ncc = np.array([np.argmin(np.linalg.norm(x - means, axis=1)) for x in h])  # per sample, as the notebook
    mismatches += int(np.sum(network != ncc))
  return sigma_w, mismatches


def notebook_one_off(sigma_w, means, num_classes):
  centred = means - means.mean(0)
  sigma_b = (centred.T @ centred / num_classes).astype(np.float64)
  eigvec, eigval, _ = scipy.sparse.linalg.svds(sigma_b, k=num_classes - 1)
  inverse = eigvec @ np.diag(eigval ** (-1)) @ eigvec.T
  return np.trace(sigma_w @ inverse) / num_classes


def run_size(num_samples, feature_dim, num_classes, repeats, baselines=True):
  features, labels, weights, bias = make_data(num_samples, feature_dim, num_classes)
  device = jax.devices()[0]
  h, y, w, b = (jax.device_put(x, device) for x in (features, labels, weights, bias))

  floor_fn = jax.jit(lambda h, w, b: jnp.argmax(h @ w.T + b, axis=-1))
  suite_svd = jax.jit(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b))
  suite_gram = jax.jit(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b, solver="gram"))
  row = {"size": (num_samples, feature_dim, num_classes)}
  row["floor"] = common.median_time(lambda: floor_fn(h, w, b), repeats)
  row["suite"] = common.median_time(lambda: suite_svd(h, y, w, b), repeats)
  row["suite_gram"] = common.median_time(lambda: suite_gram(h, y, w, b), repeats)
  if not baselines:
    return row

  start = time.perf_counter()
  numpy_float64(features, labels, num_classes, weights, bias)
  row["numpy64"] = time.perf_counter() - start

  subset = min(num_samples, 4_000 if feature_dim < 1024 else 512)
  start = time.perf_counter()
  means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])  # the notebook's first pass
  means_time = time.perf_counter() - start
  start = time.perf_counter()
  sigma_w, _ = notebook_per_sample_work(features[:subset], labels[:subset], num_classes, weights, bias, means)
  per_sample = (time.perf_counter() - start) / subset
  start = time.perf_counter()
  notebook_one_off(sigma_w, means, num_classes)
  row["notebook"] = per_sample * num_samples + means_time + (time.perf_counter() - start)
  row["notebook_subset"] = subset
  return row


def format_table(rows, header):
  lines = [header, "",
           "| N, p, C | floor (ms) | suite svd (ms) | suite gram (ms) | numpy f64 (ms) | notebook (ms) | suite/floor | notebook/suite | numpy64/suite |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    ms = {k: 1e3 * v for k, v in row.items() if isinstance(v, float)}
    if "numpy64" in row:
      baselines = (f"{ms['numpy64']:.0f} | {ms['notebook']:.0f} (scaled from {row['notebook_subset']:,})",
                   f"{row['notebook'] / row['suite']:.0f}x | {row['numpy64'] / row['suite']:.1f}x")
    else:
      baselines = ("not run | not run", "n/a | n/a")
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]} | {ms['floor']:.1f} | {ms['suite']:.1f} | "
        f"{ms['suite_gram']:.1f} | {baselines[0]} | {row['suite'] / row['floor']:.1f}x | {baselines[1]} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default="all")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-baselines", action="store_true", help="skip the host-CPU numpy64 and notebook columns")
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  rows = []
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # a time limit's SIGTERM keeps the rows measured so far
  try:
    for size in SIZES[args.sizes]:
      repeats = args.repeats if size[0] * size[1] * size[2] < 1e10 else 2
      rows.append(run_size(*size, repeats, baselines=not args.no_baselines))
      print(f"done {size}", flush=True)
  except KeyboardInterrupt:
    print(f"stopped after {len(rows)} of {len(SIZES[args.sizes])} sizes", flush=True)
    if not rows:
      raise SystemExit(143)
  device = jax.devices()[0]
  header = (f"### benchmarks/metrics.py, {datetime.date.today()}: {device.platform} ({device.device_kind}), "
            f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}, "
            f"jax {jax.__version__}, numpy {np.__version__}; median of {args.repeats} runs after warm-up")
  table = format_table(rows, header)
  common.report(table, append=not args.no_append)

if __name__ == "__main__":
  main()
