"""The later NC metrics (nc_jax.metrics.further) against a float64 reference and known geometry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.metrics import further, geometry, scale
from tests import reference

@functools.lru_cache(maxsize=None)
def _jitted_cached(options):
  return jax.jit(functools.partial(further.further_collapse, **dict(options)), static_argnums=2)


def _jitted(**options):
  return _jitted_cached(tuple(sorted(options.items())))


def _random_case(seed=0, num_classes=5, feature_dim=8, per_class=30, offset=3.0):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, feature_dim)) * 2.0 + offset
  labels = np.repeat(np.arange(num_classes), per_class)
  rng.shuffle(labels)
  spread = rng.uniform(0.3, 1.5, num_classes)[labels, None]
  features = means[labels] + rng.normal(size=(len(labels), feature_dim)) * spread
  weights = rng.normal(size=(num_classes, feature_dim))
  bias = rng.normal(size=num_classes)
  ood = rng.normal(size=(40, feature_dim)) + 1.0
  test_labels = np.repeat(np.arange(num_classes), 12)
  test = means[test_labels] + rng.normal(size=(len(test_labels), feature_dim))
  return features.astype(np.float32), labels, weights.astype(np.float32), bias.astype(np.float32), \
      ood.astype(np.float32), test.astype(np.float32), test_labels


def _assert_close(got, want, rtol=1e-4, atol=1e-6):
  assert set(want) <= set(got), set(want) - set(got)
  for key, value in want.items():
    np.testing.assert_allclose(float(got[key]), value, rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("normalize", [True, False])
def test_float32_jitted_matches_float64_reference(normalize):
  features, labels, weights, bias, ood, test, test_labels = _random_case()
  got = _jitted(kernel_normalize=normalize, cdnv_exponents=(1.0, 2.0, 0.5))(
      features, labels, 5, weights, bias, ood_features=ood, test_features=test, test_labels=test_labels)
  want = reference.reference_further(features, labels, 5, weights, bias, ood_features=ood, test_features=test,
                                     test_labels=test_labels, cdnv_exponents=(1.0, 2.0, 0.5), normalize=normalize)
  assert set(got) == set(want)
  _assert_close(got, want)


def test_keys_agree_with_the_suite_definitions():
  """kernel_log_var is geometry.gnc2; cdnv_k2 the suite's cdnv; nc1_weak its nc1_tirer."""
  features, labels, *_ = _random_case(seed=1)
  got = _jitted()(features, labels, 5)
  suite = reference.reference_metrics(features, labels, 5)
  np.testing.assert_allclose(float(got["cdnv_k2"]), suite["cdnv"], rtol=1e-4)
  np.testing.assert_allclose(float(got["nc1_weak"]), suite["nc1_tirer"], rtol=1e-4)
  np.testing.assert_allclose(float(got["kernel_log_var"]), suite["gnc2_means"], rtol=1e-4)
  centred = jnp.asarray(reference.class_means(features, labels, 5))
  centred = centred - jnp.mean(centred, axis=0)
  sweep = jax.jit(further.kernel_sweep, static_argnames="ddof")
  gnc2 = jax.jit(geometry.gnc2, static_argnames="ddof")
  for ddof in (0, 1):
    np.testing.assert_allclose(float(sweep(centred, ddof=ddof)["log_var"]), float(gnc2(centred, ddof=ddof)), rtol=1e-5)


def test_riesz_with_a_large_exponent_matches_the_reference():
  rng = np.random.default_rng(2)
  raw = rng.normal(size=(6, 64))
  centred = jnp.asarray(raw - raw.mean(axis=0), jnp.float32)
  want = reference.reference_further(np.repeat(raw, 2, axis=0), np.repeat(np.arange(6), 2), 6)
  mean, var = jax.jit(further.kernel_statistics, static_argnums=1)(centred, "riesz")  # s = p - 2 = 62
  assert 0.0 < want["kernel_riesz_mean"] < 1e-6  # d^-62 with d ~ 1.4: far from 1
  np.testing.assert_allclose([float(mean), float(var)], [want["kernel_riesz_mean"], want["kernel_riesz_var"]],
                             rtol=2e-4)
  negative, _ = further.kernel_statistics(centred, "riesz", riesz_s=-1.0)  # -d: minus the distance kernel
  np.testing.assert_allclose(float(negative), -want["kernel_distance_mean"], rtol=1e-5)


def test_exact_simplex_etf_is_collapsed_in_every_key():
  num_classes, feature_dim = 6, 10
  etf = reference.simplex_etf(num_classes, feature_dim, scale=4.0)
  labels = np.repeat(np.arange(num_classes), 5)
  features = (etf[labels] + 7.0).astype(np.float32)  # collapsed, with a global offset
  weights = (0.3 * etf).astype(np.float32)
  got = _jitted()(features, labels, num_classes, weights, jnp.full((num_classes,), 2.0),
                  test_features=features, test_labels=labels)
  for key in ("nc3_wm_structure", "kernel_distance_var", "kernel_log_var", "kernel_riesz_var",
              "equinorm_log_means", "nc1_weak", "cdnv_k1", "cdnv_k2",
              "equinorm_means_test", "equiangular_means_test", "max_angle_means_test",
              "etf_deviation_means_test", "self_duality_test"):
    np.testing.assert_allclose(float(got[key]), 0.0, atol=2e-5, err_msg=key)
  distance = np.sqrt(2.0 * num_classes / (num_classes - 1))  # ||u_a - u_b|| on the simplex
  np.testing.assert_allclose(float(got["kernel_distance_mean"]), distance, rtol=1e-5)
  np.testing.assert_allclose(float(got["kernel_log_mean"]), -np.log(distance), rtol=1e-4)
  # Zhu et al.'s minimiser: global mean 0 and b = b* 1, so W mu_G + b = b* 1 has no spread.
  centred = _jitted()(features - np.float32(7.0), labels, num_classes, weights, jnp.full((num_classes,), 2.0))
  np.testing.assert_allclose(float(centred["global_logit_spread_rel"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(centred["global_logit_norm"]), 2.0 * np.sqrt(num_classes), rtol=1e-5)
  np.testing.assert_allclose(float(got["global_logit_spread_rel"]), float(reference.reference_further(
      features, labels, num_classes, weights, np.full(num_classes, 2.0))["global_logit_spread_rel"]), rtol=1e-4)


def test_nc5_is_zero_for_ood_features_orthogonal_to_every_class_mean():
  rng = np.random.default_rng(3)
  num_classes, feature_dim = 4, 12
  means = np.zeros((num_classes, feature_dim))
  means[:, :6] = rng.normal(size=(num_classes, 6)) + 2.0
  labels = np.repeat(np.arange(num_classes), 10)
  features = means[labels] + np.concatenate([rng.normal(size=(40, 6)) * 0.1, np.zeros((40, 6))], axis=1)
  ood = np.concatenate([np.zeros((25, 6)), rng.normal(size=(25, 6)) + 1.0], axis=1)
  got = _jitted()(features.astype(np.float32), labels, num_classes, ood_features=ood.astype(np.float32))
  np.testing.assert_allclose(float(got["nc5"]), 0.0, atol=1e-6)
  assert float(got["nc5_centred"]) > 0.1  # mu_OOD - mu_G keeps -mu_G, which is not orthogonal to the M_c
  aligned = _jitted()(features.astype(np.float32), labels, num_classes, ood_features=features[:5].astype(np.float32))
  assert float(aligned["nc5"]) > 0.5


def test_scaling_the_features_changes_only_the_keys_with_units():
  features, labels, weights, bias, ood, *_ = _random_case(seed=4)
  run = _jitted(kernel_normalize=True)
  base = run(features, labels, 5, weights, None, ood_features=ood)
  for factor in (2.0**70, 2.0**-70):
    scaled = run(features * np.float32(factor), labels, 5, weights, None, ood_features=ood * np.float32(factor))
    for key in ("kernel_log_var", "kernel_riesz_mean", "cdnv_k2", "equinorm_log_means", "nc1_weak",
                "nc3_wm_structure", "nc5", "nc5_centred", "global_logit_norm_rel"):
      np.testing.assert_allclose(float(scaled[key]), float(base[key]), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(scaled["cdnv_k1"]), float(base["cdnv_k1"]) * factor, rtol=1e-5)


def test_undefined_inputs_give_nan_never_a_finite_number():
  features, labels, weights, bias, ood, test, test_labels = _random_case(seed=5)
  keep, keep_ood = np.ones(len(labels), bool), np.ones(len(ood), bool)

  def run(features=features, labels=labels, mask=keep, ood_mask=keep_ood, test_labels=test_labels):
    return _jitted()(features, labels, 5, weights, bias, mask=mask, ood_features=ood, ood_mask=ood_mask,
                     test_features=test, test_labels=test_labels)  # one signature: one compilation

  train_keys = [key for key in run() if not key.endswith("_test")]
  for bad_labels in (np.where(labels == 4, 3, labels), np.where(np.arange(len(labels)) == 0, 7, labels)):
    got = run(labels=bad_labels)  # an empty class; an unmasked label outside [0, C)
    assert all(np.isnan(float(got[key])) for key in train_keys)
  no_ood = run(ood_mask=np.zeros(len(ood), bool))
  assert np.isnan(float(no_ood["nc5"])) and np.isfinite(float(no_ood["kernel_log_var"]))
  empty_test = run(test_labels=np.minimum(test_labels, 3))
  assert np.isnan(float(empty_test["equinorm_means_test"])) and np.isfinite(float(empty_test["nc1_weak"]))
  masked = features.copy()
  masked[0] = np.nan
  keep[0] = False
  with_mask = run(features=masked, mask=keep)
  without_row = reference.reference_further(features[keep], labels[keep], 5, weights, bias, ood_features=ood,
                                            test_features=test, test_labels=test_labels)
  _assert_close(with_mask, without_row)


def test_coincident_means_give_infinite_energy_and_nan_cdnv():
  rng = np.random.default_rng(6)
  means = rng.normal(size=(4, 6)) * 3.0
  means[3] = means[2]
  labels = np.repeat(np.arange(4), 8)
  features = (means[labels] + rng.normal(size=(32, 6)) * 0.1).astype(np.float32)
  means_only = jnp.asarray(means - means.mean(axis=0), jnp.float32)
  for kernel in ("log", "riesz"):
    mean, var = further.kernel_statistics(means_only, kernel)
    assert float(mean) == np.inf and float(var) == np.inf, kernel
  mean, _ = further.kernel_statistics(means_only, "distance")
  assert np.isfinite(float(mean))
  assert np.isnan(float(further.cdnv(jnp.ones(4), means_only)))
  got = _jitted()(features, labels, 4)  # sample means differ by noise: resolvable, so finite
  assert np.isfinite(float(got["cdnv_k2"]))


def test_zero_centred_mean_has_no_direction():
  vectors = jnp.asarray([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
  assert np.isnan(float(further.kernel_statistics(vectors, "log")[1]))
  assert np.isnan(float(further.log_norm_equinorm(vectors)[0]))
  assert np.isnan(float(further.ood_orthogonality(vectors, jnp.asarray([1.0, 2.0]))))
  unnormalised_mean, _ = further.kernel_statistics(vectors, "distance", normalize=False)
  assert np.isfinite(float(unnormalised_mean))


def test_options_are_checked():
  vectors = jnp.ones((3, 2)) * jnp.arange(3.0)[:, None]
  with pytest.raises(ValueError, match="unknown kernel"):
    further.kernel_statistics(vectors, "gauss")
  riesz_mean, riesz_var = further.kernel_statistics(vectors, "riesz")  # p = 2: the default s = p - 2 = 0
  assert np.isnan(float(riesz_mean)) and np.isnan(float(riesz_var))


def test_tiled_sweeps_equal_the_one_tile_sweep():
  rng = np.random.default_rng(7)
  vectors = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  variances = jnp.asarray(rng.uniform(0.5, 2.0, 7), jnp.float32)
  for normalize in (True, False):
    whole = further.kernel_sweep(vectors, normalize=normalize)
    tiled = further.kernel_sweep(vectors, normalize=normalize, block_rows=3)
    for key in whole:
      np.testing.assert_allclose(float(tiled[key]), float(whole[key]), rtol=1e-5, err_msg=key)
  for k in (1.0, 2.0):
    np.testing.assert_allclose(float(further.cdnv(variances, vectors, k, block_rows=3)),
                               float(further.cdnv(variances, vectors, k)), rtol=1e-5)


def test_more_classes_than_the_pilot_still_match_float64():
  """C = 2100 > PILOT_ROWS and > one dense tile: a strided pilot and 1024-row tiles."""
  rng = np.random.default_rng(8)
  num_classes = 2100
  vectors = rng.normal(size=(num_classes, 16))
  variances = rng.uniform(0.5, 2.0, num_classes)
  got = jax.jit(further.kernel_sweep)(jnp.asarray(vectors, jnp.float32))
  cdnv = jax.jit(further.cdnv)(jnp.asarray(variances, jnp.float32), jnp.asarray(vectors, jnp.float32))
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  off = ~np.eye(num_classes, dtype=bool)
  distance = np.sqrt(np.maximum(2.0 - 2.0 * unit @ unit.T, 0.0))[off]
  for name, values in {"distance": distance, "log": -np.log(distance), "riesz": distance**-14.0}.items():
    np.testing.assert_allclose(float(got[name + "_mean"]), np.mean(values), rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(float(got[name + "_var"]), np.var(values, ddof=1), rtol=1e-3, err_msg=name)
  norm_sq = np.sum(vectors**2, axis=1)
  raw_sq = (norm_sq[:, None] + norm_sq[None, :] - 2.0 * vectors @ vectors.T)[off]  # float64: no cancellation here
  spread = (variances[:, None] + variances[None, :])[off]
  np.testing.assert_allclose(float(cdnv), np.mean(spread / (2.0 * raw_sq)), rtol=1e-4)


def test_structure_error_in_blocks_equals_the_whole_product():
  rng = np.random.default_rng(9)
  weights = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  means = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
  np.testing.assert_allclose(float(further.structure_error(weights, means, block_rows=3)),
                             float(further.structure_error(weights, means)), rtol=1e-5)
  etf = jnp.asarray(reference.simplex_etf(7, 9), jnp.float32)
  np.testing.assert_allclose(float(further.structure_error(2.0 * etf, etf, block_rows=2)), 0.0, atol=1e-5)


def test_bad_inputs_are_one_line_value_errors():
  features, labels, weights, _, *_ = _random_case()
  features, labels = features.astype(np.float32), labels.astype(np.int32)
  ood = np.ones((4, features.shape[1] + 1), np.float32)
  cases = [
      (dict(ood_features=ood), "ood_features must have shape"),
      (dict(test_features=features[:, :3], test_labels=labels), "test_features have 3 columns"),
      (dict(test_features=features), "must be given together"),
      (dict(riesz_s=float("nan")), "riesz_s must be"),
      (dict(riesz_s="a"), "riesz_s must be"),
      (dict(cdnv_exponents=2), "cdnv_exponents must be"),
      (dict(ddof=-1), "ddof must be"),
  ]
  for options, message in cases:
    with pytest.raises(ValueError, match=message):
      further.further_collapse(features, labels, 5, weights, **options)
  with pytest.raises(ValueError, match="labels must be integers"):
    further.further_collapse(features, labels.astype(np.float32), 5)
  with pytest.raises(ValueError, match="weights must have shape"):
    further.further_collapse(features, labels, 5, weights[:3])
  with pytest.raises(ValueError, match="num_classes must be at least 2"):
    further.further_collapse(features, np.zeros_like(labels), 1)


def test_variance_over_no_more_pairs_than_ddof_is_nan_not_zero():
  """C = 2 has 2 ordered pairs: ddof = 2 or more leaves no degree of freedom (it was -0.0)."""
  features, labels, *_ = _random_case(num_classes=2)
  got = further.further_collapse(features.astype(np.float32), labels.astype(np.int32), 2, ddof=2)
  assert all(np.isnan(float(got[f"kernel_{kernel}_var"])) for kernel in further.KERNELS)
  assert np.isfinite(float(got["kernel_distance_mean"]))


@pytest.mark.parametrize("ddof", [0, 1])
def test_test_means_geometry_is_geometrys_own_numbers_from_one_sweep(ddof):
  """mean_geometry takes equiangularity, max_angle and etf_deviation from one ``pair_geometry`` sweep:
  bit for bit what geometry's three functions give, each with its own sweep."""
  rng = np.random.default_rng(10)
  centred = jnp.asarray(rng.normal(size=(9, 6)) * 1e3, jnp.float32)
  weights = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  got = further.mean_geometry(centred, weights, ddof)
  scaled = scale.unit_scaled(centred)
  expected = {"equinorm_means_test": geometry.equinorm(scaled, ddof),
              "equiangular_means_test": geometry.equiangularity(scaled, ddof),
              "max_angle_means_test": geometry.max_angle(scaled),
              "etf_deviation_means_test": geometry.etf_deviation(scaled),
              "self_duality_test": geometry.self_duality(scale.unit_scaled(weights), scaled)}
  assert set(got) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
