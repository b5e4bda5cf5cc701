"""DeepFool on affine classifiers, where the minimal perturbation has a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.metrics import deepfool


def affine_problem(num_classes=5, dim=12, batch=16, seed=0):
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(num_classes, dim)).astype(np.float32)
  bias = rng.normal(size=num_classes).astype(np.float32)
  inputs = rng.normal(size=(batch, dim)).astype(np.float32)
  return weights, bias, inputs


def closed_form_distance(weights, bias, x):
  """Distance from x to the region where its decision changes: min_l |f_l - f_k| / ||w_l - w_k||."""
  logits = weights @ x + bias
  k = np.argmax(logits)
  return min(abs(logits[l] - logits[k]) / np.linalg.norm(weights[l] - weights[k])
             for l in range(len(bias)) if l != k)


@pytest.mark.parametrize("overshoot", [0.02, 0.0])
def test_affine_classifier_gets_the_minimal_perturbation_in_one_step(overshoot):
  weights, bias, inputs = affine_problem()
  logits_fn = lambda x: jnp.asarray(weights) @ x + jnp.asarray(bias)
  perturbations, iterations = jax.jit(lambda x: deepfool.deepfool(logits_fn, x, overshoot=overshoot))(inputs)
  for x, r, steps in zip(inputs, np.asarray(perturbations), np.asarray(iterations)):
    expected = (1 + overshoot) * (closed_form_distance(weights, bias, x) + 1e-4)
    assert np.linalg.norm(r) == pytest.approx(expected, rel=1e-4)
    assert steps == 1
    assert np.argmax(weights @ (x + r) + bias) != np.argmax(weights @ x + bias)


def test_robustness_is_the_mean_relative_norm():
  weights, bias, inputs = affine_problem(seed=1)
  logits_fn = lambda x: jnp.asarray(weights) @ x + jnp.asarray(bias)
  expected = np.mean([1.02 * (closed_form_distance(weights, bias, x) + 1e-4) / np.linalg.norm(x) for x in inputs])
  assert float(deepfool.robustness(logits_fn, inputs)) == pytest.approx(expected, rel=1e-4)


def test_nonlinear_classifier_is_fooled_within_the_iteration_budget():
  rng = np.random.default_rng(2)
  first, second = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(4, 16)).astype(np.float32)
  logits_fn = lambda x: jnp.asarray(second) @ jnp.tanh(jnp.asarray(first) @ x)
  inputs = rng.normal(size=(10, 8)).astype(np.float32)
  perturbations, iterations = deepfool.deepfool(logits_fn, inputs)
  flipped = [np.argmax(logits_fn(x + r)) != np.argmax(logits_fn(x)) for x, r in zip(inputs, perturbations)]
  assert all(flipped) and int(np.max(iterations)) < 50
