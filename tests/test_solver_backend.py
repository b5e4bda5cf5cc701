"""solver='auto': the SVD's exact results on CPU, and the accelerator path against a float64 reference.

The default solver picks its factorisation where the program is lowered (``jax.lax.platform_dependent``). On
CPU it is the 'svd' program, bit for bit. On GPU and TPU it factorises the class means by CholeskyQR2 (or eigh
of the Gram matrix with a Rayleigh-Ritz step, or the SVD where neither resolves them);
``accumulators.simulate_accelerator`` traces that path here. Pass 2 is float32 at full precision for every
solver, so the decisions (NCC, the network's) are the SVD path's exactly.
"""

import re

import jax
import jax.export  # jax 0.7 has jax.export only once it is imported
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.metrics import NCOptions, accumulators as acc, engine, neural_collapse

# Relative error of NC1 against float64 allowed for the accelerator path's factorisation (the SVD's accuracy).
TOLERANCE = 2e-5
RATES = ("ncc_accuracy", "ncc_mismatch", "accuracy")


def mixture(num_samples, feature_dim, num_classes, *, condition=None, duplicate=False, offset=2.0, seed=0):
  """Features (N, p) float32 whose class means are exactly ``mu`` (each class's noise has mean 0), labels (N,),
  W (C, p), b (C,). ``condition``: the centred means' singular values spread log-evenly over that ratio;
  ``duplicate``: class 1's mean equals class 0's (M of rank C - 2)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(num_samples) % num_classes
  means = rng.normal(size=(num_classes, feature_dim)) * 3.0
  if condition is not None:
    left, _, right = np.linalg.svd(means - means.mean(0), full_matrices=False)
    rank = min(num_classes - 1, feature_dim)
    means = (left[:, :rank] * np.logspace(1, 1 - np.log10(condition), rank)) @ right[:rank]
  if duplicate:
    means[1] = means[0]
  noise = rng.normal(size=(num_samples, feature_dim))
  for c in range(num_classes):
    noise[labels == c] -= noise[labels == c].mean(0)
  features = (offset + means[labels] + noise).astype(np.float32)
  weights = (means - means.mean(0) + rng.normal(size=means.shape)).astype(np.float32)
  bias = (rng.normal(size=num_classes) * 0.1).astype(np.float32)
  return features, labels.astype(np.int32), weights, bias


def nc1_float64(features, labels, num_classes, rcond=None, kept=None):
  """NC1 = (1/N) sum_i ||S^-1 V^T (h_i - mu_{y_i})||^2 over the ``kept`` classes, in float64 (the SVD of the
  centred means, directions with s_k <= rcond s_max dropped; default max(C', p) float32 eps)."""
  h, y = np.asarray(features, np.float64), np.asarray(labels)
  classes = np.arange(num_classes) if kept is None else np.flatnonzero(kept)
  rows = np.isin(y, classes)
  h, y = h[rows], y[rows]
  means = np.stack([h[y == c].mean(0) for c in classes])
  index = {c: i for i, c in enumerate(classes)}
  deviations = h - means[[index[c] for c in y]]
  centred = means - means.mean(0)
  _, singular, right = np.linalg.svd(centred, full_matrices=False)
  rank = min(len(classes) - 1, h.shape[1])
  singular, right = singular[:rank], right[:rank]
  cutoff = (rcond if rcond is not None else max(centred.shape) * np.finfo(np.float32).eps) * singular[0]
  keep = singular > cutoff
  return float(np.sum((deviations @ (right[keep].T / singular[keep])) ** 2) / len(y))


def suite(features, labels, num_classes, weights=None, bias=None, accelerator=False, **keywords):
  """neural_collapse, jitted afresh: on the accelerator path (simulated) or as lowered here."""
  fn = jax.jit(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b, **keywords))
  if not accelerator:
    return fn(features, labels, weights, bias)
  with acc.simulate_accelerator():
    return fn(features, labels, weights, bias)


def relative(got, want):
  return abs(float(got) - want) / abs(want)


# ----------------------------------------------------------------------------
# CPU: 'auto' is the SVD program.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,keywords", [
    ((600, 32, 6), {}),
    ((900, 8, 30), {}),  # C > 2p: the SVD through M = QR
    ((600, 32, 6), {"global_mean": "samples", "min_count": 2, "ncc_use_bias": False}),
], ids=["C<p", "C>2p", "conventions"])
def test_auto_is_the_svd_bit_for_bit_on_cpu(shape, keywords):
  features, labels, weights, bias = mixture(*shape)
  test_features, test_labels, _, _ = mixture(*shape, seed=1)
  held = {"test_features": test_features, "test_labels": test_labels}
  auto = suite(features, labels, shape[2], weights, bias, **held, **keywords)
  svd = suite(features, labels, shape[2], weights, bias, solver="svd", **held, **keywords)
  assert NCOptions().solver == "auto"
  assert auto.keys() == svd.keys()
  for key in svd:
    np.testing.assert_array_equal(np.asarray(auto[key]), np.asarray(svd[key]), err_msg=key)


def test_auto_streams_bit_for_bit_as_the_svd_on_cpu():
  features, labels, weights, bias = mixture(640, 16, 5)
  apply_fn = lambda params, x: (x @ params.T, x)
  batches = [(features[i:i + 128], labels[i:i + 128], np.ones(128, bool)) for i in range(0, 640, 128)]
  auto = engine.measure(apply_fn, weights, batches, 5, weights=weights, bias=bias)
  svd = engine.measure(apply_fn, weights, batches, 5, weights=weights, bias=bias, options=NCOptions(solver="svd"))
  for key in svd:
    np.testing.assert_array_equal(np.asarray(auto[key]), np.asarray(svd[key]), err_msg=key)


def custom_calls(fn, args, platform):
  """The custom-call targets of ``fn`` lowered for ``platform``, and 'cholesky' for XLA's own Cholesky op (how
  jax < 0.8 lowers it for GPUs; XLA calls cuSOLVER's potrf for it)."""
  text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
  return set(re.findall(r"custom_call @(\w+)", text)) | ({"cholesky"} if "stablehlo.cholesky" in text else set())


def test_each_platform_lowers_its_own_path():
  args = [jax.ShapeDtypeStruct((2000, 64), jnp.float32), jax.ShapeDtypeStruct((2000,), jnp.int32),
          jax.ShapeDtypeStruct((10, 64), jnp.float32), jax.ShapeDtypeStruct((10,), jnp.float32)]
  fn = lambda h, y, w, b: neural_collapse(h, y, 10, w, b)
  cpu = custom_calls(fn, args, "cpu")
  assert {call for call in cpu if "lapack" in call} == {"lapack_sgesdd_ffi"}  # the SVD, and nothing else
  cuda = custom_calls(fn, args, "cuda")
  # CholeskyQR2, then eigh + Rayleigh-Ritz, then the SVD: three branches of lax.cond, one runs
  assert {"cusolver_potrf_ffi", "cholesky"} & cuda and "cusolver_syevd_ffi" in cuda
  assert not any("lapack" in call for call in cuda)
  assert not any("lapack" in call for call in custom_calls(fn, args, "tpu"))


# ----------------------------------------------------------------------------
# The accelerator path against float64.
# ----------------------------------------------------------------------------

CASES = {  # name: ((N, p, C), mixture keywords, suite keywords)
    "well conditioned, C < p": ((2000, 64, 10), {}, {}),
    "well conditioned, C = 100": ((4000, 128, 100), {}, {}),
    "C > p": ((6000, 64, 300), {}, {}),
    "condition 30": ((2000, 64, 10), {"condition": 30}, {}),
    "condition 300": ((2000, 64, 10), {"condition": 300}, {}),
    "condition 100, C = 50": ((4000, 128, 50), {"condition": 100}, {}),
    "condition 3000 (beyond the Gram matrix: the SVD)": ((2000, 64, 10), {"condition": 3000}, {}),
    "duplicate classes (rank C - 2)": ((2000, 64, 10), {"duplicate": True}, {}),
    "sample mean (rank C - 1 of C)": ((2000, 64, 10), {}, {"global_mean": "samples"}),
    "rcond given": ((2000, 64, 10), {}, {"rcond": 1e-3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_accelerator_path_matches_float64(name):
  shape, data, keywords = CASES[name]
  features, labels, weights, bias = mixture(*shape, **data)
  num_classes = shape[2]
  got = suite(features, labels, num_classes, weights, bias, accelerator=True, **keywords)
  cpu = suite(features, labels, num_classes, weights, bias, **keywords)
  if keywords.get("global_mean") == "samples":  # the reference centres at the class means
    want = float(cpu["nc1"])
    assert relative(cpu["nc1"], nc1_float64(features, labels, num_classes)) < 1e-2
  else:
    want = nc1_float64(features, labels, num_classes, rcond=keywords.get("rcond"))
  # float32 itself resolves NC1 to ~eps cond(M) (the SVD on CPU: 4e-4 at condition 3000)
  floor = max(TOLERANCE, 10 * np.finfo(np.float32).eps * data.get("condition", 1))
  assert relative(cpu["nc1"], want) < floor
  assert relative(got["nc1"], want) < floor, (float(got["nc1"]), want)
  for key in RATES:  # pass 2's decisions do not depend on the factorisation
    assert float(got[key]) == float(cpu[key]), key
  for key in ("nc1_tirer", "cdnv", "equinorm_means", "self_duality"):  # not from the factorisation
    np.testing.assert_allclose(float(got[key]), float(cpu[key]), rtol=1e-5, err_msg=key)


def test_dropped_classes_match_float64():
  features, labels, weights, bias = mixture(2000, 64, 10)
  labels = np.where(labels == 3, 4, labels).astype(np.int32)  # class 3 empty: dropped by min_count
  kept = np.arange(10) != 3
  got = suite(features, labels, 10, weights, bias, accelerator=True, min_count=1)
  assert int(got["num_filtered_classes"]) == 1
  assert relative(got["nc1"], nc1_float64(features, labels, 10, kept=kept)) < TOLERANCE


def test_collapsed_features_give_zero_nc1_and_exact_decisions():
  rng = np.random.default_rng(7)
  means = rng.normal(size=(8, 32)) * 4 + 100.0  # a large common offset
  labels = np.repeat(np.arange(8), 25).astype(np.int32)
  weights = (means - means.mean(0)).astype(np.float32)
  bias = -(weights @ means.mean(0)).astype(np.float32)
  got = suite(means[labels].astype(np.float32), labels, 8, weights, bias, accelerator=True)
  assert float(got["nc1"]) < 1e-10
  assert float(got["ncc_accuracy"]) == float(got["accuracy"]) == 1.0 and float(got["ncc_mismatch"]) == 0.0


@pytest.mark.parametrize("case", ["a row 1e12 x the rest", "one class mean 1000 x the rest"])
def test_ill_scaled_inputs_decide_as_the_svd_path(case):
  """Found by review of an earlier accelerator path (TF32 candidates re-scored in float32): there a row far
  larger than the rest, or one class mean far from the others, changed accuracy (1.0 -> 0.20) and the NCC
  decisions (ncc_accuracy 1.0 -> 0.51). Pass 2 is now float32 for every solver: the same decisions."""
  if case.startswith("a row"):
    num_classes = 5
    features, labels, weights, bias = mixture(600, 16, num_classes)
    features[11] *= np.float32(1e12)
  else:
    num_classes = 10
    features, labels, weights, bias = mixture(3000, 32, num_classes)
    features[labels == 0] += np.float32(999.0) * features[labels == 0].mean(0)
  got = suite(features, labels, num_classes, weights, bias, accelerator=True)
  cpu = suite(features, labels, num_classes, weights, bias, solver="svd")
  for key in RATES:
    assert float(got[key]) == float(cpu[key]), key
  assert relative(got["nc1"], float(cpu["nc1"])) < 1e-4


# ----------------------------------------------------------------------------
# The factorisation's paths.
# ----------------------------------------------------------------------------


def pseudo_inverse_factor(result):
  _, feature_basis, inverse_sq = result
  return np.asarray(feature_basis, np.float64) * np.sqrt(np.asarray(inverse_sq, np.float64))


@pytest.mark.parametrize("num_classes,feature_dim", [(10, 64), (40, 8)])
def test_cholesky_path_factors_the_pseudo_inverse(num_classes, feature_dim):
  rng = np.random.default_rng(2)
  centred = rng.normal(size=(num_classes, feature_dim))
  centred -= centred.mean(0)
  rank = min(num_classes - 1, feature_dim)
  factor = pseudo_inverse_factor(acc._factorise_accelerated(jnp.asarray(centred, jnp.float32), rank, None,
                                                             deflate=True, cholesky=True))
  want = np.linalg.pinv(centred.T @ centred, rcond=1e-10, hermitian=True)
  np.testing.assert_allclose(factor @ factor.T, want, atol=1e-5 * np.abs(want).max())


def test_cholesky_qr2_refuses_dependent_columns():
  rng = np.random.default_rng(4)
  tall = rng.normal(size=(64, 9)).astype(np.float32)
  assert bool(acc._cholesky_qr2(jnp.asarray(tall))[2])
  tall[:, 1] = tall[:, 0]
  assert not bool(acc._cholesky_qr2(jnp.asarray(tall))[2])


def test_gram_path_says_when_it_cannot_resolve_the_means():
  rng = np.random.default_rng(5)
  left, _, right = np.linalg.svd(rng.normal(size=(10, 64)), full_matrices=False)
  for condition, complete in ((100.0, True), (3000.0, False)):
    singular = np.append(np.logspace(0, -np.log10(condition), 9), 0.0)  # rank 9: the class-mean null direction
    centred = jnp.asarray((left * singular) @ right, jnp.float32)
    _, resolved = acc._factorise_gram_refined(centred, 9, None, deflate=True)
    assert bool(resolved) == complete, condition


def test_simulation_is_scoped():
  with acc.simulate_accelerator():
    assert acc._SIMULATING
  assert not acc._SIMULATING


def test_float64_on_the_accelerator_path():
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:
    from jax.experimental import enable_x64  # jax < 0.7
  features, labels, weights, bias = mixture(1000, 32, 8)
  with enable_x64(True):
    features = features.astype(np.float64)
    got = suite(features, labels, 8, weights.astype(np.float64), bias.astype(np.float64), accelerator=True)
    cpu = suite(features, labels, 8, weights.astype(np.float64), bias.astype(np.float64))
    assert got["nc1"].dtype == np.float64
  assert relative(got["nc1"], nc1_float64(features, labels, 8)) < 1e-9  # float64 throughout
  for key in RATES:
    assert float(got[key]) == float(cpu[key]), key
