"""python -m nc_jax.ufm: train the unconstrained features model and compare with its closed form.

Closed form (Zhu et al. 2021, Thm. 3.1): every global
minimiser has W rows of equal norm forming a simplex ETF, h_{k,i} = c w_k with
c = sqrt(lambda_w / (n lambda_h)), b = 0, and with beta = (K/(K-1)) c,

    ||w||^2 = (1/beta) log[(K-1)(beta - K lambda_w) / (K lambda_w)]   (0 if the log's argument <= 1).

Writes ufm.json: num_classes, n_per_class, lambda_w, lambda_h, the measured
mean squared row norm ``w_norm_sq`` of W and ``h_over_w`` = mean_i ||h_i|| / ||w_{y_i}||,
their closed-form values and relative errors, and the NC metrics of (H, W, b).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nc_jax import files
from nc_jax.metrics import neural_collapse


def closed_form(num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float) -> dict:
  """{'w_norm_sq', 'h_over_w'} of the global minimisers (see the module docstring)."""
  ratio = math.sqrt(lambda_w / (n_per_class * lambda_h))
  beta = num_classes / (num_classes - 1) * ratio
  argument = (num_classes - 1) * (beta - num_classes * lambda_w) / (num_classes * lambda_w)
  w_norm_sq = math.log(argument) / beta if argument > 1 else 0.0
  return {"w_norm_sq": w_norm_sq, "h_over_w": ratio}


def objective(params, labels, config):
  """(1/N) sum CE(W h_i + b, y_i) + (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2 [+ (lambda_b/2)||b||^2]."""
  logits = params["features"] @ params["weights"].T
  if config.use_bias:
    logits = logits + params["bias"]
  value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  value += 0.5 * config.lambda_w * jnp.sum(params["weights"] ** 2) + 0.5 * config.lambda_h * jnp.sum(
      params["features"] ** 2)
  if config.use_bias:
    value += 0.5 * config.lambda_b * jnp.sum(params["bias"] ** 2)
  return value


def minimise(config):
  """L-BFGS (optax, zoom line search) from a small random start until ||grad|| < tolerance."""
  num_classes, feature_dim = config.num_classes, config.feature_dim
  labels = jnp.repeat(jnp.arange(num_classes), config.n_per_class)
  keys = jax.random.split(jax.random.PRNGKey(config.seed), 2)
  params = {"weights": 0.1 * jax.random.normal(keys[0], (num_classes, feature_dim)),
            "features": 0.1 * jax.random.normal(keys[1], (labels.size, feature_dim))}
  if config.use_bias:
    params["bias"] = jnp.zeros((num_classes,))
  value_fn = lambda p: objective(p, labels, config)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(value_fn)

  def step(carry):
    params, state, _, iteration = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=value_fn)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grad), iteration + 1

  def keep_going(carry):
    return (carry[2] > config.gradient_tolerance) & (carry[3] < config.max_iterations)

  carry = (params, solver.init(params), jnp.asarray(jnp.inf), jnp.asarray(0))
  params, _, grad_norm, iterations = jax.jit(lambda c: jax.lax.while_loop(keep_going, step, c))(carry)
  return params, labels, float(grad_norm), int(iterations), float(value_fn(params))


def run(config, workdir: str) -> dict:
  if config.feature_dim < config.num_classes - 1:
    raise ValueError(f"feature_dim {config.feature_dim} < num_classes - 1 = {config.num_classes - 1}: "
                     "no simplex ETF fits")
  expected = closed_form(config.num_classes, config.n_per_class, config.lambda_w, config.lambda_h)
  if expected["w_norm_sq"] == 0.0:
    raise ValueError(f"lambda_w {config.lambda_w} and lambda_h {config.lambda_h} are so large that the global "
                     "minimiser is W = H = 0 (closed form): nothing collapses; lower them")
  with _float64():
    params, labels, grad_norm, iterations, value = minimise(config)
    weights, features = np.asarray(params["weights"]), np.asarray(params["features"])
    bias = np.asarray(params["bias"]) if config.use_bias else np.zeros(config.num_classes)
    nc = neural_collapse(features, np.asarray(labels), config.num_classes, weights, bias)
  row_norms = np.linalg.norm(weights, axis=1)
  measured = {"w_norm_sq": float(np.mean(row_norms**2)),
              "h_over_w": float(np.mean(np.linalg.norm(features, axis=1) / row_norms[np.asarray(labels)]))}
  result = {
      "num_classes": config.num_classes, "n_per_class": config.n_per_class, "feature_dim": config.feature_dim,
      "lambda_w": config.lambda_w, "lambda_h": config.lambda_h, "use_bias": config.use_bias,
      **measured, **{f"{k}_closed_form": v for k, v in expected.items()},
      **{f"{k}_relative_error": abs(measured[k] - expected[k]) / expected[k] for k in expected if expected[k]},
      "objective": value, "gradient_norm": grad_norm, "iterations": iterations,
      **{k: float(v) for k, v in nc.items() if k in ("nc1", "etf_deviation_means", "etf_deviation_weights",
                                                     "self_duality", "equinorm_weights", "ncc_mismatch")},
  }
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  files.write_atomically(out / "ufm.json", (json.dumps(result, indent=2) + "\n").encode())
  return result


def _float64():
  """float64 for the optimisation, so the gradient tolerance is reachable (jax >= 0.7 or older)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.7
  return enable_x64(True)


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags

  default = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "ufm.py")
  config_flags.DEFINE_config_file("config", default, "UFM config file.")
  flags.DEFINE_string("workdir", "workdirs/ufm", "Where ufm.json goes.")

  def run_main(argv):
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    result = run(flags.FLAGS.config, flags.FLAGS.workdir)
    for key in ("w_norm_sq", "h_over_w"):
      print(f"{key}: measured {result[key]:.6g}, closed form {result[key + '_closed_form']:.6g}, "
            f"relative error {result.get(key + '_relative_error', float('nan')):.2e}")
    print(f"ETF deviation of W {result['etf_deviation_weights']:.2e}, NC1 {result['nc1']:.2e}, "
          f"{result['iterations']} L-BFGS iterations, |grad| {result['gradient_norm']:.1e}")

  app.run(run_main, argv=argv or sys.argv)


if __name__ == "__main__":
  main()
