"""nc_jax.data.stream: streamed batches are the in-memory path's batches, read shard by shard, resumable.

The real-file fixture is a tfds dataset prepared offline by tfds's own builder into ArrayRecord files (what
`tfds build NAME --file_format=array_record` writes): 3000 + 1000 PNG-encoded 12x12x3 images in 100 classes,
read back through ``tfds.data_source``. Images are encoded with PIL (tfds would need TensorFlow to encode).
"""

import os
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from nc_jax import data
from nc_jax.data import device, preprocess, stream

FIXTURE = "nc_stream_fixture"
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SIDE = 100, 30, 10, 12


class NcStreamFixture(tfds.core.GeneratorBasedBuilder):
  """Class-dependent colour plus noise, so per-channel and per-pixel statistics differ."""

  VERSION = tfds.core.Version("1.0.0")
  __module__ = "nc_stream_fixture"  # one-part module name: tfds skips a code-path lookup needing importlib_resources

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(SIDE, SIDE, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=CLASSES)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(TRAIN_PER_CLASS, 0), "test": self._generate_examples(TEST_PER_CLASS, 1)}

  def _generate_examples(self, per_class, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(CLASSES), per_class))
    base = np.random.default_rng(7).integers(0, 200, (CLASSES, 1, 1, 3))
    for i, label in enumerate(labels):
      image = np.clip(base[label] + rng.integers(0, 56, (SIDE, SIDE, 3)) + np.arange(SIDE)[:, None, None], 0, 255)
      yield i, {"image": stream.encode_image(image.astype(np.uint8)), "label": int(label)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  NcStreamFixture(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return str(directory)


@pytest.fixture(scope="module")
def fixture_data(data_dir):
  return stream.open_dataset(FIXTURE, data_dir=data_dir, per_class=20, standardization="channel", seed=5)


def _in_memory(source, per_class, kind, seed, pad_to=None):
  """The in-memory path's steps (nc_jax.data.load) on arrays read whole from a source."""
  images, labels = (np.stack(x) for x in zip(*source.read(range(len(source)))))
  indices = preprocess.training_subset(labels, CLASSES, per_class, seed)
  inputs = images[indices]
  mean, std = preprocess.statistics(inputs / 255.0, kind)
  return preprocess.standardize(inputs, mean, std, 1 / 255.0), labels[indices].astype(np.int32), indices


# ----------------------------------------------------------------- (a) real ArrayRecord files
def test_reads_array_record_files_through_tfds_data_source(data_dir, fixture_data):
  source = stream.TfdsSource(FIXTURE, "train", data_dir)
  assert len(source) == CLASSES * TRAIN_PER_CLASS
  image, label = source.read([17])[0]
  assert image.shape == (SIDE, SIDE, 3) and image.dtype == np.uint8 and 0 <= label < CLASSES
  assert np.bincount(fixture_data.train_labels, minlength=CLASSES).tolist() == [20] * CLASSES
  assert fixture_data.input_shape == (SIDE, SIDE, 3) and fixture_data.mean.shape == (3,)
  assert len(fixture_data.test_labels) == CLASSES * TEST_PER_CLASS
  cached = list(pathlib.Path(data_dir).glob(f"{FIXTURE}/1.0.0/nc_jax-labels-train-*.npy"))
  assert len(cached) == 1 and np.array_equal(np.load(cached[0]), source.labels())  # one label pass per dataset



def test_a_damaged_edited_or_stale_label_cache_is_rebuilt_with_a_warning(data_dir, tmp_path):
  """The label cache is trusted only when its labels match the digest in its name and its stem matches the
  files: an edited one (same length: the trainer would use wrong labels), a truncated one (np.load's EOF error
  before) and one of files since rebuilt are each named in one warning, removed and rebuilt."""
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  folder = copy / FIXTURE / "1.0.0"
  source = stream.TfdsSource(FIXTURE, "train", str(copy))
  truth = np.asarray([label for _, label in source.read(range(len(source)))], np.int32)  # from the records

  def labels_now():
    warnings = []
    labels = stream.TfdsSource(FIXTURE, "train", str(copy)).labels(warn=warnings.append)
    caches = sorted(folder.glob("nc_jax-labels-train-*.npy"))
    return labels, warnings, caches

  labels, warnings, [cache] = labels_now()
  assert np.array_equal(labels, truth)
  np.save(cache, (truth + 1) % CLASSES)  # edited in place: same length and dtype
  labels, warnings, [rebuilt] = labels_now()
  assert np.array_equal(labels, truth) and np.array_equal(np.load(rebuilt), truth)
  assert len(warnings) == 1 and str(cache) in warnings[0] and "edited" in warnings[0], warnings
  rebuilt.write_bytes(rebuilt.read_bytes()[:90])  # truncated inside the header
  labels, warnings, [cache] = labels_now()
  assert np.array_equal(labels, truth) and len(warnings) == 1 and "unreadable" in warnings[0], warnings
  record_file = next(folder.glob(f"{FIXTURE}-train.array_record-*"))
  os.utime(record_file, ns=(1, 1))  # the dataset's files changed: the cache is of older files
  labels, warnings, [fresh] = labels_now()
  assert np.array_equal(labels, truth) and fresh != cache and "out of date" in warnings[0], warnings
  assert labels_now()[1] == [], "a whole cache of these files is used without a word"

def test_statistics_equal_the_in_memory_ones(data_dir, fixture_data):
  source = stream.TfdsSource(FIXTURE, "train", data_dir)
  for kind in ("global", "channel", "pixel"):
    streamed = stream.open_dataset(FIXTURE, data_dir=data_dir, per_class=20, standardization=kind, seed=5,
                                   batch_size=97)
    images = np.stack([image for image, _ in source.read(streamed.train_indices)])
    mean, std = preprocess.statistics(images / 255.0, kind)
    np.testing.assert_array_equal(streamed.mean, mean.astype(np.float32))
    np.testing.assert_array_equal(streamed.std, std.astype(np.float32))


def test_exact_sums_do_not_depend_on_batching():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  whole, pieces = stream.Moments("pixel"), stream.Moments("pixel")
  whole.update(images)
  for start in (0, 7, 30):
    part = stream.Moments("pixel")
    part.update(images[start:{0: 7, 7: 30, 30: 50}[start]])
    pieces.merge(part)
  for a, b in zip(whole.finalize(), pieces.finalize()):
    np.testing.assert_array_equal(a, b)
  mean, std = preprocess.statistics(images / 255.0, "pixel")
  np.testing.assert_allclose(whole.finalize()[0], mean, rtol=1e-14)
  np.testing.assert_allclose(whole.finalize()[1], std, rtol=1e-12)


# --------------------------------------------------- (c) streamed batches == in-memory batches
@pytest.mark.parametrize("name,kind", [("cifar10", "global"), ("cifar10", "pixel"), ("mnist", "channel")])
def test_streamed_batches_equal_in_memory_batches_under_mock_data(name, kind):
  with tfds.testing.mock_data(num_examples=80):
    memory = data.load(name, per_class=3, standardization=kind, seed=2)
    streamed = stream.open_dataset(name, per_class=3, standardization=kind, seed=2, batch_size=7)
    np.testing.assert_array_equal(streamed.train_indices, memory.train_indices)
    assert streamed.input_shape == memory.input_shape  # mnist: padded 28 -> 32
    train = stream.TrainStream(streamed, batch_size=8, seed=11)
    inputs, labels = device.epoch_batches(memory.train_inputs, memory.train_labels, 11, 3, 8)
    got = list(train.epoch(3))
  assert len(got) == train.steps_per_epoch == inputs.shape[0]
  for step, (x, y) in enumerate(got):
    np.testing.assert_array_equal(x, np.asarray(inputs[step]))
    np.testing.assert_array_equal(y, np.asarray(labels[step]))


def test_streamed_batches_equal_in_memory_batches_on_array_record_files(data_dir, fixture_data):
  inputs, labels, indices = _in_memory(stream.TfdsSource(FIXTURE, "train", data_dir), 20, "channel", 5)
  np.testing.assert_array_equal(fixture_data.train_indices, indices)
  expected = device.epoch_batches(inputs, labels, 4, 2, 64)
  train = stream.TrainStream(fixture_data, batch_size=64, seed=4, epoch=2)
  for step in range(3):
    x, y = next(train)
    np.testing.assert_array_equal(x, np.asarray(expected[0][step]))
    np.testing.assert_array_equal(y, np.asarray(expected[1][step]))


def test_mesh_batches_are_sharded_global_arrays(fixture_data):
  mesh = device.data_mesh()
  train = stream.TrainStream(fixture_data, batch_size=64, seed=4, mesh=mesh)
  plain = stream.TrainStream(fixture_data, batch_size=64, seed=4)
  (x, y), (expected_x, expected_y) = next(train), next(plain)
  assert x.sharding == device.batch_sharding(mesh) and x.shape == (64, SIDE, SIDE, 3)
  np.testing.assert_array_equal(np.asarray(x), expected_x)
  np.testing.assert_array_equal(np.asarray(y), expected_y)


def test_worker_processes_give_the_same_batches(fixture_data):
  inline = stream.TrainStream(fixture_data, batch_size=64, seed=4, epoch=2)
  workers = stream.TrainStream(fixture_data, batch_size=64, seed=4, epoch=2, worker_count=2)
  for (x, y), (wx, wy) in zip(list(inline.epoch(2)), list(workers.epoch(2))):
    np.testing.assert_array_equal(x, wx)
    np.testing.assert_array_equal(y, wy)


# ------------------------------------------------------------------------ (d) sharding
@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_its_rows_and_their_union_is_the_global_batch(fixture_data, process_count):
  single = list(stream.TrainStream(fixture_data, batch_size=64, seed=9, process_index=0, process_count=1)
                .local_batches(1))
  parts = [list(stream.TrainStream(fixture_data, batch_size=64, seed=9, process_index=p,
                                   process_count=process_count).local_batches(1)) for p in range(process_count)]
  for step, (x, y) in enumerate(single):
    local = 64 // process_count
    for p in range(process_count):
      assert parts[p][step][0].shape[0] == local
      np.testing.assert_array_equal(parts[p][step][0], x[p * local:(p + 1) * local])
    np.testing.assert_array_equal(np.concatenate([parts[p][step][1] for p in range(process_count)]), y)


def test_a_process_reads_only_its_rows(fixture_data):
  read = []

  class Spy:
    def __init__(self, inner):
      self.inner = inner

    def read(self, indices):
      read.extend(int(i) for i in indices)
      return self.inner.read(indices)

  spied = fixture_data.__class__(**{**fixture_data.__dict__, "train_source": Spy(fixture_data.train_source)})
  train = stream.TrainStream(spied, batch_size=64, seed=9, process_index=1, process_count=2)
  next(train)
  positions = train.order(1)[0, 32:]
  assert read == fixture_data.train_indices[positions].tolist()


# ------------------------------------------------------------------ (e) resumable state
def test_iterator_state_round_trips_mid_epoch_and_across_epochs(fixture_data):
  train = stream.TrainStream(fixture_data, batch_size=256, seed=1)  # 2000 examples: 7 steps per epoch
  for _ in range(5):
    next(train)
  state = train.get_state()
  assert state == {"epoch": 1, "step": 5}
  expected = [next(train) for _ in range(4)]  # steps 5, 6 of epoch 1, then 0, 1 of epoch 2
  assert train.get_state() == {"epoch": 2, "step": 2}
  resumed = stream.TrainStream(fixture_data, batch_size=256, seed=1)
  resumed.set_state(state)
  for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(4))):
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


# ---------------------------------------------------------------- (b) ImageNet, mock data
def test_imagenet_mock_data_is_resized_and_centre_cropped_to_224():
  with tfds.testing.mock_data(num_examples=12):
    imagenet = stream.open_dataset("imagenet2012", per_class=None)
    x, y = next(stream.TrainStream(imagenet, batch_size=4, seed=0))
  assert imagenet.input_shape == (224, 224, 3) and imagenet.num_classes == 1000
  assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32
  assert np.isfinite(x).all() and abs(float(imagenet.mean)) < 1 and float(imagenet.std) > 0


def test_resize_shorter_side_to_256_then_centre_crop():
  from PIL import Image
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  out = stream.resize_and_crop(image, 256, 224)
  resized = np.asarray(Image.fromarray(image).resize((341, 256), Image.BILINEAR))  # torchvision Resize(256)
  np.testing.assert_array_equal(out, resized[16:240, 58:282])
  assert stream.resize_and_crop(image[:, :, :1], 256, 224).shape == (224, 224, 3)


# -------------------------------------------------------------------- (f) bad input
def test_a_label_cache_that_cannot_be_written_is_no_error_and_a_written_one_leaves_no_temporary(data_dir, tmp_path,
                                                                                                 monkeypatch):
  """The cache is written by ``files.write_atomically``: a full disk (or a read-only folder) means no cache, not a
  failed run, and nothing is left behind; a written cache is whole and the only new file."""
  import errno

  from nc_jax import files
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  folder = copy / FIXTURE / "1.0.0"
  for cache in folder.glob("nc_jax-labels-*"):
    cache.unlink()
  before = sorted(p.name for p in folder.iterdir())
  truth = stream.TfdsSource(FIXTURE, "train", str(copy)).read(range(CLASSES * TRAIN_PER_CLASS))
  truth = np.asarray([label for _, label in truth], np.int32)

  def full(path, payload):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))

  warnings = []
  with monkeypatch.context() as patch:
    patch.setattr(files, "write_atomically", full)
    labels = stream.TfdsSource(FIXTURE, "train", str(copy)).labels(warn=warnings.append)
  assert np.array_equal(labels, truth) and not warnings and sorted(p.name for p in folder.iterdir()) == before
  labels = stream.TfdsSource(FIXTURE, "train", str(copy)).labels(warn=warnings.append)
  [added] = sorted(set(p.name for p in folder.iterdir()) - set(before))
  assert added.startswith("nc_jax-labels-train-") and np.array_equal(np.load(folder / added), truth)
  assert np.array_equal(labels, truth) and not warnings


def test_unprepared_dataset_says_how_to_build_it_and_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --file_format=array_record.*manual_dir"):
    stream.open_dataset("imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    stream.TfdsSource("cifar10", "train", str(tmp_path))


def test_corrupt_record_names_the_file_and_the_index(data_dir, tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  path = next(pathlib.Path(copy).glob(f"{FIXTURE}/1.0.0/{FIXTURE}-train.array_record-*"))
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 3:len(raw) // 3 + 4000] = b"\xff" * 4000
  path.write_bytes(bytes(raw))
  source = stream.TfdsSource(FIXTURE, "train", str(copy))
  with pytest.raises(stream.StreamError, match=rf"corrupt record in {path}, record \d+"):
    for start in range(0, len(source), 500):
      source.read(range(start, start + 500))


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_files_name_the_folder_and_the_command_that_rebuilds_it(data_dir, tmp_path, monkeypatch, damage):
  # Both readers (streamed and in-memory): ArrayRecord's own RuntimeError names neither the folder nor the fix.
  from nc_jax.data import sources
  monkeypatch.setitem(sources.TFDS_DATASETS, FIXTURE, (CLASSES, "test"))  # as one of nc_jax.prepare's sets
  copy = tmp_path / "tfds copy"  # a space: the printed command must quote it
  shutil.copytree(data_dir, copy)
  folder = copy / FIXTURE / "1.0.0"
  split = "train" if damage == "truncated" else "test"
  shard = next(folder.glob(f"{FIXTURE}-{split}.array_record-*"))
  if damage == "truncated":
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  else:
    shard.unlink()
  fix = f"python -m nc_jax.prepare {FIXTURE} --data_dir '{copy}'"
  source = stream.TfdsSource(FIXTURE, split, str(copy))
  with pytest.raises(stream.StreamError) as streamed:
    source.labels()
  with pytest.raises(sources.DamagedDataset) as in_memory:
    sources.from_tfds(FIXTURE, str(copy))
  for error in (streamed.value, in_memory.value):
    message = str(error)
    assert "\n" not in message and f"{folder} is damaged" in message and fix in message, message


def test_batch_the_processes_cannot_split_is_refused():
  with pytest.raises(stream.StreamError, match="batch_size 130 cannot be split over 4 processes.*128 or 132"):
    stream.process_rows(130, 0, 4)


# ------------------------------------------------------------- training from the stream
def _smoke(name, **overrides):
  import importlib.util
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "paper" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.update(overrides)
  return config


def _records(workdir):
  import json
  return [{k: v for k, v in json.loads(line).items() if k not in ("wall_time", "images_per_sec")}
          for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_streamed_training_equals_in_memory_training(tmp_path):
  from nc_jax.training import checkpoints, train_and_evaluate
  runs = {}
  for pipeline in ("memory", "stream"):
    config = _smoke("cifar10_resnet18", model="cnn", input_pipeline=pipeline, epoch_loop="steps", per_class="5",
                    deepfool_samples=2)
    config.model_options = {"channels": (4, 8, 8), "width": 16, "fixed_etf": False, "head_bias": True}
    with tfds.testing.mock_data(num_examples=100):
      train_and_evaluate(config, str(tmp_path / pipeline), log=lambda *a, **k: None)
    runs[pipeline] = _records(tmp_path / pipeline)
  assert [r["epoch"] for r in runs["stream"]] == [1, 2]
  for streamed, memory in zip(runs["stream"], runs["memory"]):
    assert set(streamed) == set(memory)
    # training: the same batches through the same jitted step, bit for bit
    assert [streamed[k] for k in ("step", "epoch_loss", "epoch_acc")] == [memory[k] for k in ("step", "epoch_loss",
                                                                                                 "epoch_acc")]
    # evaluation: two streamed passes with the metrics' accumulators against the whole-set computation
    for key, value in memory.items():
      np.testing.assert_allclose(streamed[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
  ckpt = checkpoints.Checkpoints(tmp_path / "stream" / "checkpoints", read_only=True)
  try:  # the iterator's position is saved with the state: after epoch 2, the start of epoch 3
    meta = ckpt.manager.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    ckpt.close()
  assert meta["input_state"] == {"epoch": 3, "step": 0}
  # resume: without the epoch-2 checkpoint the rerun goes on from epoch 1's, its input state (2, 0) included
  shutil.rmtree(tmp_path / "stream" / "checkpoints" / "2")
  with tfds.testing.mock_data(num_examples=100):
    train_and_evaluate(config, str(tmp_path / "stream"), log=lambda *a, **k: None)
  assert _records(tmp_path / "stream") == runs["stream"]


def test_auto_streams_what_would_not_fit_on_a_device():
  h200 = 141 * 2**30
  assert stream.choose_pipeline("auto", "imagenet2012", "paper", memory_bytes=h200) == "stream"  # 391 GB
  assert stream.choose_pipeline("auto", "cifar10", "paper", memory_bytes=h200) == "memory"  # 737 MB
  assert stream.choose_pipeline("auto", "cifar10", "paper", memory_bytes=2 * 2**30) == "stream"
  assert stream.choose_pipeline("auto", "mnist1d", "paper") == "memory"
  assert stream.choose_pipeline("stream", "mnist1d", None) == "stream"


def test_schema_checks_the_input_keys():
  from nc_jax import schema
  config = _smoke("cifar10_resnet18", input_pipeline="disk")
  with pytest.raises(schema.ConfigError, match="config.input_pipeline = 'disk'.*auto"):
    schema.validate(config)
  with pytest.raises(schema.ConfigError, match="config.input_workers = -1"):
    schema.validate(_smoke("cifar10_resnet18", input_workers=-1))


# ------------------------------------------------- the three ImageNet cells on a real imagenet2012 dataset
IMAGENET_TRAIN, IMAGENET_VALIDATION = 1000, 200  # one JPEG per class; a validation split of 200


class Imagenet2012Fixture(tfds.builder_cls("imagenet2012"), skip_registration=True):
  """tfds's own imagenet2012 builder (its name, version and features: JPEG 'image', 1000-class 'label',
  'file_name'), its examples generated here instead of read from the ILSVRC tars, so tfds.data_source finds
  the files as it would a real build. Images of 30..70 px per side, landscape and portrait, through the resize
  to 256 and the 224 centre crop."""

  name = "imagenet2012"
  __module__ = "imagenet2012_fixture"  # one-part module name, as NcStreamFixture's

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(np.arange(1000), 0),
            "validation": self._generate_examples(np.random.default_rng(1).integers(0, 1000, IMAGENET_VALIDATION), 1)}

  def _generate_examples(self, labels, seed):
    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
      height, width = int(rng.integers(30, 51)), int(rng.integers(40, 71))
      shape = (height, width, 3) if i % 2 else (width, height, 3)
      image = np.clip(rng.integers(0, 96, shape) + (label * np.array([7, 13, 29])) % 160, 0, 255).astype(np.uint8)
      yield i, {"image": stream.encode_image(image, "JPEG"), "label": int(label),
                "file_name": f"n{label:08d}_{i}.JPEG"}


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("imagenet")
  Imagenet2012Fixture(data_dir=str(directory), file_format="array_record").download_and_prepare()
  return str(directory)


def test_imagenet_fixture_is_read_as_imagenet2012(imagenet_dir):
  source = stream.TfdsSource("imagenet2012", "train", imagenet_dir)
  assert len(source) == IMAGENET_TRAIN
  assert len(stream.TfdsSource("imagenet2012", "validation", imagenet_dir)) == IMAGENET_VALIDATION
  assert sorted(source.labels().tolist()) == list(range(1000))
  images = [image for image, _ in source.read(range(4))]  # JPEG records, decoded by tfds with PIL
  assert {image.shape[:2] for image in images} != {images[0].shape[:2]} and all(i.dtype == np.uint8 for i in images)
  assert all(30 <= min(i.shape[:2]) and max(i.shape[:2]) <= 70 for i in images)


def _cut_down(net, config):
  """Each cell's smoke model with its ImageNet stem, head and 224 px input, cut to CPU seconds per epoch."""
  if net == "resnet152":
    config.model_options.stage_sizes = (1, 1, 1, 1)
  elif net == "vgg19":
    assert config.model_options.stem == "imagenet" and config.model_options.width_multiplier == 1 / 16
    # one conv per stage (VGG19 has 2, 2, 4, 4, 4): the five stages and pools keep the 7x7 map the imagenet
    # classifier pools to; the two 224 px convs took half the epoch (~30 s of a ~70 s test, busy CPU)
    config.model_options.config = (64, "M", 128, "M", 256, "M", 512, "M", 512, "M")
  elif net == "densenet201":
    assert config.model_options.stem == "imagenet" and config.model_options.block_sizes == (1, 1, 1, 1)
    config.model_options.init_features = 8  # the 7x7/2 stem at 8 channels, not 64 (64: ~70 s a test, 8: ~30 s)
  return config


@pytest.mark.parametrize("net", ["resnet152", "vgg19", "densenet201"])
def test_imagenet_cell_trains_from_the_fixture_dataset_by_streaming(imagenet_dir, tmp_path, monkeypatch, net):
  from nc_jax.training import train_and_evaluate
  opened = []
  open_dataset = stream.open_dataset
  monkeypatch.setattr(stream, "open_dataset", lambda *a, **k: opened.append(open_dataset(*a, **k)) or opened[-1])
  config = _cut_down(net, _smoke(f"imagenet2012_{net}", data_dir=imagenet_dir, per_class="1", batch_size=40,
                                 eval_batch_size=200, num_epochs=1, measure_epochs=(1,), deepfool_samples=0))
  assert config.input_pipeline == "auto" and stream.choose_pipeline("auto", "imagenet2012", "1") == "stream"
  last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  assert len(opened) == 1 and opened[0].input_shape == (224, 224, 3)  # streamed: resized to 256, cropped to 224
  assert len(opened[0].test_labels) == IMAGENET_VALIDATION
  assert last["epoch"] == 1 and last["num_samples"] == 1000 and np.isfinite(last["train_loss"])
  assert all(np.isfinite(last[key]) for key in ("nc1", "equiangular_means")), {k: last[k] for k in ("nc1",
                                                                                                   "equiangular_means")}

