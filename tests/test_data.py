"""nc_jax.data: every offline source, tfds under mock data, preprocessing, device batches."""

import gzip
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax.data import device, idx, preprocess

# Real MNIST IDX files: $NC_JAX_MNIST_DIR, else the workplace's shared copy beside the checkout.
REAL_MNIST = pathlib.Path(os.environ.get("NC_JAX_MNIST_DIR",
                                         pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def write_fake_idx_folder(folder, train=120, test=30, compress=True):
  rng = np.random.default_rng(0)
  suffix = ".gz" if compress else ""
  for split, count in (("train", train), ("test", test)):
    images_name, labels_name = idx.SPLIT_FILES[split]
    idx.write_idx(folder / f"{images_name}{suffix}", rng.integers(0, 256, (count, 28, 28)))
    idx.write_idx(folder / f"{labels_name}{suffix}", np.arange(count) % 10)


class TestIDX:

  @pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
  def test_roundtrip(self, tmp_path, compress):
    array = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    idx.write_idx(path, array)
    np.testing.assert_array_equal(idx.read_idx(path), array)

  def test_truncated_and_corrupt_files_are_named(self, tmp_path):
    path = tmp_path / "images.gz"
    idx.write_idx(path, np.zeros((10, 4, 4), np.uint8))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="images.gz.*truncated or corrupt"):
      idx.read_idx(path)
    path.write_bytes(path.read_bytes()[:20])  # a cut gzip stream
    with pytest.raises(ValueError, match="images.gz"):
      idx.read_idx(path)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
      idx.read_idx(tmp_path / "bad")

  def test_missing_folder_says_how_to_get_the_data(self, tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
      data.load("fashion_mnist", source="idx", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
      data.load("fashion_mnist", source="idx", data_dir=str(tmp_path))

  def test_load_from_written_files_pads_and_standardises(self, tmp_path):
    write_fake_idx_folder(tmp_path)
    dataset = data.load("fashion_mnist", source="idx", data_dir=str(tmp_path), per_class=10)
    assert dataset.train_inputs.shape == (100, 32, 32, 1) and dataset.test_inputs.shape == (30, 32, 32, 1)
    assert np.bincount(dataset.train_labels).tolist() == [10] * 10
    # statistics come from the unpadded images (the notebook's convention); padding is raw 0
    raw = idx.read_idx(tmp_path / "train-images-idx3-ubyte.gz")[dataset.train_indices] / 255.0
    assert float(dataset.mean) == pytest.approx(raw.mean(), rel=1e-6)
    np.testing.assert_allclose(dataset.train_inputs[:, 0, 0, 0], -raw.mean() / raw.std(), rtol=1e-5)

  @pytest.mark.skipif(not idx.DEBIAN_FASHION_MNIST.exists(),
                      reason=f"no Fashion-MNIST in {idx.DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
  def test_real_fashion_mnist(self):
    dataset = data.load("fashion_mnist", source="idx", standardization="none", pad_to=None)
    assert dataset.train_inputs.shape == (60_000, 28, 28, 1) and dataset.test_inputs.shape == (10_000, 28, 28, 1)
    assert np.bincount(dataset.train_labels).tolist() == [6000] * 10
    # the dataset's well-known pixel statistics (Xiao et al. 2017 images scaled to [0, 1])
    assert dataset.train_inputs.mean() == pytest.approx(0.2860, abs=5e-4)
    assert dataset.train_inputs.std() == pytest.approx(0.3530, abs=5e-4)


  @pytest.mark.skipif(not REAL_MNIST.exists(), reason=f"real MNIST IDX files not in {REAL_MNIST}")
  def test_real_mnist(self):
    dataset = data.load("mnist", source="idx", data_dir=str(REAL_MNIST), per_class=None, standardization="none",
                        pad_to=None)
    assert dataset.train_inputs.shape == (60_000, 28, 28, 1) and dataset.test_inputs.shape == (10_000, 28, 28, 1)
    # the published class counts and the notebook's normalisation constants (LeCun et al.)
    assert np.bincount(dataset.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(dataset.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert dataset.train_inputs.mean() == pytest.approx(0.1307, abs=5e-5)
    assert dataset.train_inputs.std() == pytest.approx(0.3081, abs=5e-5)
    paper = data.load("mnist", source="idx", data_dir=str(REAL_MNIST))  # the paper's 5000 per class, padded to 32
    assert paper.train_inputs.shape == (50_000, 32, 32, 1)
    assert np.bincount(paper.train_labels).tolist() == [5000] * 10

  def test_mnist_from_idx_needs_its_folder(self):
    # no system package holds MNIST: without data_dir it must not fall back to Fashion-MNIST's folder
    with pytest.raises(FileNotFoundError, match="data_dir"):
      data.load("mnist", source="idx")


class TestGenerated:

  def test_mnist1d_is_generated_deterministically_and_balanced(self):
    first, second = data.load("mnist1d"), data.load("mnist1d")
    np.testing.assert_array_equal(first.train_inputs, second.train_inputs)
    counts = np.bincount(first.train_labels)
    assert first.input_shape == (40,) and (counts == counts[0]).all()
    assert first.test_inputs.shape == (1000, 40)

  def test_synthetic_any_shape(self):
    dataset = data.load("synthetic", num_classes=7, feature_dim=5, train_per_class=11, test_per_class=3)
    assert dataset.train_inputs.shape == (77, 5) and dataset.test_inputs.shape == (21, 5)
    assert dataset.num_classes == 7


class TestTFDS:

  @pytest.mark.parametrize("name,shape,classes", [
      ("mnist", (32, 32, 1), 10), ("fashion_mnist", (32, 32, 1), 10), ("cifar10", (32, 32, 3), 10),
      ("cifar100", (32, 32, 3), 100), ("svhn_cropped", (32, 32, 3), 10), ("stl10", (96, 96, 3), 10)])
  def test_data_source_under_mock_data(self, name, shape, classes):
    with tfds.testing.mock_data(num_examples=30):
      dataset = data.load(name, per_class=None)
    assert dataset.input_shape == shape and dataset.num_classes == classes
    assert dataset.train_inputs.dtype == np.float32 and dataset.train_labels.dtype == np.int32
    unpadded = dataset.train_inputs[:, 2:-2, 2:-2] if name in ("mnist", "fashion_mnist") else dataset.train_inputs
    assert abs(float(unpadded.mean())) < 1e-4  # training statistics, taken before padding 28 -> 32

  def test_imagenet_says_it_is_not_supported(self):
    with pytest.raises(ValueError, match="imagenet2012.*not supported"):
      data.load("imagenet2012")

  def test_unprepared_dataset_says_how_to_prepare_it(self, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m nc_jax\.prepare cifar10 --data_dir DIR"):
      data.load("cifar10", data_dir=str(tmp_path))


class TestPreprocessing:

  def test_unknown_dataset_lists_choices(self):
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10"):
      data.load("cifar11")

  @pytest.mark.parametrize("name,source,why,choices", [
      ("cifar10", "generated", "only mnist1d and synthetic are generated", "source='tfds'"),
      ("cifar10", "idx", "'idx' reads MNIST-format files (mnist, fashion_mnist) only", "source='tfds'"),
      ("cifar10", "web", "unknown source", "source='tfds'"),
      ("mnist", "generated", "only mnist1d and synthetic are generated", "source='tfds' or 'idx'"),
      ("mnist1d", "web", "unknown source", "source='generated'")])
  def test_a_source_the_dataset_lacks_names_the_sources_it_has(self, name, source, why, choices):
    with pytest.raises(ValueError) as error:
      data.load(name, source=source)
    message = str(error.value)
    assert message.startswith(f"source={source!r} cannot read {name!r}: {why}") and "\n" not in message
    assert message.endswith(f"; for {name} use {choices}")  # never the rejected value as a choice

  def test_generated_datasets_accept_any_known_source(self):
    assert data.load("synthetic", source="tfds", train_per_class=3, test_per_class=2).num_classes == 10

  def test_per_class_larger_than_a_class_is_refused(self):
    with pytest.raises(ValueError, match="per_class=500 is more than some classes hold"):
      data.load("synthetic", train_per_class=20, per_class=500)

  def test_balanced_subset_is_seeded(self):
    labels = np.repeat(np.arange(4), 50)
    same = [preprocess.balanced_subset(labels, 10, 4, seed=3) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(same[0], preprocess.balanced_subset(labels, 10, 4, seed=4))
    assert np.bincount(labels[same[0]]).tolist() == [10] * 4

  @pytest.mark.parametrize("kind", ["global", "channel", "pixel"])
  def test_standardisation_uses_training_statistics(self, kind):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
    mean, std = preprocess.statistics(images / 255.0, kind)
    out = preprocess.standardize(images, mean, std, 1 / 255)
    axes = {"global": None, "channel": (0, 1, 2), "pixel": 0}[kind]
    np.testing.assert_allclose(out.mean(axis=axes), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=axes), 1, atol=1e-4)


class TestDeviceBatches:

  def test_epoch_permutation_depends_only_on_seed_and_epoch(self):
    a, b = device.epoch_permutation(0, 3, 100), device.epoch_permutation(0, 3, 100)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, device.epoch_permutation(0, 4, 100))
    assert sorted(np.asarray(a).tolist()) == list(range(100))

  def test_epoch_batches_are_sharded_over_eight_devices(self):
    mesh = device.data_mesh()
    inputs = device.put_replicated(np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), mesh)
    labels = device.put_replicated(np.arange(100, dtype=np.int32), mesh)
    batches = jax.jit(lambda x, y, e: device.epoch_batches(x, y, 7, e, 16, mesh))(inputs, labels, 2)
    batch_inputs, batch_labels = batches
    assert batch_inputs.shape == (6, 16, 3) and batch_labels.shape == (6, 16)  # last partial batch dropped
    assert len(set(np.asarray(batch_labels).ravel().tolist())) == 96
    np.testing.assert_array_equal(batch_inputs[..., 0], batch_labels.astype(np.float32))
    assert batch_labels.sharding.shard_shape(batch_labels.shape) == (6, 2)

  def test_padded_batches_cover_every_example_once(self):
    indices, mask = device.padded_batches(10, 4)
    assert indices.shape == (3, 4) and mask.sum() == 10
    assert sorted(indices[mask].tolist()) == list(range(10))


@pytest.fixture(scope="module")
def pair():
  """The same synthetic options, in memory and streamed (arrays through ``stream.ArraySource``)."""
  options = dict(per_class=12, seed=3, feature_dim=5, train_per_class=20, random_label_fraction=0.25)
  from nc_jax.data import stream
  return data.load("synthetic", **options), stream.open_dataset("synthetic", batch_size=7, **options)


class TestDatasetInterface:
  """One interface for both kinds: sizes, classes, statistics, ``streamed``, batches in the (seed, epoch) order."""

  def test_both_kinds_satisfy_the_protocol_and_say_their_kind(self, pair):
    memory, streamed = pair
    assert isinstance(memory, data.DatasetProtocol) and isinstance(streamed, data.DatasetProtocol)
    assert (memory.streamed, streamed.streamed) == (False, True)
    for field in ("train_labels", "train_true_labels", "train_indices", "test_labels", "mean", "std"):
      np.testing.assert_array_equal(getattr(memory, field), getattr(streamed, field))
    assert memory.input_shape == streamed.input_shape == (5,) and memory.num_classes == streamed.num_classes == 10
    assert memory.num_examples("train") == streamed.num_examples("train") == 120
    assert memory.num_examples("test") == streamed.num_examples("test") == 500
    with pytest.raises(ValueError, match="split='val': choose 'train' or 'test'"):
      memory.num_examples("val")

  def test_train_batches_are_the_device_batches_of_each_epoch(self, pair):
    memory, streamed = pair
    for epoch in (1, 2):
      on_device = jax.jit(device.epoch_batches, static_argnums=(2, 4))(
          memory.train_inputs, memory.train_labels, 9, epoch, 16)
      batches = list(memory.train_batches(16, 9, epoch))
      assert len(batches) == 120 // 16
      np.testing.assert_array_equal(np.stack([x for x, _ in batches]), on_device[0])
      np.testing.assert_array_equal(np.stack([y for _, y in batches]), on_device[1])
      for (a, b), (c, d) in zip(batches, streamed.train_batches(16, 9, epoch)):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    later = list(memory.train_batches(16, 9, 2, start_step=5))
    assert len(later) == 2 and np.array_equal(later[0][1], batches[5][1])

  def test_eval_batches_cover_every_example_once_in_order(self, pair):
    for dataset in pair:
      parts = list(dataset.eval_batches("test", 64))
      inputs, labels, mask = (np.concatenate(x) for x in zip(*parts))
      assert len(parts) == 8 and mask.sum() == 500 and not mask[500:].any()
      np.testing.assert_array_equal(labels[:500], dataset.test_labels)
      np.testing.assert_array_equal(inputs[500:], np.repeat(inputs[:1], 12, axis=0))  # padded with example 0
    np.testing.assert_allclose(np.concatenate([x for x, _, _ in pair[1].eval_batches("test", 64)])[:500],
                               pair[0].test_inputs, rtol=0, atol=0)


class TestSelection:

  def test_options_value_and_keywords_give_the_same_dataset(self):
    options = data.DataOptions(per_class=8, seed=2, imbalance="step", imbalance_ratio=4.0)
    a = data.load_with("synthetic", options, feature_dim=3, train_per_class=10)
    b = data.load("synthetic", per_class=8, seed=2, imbalance="step", imbalance_ratio=4.0, feature_dim=3,
                  train_per_class=10)
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    assert np.bincount(a.train_labels).tolist() == [8] * 5 + [2] * 5  # step: the last C // 2 keep 8 / 4

  def test_per_class_spelled_as_on_the_command_line(self):
    from nc_jax import schema
    from nc_jax.data import selection
    labels = np.repeat(np.arange(3), 7)
    assert selection.per_class_count("synthetic", labels, 3, "5") == 5
    assert selection.per_class_count("synthetic", labels, 3, "none") is None
    assert selection.per_class_count("synthetic", labels, 3, "paper") == 7  # no paper count: the smallest class
    assert selection.per_class_count("cifar10", labels, 3, "paper") == 5000
    with pytest.raises(schema.ConfigError, match="per_class"):
      selection.per_class_count("synthetic", labels, 3, "lots")

  def test_padding_and_scale_by_stored_shape_and_dtype(self):
    from nc_jax.data import selection
    assert selection.pad_side("auto", (28, 28, 1)) == 32 and selection.pad_side("auto", (32, 32, 3)) is None
    assert selection.pad_side(40, (28, 28, 1)) == 40 and selection.pad_side(40, (40,)) is None
    assert selection.input_scale(np.uint8) == 1 / 255 and selection.input_scale(np.float32) is None
