"""Neural Collapse at vocabulary scale: tiled pair statistics, no C x C array, min_count filtering."""

import jax
import jax.export  # jax 0.7 has jax.export only once it is imported
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.metrics import collapse, filter_classes, geometry, neural_collapse, streaming
from tests import reference
from tests.test_metrics import assert_matches_reference, gaussian_classes

VOCABULARY = 50_257  # GPT-2's: C(C-1) > 2^31


def spread_vectors(num_classes, dim, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(num_classes, dim)), jnp.float32)


def assert_close(got, want, rtol):
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=rtol, atol=0, err_msg=key)


def pair_keys(vectors, **options):
  variances = jnp.linspace(0.5, 2.0, vectors.shape[0], dtype=jnp.float32)
  return jax.jit(lambda v: geometry.pair_geometry(v, variances=variances, coincident_floor_sq=jnp.float32(0.0),
                                                   **options))(vectors)


class TestPairSums:

  @pytest.mark.parametrize("block_rows", [300, 64, 37, 1])
  def test_counts_every_pair_once_with_ragged_tiles(self, block_rows):
    """Integers count unordered pairs c < c', floats sum ordered pairs c != c', over valid classes only."""
    valid = jnp.arange(300) % 3 != 0
    count = lambda gram, a, b, mask: {"n": jnp.sum(mask, dtype=jnp.int32), "x": jnp.sum(jnp.where(mask, 1.0, 0.0))}
    total = geometry.pair_sums(count, jnp.ones((300, 2)), valid=valid, block_rows=block_rows)
    assert int(total["n"]) == 200 * 199 // 2 and float(total["x"]) == 200 * 199

  def test_row_data_and_gram_reach_the_statistic(self):
    """sum_{c != c'} ||v_c - v_c'||^2 = 2 C sum ||v_c||^2 - 2 ||sum v_c||^2, from tiles of G and ||v||^2."""
    vectors = spread_vectors(203, 5)
    distance = lambda gram, a, b, mask: jnp.sum(jnp.where(mask, a[:, None] + b[None, :] - 2.0 * gram, 0.0))
    x = np.asarray(vectors, np.float64)
    want = 2 * 203 * np.sum(x**2) - 2 * np.sum(x.sum(0) ** 2)
    for block_rows in (203, 50):
      assert float(geometry.pair_sums(distance, vectors, block_rows=block_rows)) == pytest.approx(want, rel=1e-5)

  def test_vocabulary_sized_pair_count_fits_int32(self):
    """C(C-1)/2 = 1 262 889 396 unordered pairs at C = 50 257 (C(C-1) would overflow int32)."""
    count = lambda gram, a, b, mask: jnp.sum(mask, dtype=jnp.int32)
    total = jax.jit(lambda v: geometry.pair_sums(count, v, block_rows=8192))(jnp.ones((VOCABULARY, 1)))
    assert int(total) == VOCABULARY * (VOCABULARY - 1) // 2


class TestTiledEqualsDense:

  @pytest.mark.parametrize("num_classes,dim,block_rows", [(300, 16, 64), (300, 400, 37), (2500, 24, 1024)])
  def test_pair_geometry(self, num_classes, dim, block_rows):
    """The tiled sweep (ragged last tile; V^T V or a first sweep for ||G||_F) equals the one dense tile."""
    vectors = spread_vectors(num_classes, dim)
    assert_close(pair_keys(vectors, block_rows=block_rows), pair_keys(vectors, block_rows=num_classes), 1e-5)

  def test_pair_geometry_with_dropped_classes(self):
    vectors = spread_vectors(300, 16, seed=1)
    valid = jnp.arange(300) % 7 != 3
    assert_close(pair_keys(vectors, valid=valid, block_rows=64), pair_keys(vectors, valid=valid, block_rows=300), 1e-5)

  def test_float64_reference_for_the_pairs(self):
    vectors = spread_vectors(300, 16, seed=2)
    x = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(x, axis=1)
    cos = x @ x.T / np.outer(norms, norms)
    off = ~np.eye(300, dtype=bool)
    gram, etf = x @ x.T, np.eye(300) - 1 / 300
    got = pair_keys(vectors, block_rows=64)
    assert float(got["equiangularity"]) == pytest.approx(cos[off].std(ddof=1), rel=1e-5)
    assert float(got["max_angle"]) == pytest.approx(np.abs(cos[off] + 1 / 299).mean(), rel=1e-5)
    etf_deviation = np.linalg.norm(gram / np.linalg.norm(gram) - etf / np.linalg.norm(etf))
    assert float(got["etf_deviation"]) == pytest.approx(etf_deviation, rel=1e-5)
    assert float(got["gnc2"]) == pytest.approx(np.var(-0.5 * np.log(2 - 2 * cos[off]), ddof=1), rel=1e-4)

  def test_simplex_etf_is_still_exact_when_tiled(self):
    etf = jnp.asarray(reference.simplex_etf(300, 320), jnp.float32)
    got = pair_keys(etf, block_rows=64)
    assert float(got["etf_deviation"]) < 1e-5 and float(got["equiangularity"]) < 1e-5
    assert float(got["max_angle"]) < 1e-5

  def test_zero_row_and_nan_are_never_a_finite_direction_statistic(self):
    vectors = spread_vectors(300, 16).at[5].set(0.0)
    for block_rows in (64, 300):
      got = pair_keys(vectors, block_rows=block_rows)
      assert all(np.isnan(float(got[key])) for key in ("equiangularity", "max_angle", "gnc2"))
      assert np.isfinite(float(got["cdnv"]))
      poisoned = pair_keys(vectors.at[7, 3].set(jnp.nan), block_rows=block_rows)
      assert all(np.isnan(float(poisoned[key])) for key in ("equiangularity", "etf_deviation", "gnc2", "cdnv"))

  def test_coincident_means_are_counted_once_per_pair_across_tiles(self):
    vectors = spread_vectors(300, 16).at[250].set(spread_vectors(300, 16)[3]).at[299].set(spread_vectors(300, 16)[3])
    for block_rows in (64, 300):
      assert int(pair_keys(vectors, block_rows=block_rows)["num_coincident"]) == 3


def eight_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))


def _sub_jaxprs(params):
  """The jaxprs in one equation's params (a scan's or shard_map's body, a cond's branches), not recursively.

  Newer jax has it as jax.extend.core.jaxprs_in_params; jax 0.7.1 does not export it.
  """
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _scan_lengths_inside_shard_map(closed_jaxpr):
  """Lengths of the scans (fori_loops with static bounds) inside any shard_map of a closed jaxpr."""
  lengths = []

  def walk(jaxpr, in_shard_map):
    for eqn in jaxpr.eqns:
      here = in_shard_map or eqn.primitive.name == "shard_map"
      if here and eqn.primitive.name == "scan":
        lengths.append(eqn.params["length"])
      for sub in _sub_jaxprs(eqn.params):
        walk(sub, here)

  walk(closed_jaxpr.jaxpr, False)
  return lengths


class TestTilesShardedAcrossDevices:
  """``mesh=``: the tiles i <= j dealt round-robin to 8 (fake CPU) devices, summed by one psum."""

  @pytest.mark.parametrize("block_rows", [64, 37, 7, 299])
  def test_sums_and_counts_equal_the_one_device_sweep(self, block_rows):
    """Ragged last tiles, padding tiles (T not a multiple of 8) and dropped classes: same sums."""
    vectors, valid = spread_vectors(300, 5, seed=3), jnp.arange(300) % 7 != 2
    statistic = lambda gram, a, b, mask: {"n": jnp.sum(mask, dtype=jnp.int32),
                                          "s": jnp.sum(jnp.where(mask, a[:, None] + b[None, :] - 2.0 * gram, 0.0))}
    one = jax.jit(lambda v: geometry.pair_sums(statistic, v, valid=valid, block_rows=block_rows))(vectors)
    shared = jax.jit(lambda v: geometry.pair_sums(statistic, v, valid=valid, block_rows=block_rows,
                                                  mesh=eight_device_mesh()))(vectors)
    kept = int(jnp.sum(valid))
    assert int(shared["n"]) == int(one["n"]) == kept * (kept - 1) // 2
    assert float(shared["s"]) == pytest.approx(float(one["s"]), rel=1e-6)

  def test_each_device_sweeps_its_share_of_the_tiles(self):
    """300 classes in tiles of 37 rows: 9 x 10 / 2 = 45 tiles i <= j, so ceil(45 / 8) = 6 per device."""
    count = lambda gram, a, b, mask: jnp.sum(mask, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(lambda v: geometry.pair_sums(count, v, block_rows=37, mesh=eight_device_mesh()))(
        spread_vectors(300, 5))
    assert _scan_lengths_inside_shard_map(jaxpr) == [6]
    one_device = jax.make_jaxpr(lambda v: geometry.pair_sums(count, v, block_rows=37))(spread_vectors(300, 5))
    assert _scan_lengths_inside_shard_map(one_device) == []

  def test_suite_with_a_pair_mesh_equals_the_suite_without(self):
    """neural_collapse(pair_mesh=...) on features sharded over the 8 devices: every key as on one device."""
    features, labels, weights, bias = gaussian_classes(1200, 24, 300, seed=5)
    mesh = eight_device_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(jnp.asarray(features), rows), jax.device_put(jnp.asarray(labels), rows)
    one = jax.jit(lambda h, y: neural_collapse(h, y, 300, weights, bias, pair_block_rows=64))(*sharded)
    shared = jax.jit(lambda h, y: neural_collapse(h, y, 300, weights, bias, pair_block_rows=64, pair_mesh=mesh))(
        *sharded)
    for key in one:
      np.testing.assert_allclose(float(shared[key]), float(one[key]), rtol=1e-5, err_msg=key)


def mesh_of(kind):
  """The meshes a user may pass as pair_mesh: 2-D (4 x 2), jax.make_mesh's (Explicit axes in this JAX),
  and one over 3 of the 8 devices (28 tiles of 45 rows for C = 300: not a multiple of 3 or of 8)."""
  devices = jax.devices()
  if kind == "2d":
    return jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
  if kind == "make_mesh":
    return jax.make_mesh((4, 2), ("data", "model"))
  return jax.sharding.Mesh(np.array(devices[5:8]), ("data",))


def sum_and_count(gram, a, b, mask):
  return {"n": jnp.sum(mask, dtype=jnp.int32), "s": jnp.sum(jnp.where(mask, a[:, None] + b[None, :] - 2.0 * gram, 0.0))}


def assert_same_keys(got, want, rtol=1e-5):
  """Every key equal to float32 rounding, NaN exactly where ``want`` has NaN, integers exactly."""
  assert set(got) == set(want)
  for key in want:
    if jnp.issubdtype(jnp.asarray(want[key]).dtype, jnp.integer):
      assert int(got[key]) == int(want[key]), key
    else:
      np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=rtol, atol=0, equal_nan=True, err_msg=key)


class TestPairMeshes:
  """Any mesh a user holds shares the tiles and gives the one-device sums: 2-D, Explicit axes, a subset of
  the devices, eagerly, under jit and under jax.set_mesh; a wrong ``mesh`` is one clear error."""

  @pytest.mark.parametrize("kind", ["2d", "make_mesh", "three_devices"])
  def test_any_mesh_eager_jitted_or_set_gives_the_one_device_sums(self, kind):
    """Under jax.set_mesh the shard_map once ran on a flat copy of the mesh and failed (context mesh
    'data' != shard_map's 'pair_tiles'); under an Explicit-axes set_mesh it could close over nothing."""
    mesh, vectors = mesh_of(kind), spread_vectors(300, 5, seed=3)
    one = geometry.pair_sums(sum_and_count, vectors, block_rows=45)
    shared = lambda v: geometry.pair_sums(sum_and_count, v, block_rows=45, mesh=mesh)
    results = [shared(vectors), jax.jit(shared)(vectors)]
    with jax.set_mesh(mesh):
      results += [jax.jit(shared)(vectors), shared(vectors)]
    for got in results:
      assert int(got["n"]) == int(one["n"]) == 300 * 299 // 2
      assert float(got["s"]) == pytest.approx(float(one["s"]), rel=1e-6)

  def test_more_tiles_per_device_than_classes(self):
    """block_rows=1, C = 20: 210 tiles, 27 per device (> C); each pair still counted once."""
    vectors = spread_vectors(20, 3, seed=4)
    one = geometry.pair_sums(sum_and_count, vectors, block_rows=1)
    got = jax.jit(lambda v: geometry.pair_sums(sum_and_count, v, block_rows=1, mesh=eight_device_mesh()))(vectors)
    assert int(got["n"]) == int(one["n"]) == 190 and float(got["s"]) == pytest.approx(float(one["s"]), rel=1e-6)

  def test_nan_and_zero_rows_and_dropped_classes_just_above_the_dense_threshold(self):
    """C = DENSE_MAX_CLASSES + 1: 3 default tiles i <= j, one per device; NaN exactly where the one-device
    sweep has NaN (a zero row: the direction statistics; a NaN entry: CDNV too); dropped classes left out."""
    num_classes = geometry.DENSE_MAX_CLASSES + 1
    vectors, valid = spread_vectors(num_classes, 6, seed=8), jnp.arange(num_classes) % 5 != 1
    variances = jnp.linspace(0.5, 2.0, num_classes, dtype=jnp.float32)
    keys = lambda mesh: jax.jit(lambda v: geometry.pair_geometry(
        v, valid=valid, variances=variances, coincident_floor_sq=jnp.float32(0.0), mesh=mesh))
    one, shared = keys(None), keys(mesh_of("three_devices"))
    for v in (vectors, vectors.at[4].set(0.0), vectors.at[9, 2].set(jnp.nan), vectors.at[12].set(vectors[30])):
      assert_same_keys(shared(v), one(v))
    zero, nan = shared(vectors.at[4].set(0.0)), shared(vectors.at[9, 2].set(jnp.nan))
    assert np.isnan(float(zero["gnc2"])) and np.isfinite(float(zero["cdnv"])) and np.isnan(float(nan["cdnv"]))
    assert int(shared(vectors.at[12].set(vectors[30]))["num_coincident"]) == 1

  def test_suite_on_explicitly_sharded_features_with_min_count(self):
    """Features sharded along N on jax.make_mesh's Explicit axes once failed in pass 1 (segment sums have no
    output type there); with pair_mesh and min_count dropping classes: the suite on plain arrays."""
    features, labels, weights, bias = gaussian_classes(784, 6, 260, seed=9)
    labels = np.where(labels % 13 == 0, 1, labels)  # 20 classes empty: min_count drops them
    mesh = mesh_of("make_mesh")
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "model")))
    sharded = jax.device_put(jnp.asarray(features), rows), jax.device_put(jnp.asarray(labels), rows)
    want = jax.jit(lambda h, y: neural_collapse(h, y, 260, weights, bias, min_count=1))(features, labels)
    got = jax.jit(lambda h, y: neural_collapse(h, y, 260, weights, bias, min_count=1, pair_mesh=mesh))(*sharded)
    assert int(want["num_filtered_classes"]) == 20
    assert_same_keys(got, want)

  @pytest.mark.parametrize("jitted", [False, True])
  def test_streaming_updates_on_explicitly_sharded_batches(self, jitted):
    """update_class_means / update_deviations on a batch sharded along B on jax.make_mesh's Explicit axes
    (segment sums have no output type there): the states of the same batch as plain arrays."""
    features, labels, weights, bias = gaussian_classes(96, 6, 12, seed=4)
    rows = jax.sharding.NamedSharding(mesh_of("make_mesh"), jax.sharding.PartitionSpec(("data", "model")))
    sharded = jax.device_put(jnp.asarray(features), rows), jax.device_put(jnp.asarray(labels), rows)
    wrap = jax.jit if jitted else (lambda f: f)
    means = lambda h, y: streaming.update_class_means(streaming.init_class_means(12, 6), h, y)
    want_means, got_means = wrap(means)(features, labels), wrap(means)(*sharded)
    for want, got in zip(jax.tree_util.tree_leaves(want_means), jax.tree_util.tree_leaves(got_means)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    geometry_ = streaming.finalize_class_means(want_means, jnp.asarray(weights), jnp.asarray(bias))
    deviations = lambda h, y: streaming.update_deviations(streaming.init_deviations(geometry_), geometry_, h, y)
    want_state, got_state = wrap(deviations)(features, labels), wrap(deviations)(*sharded)
    for want, got in zip(jax.tree_util.tree_leaves(want_state), jax.tree_util.tree_leaves(got_state)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("bad", [jax.devices, "data", "abstract"])
  def test_a_mesh_of_the_wrong_type_is_one_type_error(self, bad):
    """Even on the dense path (C = 3), where the mesh would be ignored, and before any pass runs."""
    bad = {jax.devices: jax.devices(), "abstract": eight_device_mesh().abstract_mesh}.get(bad, bad)
    features, labels, _, _ = gaussian_classes(60, 4, 3, seed=1)
    calls = [lambda: geometry.pair_sums(sum_and_count, spread_vectors(3, 2), mesh=bad),
             lambda: geometry.pair_geometry(spread_vectors(3, 2), mesh=bad),
             lambda: neural_collapse(features, labels, 3, pair_mesh=bad),
             lambda: streaming.finalize_collapse(None, None, mesh=bad)]  # the mesh is checked first
    for call in calls:
      with pytest.raises(TypeError, match=r"pair_mesh / mesh must be None or a jax.sharding.Mesh .*got"):
        call()

  def test_inputs_on_other_devices_name_the_fix(self):
    """Eagerly: inputs committed to device 7 and a mesh over all 8, or a mesh other than jax.set_mesh's, are
    one ValueError naming the fix (under jit JAX itself refuses, naming both device sets)."""
    vectors = spread_vectors(300, 5)
    on_seven = jax.device_put(vectors, jax.devices()[7])
    with pytest.raises(ValueError, match=r"spans devices \[0, 1, 2, 3, 4, 5, 6, 7\] but the inputs are committed to "
                                         r"devices \[7\]: pass the mesh the inputs are sharded on"):
      geometry.pair_sums(sum_and_count, on_seven, block_rows=45, mesh=eight_device_mesh())
    with pytest.raises(ValueError, match="incompatible devices"):
      jax.jit(lambda v: geometry.pair_sums(sum_and_count, v, block_rows=45, mesh=eight_device_mesh()))(on_seven)
    with jax.set_mesh(mesh_of("2d")):
      with pytest.raises(ValueError, match=r"has axes \{'data': 8\} but the mesh in use \(set by jax.set_mesh.*"
                                           r"has \{'data': 4, 'model': 2\}: pass that mesh"):
        geometry.pair_sums(sum_and_count, vectors, block_rows=45, mesh=eight_device_mesh())

  @pytest.mark.parametrize("platform", ["tpu", "cuda"])
  def test_exports_for_accelerators_with_the_sweep_in_a_manual_computation(self, platform):
    features = jax.ShapeDtypeStruct((600, 8), jnp.float32)
    labels = jax.ShapeDtypeStruct((600,), jnp.int32)
    suite = jax.jit(lambda h, y: neural_collapse(h, y, 300, pair_block_rows=64, pair_mesh=eight_device_mesh()))
    exported = jax.export.export(suite, platforms=[platform])(features, labels)
    module = exported.mlir_module()
    assert exported.nr_devices == 8 and "sdy.manual_computation" in module and "callback" not in module


class TestSuiteAtLargeC:

  def test_tiled_suite_matches_float64_reference_and_dense_path(self):
    features, labels, weights, bias = gaussian_classes(1200, 12, 300, seed=5)
    suite = lambda block_rows: jax.jit(lambda h, y, w, b: neural_collapse(h, y, 300, w, b, pair_block_rows=block_rows))
    tiled, dense = suite(64)(features, labels, weights, bias), suite(None)(features, labels, weights, bias)
    assert_matches_reference(tiled, reference.reference_metrics(features, labels, 300, weights, bias), rtol=2e-4)
    for key in dense:
      np.testing.assert_allclose(float(tiled[key]), float(dense[key]), rtol=1e-5, err_msg=key)

  def test_no_class_by_class_array_in_pass_two_or_the_tiled_finalisation(self):
    """With C > p and tiles smaller than C, no intermediate has two axes of length C."""
    num_classes, dim = 300, 16
    features, labels, weights, bias = gaussian_classes(600, dim, num_classes, seed=6)
    geometry_ = collapse.class_geometry(features, labels, num_classes, weights, bias)
    assert all(leaf.shape.count(num_classes) <= 1 for leaf in jax.tree_util.tree_leaves(geometry_))

    def shapes(fn, *args):
      found = []
      def walk(jaxpr):
        for eqn in jaxpr.eqns:
          found.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
          for sub in _sub_jaxprs(eqn.params):
            walk(sub)
      walk(jax.make_jaxpr(fn)(*args).jaxpr)
      return found

    state = streaming.init_deviations(geometry_)
    pass_two = shapes(lambda h, y: streaming.update_deviations(state, geometry_, h, y), features[:32], labels[:32])
    state = streaming.update_deviations(state, geometry_, features, labels)
    final = shapes(lambda s: streaming.finalize_collapse(s, geometry_, block_rows=64), state)
    assert pass_two and final
    assert all(shape.count(num_classes) <= 1 for shape in pass_two + final)

  def test_vocabulary_sized_suite_equals_the_filtered_dense_suite(self):
    """C = 50 257 classes, 1000 of them with 3 samples each and 5 with one (min_count=2 drops them):
    the tiled, masked suite equals the dense suite on the explicitly filtered and remapped data."""
    rng = np.random.default_rng(7)
    present = rng.choice(VOCABULARY, 1005, replace=False)
    labels = np.concatenate([np.repeat(present[:1000], 3), present[1000:]]).astype(np.int32)
    means = rng.normal(size=(VOCABULARY, 8)).astype(np.float32)
    features = means[labels] + 0.3 * rng.normal(size=(len(labels), 8)).astype(np.float32)
    weights = rng.normal(size=(VOCABULARY, 8)).astype(np.float32)
    bias = 0.1 * rng.normal(size=VOCABULARY).astype(np.float32)
    got = jax.jit(lambda h, y, w, b: neural_collapse(h, y, VOCABULARY, w, b, min_count=2))(
        features, labels, weights, bias)
    kept_features, kept_labels, kept, kept_weights, kept_bias, counts = filter_classes(
        features, labels, VOCABULARY, weights, bias, min_count=2)
    want = neural_collapse(kept_features, kept_labels, kept, kept_weights, kept_bias)
    assert kept == 1000 and counts == {"num_filtered_classes": VOCABULARY - 1000, "num_filtered_samples": 5}
    assert int(got["num_filtered_classes"]) == VOCABULARY - 1000 and int(got["num_filtered_samples"]) == 5
    for key in want:
      np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=2e-5, atol=1e-7, err_msg=key)


class TestMinCount:

  def data(self):
    features, labels, weights, bias = gaussian_classes(400, 12, 9, seed=3)
    labels = labels.copy()
    labels[labels == 2] = 5  # class 2 empty
    labels[np.flatnonzero(labels == 7)[2:]] = 1  # class 7: two samples
    return features, labels, weights, bias

  def test_default_is_the_papers_strict_rule(self):
    features, labels, weights, bias = self.data()
    got = neural_collapse(features, labels, 9, weights, bias)
    assert int(got["num_empty_classes"]) == 1 and np.isnan(float(got["nc1"]))
    assert "num_filtered_classes" not in got

  @pytest.mark.parametrize("block_rows", [None, 3])
  def test_matches_float64_reference_on_filtered_and_remapped_data(self, block_rows):
    features, labels, weights, bias = self.data()
    got = jax.jit(lambda h, y, w, b: neural_collapse(h, y, 9, w, b, min_count=3, pair_block_rows=block_rows))(
        features, labels, weights, bias)
    kept_features, kept_labels, kept, kept_weights, kept_bias, counts = filter_classes(
        features, labels, 9, weights, bias, min_count=3)
    assert kept == 7 and counts == {"num_filtered_classes": 2, "num_filtered_samples": 2}
    assert int(got["num_filtered_classes"]) == 2 and int(got["num_filtered_samples"]) == 2
    assert int(got["num_empty_classes"]) == 0 and int(got["num_samples"]) == 398
    want = reference.reference_metrics(kept_features, kept_labels, kept, kept_weights, kept_bias)
    assert_matches_reference(got, want, rtol=1e-4)

  def test_divide_nc1_by_classes_uses_the_kept_count(self):
    features, labels, weights, bias = self.data()
    divided = neural_collapse(features, labels, 9, min_count=3)
    undivided = neural_collapse(features, labels, 9, min_count=3, divide_nc1_by_classes=False)
    assert float(undivided["nc1"]) == pytest.approx(7 * float(divided["nc1"]), rel=1e-6)

  def test_streaming_and_held_out_data_use_the_same_kept_classes(self):
    features, labels, weights, bias = self.data()
    means = streaming.update_class_means(streaming.init_class_means(9, 12), features, labels)
    geometry_ = streaming.finalize_class_means(means, weights, bias, min_count=3)
    state = streaming.update_deviations(streaming.init_deviations(geometry_), geometry_, features, labels)
    streamed = streaming.finalize_collapse(state, geometry_)
    in_memory = neural_collapse(features, labels, 9, weights, bias, min_count=3)
    for key in in_memory:
      np.testing.assert_allclose(float(streamed[key]), float(in_memory[key]), rtol=1e-5, err_msg=key)
    held_out = collapse.heldout_collapse(features, labels, geometry_)
    assert int(held_out["num_filtered_samples_test"]) == 2
    assert float(held_out["ncc_accuracy_test"]) == pytest.approx(float(in_memory["ncc_accuracy"]))

  def test_fewer_than_two_kept_classes_poison_every_metric(self):
    features, labels, weights, bias = self.data()
    got = neural_collapse(features, labels, 9, weights, bias, min_count=1000)
    assert int(got["num_filtered_classes"]) == 9
    assert all(np.isnan(float(got[key])) for key in ("nc1", "cdnv", "equiangular_means", "accuracy", "self_duality"))


class TestChunking:

  def test_auto_chunks_bound_the_rows_by_classes_on_every_backend(self):
    assert collapse._chunk_rows(VOCABULARY, "auto") * VOCABULARY * 4 <= collapse.CHUNK_BYTES
    assert collapse._chunking(1000, collapse._chunk_rows(10, "auto")) == (1, 1000)

  def test_prime_sample_count_is_padded_not_one_chunk(self):
    assert collapse._chunking(10_007, 333) == (31, 31 * 323)
    features, labels, weights, bias = gaussian_classes(1009, 8, 7, seed=4)  # 1009 is prime
    one = neural_collapse(features, labels, 7, weights, bias, chunk_rows=None)
    chunked = neural_collapse(features, labels, 7, weights, bias, chunk_rows=100)
    for key in one:
      np.testing.assert_allclose(float(chunked[key]), float(one[key]), rtol=1e-5, err_msg=key)


class TestAdversarialInputs:

  def test_min_count_must_be_a_non_negative_int_everywhere(self):
    features, labels, weights, bias = gaussian_classes(60, 4, 3, seed=1)
    for bad in (-1, 2.5, True, "3"):
      with pytest.raises(ValueError, match="min_count must be None or a non-negative"):
        neural_collapse(features, labels, 3, min_count=bad)
      with pytest.raises(ValueError, match="min_count must be None or a non-negative"):
        filter_classes(features, labels, 3, min_count=bad)
      with pytest.raises(ValueError, match="min_count must be None or a non-negative"):
        collapse.class_geometry(features, labels, 3, min_count=bad)
    with pytest.raises(ValueError, match="has 60 rows but labels have 5|features have 60 rows but labels have 5"):
      filter_classes(features, labels[:5], 3, min_count=2)

  @pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
  def test_pair_geometry_is_scale_free_beyond_float32_squares(self, scale):
    """Raw vectors whose squared norms over- or underflow float32 give the unit-scale angles
    (they once gave cos = 0 at 1e20: max_angle 1/(C-1), equiangularity 0, finite and wrong)."""
    vectors = spread_vectors(300, 16, seed=3)
    vectors = vectors - jnp.mean(vectors, axis=0)
    unit = geometry.pair_geometry(vectors, block_rows=7)
    scaled = geometry.pair_geometry(vectors * scale, block_rows=7)
    for key in ("equiangularity", "max_angle", "etf_deviation", "gnc2"):
      np.testing.assert_allclose(float(scaled[key]), float(unit[key]), rtol=1e-5, err_msg=key)

  @pytest.mark.parametrize("scale", [1e-25, 1e20])
  def test_per_row_geometry_is_scale_free_beyond_float32_squares(self, scale):
    """equinorm, self_duality, unc3 of raw (C, p) arrays: self_duality once read 0.0 at 1e20."""
    means, weights = spread_vectors(10, 6, seed=5), spread_vectors(10, 6, seed=6)
    means = means - jnp.mean(means, axis=0)
    for name, function in (("equinorm", lambda w, m: geometry.equinorm(m)),
                           ("self_duality", geometry.self_duality), ("unc3", geometry.unc3)):
      np.testing.assert_allclose(float(function(weights * scale, means * scale)), float(function(weights, means)),
                                 rtol=1e-5, err_msg=name)

  def test_pair_block_rows_must_be_a_positive_int(self):
    features, labels, weights, bias = gaussian_classes(60, 4, 3, seed=1)
    for bad in (0, -5, 2.5, True, "abc"):
      with pytest.raises(ValueError, match="block_rows must be None or an int >= 1"):
        neural_collapse(features, labels, 3, pair_block_rows=bad)

  def test_raise_if_invalid_names_min_count_leaving_one_class(self):
    features, labels, _, _ = gaussian_classes(60, 4, 3, seed=1)
    labels = np.where(np.arange(60) < 50, 0, labels)  # class 0 has 50+ samples, the others few
    got = neural_collapse(features, labels, 3, min_count=30)
    with pytest.raises(ValueError, match="min_count leaving fewer than 2 classes"):
      collapse.raise_if_invalid(got, allow_degenerate=True)
    collapse.raise_if_invalid(neural_collapse(features, labels, 3, min_count=1))  # nothing dropped: passes
