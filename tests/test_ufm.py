"""The unconstrained features model converges to its closed-form simplex ETF."""

import json

import pytest

from configs import ufm as ufm_config
from nc_jax import ufm


def test_closed_form_values():
  # beta = (K/(K-1)) sqrt(lw/(n lh)); ||w||^2 = log[(K-1)(beta - K lw)/(K lw)] / beta
  expected = ufm.closed_form(10, 20, 5e-3, 5e-3)
  beta = 10 / 9 * (5e-3 / (20 * 5e-3)) ** 0.5
  assert expected["h_over_w"] == pytest.approx((1 / 20) ** 0.5)
  import math
  assert expected["w_norm_sq"] == pytest.approx(math.log(9 * (beta - 0.05) / 0.05) / beta)
  assert ufm.closed_form(10, 20, 1.0, 1e-3)["w_norm_sq"] == 0.0  # decay so strong that W = 0


@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
def test_small_ufm_matches_the_closed_form_within_one_percent(tmp_path, use_bias):
  config = ufm_config.get_config("smoke")
  config.use_bias = use_bias
  result = ufm.run(config, str(tmp_path))
  assert result["w_norm_sq_relative_error"] < 0.01 and result["h_over_w_relative_error"] < 0.01
  assert result["etf_deviation_weights"] < 1e-3 and result["nc1"] < 1e-6 and result["self_duality"] < 1e-4
  saved = json.loads((tmp_path / "ufm.json").read_text())
  for key in ("num_classes", "n_per_class", "lambda_w", "lambda_h", "w_norm_sq", "h_over_w"):
    assert key in saved


def test_ufm_in_the_smallest_space_an_etf_fits_and_clear_errors(tmp_path):
  config = ufm_config.get_config("smoke")
  config.feature_dim = config.num_classes - 1  # K vectors of a simplex ETF span K - 1 dimensions
  result = ufm.run(config, str(tmp_path))
  assert result["w_norm_sq_relative_error"] < 0.01 and result["etf_deviation_weights"] < 1e-3
  config.feature_dim = config.num_classes - 2
  with pytest.raises(ValueError, match="no simplex ETF fits"):
    ufm.run(config, str(tmp_path / "narrow"))
  config.num_classes, config.n_per_class, config.feature_dim, config.lambda_w, config.lambda_h = 10, 20, 16, 1.0, 1e-3
  with pytest.raises(ValueError, match="W = H = 0"):
    ufm.run(config, str(tmp_path / "trivial"))
