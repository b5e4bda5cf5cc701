"""Minority collapse (Fang, He, Long & Su, PNAS 2021): the geometry of minority and majority classes.

With imbalanced classes, the classifier rows w_c of the minority classes are pulled together as training goes
on, and past a critical imbalance ratio they collapse onto one direction (cosine -> 1), instead of spreading to
the simplex ETF's cosine -1/(C-1). ``minority_collapse`` measures it on the classifier and on the centred class
means of the training features, and gives each class's norms (for the per-class norm plot).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _mean_pairwise_cosine(rows: jax.Array) -> jax.Array:
  """Mean over pairs i < j of cos(rows_i, rows_j); rows (k, p) with k >= 2."""
  unit = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
  cosines = unit @ unit.T
  k = rows.shape[0]
  return (jnp.sum(cosines) - jnp.trace(cosines)) / (k * (k - 1))


def minority_collapse(features: jax.Array, labels: jax.Array, num_classes: int, weights: jax.Array,
                      minority: Sequence[int], per_class: bool = True) -> dict:
  """Minority-collapse statistics of one measurement.

  Args:
    features: (N, p) training features h_i; labels: (N,) in [0, C).
    num_classes: C. weights: (C, p) classifier rows w_c.
    minority: the minority classes (static; the rest are the majority). Groups of fewer than two classes get NaN
      cosines.
    per_class: also 'class/<c>/w_norm' = ||w_c|| and 'class/<c>/mean_norm' = ||mu_c - mu_G|| for every class.

  Returns:
    'minority_w_cosine', 'majority_w_cosine': mean pairwise cosine of the group's classifier rows (the simplex
    ETF gives -1/(C-1); minority collapse drives the minority's to 1); 'minority_mean_cosine',
    'majority_mean_cosine': the same for the centred class means mu_c - mu_G, with mu_G the mean of the class
    means (the notebook's global mean); 'minority_w_norm', 'majority_w_norm': mean ||w_c|| of the group.
  """
  minority = sorted(set(int(c) for c in minority))
  majority = [c for c in range(num_classes) if c not in minority]
  features = features.astype(jnp.float32)
  counts = jax.ops.segment_sum(jnp.ones(labels.shape, jnp.float32), labels, num_classes)
  means = jax.ops.segment_sum(features, labels, num_classes) / counts[:, None]
  centred = means - jnp.mean(means, axis=0)
  weights = weights.astype(jnp.float32)
  nan = jnp.float32(jnp.nan)
  result = {}
  for name, group in (("minority", minority), ("majority", majority)):
    index = jnp.asarray(group, jnp.int32)
    result[f"{name}_w_cosine"] = _mean_pairwise_cosine(weights[index]) if len(group) >= 2 else nan
    result[f"{name}_mean_cosine"] = _mean_pairwise_cosine(centred[index]) if len(group) >= 2 else nan
    result[f"{name}_w_norm"] = jnp.mean(jnp.linalg.norm(weights[index], axis=-1)) if group else nan
  if per_class:
    w_norms, mean_norms = jnp.linalg.norm(weights, axis=-1), jnp.linalg.norm(centred, axis=-1)
    for c in range(num_classes):
      result[f"class/{c}/w_norm"], result[f"class/{c}/mean_norm"] = w_norms[c], mean_norms[c]
  return result
