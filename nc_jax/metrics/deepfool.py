"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016), batched and jittable.

For an input x0 with decision k0 = argmax_k f_k(x0), each iteration linearises
the classifier at x_i = x0 + (1 + overshoot) r and steps to the nearest linearised
boundary among the ``candidates`` classes ranked highest at x0:

    w_k = grad f_k(x_i) - grad f_k0(x_i),   g_k = f_k(x_i) - f_k0(x_i),
    l = argmin_{k != k0} |g_k| / ||w_k||,   r <- r + (|g_l| / ||w_l|| + 1e-4) w_l / ||w_l||,

until the decision at x0 + (1 + overshoot) r changes or ``max_iterations`` pass;
the perturbation returned is (1 + overshoot) r. For an affine classifier the
first step is already the minimal perturbation. The paper's robustness measure
is the mean of ||r(x)||_2 / ||x||_2 over a fixed set of test inputs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def deepfool(logits_fn: Callable[[jax.Array], jax.Array], inputs: jax.Array, *, overshoot: float = 0.02,
             max_iterations: int = 50, candidates: int = 10) -> tuple[jax.Array, jax.Array]:
  """Minimal-ish perturbations of a batch.

  Args:
    logits_fn: one input (...) -> logits (C,).
    inputs: (B, ...) inputs.
  Returns:
    perturbations (B, ...) and iterations used (B,) int32; an input whose
    decision never changes gets the perturbation reached after ``max_iterations``.
  """

  def one(x0):
    logits0 = logits_fn(x0)
    num_candidates = min(candidates, logits0.shape[-1])
    ranked = jnp.argsort(-logits0)[:num_candidates]
    original = ranked[0]
    jacobian_fn = jax.jacrev(lambda x: logits_fn(x)[ranked])

    def not_fooled(r):
      return jnp.argmax(logits_fn(x0 + (1 + overshoot) * r)) == original

    def body(carry):
      r, iteration = carry
      x = x0 + (1 + overshoot) * r
      values = logits_fn(x)[ranked]
      gradients = jacobian_fn(x).reshape(num_candidates, -1)
      w = gradients[1:] - gradients[0]
      g = values[1:] - values[0]
      norms = jnp.linalg.norm(w, axis=-1) + 1e-12
      distances = jnp.abs(g) / norms
      best = jnp.argmin(distances)
      step = (distances[best] + 1e-4) * w[best] / norms[best]
      return r + step.reshape(x0.shape), iteration + 1

    def keep_going(carry):
      r, iteration = carry
      return (iteration < max_iterations) & not_fooled(r)

    r, iterations = jax.lax.while_loop(keep_going, body, (jnp.zeros_like(x0), jnp.zeros((), jnp.int32)))
    return (1 + overshoot) * r, iterations

  return jax.vmap(one)(inputs)


def robustness_and_failures(logits_fn: Callable[[jax.Array], jax.Array], inputs: jax.Array,
                            **options) -> tuple[jax.Array, jax.Array]:
  """(mean of ||r(x)||_2 / ||x||_2 over the inputs DeepFool fooled, how many it did not fool).

  An input whose decision never changes has no DeepFool distance: a dead network (zero gradients) would
  otherwise report r = 0, i.e. "maximally fragile". Such inputs are left out of the mean and counted; the
  mean is NaN when no input was fooled.
  """
  perturbations, _ = deepfool(logits_fn, inputs, **options)
  before = jax.vmap(lambda x: jnp.argmax(logits_fn(x)))(inputs)
  after = jax.vmap(lambda x: jnp.argmax(logits_fn(x)))(inputs + perturbations)
  fooled = before != after
  axes = tuple(range(1, inputs.ndim))
  ratios = jnp.sqrt(jnp.sum(perturbations**2, axis=axes)) / jnp.sqrt(jnp.sum(inputs**2, axis=axes))
  count = jnp.sum(fooled)
  mean = jnp.where(count > 0, jnp.sum(jnp.where(fooled, ratios, 0.0)) / jnp.maximum(count, 1), jnp.nan)
  return mean, jnp.sum(~fooled).astype(jnp.int32)


def robustness(logits_fn: Callable[[jax.Array], jax.Array], inputs: jax.Array, **options) -> jax.Array:
  """The paper's DeepFool robustness: the mean over the batch of ||r(x)||_2 / ||x||_2, over the inputs it
  fooled (``robustness_and_failures``)."""
  return robustness_and_failures(logits_fn, inputs, **options)[0]
