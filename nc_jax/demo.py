"""python -m nc_jax.demo: the NC metrics along a synthetic path into collapse.

Features start as a random Gaussian mixture and move, step by step, to a simplex
ETF with vanishing within-class spread while the classifier moves to the
centred means: every NC metric should fall towards zero. Runs in seconds on a
CPU, needs no data, and prints one row per step.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nc_jax.metrics import neural_collapse, raise_if_invalid

COLUMNS = ("nc1", "equinorm_means", "equiangular_means", "max_angle_means", "self_duality", "ncc_mismatch")


def collapse_path(progress: float, num_classes: int, feature_dim: int, per_class: int, seed: int = 0):
  """Features (N, p), labels (N,), W (C, p), b (C,) at ``progress`` in [0, 1] of the way to collapse."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(feature_dim, num_classes)))
  etf = np.sqrt(num_classes / (num_classes - 1)) * (np.eye(num_classes) - 1.0 / num_classes) @ rotation.T
  random_means = rng.normal(size=(num_classes, feature_dim)) / np.sqrt(feature_dim)
  labels = np.repeat(np.arange(num_classes), per_class)
  noise = rng.normal(size=(labels.size, feature_dim)) / np.sqrt(feature_dim)
  random_weights = rng.normal(size=(num_classes, feature_dim)) / np.sqrt(feature_dim)
  means = (1 - progress) * random_means + progress * etf
  spread = 4.0 * (1 - progress) ** 2 + 1e-4
  features = 5.0 * (means[labels] + spread * noise) + 2.0  # a common offset, like ReLU features
  weights = (1 - progress) * random_weights + progress * etf
  bias = -(weights @ np.full(feature_dim, 2.0))  # cancels the offset in W h + b
  return (features.astype(np.float32), labels.astype(np.int32), weights.astype(np.float32),
          bias.astype(np.float32))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--feature_dim", type=int, default=512)
  parser.add_argument("--per_class", type=int, default=5000)
  args = parser.parse_args(argv)

  suite = jax.jit(neural_collapse, static_argnums=2)
  print(f"nc-jax demo: {args.num_classes} classes x {args.per_class} samples, p = {args.feature_dim}, "
        f"devices: {jax.devices()}")
  print(f"{'progress':>9} " + " ".join(f"{name:>18}" for name in COLUMNS) + f" {'ms':>7}")
  for progress in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
    features, labels, weights, bias = collapse_path(progress, args.num_classes, args.feature_dim, args.per_class)
    start = time.perf_counter()
    metrics = jax.device_get(suite(features, labels, args.num_classes, weights, bias))
    elapsed_ms = 1e3 * (time.perf_counter() - start)
    raise_if_invalid(metrics)
    print(f"{progress:>9.3f} " + " ".join(f"{float(metrics[name]):>18.3e}" for name in COLUMNS)
          + f" {elapsed_ms:>7.1f}")


if __name__ == "__main__":
  main()
