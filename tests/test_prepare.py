"""python -m nc_jax.prepare: the paper's seven datasets through tfds's own builders, offline, read back by training.

Each dataset's original download is written here in its own format (tests/download_formats.py), tfds's real
builder turns it into ArrayRecord files (its download step answered with those files, its extraction and
generation untouched), and the training input reads them back: every image and label the files held, the
standardised values training sees, and, in a fresh process, without TensorFlow ever imported.

tfds's builders need TensorFlow and importlib_resources (nc_jax.prepare.PREPARATION_PACKAGES); where they are not
installed the builder tests skip, saying so. The bad-input tests need neither.
"""

import collections
import json
import pathlib
import posixpath
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
import requests
import tensorflow_datasets as tfds
from etils import epath

from nc_jax import prepare
from nc_jax.data import preprocess, stream
from tests import download_formats
from tests.run_helpers import REPO, cpu_env

DATASETS = prepare.DATASETS
MISSING = prepare.missing_packages("svhn_cropped")
needs_builders = pytest.mark.skipif(
    bool(MISSING), reason=f"tfds's builders need {', '.join(MISSING)}: pip install "
    f"{' '.join(prepare.PREPARATION_PACKAGES[m][0] for m in MISSING)}")
TFDS_IMAGENET = pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012"
TEST_SPLIT = {name: test for name, (_, test) in prepare.sources.TFDS_DATASETS.items()}


def _serve(monkeypatch, files: dict, requested: list) -> None:
  """tfds's downloads answered from ``files`` (URL basename -> local file), every URL asked for noted; tfds's own
  extraction then runs on them (gzip, tar.gz), and no checksum is compared (nothing was downloaded)."""
  def download(self, url_or_urls):
    def one(url):
      requested.append(url)
      return epath.Path(files[posixpath.basename(urllib.parse.urlparse(url).path)])
    return tfds.core.utils.map_nested(one, url_or_urls)
  monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      lambda self, url_or_urls: self.extract(self.download(url_or_urls)))


def _write(name: str, folder: pathlib.Path) -> download_formats.Written:
  if name == "imagenet2012":
    return download_formats.write_imagenet2012(folder, TFDS_IMAGENET)
  return download_formats.WRITERS[name](folder)


def _build(monkeypatch, name: str, folder: pathlib.Path, requested: list):
  """Writes ``name``'s files under ``folder`` and returns (Written, manual_dir or None) with downloads served."""
  written = _write(name, folder)
  _serve(monkeypatch, written.files, requested)
  if name in ("mnist", "fashion_mnist"):  # the builder reads a fixed 60000 + 10000 images; the files hold fewer
    from tensorflow_datasets.image_classification import mnist
    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", len(written.splits["train"][1]))
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", len(written.splits["test"][1]))
  monkeypatch.setattr(prepare, "check_network", lambda name: None)
  manual = folder / "manual" if name == "imagenet2012" else None
  return written, manual and str(manual)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One data_dir with all seven prepared by ``prepare.prepare``: (data_dir, {name: Written}, {name: URLs})."""
  root = tmp_path_factory.mktemp("prepare")
  data_dir, written, requested = root / "tfds", {}, collections.defaultdict(list)
  for name in DATASETS:
    with pytest.MonkeyPatch.context() as monkeypatch:
      (root / name).mkdir()
      written[name], manual = _build(monkeypatch, name, root / name, requested[name])
      result = prepare.prepare(name, str(data_dir), manual)
    assert result.built and result.data_dir == data_dir
  return data_dir, written, requested


def _stored(name: str, images) -> list[np.ndarray]:
  """What the files hold, as training decodes it: ImageNet's JPEG bytes decoded (PIL, as tfds without OpenCV)."""
  return [download_formats.decode_jpeg(x) for x in images] if name == "imagenet2012" else list(images)


def _multiset(images, labels) -> collections.Counter:
  return collections.Counter((int(label), image.shape, image.tobytes()) for image, label in zip(images, labels))


# ----------------------------------------------------------------- tfds's builders, offline
@needs_builders
@pytest.mark.parametrize("name", DATASETS)
def test_every_image_and_label_of_the_download_is_read_back_by_the_training_source(prepared, name):
  data_dir, written, _ = prepared
  for split, (images, labels) in written[name].splits.items():
    source = stream.TfdsSource(name, split, str(data_dir))
    assert len(source) == len(labels), split
    read = source.read(range(len(source)))
    assert _multiset(*zip(*read)) == _multiset(_stored(name, images), labels), split  # tfds reorders: as sets


@needs_builders
def test_labels_are_the_datasets_own_conventions(prepared):
  """SVHN's stored 10 is digit 0, STL-10's 1..10 are classes 0..9, CIFAR-100's label is the fine one; ImageNet's
  validation labels are tfds's published list (file k <-> line k), class indices lines of labels.txt."""
  data_dir, written, _ = prepared
  svhn = stream.TfdsSource("svhn_cropped", "train", str(data_dir)).labels()
  assert sorted(svhn) == sorted(written["svhn_cropped"].splits["train"][1]) and 0 in svhn and 10 not in svhn
  stl = stream.TfdsSource("stl10", "train", str(data_dir)).labels()
  assert sorted(stl) == sorted(np.repeat(np.arange(10), 2))
  assert max(stream.TfdsSource("cifar100", "train", str(data_dir)).labels()) > 19
  validation = stream.TfdsSource("imagenet2012", "validation", str(data_dir)).labels()
  synsets = (TFDS_IMAGENET / "labels.txt").read_text().split()
  expected = [synsets.index(s) for s in (TFDS_IMAGENET / "validation_labels.txt").read_text().split()[:12]]
  assert sorted(validation) == sorted(expected)


def _load(config_file: str, overrides: dict):
  """The run's data exactly as ``train_and_evaluate`` loads it, for a config file and command-line overrides."""
  import importlib.util

  from nc_jax.training import program as program_lib
  spec = importlib.util.spec_from_file_location("prepared_config", REPO / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")  # per_class 'none': every example
  config.update(overrides)
  return program_lib.load_dataset(config), config


@needs_builders
@pytest.mark.parametrize("name", [n for n in DATASETS if n != "imagenet2012"])
@pytest.mark.parametrize("pipeline", ["stream", "memory"])
def test_training_input_standardises_the_prepared_set(prepared, name, pipeline):
  """Through the config prepare prints: the streamed and in-memory inputs are the written images, padded 28 -> 32
  and standardised with the written training set's mean and std (float64 here)."""
  data_dir, written, _ = prepared
  config_file, overrides = _printed_command(name, data_dir)
  data, config = _load(config_file, {**overrides, "input_pipeline": pipeline})
  assert config.standardization == "global"
  images, labels = written[name].splits["train"]
  scaled = images.astype(np.float64) / 255
  mean, std = scaled.mean(), scaled.std()
  side = 32 if images.shape[1] == 28 else images.shape[1]
  assert data.input_shape == (side, side, images.shape[-1])
  assert data.num_classes == prepare.sources.TFDS_DATASETS[name][0]
  np.testing.assert_allclose([float(np.squeeze(data.mean)), float(np.squeeze(data.std))], [mean, std], rtol=1e-6)
  inputs = stream.materialise(data, "train") if pipeline == "stream" else data.train_inputs
  source = stream.TfdsSource(name, "train", str(data_dir))
  assert sorted(data.train_labels) == sorted(labels) and len(inputs) == len(labels)
  for row in (0, len(inputs) // 2, len(inputs) - 1):
    raw, label = source.read([int(data.train_indices[row])])[0]
    assert data.train_labels[row] == label
    expected = (preprocess.pad_images(raw[None], side)[0] / 255 - mean) / std
    np.testing.assert_allclose(inputs[row], expected, atol=2e-5)
  assert sorted(data.test_labels) == sorted(written[name].splits["test"][1])


@needs_builders
def test_imagenet_trains_from_the_prepared_tars_by_streaming(prepared):
  data_dir, written, _ = prepared
  data, _ = _load(*_printed_command("imagenet2012", data_dir))
  assert isinstance(data, stream.StreamedDataset) and data.input_shape == (224, 224, 3) and data.num_classes == 1000
  assert sorted(data.train_labels) == sorted(written["imagenet2012"].splits["train"][1])
  assert sorted(data.test_labels) == sorted(written["imagenet2012"].splits["validation"][1])
  batch, labels, mask = next(stream.eval_batches(data, "test", 4, process_index=0, process_count=1))
  assert batch.shape == (4, 224, 224, 3) and mask.all() and np.isfinite(batch).all()


READ_ALL_WITHOUT_TENSORFLOW = """
import importlib.util, json, sys
from nc_jax.data import stream
from nc_jax.training import program as program_lib
assert importlib.util.find_spec("tensorflow") is not None  # installed: only not imported
out = {}
for name, (config_file, overrides) in json.loads(sys.argv[1]).items():
  spec = importlib.util.spec_from_file_location("config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.update({**overrides, "input_pipeline": "stream"})
  data = program_lib.load_dataset(config)
  inputs, labels, _ = next(stream.eval_batches(data, "train", 2, process_index=0, process_count=1))
  out[name] = [list(data.input_shape), len(data.train_labels), len(data.test_labels), inputs.shape[0]]
out["tensorflow"] = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print(json.dumps(out))
"""


@needs_builders
def test_training_reads_all_seven_without_importing_tensorflow(prepared):
  """A fresh process, TensorFlow installed, loads each set as training does and reads a batch: no tensorflow module
  is ever imported (tfds.data_source decodes with PIL)."""
  data_dir, written, _ = prepared
  commands = {name: _printed_command(name, data_dir) for name in DATASETS}
  result = subprocess.run([sys.executable, "-c", READ_ALL_WITHOUT_TENSORFLOW, json.dumps(commands)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out.pop("tensorflow") == []
  for name in DATASETS:
    splits = written[name].splits
    assert out[name][1:] == [len(splits["train"][1]), len(splits[TEST_SPLIT[name]][1]), 2], name


@needs_builders
@pytest.mark.parametrize("name", [n for n in DATASETS if n != "imagenet2012"])
def test_builders_download_only_from_the_host_prepare_checks(prepared, name):
  _, _, requested = prepared
  assert requested[name] and {urllib.parse.urlparse(url).hostname for url in requested[name]} == {
      prepare.DOWNLOAD_HOSTS[name]}


# ------------------------------------------------------------------ the command line
def _printed_command(name: str, data_dir: pathlib.Path) -> tuple[str, dict]:
  """(config file, {key: value} overrides) of the training command prepare prints for ``name``."""
  words = shlex.split(prepare.train_command(name, data_dir))
  assert words[:3] == ["python", "-m", "nc_jax.train"] and (REPO / words[words.index("--config") + 1]).is_file()
  overrides = dict(w[len("--config."):].split("=", 1) for w in words if w.startswith("--config."))
  return words[words.index("--config") + 1], overrides


def _main(capsys, *arguments) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of ``python -m nc_jax.prepare ARGUMENTS``, run here."""
  try:
    prepare.main(["nc_jax.prepare", *arguments])
    code = 0
  except SystemExit as exit:
    code = exit.code
  out, err = capsys.readouterr()
  return code, out, err


@needs_builders
def test_command_prepares_and_prints_how_to_train(tmp_path, monkeypatch, capsys):
  _build(monkeypatch, "fashion_mnist", tmp_path, [])
  code, out, err = _main(capsys, "fashion_mnist", "--data_dir", str(tmp_path / "tfds"))
  assert code == 0, err
  assert f"--config.data_dir={tmp_path / 'tfds'} --config.data_source=tfds" in out  # its configs read Debian IDX
  assert f"--config {REPO}/configs/paper/fashion_mnist_resnet18.py" in out and "train 40, test 20" in out
  assert (tmp_path / "tfds" / "fashion_mnist" / "3.0.1").is_dir()
  monkeypatch.setattr(prepare, "missing_packages", lambda name: ["tensorflow"])  # a rerun needs no TensorFlow
  code, out, err = _main(capsys, "fashion_mnist", "--data_dir", str(tmp_path / "tfds"))
  assert code == 0 and out.startswith("already prepared: fashion_mnist") and "--config.data_source=tfds" in out, err


@needs_builders
def test_a_download_that_fails_midway_is_one_line_and_keeps_nothing_half_built(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(prepare, "check_network", lambda name: None)

  def offline(self, url, **kwargs):
    raise requests.exceptions.ConnectionError("Failed to resolve host", request=requests.Request("GET", url).prepare())
  monkeypatch.setattr(requests.Session, "get", offline)
  code, out, err = _main(capsys, "cifar10", "--data_dir", str(tmp_path))
  lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert code == 1 and len(lines) == 1 and "Traceback" not in err
  assert "cannot download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in lines[0]
  assert "internet" in lines[0] and not (tmp_path / "cifar10" / "3.0.2").exists()


def _error(code_and_output, expected_code: int) -> str:
  code, out, err = code_and_output
  assert code == expected_code and out == "" and "Traceback" not in err, (code, out, err)
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  return err


def test_unknown_dataset_names_the_closest(capsys, tmp_path):
  assert "unknown dataset 'cifar11'; did you mean 'cifar10'?" in _error(
      _main(capsys, "cifar11", "--data_dir", str(tmp_path)), 2)
  assert "choose one of mnist, fashion_mnist" in _error(_main(capsys, "emnist_x", "--data_dir", str(tmp_path)), 2)
  assert "--data_dir must be given" in _error(_main(capsys, "mnist"), 2)


def test_a_data_dir_that_cannot_be_written_is_named(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "missing_packages", lambda name: [])
  (tmp_path / "file").write_text("")
  err = _error(_main(capsys, "mnist", "--data_dir", str(tmp_path / "file" / "tfds")), 1)
  assert f"--data_dir {tmp_path / 'file' / 'tfds'} cannot be written" in err


def test_imagenet_without_its_tars_says_where_to_get_them(capsys, tmp_path):
  assert "https://image-net.org/download-images" in _error(
      _main(capsys, "imagenet2012", "--data_dir", str(tmp_path)), 2)
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "ILSVRC2012_img_train.tar").write_bytes(b"<html>login</html>")
  err = _error(_main(capsys, "imagenet2012", "--data_dir", str(tmp_path), "--manual_dir", str(tmp_path / "manual")), 1)
  assert "lacks ILSVRC2012_img_val.tar:" in err and "ILSVRC2012_img_train.tar and" not in err.split(":")[0]
  (tmp_path / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"<html>login</html>")
  err = _error(_main(capsys, "imagenet2012", "--data_dir", str(tmp_path), "--manual_dir", str(tmp_path / "manual")), 1)
  assert "ILSVRC2012_img_train.tar is not a tar file" in err


def test_missing_tensorflow_says_to_install_it_for_preparation_only(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "PREPARATION_PACKAGES", {"tensorflow": prepare.PREPARATION_PACKAGES["tensorflow"]})
  monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda module: None)  # as without TensorFlow
  err = _error(_main(capsys, "cifar10", "--data_dir", str(tmp_path / "tfds")), 1)
  assert "pip install tensorflow-cpu (for preparation only" in err
  assert not (tmp_path / "tfds").exists()  # refused before anything was written


def test_no_network_fails_at_once_naming_the_host(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "missing_packages", lambda name: [])
  monkeypatch.setattr(prepare.urllib.request, "getproxies", lambda: {})

  def unresolved(host, *args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
  monkeypatch.setattr(prepare.socket, "getaddrinfo", unresolved)
  err = _error(_main(capsys, "svhn_cropped", "--data_dir", str(tmp_path)), 1)
  assert "cannot reach ufldl.stanford.edu (Name or service not known)" in err and "internet" in err


def test_an_unprepared_set_points_at_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"python -m nc_jax\.prepare cifar10 --data_dir DIR"):
    stream.TfdsSource("cifar10", "train", str(tmp_path))


# ------------------------------------------------------------------ hostile cases
@needs_builders
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_prepared_set_is_one_line_naming_its_folder(prepared, tmp_path, capsys, damage):
  data_dir, _, _ = prepared
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir / "cifar10", copy / "cifar10")
  folder = next((copy / "cifar10").iterdir())  # cifar10/VERSION
  shard = next(folder.glob("cifar10-train.array_record-*" if damage == "truncated" else "cifar10-test.array_record-*"))
  if damage == "truncated":
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  else:
    shard.unlink()
  err = _error(_main(capsys, "cifar10", "--data_dir", str(copy)), 1)
  assert f"{folder} is damaged" in err and "delete that folder and rerun" in err, err


def test_a_data_dir_under_a_file_is_named_before_any_missing_package(capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(prepare.importlib.util, "find_spec", lambda module: None)  # as without TensorFlow
  (tmp_path / "file").write_text("")
  err = _error(_main(capsys, "mnist", "--data_dir", str(tmp_path / "file" / "tfds")), 1)
  assert f"{tmp_path / 'file'} is a file" in err and "pip install" not in err


def test_the_printed_command_quotes_the_folder_and_names_the_config_absolutely():
  data_dir = pathlib.Path("/tmp/data dir's")  # a space and a quote: pasted unquoted, it splits
  words = shlex.split(prepare.train_command("cifar10", data_dir))
  config = pathlib.Path(words[words.index("--config") + 1])
  assert config.is_absolute() and config.is_file()  # works from any folder, not only the repo root
  assert f"--config.data_dir={data_dir}" in words


def _closed_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]  # closed again on exit: a connect is refused


def test_a_proxy_that_does_not_answer_fails_at_once_naming_it(capsys, tmp_path, monkeypatch):
  import logging
  import time
  monkeypatch.setattr(prepare, "missing_packages", lambda name: [])
  proxy = f"http://127.0.0.1:{_closed_port()}"
  monkeypatch.setattr(prepare.urllib.request, "getproxies", lambda: {"https": proxy})
  monkeypatch.setattr(prepare.urllib.request, "proxy_bypass", lambda host: False)
  start = time.monotonic()
  err = _error(_main(capsys, "mnist", "--data_dir", str(tmp_path)), 1)
  assert time.monotonic() - start < 30  # tfds's downloader retries through a dead proxy for minutes
  assert f"cannot reach the proxy {proxy}" in err and "HTTPS_PROXY" in err
  assert logging.getLogger("urllib3").getEffectiveLevel() >= logging.ERROR  # no retry warnings before it


def test_a_proxy_that_answers_passes_the_check(monkeypatch):
  with socket.socket() as listening:
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    monkeypatch.setattr(prepare.urllib.request, "getproxies",
                        lambda: {"https": f"http://127.0.0.1:{listening.getsockname()[1]}"})
    monkeypatch.setattr(prepare.urllib.request, "proxy_bypass", lambda host: False)

    real = socket.getaddrinfo

    def unresolved(host, *args, **kwargs):  # behind a proxy the download host's name need not resolve here
      if host == prepare.DOWNLOAD_HOSTS["cifar10"]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
      return real(host, *args, **kwargs)
    monkeypatch.setattr(prepare.socket, "getaddrinfo", unresolved)
    prepare.check_network("cifar10")


@needs_builders
def test_a_failed_download_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(prepare, "check_network", lambda name: None)
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  (downloads / "finished.tar.gz").write_bytes(b"kept")

  def midway(self, url, **kwargs):  # as tfds's downloader leaves it: NAME.tmp.UUID/ holding a part of the file
    partial = downloads / "cs.toronto.edu_cifar-10.tmp.0123abcd"
    partial.mkdir(exist_ok=True)
    (partial / "cifar-10-binary.tar.gz").write_bytes(b"half")
    raise requests.exceptions.ConnectionError("Connection reset", request=requests.Request("GET", url).prepare())
  monkeypatch.setattr(requests.Session, "get", midway)
  code, _, err = _main(capsys, "cifar10", "--data_dir", str(tmp_path))
  assert code == 1 and "cannot download" in err
  assert not list(downloads.rglob("*.tmp.*")) and (downloads / "finished.tar.gz").read_bytes() == b"kept"
