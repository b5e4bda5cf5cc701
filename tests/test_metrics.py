"""nc_jax.metrics against an independent float64 reference and the geometry the paper predicts."""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nc_jax import metrics
from nc_jax.metrics import geometry, neural_collapse, streaming
from tests import reference

FLOAT_KEYS_MEANS = ("nc1", "nc1_tirer", "cdnv", "trace_within", "trace_between", "equinorm_means",
                    "equiangular_means", "max_angle_means", "etf_deviation_means", "gnc2_means")
FLOAT_KEYS_WEIGHTS = ("equinorm_weights", "equiangular_weights", "max_angle_weights",
                      "etf_deviation_weights", "self_duality", "unc3")
RATE_KEYS = ("ncc_accuracy", "ncc_mismatch", "accuracy")


def enable_x64():
  context = getattr(jax, "enable_x64", None)
  if context is None:
    from jax.experimental import enable_x64 as context  # jax < 0.7
  return context(True)


def gaussian_classes(num_samples, feature_dim, num_classes, *, mean_scale=3.0, spread=1.0,
                     offset=0.0, seed=0, dtype=np.float32):
  """Balanced-ish Gaussian mixture: labels (N,), features (N, p), W (C, p), b (C,)."""
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, num_samples - num_classes)])
  means = rng.normal(size=(num_classes, feature_dim)) * mean_scale
  features = offset + means[labels] + spread * rng.normal(size=(num_samples, feature_dim))
  weights = (means - means.mean(0)) + rng.normal(size=means.shape)
  bias = rng.normal(size=num_classes) * 0.1
  return features.astype(dtype), labels.astype(np.int32), weights.astype(dtype), bias.astype(dtype)


def assert_matches_reference(got, want, rtol, atol=1e-6):
  for key, value in want.items():
    if key in RATE_KEYS or key.startswith(("ncc_", "accuracy")):
      # one sample either way; approx takes only Python numbers as tolerances (pytest >= 9.2)
      assert float(got[key]) == pytest.approx(value, abs=1.5 / int(got["num_samples"])), key
    else:
      np.testing.assert_allclose(float(got[key]), value, rtol=rtol, atol=atol, err_msg=key)


SHAPES = [  # (N, p, C)
    pytest.param(240, 16, 5, id="N240-p16-C5"),
    pytest.param(300, 3, 10, id="p<C-1"),
    pytest.param(120, 8, 2, id="C2"),
    pytest.param(1500, 128, 100, id="C100"),
]


class TestAgainstFloat64Reference:

  @pytest.mark.parametrize("jitted", [True, False], ids=["with_jit", "without_jit"])
  @pytest.mark.parametrize("num_samples,feature_dim,num_classes", SHAPES)
  def test_float32_suite_matches_reference(self, num_samples, feature_dim, num_classes, jitted):
    features, labels, weights, bias = gaussian_classes(num_samples, feature_dim, num_classes)
    context = contextlib.nullcontext() if jitted else chex.fake_jit()
    with context:
      got = jax.jit(neural_collapse, static_argnums=2)(features, labels, num_classes, weights, bias)
    chex.assert_shape([got[k] for k in FLOAT_KEYS_MEANS + FLOAT_KEYS_WEIGHTS], ())
    want = reference.reference_metrics(features, labels, num_classes, weights, bias)
    assert_matches_reference(got, want, rtol=2e-4)

  @pytest.mark.parametrize("num_samples,feature_dim,num_classes", SHAPES[:3])
  def test_float64_inputs_match_reference_to_1e_9(self, num_samples, feature_dim, num_classes):
    features, labels, weights, bias = gaussian_classes(num_samples, feature_dim, num_classes, dtype=np.float64)
    with enable_x64():
      got = jax.jit(neural_collapse, static_argnums=2)(features, labels, num_classes, weights, bias)
      got = jax.tree_util.tree_map(np.asarray, got)
    assert got["nc1"].dtype == np.float64
    want = reference.reference_metrics(features, labels, num_classes, weights, bias)
    assert_matches_reference(got, want, rtol=1e-9, atol=1e-12)

  def test_test_set_variants_use_training_means(self):
    features, labels, weights, bias = gaussian_classes(400, 12, 6, seed=1)
    test_features, test_labels, _, _ = gaussian_classes(200, 12, 6, seed=1, spread=1.5)
    got = jax.jit(neural_collapse, static_argnums=2)(
        features, labels, 6, weights, bias, test_features=test_features, test_labels=test_labels)
    want = reference.reference_test_metrics(features, labels, test_features, test_labels, 6, weights, bias)
    for key, value in want.items():
      tol = 1.5 / 200 if key != "nc1_test" else 2e-4 * value
      assert float(got[key]) == pytest.approx(value, abs=tol), key

  def test_gram_solver_agrees_with_svd_on_well_conditioned_means(self):
    features, labels, weights, bias = gaussian_classes(500, 32, 8, seed=2)
    svd = neural_collapse(features, labels, 8, weights, bias)
    gram = neural_collapse(features, labels, 8, weights, bias, solver="gram")
    np.testing.assert_allclose(float(gram["nc1"]), float(svd["nc1"]), rtol=1e-4)


class TestPaperGeometry:

  def test_exact_simplex_etf_has_zero_nc1_nc2_nc3_nc4(self):
    num_classes, feature_dim = 10, 32
    etf = reference.simplex_etf(num_classes, feature_dim, scale=5.0)
    labels = np.repeat(np.arange(num_classes), 20)
    offset = np.random.default_rng(3).normal(size=feature_dim) * 4.0  # a global shift changes nothing
    features = (etf[labels] + offset).astype(np.float32)
    weights = etf.astype(np.float32)  # W = centred means: self-dual
    bias = -(weights @ offset).astype(np.float32)  # so that W h + b = W (h - offset)
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, num_classes, weights, bias)
    for key in ("nc1", "nc1_tirer", "cdnv", "equinorm_means", "equiangular_means", "max_angle_means",
                "etf_deviation_means", "equinorm_weights", "equiangular_weights", "max_angle_weights",
                "etf_deviation_weights", "self_duality", "ncc_mismatch"):
      assert abs(float(got[key])) < 2e-6, (key, float(got[key]))
    assert float(got["ncc_accuracy"]) == 1.0 and float(got["accuracy"]) == 1.0

  def test_random_means_are_far_from_an_etf(self):
    features, labels, weights, bias = gaussian_classes(300, 32, 10)
    got = neural_collapse(features, labels, 10, weights, bias)
    assert float(got["etf_deviation_means"]) > 0.1 and float(got["max_angle_means"]) > 0.05

  def test_features_equal_to_class_means_give_zero_nc1_and_mismatch(self):
    rng = np.random.default_rng(4)
    means = rng.normal(size=(7, 20)) * 3
    labels = np.repeat(np.arange(7), 15)
    weights = (means - means.mean(0)).astype(np.float32)
    got = neural_collapse(means[labels].astype(np.float32), labels, 7, weights, np.zeros(7, np.float32))
    assert float(got["nc1"]) < 1e-10
    assert float(got["ncc_mismatch"]) == 0.0
    assert float(got["self_duality"]) < 1e-10

  def test_nc1_invariant_to_rotation_and_global_shift(self):
    features, labels, _, _ = gaussian_classes(600, 24, 6, seed=5)
    rotation, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(24, 24)))
    base = float(neural_collapse(features, labels, 6)["nc1"])
    rotated = float(neural_collapse((features @ rotation).astype(np.float32), labels, 6)["nc1"])
    shifted = float(neural_collapse(features + np.float32(50.0), labels, 6)["nc1"])
    np.testing.assert_allclose([rotated, shifted], [base, base], rtol=1e-4)

  def test_conventions_are_options(self):
    features, labels, weights, bias = gaussian_classes(300, 16, 5)
    paper = neural_collapse(features, labels, 5, weights, bias)
    notebook_nc1 = neural_collapse(features, labels, 5, divide_nc1_by_classes=False)["nc1"]
    np.testing.assert_allclose(float(notebook_nc1), 5 * float(paper["nc1"]), rtol=1e-6)
    root = neural_collapse(features, labels, 5, weights, bias, self_duality_squared=False)["self_duality"]
    np.testing.assert_allclose(float(root) ** 2, float(paper["self_duality"]), rtol=1e-5)
    population = neural_collapse(features, labels, 5, std_ddof=0)["equinorm_means"]
    np.testing.assert_allclose(float(population), float(paper["equinorm_means"]) * np.sqrt(4 / 5), rtol=1e-5)


class TestNumericalTraps:

  @pytest.mark.parametrize("offset", [0.0, 30.0], ids=["no-offset", "relu-like-offset"])
  def test_collapsed_features_with_large_means(self, offset):
    # class-mean norms ~100, within-class spread ~1e-3 (per sample, in norm)
    num_classes, feature_dim = 10, 64
    features, labels, _, _ = gaussian_classes(2000, feature_dim, num_classes, mean_scale=100 / np.sqrt(feature_dim),
                                              spread=1e-3 / np.sqrt(feature_dim), offset=offset, seed=7)
    got = float(jax.jit(neural_collapse, static_argnums=2)(features, labels, num_classes)["nc1"])
    want = reference.reference_metrics(features, labels, num_classes)["nc1"]
    assert got > 0
    assert abs(got - want) <= 1e-3 * want, (got, want)

  def test_the_trap_is_real_for_raw_moments(self):
    """A negative control: the textbook float32 formula fails on the same data."""
    features, labels, _, _ = gaussian_classes(2000, 64, 10, mean_scale=100 / 8, spread=1e-3 / 8, offset=30.0, seed=7)
    want = reference.reference_metrics(features, labels, 10)["nc1"]
    onehot = np.eye(10, dtype=np.float32)[labels]
    counts = onehot.sum(0)
    means = (onehot.T @ features) / counts[:, None]
    raw_within = features.T @ features / len(labels) - (means.T * (counts / len(labels))) @ means
    centred = means - means.mean(0)
    naive = np.trace(raw_within @ np.linalg.pinv(centred.T @ centred / 10)) / 10
    assert not abs(naive - want) <= 1e-3 * want

  @staticmethod
  def close_means_case(num_classes=6, feature_dim=64, separation=3e-3, seed=0):
    """Two class means 0.3% of their norm apart, far from the rest (as two similar classes early in training)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, feature_dim)) * 100 / np.sqrt(feature_dim)
    means[1] = means[0] + separation * 100 * rng.normal(size=feature_dim) / np.sqrt(feature_dim)
    labels = np.repeat(np.arange(num_classes), 200).astype(np.int32)
    features = means[labels] + 0.01 * rng.normal(size=(len(labels), feature_dim))
    return features.astype(np.float32), labels

  @staticmethod
  def means_and_variances(features, labels, num_classes=6):
    """Class means (C, p) and V_c = (1/n_c) sum ||h - mu_c||^2 (C,), in float32 as the suite keeps them."""
    means = reference.class_means(features, labels, num_classes)
    variances = np.array([np.mean(np.sum((features[labels == c] - means[c]) ** 2, -1)) for c in range(num_classes)],
                         np.float32)
    return means, variances

  @pytest.mark.parametrize("block_rows", [None, 2], ids=["dense", "tiled"])
  def test_cdnv_of_two_close_means_matches_float64(self, block_rows):
    """||mu_c - mu_c'||^2 from the Gram formula lost ~5 of float32's 7 digits here: CDNV was 3% off."""
    from nc_jax.metrics import further
    features, labels = self.close_means_case()
    want = reference.reference_metrics(features, labels, 6)["cdnv"]
    got = jax.jit(functools.partial(neural_collapse, num_classes=6, pair_block_rows=block_rows))(features, labels)
    assert int(got["num_coincident_means"]) == 0
    np.testing.assert_allclose(float(got["cdnv"]), want, rtol=2e-5)
    per_class = reference.reference_further(features, labels, 6)
    means, variances = self.means_and_variances(features, labels)
    got_k2 = further.cdnv(jnp.asarray(variances), jnp.asarray(means - means.mean(0)), 2.0, block_rows=block_rows)
    np.testing.assert_allclose(float(got_k2), per_class["cdnv_k2"], rtol=2e-5)

  def test_the_cdnv_trap_is_real_for_the_gram_formula(self):
    """A negative control: the same means' distances from the Gram matrix alone miss by far more."""
    features, labels = self.close_means_case()
    want = reference.reference_metrics(features, labels, 6)["cdnv"]
    means, variances = self.means_and_variances(features, labels)
    centred = means - means.mean(0)
    gram = centred @ centred.T
    norm_sq = np.diag(gram)
    distance_sq = norm_sq[:, None] + norm_sq[None, :] - 2 * gram
    np.fill_diagonal(distance_sq, 1.0)  # no pair
    pairs = ~np.eye(6, dtype=bool)
    naive = np.mean(((variances[:, None] + variances[None, :]) / (2 * distance_sq))[pairs])
    assert not abs(naive - want) <= 1e-3 * want, (naive, want)


class TestShardingAndStreaming:

  @pytest.mark.parametrize("chunk_rows", [None, 100], ids=["one-chunk", "8-chunks"])
  def test_eight_devices_give_the_one_device_values(self, chunk_rows):
    assert jax.device_count() == 8, "tests/conftest.py should create 8 CPU devices"
    features, labels, weights, bias = gaussian_classes(800, 32, 10, seed=8)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    suite = jax.jit(functools.partial(neural_collapse, chunk_rows=chunk_rows), static_argnums=2)
    one = jax.jit(neural_collapse, static_argnums=2)(features, labels, 10, weights, bias, chunk_rows=None)
    many = suite(jax.device_put(features, sharded), jax.device_put(labels, sharded), 10, weights, bias)
    assert many["nc1"].sharding.is_fully_replicated
    for key in one:
      np.testing.assert_allclose(float(many[key]), float(one[key]), rtol=1e-5, atol=1e-7, err_msg=key)

  def test_scanned_batches_and_merges_give_the_in_memory_result(self):
    features, labels, weights, bias = gaussian_classes(1024, 16, 8, seed=9, offset=10.0)
    batches = (features.reshape(8, 128, 16), labels.reshape(8, 128))

    @jax.jit
    def two_passes(batches):
      def pass_one(state, batch):
        return streaming.update_class_means(state, *batch), None
      means, _ = jax.lax.scan(pass_one, streaming.init_class_means(8, 16), batches)
      geometry = streaming.finalize_class_means(means, weights, bias)
      def pass_two(state, batch):
        return streaming.update_deviations(state, geometry, *batch), None
      state, _ = jax.lax.scan(pass_two, streaming.init_deviations(geometry), batches)
      return metrics.finalize_collapse(state, geometry)

    streamed = two_passes(batches)
    whole = neural_collapse(features, labels, 8, weights, bias, chunk_rows=None)
    chunked = neural_collapse(features, labels, 8, weights, bias, chunk_rows=128)
    for key in whole:
      np.testing.assert_allclose(float(chunked[key]), float(whole[key]), rtol=2e-5, atol=1e-7, err_msg=key)
    for key in whole:
      np.testing.assert_allclose(float(streamed[key]), float(whole[key]), rtol=2e-5, atol=1e-7, err_msg=key)

  def test_merge_of_disjoint_halves_equals_the_whole(self):
    features, labels, _, _ = gaussian_classes(500, 8, 4, seed=10)
    halves = [(features[:200], labels[:200]), (features[200:], labels[200:])]
    init = streaming.init_class_means(4, 8)
    merged = streaming.merge_class_means(*[streaming.update_class_means(init, f, l) for f, l in halves])
    whole = streaming.update_class_means(init, features, labels)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.means, whole.means, rtol=1e-5, atol=1e-6)
    geometry = streaming.finalize_class_means(whole)
    start = streaming.init_deviations(geometry)
    parts = [streaming.update_deviations(start, geometry, f, l) for f, l in halves]
    merged_state = streaming.merge_deviations(*parts)
    whole_state = streaming.update_deviations(start, geometry, features, labels)
    chex.assert_trees_all_close(merged_state, whole_state, rtol=1e-5, atol=1e-5)

  def test_mask_drops_padding_rows_even_if_they_hold_nan(self):
    features, labels, weights, bias = gaussian_classes(300, 8, 4, seed=11)
    padded = np.concatenate([features, np.full((20, 8), np.nan, np.float32)])
    padded_labels = np.concatenate([labels, np.full(20, 99, np.int32)])
    mask = np.arange(320) < 300
    got = neural_collapse(padded, padded_labels, 4, weights, bias, mask=mask)
    want = neural_collapse(features, labels, 4, weights, bias)
    for key in want:
      np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6, err_msg=key)


class TestLayersAndLargeC:

  def test_per_layer_collapse_flattens_each_layer(self):
    rng = np.random.default_rng(12)
    labels = np.repeat(np.arange(3), 30)
    layers = {"conv": rng.normal(size=(90, 4, 4, 2)).astype(np.float32) + labels[:, None, None, None],
              "dense": rng.normal(size=(90, 16)).astype(np.float32) + 3 * labels[:, None]}
    got = metrics.per_layer_collapse(layers, labels, 3)
    assert set(got) == {"conv", "dense"}
    flat = neural_collapse(layers["conv"].reshape(90, 32), labels, 3)
    np.testing.assert_allclose(float(got["conv"]["nc1"]), float(flat["nc1"]), rtol=1e-6)

  @pytest.mark.slow
  def test_thousand_classes_2048_features_runs_without_cxcxp_intermediates(self):
    features, labels, weights, bias = gaussian_classes(3000, 2048, 1000, seed=13, mean_scale=1.0)
    compiled = jax.jit(neural_collapse, static_argnums=2).lower(features, labels, 1000, weights, bias).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:  # C*C*p float32 would be 8 GB
      assert analysis.temp_size_in_bytes < 1e9
    got = compiled(features, labels, weights, bias)
    assert np.isfinite(float(got["gnc2_means"])) and np.isfinite(float(got["unc3"]))
    assert np.isfinite(float(got["nc1"])) and float(got["nc1"]) > 0


class TestOptionsValue:
  """NCOptions through the keyword faces: options= measures what the same keywords measure; a keyword
  that disagrees with options is refused in one line."""

  CONVENTIONS = dict(global_mean="samples", solver="gram", std_ddof=0, divide_nc1_by_classes=False,
                     self_duality_squared=False, ncc_use_bias=False, min_count=2)

  def test_options_measure_what_the_keywords_measure(self):
    features, full_labels, weights, bias = gaussian_classes(90, 6, 4, seed=3)
    labels = np.where(full_labels == 3, 2, full_labels)  # unbalanced, and class 3 empty: min_count drops it
    test = dict(test_features=features[:30], test_labels=labels[:30])
    options = metrics.NCOptions(**self.CONVENTIONS)
    by_keywords = neural_collapse(features, labels, 4, weights, bias, **test, **self.CONVENTIONS)
    by_options = neural_collapse(features, labels, 4, weights, bias, **test, options=options)
    agreeing = neural_collapse(features, labels, 4, weights, bias, **test, options=options, solver="gram")
    paper = neural_collapse(features, labels, 4, weights, bias, **test, min_count=2)
    assert by_options.keys() == by_keywords.keys() == agreeing.keys()
    for key in by_keywords:
      np.testing.assert_array_equal(np.asarray(by_options[key]), np.asarray(by_keywords[key]), err_msg=key)
      np.testing.assert_array_equal(np.asarray(agreeing[key]), np.asarray(by_keywords[key]), err_msg=key)
    assert float(by_options["nc1"]) != float(paper["nc1"])  # the options were used, not the defaults
    further = functools.partial(metrics.further_collapse, features, full_labels, 4, weights, bias)
    further_keywords, further_options = further(global_mean="samples", ddof=0), further(options=options)
    for key in further_keywords:
      np.testing.assert_array_equal(np.asarray(further_options[key]), np.asarray(further_keywords[key]), err_msg=key)
    assert float(further_options["kernel_log_var"]) != float(further()["kernel_log_var"])  # ddof 0, not 1

  def test_streaming_functions_take_options_or_keywords(self):
    features, labels, weights, bias = gaussian_classes(90, 6, 4, seed=4)
    options = metrics.NCOptions(**self.CONVENTIONS)
    state = streaming.update_class_means(streaming.init_class_means(4, 6), features, labels)
    results = []
    for by in ("options", "keywords"):
      kw = lambda *names: ({"options": options} if by == "options" else
                           {name: self.CONVENTIONS[name] for name in names})
      geometry = streaming.finalize_class_means(state, weights, bias, **kw("global_mean", "solver", "min_count"))
      dev = streaming.update_deviations(streaming.init_deviations(geometry), geometry, features, labels,
                                        **kw("ncc_use_bias"))
      results.append(streaming.finalize_collapse(dev, geometry, **kw(
          "global_mean", "divide_nc1_by_classes", "std_ddof", "self_duality_squared"))
          | streaming.finalize_transfer(dev, geometry, **kw("divide_nc1_by_classes")))
    for key in results[1]:
      np.testing.assert_array_equal(np.asarray(results[0][key]), np.asarray(results[1][key]), err_msg=key)

  def test_a_keyword_that_disagrees_with_options_is_one_line(self):
    features, labels, weights, bias = gaussian_classes(40, 4, 3, seed=5)
    options = metrics.NCOptions(global_mean="samples", min_count=2)
    state = streaming.update_class_means(streaming.init_class_means(3, 4), features, labels)
    geometry = streaming.finalize_class_means(state, options=options)
    dev = streaming.init_deviations(geometry)
    calls = {
        "neural_collapse": lambda: neural_collapse(features, labels, 3, options=options, global_mean="class_means"),
        "class_geometry": lambda: metrics.class_geometry(features, labels, 3, options=options, min_count=None),
        "heldout_collapse": lambda: metrics.heldout_collapse(features, labels, geometry, options=options,
                                                             ncc_use_bias=False),
        "further_collapse": lambda: metrics.further_collapse(features, labels, 3, options=options, ddof=0),
        "finalize_class_means": lambda: streaming.finalize_class_means(state, options=options, solver="gram"),
        "update_deviations": lambda: streaming.update_deviations(dev, geometry, features, labels, options=options,
                                                                 ncc_use_bias=False),
        "finalize_collapse": lambda: streaming.finalize_collapse(dev, geometry, options=options, std_ddof=0),
        "finalize_transfer": lambda: streaming.finalize_transfer(dev, geometry, options=options,
                                                                 divide_nc1_by_classes=False),
    }
    for name, call in calls.items():
      with pytest.raises(ValueError, match=f"^{name}: .* against options\\.") as error:
        call()
      assert "\n" not in str(error.value), name
    with pytest.raises(ValueError, match="options must be an nc_jax.metrics.NCOptions or None, got a dict"):
      neural_collapse(features, labels, 3, options={"global_mean": "samples"})
    with pytest.raises(ValueError, match="min_count must be None or a non-negative int"):
      metrics.NCOptions(min_count=-1)


class TestBadInput:

  @pytest.mark.parametrize("args,match", [
      ((np.zeros((10,)), np.zeros(10, int), 3), "features must have shape"),
      ((np.zeros((10, 4)), np.zeros((10, 1), int), 3), "labels must have shape"),
      ((np.zeros((10, 4)), np.zeros(9, int), 3), "10 rows but labels have 9"),
      ((np.zeros((10, 4)), np.zeros(10, int), 1), "at least 2"),
      ((np.zeros((10, 4)), np.zeros(10, np.float32), 3), "labels must be integers"),
      ((np.zeros((10, 4), int), np.zeros(10, int), 3), "floating point"),
      ((np.zeros((10, 4)), np.zeros(10, int), 3, np.zeros((3, 5))), "weights must have shape"),
      ((np.zeros((10, 4)), np.zeros(10, int), 3, np.zeros((3, 4)), np.zeros(4)), "bias must have shape"),
      ((np.zeros((10, 4)), np.zeros(10, int), 3, None, np.zeros(3)), "bias was given without weights"),
  ])
  def test_shape_errors_raise_at_trace_time(self, args, match):
    with pytest.raises(ValueError, match=match):
      jax.jit(neural_collapse, static_argnums=2)(*args)

  def test_traced_num_classes_is_refused(self):
    with pytest.raises(ValueError, match="static"):
      jax.jit(neural_collapse)(np.zeros((4, 2)), np.zeros(4, int), 2)

  @pytest.mark.parametrize("problem", ["label_out_of_range", "empty_class", "nan_feature"])
  def test_value_problems_poison_every_metric_and_are_named(self, problem):
    features, labels, weights, bias = gaussian_classes(100, 6, 4, seed=14)
    if problem == "label_out_of_range":
      labels[5], key, message = 7, "num_invalid_labels", "labels lie outside"
    elif problem == "empty_class":
      labels[labels == 3], key, message = 2, "num_empty_classes", "classes with no samples: \\[3\\]"
    else:
      features[9, 2], key, message = np.nan, "num_nonfinite_rows", "contain NaN or inf"
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 4, weights, bias)
    assert int(got[key]) >= 1
    for name, value in got.items():
      if name not in metrics.DIAGNOSTIC_KEYS + metrics.DEGENERACY_KEYS and name != "num_samples":
        assert np.isnan(float(value)), name
    with pytest.raises(ValueError, match=key[4:].replace("_", " ")):
      metrics.raise_if_invalid(got)
    with pytest.raises(ValueError, match=message):
      metrics.validate_inputs(features, labels, 4)

  def test_valid_inputs_pass_validation(self):
    features, labels, weights, bias = gaussian_classes(100, 6, 4)
    metrics.validate_inputs(features, labels, 4)
    metrics.raise_if_invalid(neural_collapse(features, labels, 4, weights, bias))


class TestMSEDecomposition:

  @pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "unbalanced"])
  def test_terms_add_up_to_the_regularised_loss_in_float64(self, balanced):
    rng = np.random.default_rng(15)
    num_classes, feature_dim = 5, 12
    labels = np.repeat(np.arange(num_classes), 40) if balanced else rng.integers(0, num_classes, 200)
    means = rng.normal(size=(num_classes, feature_dim)) * 2
    features = means[labels] + rng.normal(size=(len(labels), feature_dim)) + 3.0
    weights = rng.normal(size=(num_classes, feature_dim)) * 0.3
    bias = rng.normal(size=num_classes) * 0.1
    with enable_x64():
      got = jax.jit(metrics.mse_decomposition, static_argnums=2)(
          features, labels, num_classes, weights, bias, 5e-4)
      got = {k: float(v) for k, v in got.items()}
    want = reference.reference_mse_terms(features, labels, num_classes, weights, bias, 5e-4)
    assert got["mse_loss"] == pytest.approx(want, rel=1e-12)
    assert got["lnc1"] + got["lnc23"] + got["lperp"] == pytest.approx(want, rel=1e-10)
    assert min(got["lnc1"], got["lnc23"], got["lperp"]) > 0

  def test_least_squares_classifier_has_zero_lperp_and_float32_sum(self):
    rng = np.random.default_rng(16)
    labels = np.repeat(np.arange(4), 50)
    features = (rng.normal(size=(4, 6))[labels] + 0.5 * rng.normal(size=(200, 6))).astype(np.float32)
    targets = np.eye(4)[labels]
    design = np.concatenate([features, np.ones((200, 1))], axis=1).astype(np.float64)
    rho = 0.5 * 1e-2
    solution = np.linalg.solve(design.T @ design / 200 + rho * np.eye(7), design.T @ targets / 200).T
    got = metrics.mse_decomposition(features, labels, 4, solution[:, :6].astype(np.float32),
                                    solution[:, 6].astype(np.float32), 1e-2)
    assert abs(float(got["lperp"])) < 1e-6
    total = float(got["lnc1"] + got["lnc23"] + got["lperp"])
    assert total == pytest.approx(float(got["mse_loss"]), rel=1e-4)


SCALE_FREE_KEYS = ("nc1", "nc1_tirer", "cdnv", "equinorm_means", "equiangular_means", "max_angle_means",
                   "etf_deviation_means", "gnc2_means", "ncc_accuracy") + FLOAT_KEYS_WEIGHTS
UNIT_KEYS = ("trace_within", "trace_between")  # in the features' units squared


@functools.lru_cache(maxsize=None)
def scale_sweep_data():
  """(features in float64, labels, W, b) and the float32 suite at 10^0 (jitted once for every k)."""
  features, labels, weights, bias = gaussian_classes(240, 16, 5, seed=17, offset=2.0)
  suite = jax.jit(neural_collapse, static_argnums=2)
  base = jax.device_get(suite(features, labels, 5, weights, bias))
  return features.astype(np.float64), labels, weights, bias, suite, base


class TestScaleInvariance:

  @pytest.mark.parametrize("k", range(-30, 31))
  def test_features_times_ten_to_the_k(self, k):
    features64, labels, weights, bias, suite, base = scale_sweep_data()
    features = (features64 * 10.0**k).astype(np.float32)
    got = jax.device_get(suite(features, labels, 5, weights, bias))
    want = reference.reference_metrics(features, labels, 5, weights, bias)
    for key in metrics.DIAGNOSTIC_KEYS + metrics.DEGENERACY_KEYS:
      assert int(got[key]) == 0, (key, int(got[key]))  # finite input is never counted as non-finite
    for key in SCALE_FREE_KEYS:
      np.testing.assert_allclose(float(got[key]), float(base[key]), rtol=1e-5, atol=1e-7, err_msg=key)
      np.testing.assert_allclose(float(got[key]), want[key], rtol=2e-4, atol=1e-6, err_msg=key)
    for key in UNIT_KEYS:  # honestly inf above float32's range, ~0 below it
      np.testing.assert_allclose(float(got[key]), np.float32(want[key]), rtol=2e-4, atol=2e-38, err_msg=key)
    for key in ("accuracy", "ncc_mismatch"):  # the network's own decision: the bias matters more as h shrinks
      assert float(got[key]) == pytest.approx(want[key], abs=1.5 / 240), key

  @pytest.mark.parametrize("k", [-20, 20])
  def test_streamed_batches_at_extreme_scales_give_the_in_memory_result(self, k):
    features64, labels, weights, bias, _, base = scale_sweep_data()
    features = (features64 * 10.0**k).astype(np.float32)
    batches = (features.reshape(8, 30, 16), labels.reshape(8, 30))

    @jax.jit
    def two_passes(batches):
      def pass_one(state, batch):
        return streaming.update_class_means(state, *batch), None
      means, _ = jax.lax.scan(pass_one, streaming.init_class_means(5, 16), batches)
      geometry = streaming.finalize_class_means(means, weights, bias)
      def pass_two(state, batch):
        return streaming.update_deviations(state, geometry, *batch), None
      state, _ = jax.lax.scan(pass_two, streaming.init_deviations(geometry), batches)
      return metrics.finalize_collapse(state, geometry)

    streamed = two_passes(batches)
    whole = neural_collapse(features, labels, 5, weights, bias)
    for key in whole:
      np.testing.assert_allclose(float(streamed[key]), float(whole[key]), rtol=2e-5, atol=1e-7, err_msg=key)
    for key in SCALE_FREE_KEYS:
      np.testing.assert_allclose(float(streamed[key]), float(base[key]), rtol=1e-5, atol=1e-7, err_msg=key)

  def test_merged_pass_one_keeps_the_largest_magnitude(self):
    features, labels, _, _ = gaussian_classes(200, 6, 4, seed=18)
    features[150:] *= np.float32(1e25)
    init = streaming.init_class_means(4, 6)
    halves = [streaming.update_class_means(init, features[:150], labels[:150]),
              streaming.update_class_means(init, features[150:], labels[150:])]
    whole = streaming.update_class_means(init, features, labels)
    assert float(streaming.merge_class_means(*halves).max_abs) == float(whole.max_abs) == np.abs(features).max()

  @pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
  def test_finite_rows_far_above_every_class_mean_are_not_non_finite(self):
    # Every class mean is exactly 0; class 0's rows (+-2^63 in each of 8 entries) have
    # ||h - mu||^2 = 6.8e38, beyond float32, yet Tr Sigma_W = 1.4e38 is representable.
    patterns = np.concatenate([np.eye(8), -np.eye(8)]).astype(np.float32)
    features = np.concatenate([np.repeat(np.float32(2.0**63) * np.array([[1.0], [-1.0]], np.float32), 8, axis=0)
                               * np.ones((16, 8), np.float32)] + [patterns] * 4)
    labels = np.repeat(np.arange(5), 16).astype(np.int32)
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 5)
    want = reference.reference_metrics(features, labels, 5)
    assert int(got["num_nonfinite_rows"]) == 0
    np.testing.assert_allclose(float(got["trace_within"]), want["trace_within"], rtol=1e-6)
    assert int(got["num_degenerate_means"]) == 5 and np.isnan(float(got["nc1"]))


def exact_classes(means, reps=1):
  """Features whose class means are exactly ``means`` (C, p) in float32: mean +- e_j / 2."""
  num_classes, dim = means.shape
  offsets = np.concatenate([np.eye(dim), -np.eye(dim)]) / 2
  features = np.concatenate([means[c] + offsets for c in range(num_classes)] * reps).astype(np.float32)
  labels = np.tile(np.repeat(np.arange(num_classes), 2 * dim), reps).astype(np.int32)
  return features, labels


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
class TestDegenerateGeometry:

  MEAN_KEYS = ("nc1", "nc1_tirer", "cdnv", "equinorm_means", "equiangular_means", "max_angle_means",
               "etf_deviation_means", "gnc2_means", "ncc_accuracy", "self_duality", "unc3", "ncc_mismatch")

  def test_identical_class_means_give_nan_and_are_flagged_not_perfect_collapse(self):
    rng = np.random.default_rng(19)
    shared = rng.normal(size=(40, 12)).astype(np.float32) + 5.0  # every class holds the same 40 vectors
    features, labels = np.tile(shared, (4, 1)), np.repeat(np.arange(4), 40).astype(np.int32)
    weights, bias = rng.normal(size=(4, 12)).astype(np.float32), np.zeros(4, np.float32)
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 4, weights, bias)
    want = reference.reference_metrics(features, labels, 4, weights, bias)
    assert int(got["num_degenerate_means"]) == 4 and int(got["num_coincident_means"]) == 6
    for key in self.MEAN_KEYS:
      assert np.isnan(float(got[key])), key
    np.testing.assert_allclose(float(got["trace_within"]), want["trace_within"], rtol=1e-5)
    assert float(got["trace_between"]) < 1e-10 * want["trace_within"]
    assert float(got["accuracy"]) == pytest.approx(want["accuracy"])  # the network's decision is still defined
    with pytest.raises(ValueError, match="degenerate means: 4"):
      metrics.raise_if_invalid(got)
    metrics.raise_if_invalid(got, allow_degenerate=True)

  def test_all_identical_features(self):
    features, labels, weights, bias = gaussian_classes(100, 6, 4, seed=20)
    got = jax.jit(neural_collapse, static_argnums=2)(np.full_like(features, 3.0), labels, 4, weights, bias)
    assert int(got["num_degenerate_means"]) == 4
    for key in self.MEAN_KEYS:
      assert np.isnan(float(got[key])), key
    assert float(got["trace_between"]) == 0.0 and float(got["trace_within"]) < 1e-12
    assert 0.0 <= float(got["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="degenerate geometry"):
      metrics.raise_if_invalid(got)

  def test_a_class_mean_at_the_global_mean_has_no_direction(self):
    a, b = np.array([2.0, 0.0, 1.0, 0.0, 3.0]), np.array([0.0, 1.0, -1.0, 2.0, 0.0])
    means = np.stack([a, b, -(a + b), np.zeros(5)])  # mu_G = 0 = mu_3
    features, labels = exact_classes(means, reps=3)
    weights = (means + np.random.default_rng(21).normal(size=means.shape)).astype(np.float32)
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 4, weights, np.zeros(4, np.float32))
    want = reference.reference_metrics(features, labels, 4, weights, np.zeros(4), pinv_rcond=1e-9)
    assert int(got["num_degenerate_means"]) == 1 and int(got["num_coincident_means"]) == 0
    for key in ("equiangular_means", "max_angle_means", "gnc2_means", "unc3"):
      assert np.isnan(float(got[key])), key
    for key in ("nc1", "nc1_tirer", "cdnv", "equinorm_means", "etf_deviation_means", "self_duality",
                "ncc_accuracy", "ncc_mismatch", "accuracy"):
      assert float(got[key]) == pytest.approx(want[key], rel=1e-5, abs=1e-6), key

  def test_zero_weight_row_has_no_direction(self):
    features, labels, weights, bias = gaussian_classes(200, 8, 4, seed=22)
    weights[2] = 0.0
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 4, weights, bias)
    want = reference.reference_metrics(features, labels, 4, weights, bias)
    assert int(got["num_zero_weight_rows"]) == 1 and int(got["num_nonfinite_weights"]) == 0
    for key in ("equiangular_weights", "max_angle_weights", "unc3"):
      assert np.isnan(float(got[key])), key
    for key in ("equinorm_weights", "etf_deviation_weights", "self_duality", "nc1", "accuracy", "ncc_mismatch"):
      assert float(got[key]) == pytest.approx(want[key], rel=2e-4, abs=1.5 / 200), key
    with pytest.raises(ValueError, match="zero weight rows: 1"):
      metrics.raise_if_invalid(got)


class TestNonfiniteWeights:

  WEIGHT_KEYS = FLOAT_KEYS_WEIGHTS + ("ncc_mismatch", "accuracy")

  @pytest.mark.parametrize("where", ["weights", "bias"])
  def test_nan_weights_poison_only_what_depends_on_them(self, where):
    features, labels, weights, bias = gaussian_classes(300, 8, 5, seed=23)
    test_features, test_labels, _, _ = gaussian_classes(100, 8, 5, seed=24)
    if where == "weights":
      weights[1, 3] = np.nan
    else:
      bias[4] = np.inf
    suite = jax.jit(neural_collapse, static_argnums=2)
    got = suite(features, labels, 5, weights, bias, test_features=test_features, test_labels=test_labels)
    without = suite(features, labels, 5, test_features=test_features, test_labels=test_labels)
    assert int(got["num_nonfinite_weights"]) == 1 and int(got["num_nonfinite_weights_test"]) == 1
    for key in self.WEIGHT_KEYS + ("ncc_mismatch_test", "accuracy_test"):
      assert np.isnan(float(got[key])), key
    for key in without:  # NC1, NC2 of the means, ... untouched (up to the matmul's summation order)
      np.testing.assert_allclose(float(got[key]), float(without[key]), rtol=1e-6, atol=1e-7, err_msg=key)
    with pytest.raises(ValueError, match="nonfinite weights: 1"):
      metrics.raise_if_invalid(got, allow_degenerate=True)
    with pytest.raises(ValueError, match="weights contain NaN or inf|bias contain NaN or inf"):
      metrics.validate_inputs(features, labels, 5, weights=weights, bias=bias)


class TestRaiseIfInvalid:

  def test_test_set_diagnostics_are_checked(self):
    features, labels, weights, bias = gaussian_classes(200, 6, 4, seed=25)
    test_features, test_labels, _, _ = gaussian_classes(80, 6, 4, seed=26)
    test_features[7, 1] = np.nan
    got = jax.jit(neural_collapse, static_argnums=2)(features, labels, 4, weights, bias,
                                                     test_features=test_features, test_labels=test_labels)
    assert int(got["num_nonfinite_rows"]) == 0 and int(got["num_nonfinite_rows_test"]) == 1
    assert np.isnan(float(got["nc1_test"])) and np.isfinite(float(got["nc1"]))
    with pytest.raises(ValueError, match="nonfinite rows test: 1"):
      metrics.raise_if_invalid(got, allow_degenerate=True)

  def test_one_nan_row_counts_once_and_prefixed_keys_are_checked(self):
    features, labels, _, _ = gaussian_classes(200, 6, 4, seed=27)
    features[3, 0] = np.inf
    got = neural_collapse(features, labels, 4)
    assert int(got["num_nonfinite_rows"]) == 1  # not every row of its class
    with pytest.raises(ValueError, match="layer/conv: nonfinite rows: 1"):
      metrics.raise_if_invalid({f"layer/conv/{key}": value for key, value in got.items()})

  def test_key_tuples_are_exported(self):
    assert set(metrics.DIAGNOSTIC_KEYS) == {"num_invalid_labels", "num_empty_classes", "num_nonfinite_rows",
                                            "num_nonfinite_weights"}
    assert set(metrics.DEGENERACY_KEYS) == {"num_degenerate_means", "num_coincident_means", "num_zero_weight_rows"}
    features, labels, weights, bias = gaussian_classes(100, 6, 4, seed=28)
    got = neural_collapse(features, labels, 4, weights, bias)
    assert set(metrics.DIAGNOSTIC_KEYS + metrics.DEGENERACY_KEYS) <= set(got)


class TestInputKinds:

  @pytest.mark.parametrize("args,match", [
      ((np.zeros((10, 0), np.float32), np.zeros(10, np.int32), 3), "p = 0"),
      ((None, np.zeros(10, np.int32), 3), "features must be an array of shape \\(N, p\\), got None"),
      (("features.npy", np.zeros(10, np.int32), 3), "features must be an array of shape \\(N, p\\), got a str"),
      ((np.zeros((10, 2), np.float32), "labels", 3), "labels must be an array of shape \\(N,\\), got a str"),
      (([["a", "b"]] * 10, np.zeros(10, np.int32), 3), "features must be numbers"),
      (([[1.0, 2.0], [3.0]], np.zeros(2, np.int32), 3), "features must be numbers"),
      ((np.zeros((10, 2), np.float32), np.zeros(10, np.int32), 3, {"w": 1}), "weights must be an array"),
  ])
  def test_bad_kinds_are_one_line_errors(self, args, match):
    with pytest.raises(ValueError, match=match) as error:
      neural_collapse(*args)
    assert "\n" not in str(error.value)

  def test_python_lists_are_accepted(self):
    features, labels, weights, bias = gaussian_classes(60, 4, 3, seed=29)
    want = neural_collapse(features, labels, 3, weights, bias)
    got = neural_collapse(features.tolist(), labels.tolist(), 3, weights.tolist(), bias.tolist())
    jitted = jax.jit(neural_collapse, static_argnums=2)(features.tolist(), labels.tolist(), 3)
    for key in want:
      assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-7), key
    assert float(jitted["nc1"]) == pytest.approx(float(want["nc1"]), rel=1e-6)

  def test_validate_inputs_refuses_p_zero(self):
    with pytest.raises(ValueError, match="p = 0"):
      metrics.validate_inputs(np.zeros((4, 0), np.float32), np.zeros(4, np.int32), 2)


def test_vocabulary_sized_class_counts_trace_without_integer_overflow():
  """C(C-1) overflowed int32 as a Python int from C = 46 342 (GPT-2's vocabulary is 50 257): the suite must
  trace at that C (eval_shape: no arrays are made), and the pair mean stay exact at small C."""
  num_classes = 50_257
  shapes = (jax.ShapeDtypeStruct((512, 16), jnp.float32), jax.ShapeDtypeStruct((512,), jnp.int32),
            jax.ShapeDtypeStruct((num_classes, 16), jnp.float32), jax.ShapeDtypeStruct((num_classes,), jnp.float32))
  out = jax.eval_shape(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b), *shapes)
  assert out["nc1"].shape == () and out["equiangular_means"].dtype == jnp.float32
  matrix = np.random.default_rng(0).normal(size=(7, 7))
  expected = matrix[~np.eye(7, dtype=bool)].mean()
  assert float(geometry.off_diagonal_mean(jnp.asarray(matrix, jnp.float32))) == pytest.approx(expected, rel=1e-6)
