"""The unconstrained features model (Mixon et al. 2020; Zhu et al. 2021), checked against its closed form.

    python -m nc_jax.ufm --config configs/ufm.py --workdir workdirs/ufm

Features H are free parameters (n per class, K classes) with a linear classifier,
minimising (1/N) sum_i CE(W h_i + b, y_i) + (lambda_w/2)||W||^2 + (lambda_h/2)||H||^2
(+ (lambda_b/2)||b||^2 when use_bias), full batch, by L-BFGS to a gradient-norm tolerance.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.num_classes = 10
  config.n_per_class = 20
  config.feature_dim = 32  # >= num_classes - 1, so the simplex ETF fits
  config.lambda_w = 5e-3
  config.lambda_h = 5e-3
  config.use_bias = False
  config.lambda_b = 5e-3
  config.seed = 0
  config.max_iterations = 20_000
  config.gradient_tolerance = 1e-7
  if variant == "smoke":
    config.num_classes, config.n_per_class, config.feature_dim = 4, 5, 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
