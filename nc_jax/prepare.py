"""Prepares one of the paper's datasets as tfds ArrayRecord files, the form training streams and loads.

    python -m nc_jax.prepare DATASET --data_dir DIR [--manual_dir MANUAL]

DATASET is one of mnist, fashion_mnist, cifar10, cifar100, svhn_cropped, stl10, imagenet2012. The command runs
tfds's own builder (``tfds.builder(DATASET, data_dir=DIR).download_and_prepare(file_format='array_record')``):
it downloads the original files into DIR/downloads (kept there: a rerun after a failure reuses them), writes the
dataset to DIR/DATASET/VERSION/ (in a temporary folder renamed at the end, so a failed run leaves no half
dataset), reads one record of every split back, and prints the training command with ``--config.data_dir=DIR``.

ImageNet cannot be downloaded by a program: MANUAL must hold ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
from https://image-net.org/download-images (an account is needed).

What preparation needs beyond nc-jax's own dependencies (``pip install tensorflow-cpu importlib_resources``, and
scipy for svhn_cropped; PREPARATION_PACKAGES): TensorFlow, for every one of the seven builders of
tensorflow-datasets 4.9: tfds extracts the archives and each builder reads its files with ``tf.io.gfile``, and all
but ImageNet encode their images to PNG with ``tf.image.encode_png`` (ImageNet stores the JPEGs as they are);
importlib_resources, which tfds imports to build any dataset but declares only for Python < 3.9. Training needs
none of them: it reads the files through ``tfds.data_source`` and decodes them with PIL, so DIR can be copied to
machines without TensorFlow.

Every failure is one line on stderr (``error: ...``) naming the problem and what to do; exit status 2 for a
bad command line, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import pathlib
import shlex
import shutil
import sys
import socket
import tarfile
import tempfile
import urllib.parse
import urllib.request
from typing import Optional, Sequence

from nc_jax import cli
from nc_jax.data import sources

DATASETS = tuple(sources.TFDS_DATASETS)
USAGE = "python -m nc_jax.prepare DATASET --data_dir DIR [--manual_dir MANUAL]"
IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
IMAGENET_SITE = "https://image-net.org/download-images"
# Where each builder of tensorflow-datasets 4.9 downloads from (tests/test_prepare.py checks the URLs it asks for).
DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com",
                  "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
                  "cifar10": "www.cs.toronto.edu", "cifar100": "www.cs.toronto.edu",
                  "svhn_cropped": "ufldl.stanford.edu", "stl10": "ai.stanford.edu"}
PAPER_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "paper"


class PrepareError(Exception):
  """A dataset that cannot be prepared as asked; the message says why and what to do. ``code``: exit status."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


# ------------------------------------------------------------------ checks (before anything is written)
def check_dataset(name: str) -> str:
  """``name`` if it is one of DATASETS, else a PrepareError naming the closest one."""
  if name in DATASETS:
    return name
  close = difflib.get_close_matches(name.lower(), DATASETS, n=1, cutoff=0.6)
  hint = f"did you mean {close[0]!r}? " if close else ""
  raise PrepareError(f"unknown dataset {name!r}; {hint}choose one of {', '.join(DATASETS)}", 2)


def check_not_a_file(data_dir: str) -> None:
  """A PrepareError when --data_dir or a folder above it is a file (checked first: creates nothing)."""
  path = pathlib.Path(data_dir).expanduser().absolute()
  existing = next((p for p in (path, *path.parents) if p.exists()), None)
  if existing is not None and not existing.is_dir():
    raise PrepareError(f"--data_dir {path} cannot be written ({existing} is a file, not a folder): pass a folder "
                       "you can write (it will hold the downloads and the prepared dataset)")


def check_writable(data_dir: str) -> pathlib.Path:
  """The absolute data_dir, created if absent, after proving a file can be written there."""
  path = pathlib.Path(data_dir).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise PrepareError(f"--data_dir {path} cannot be written ({cli.describe_os_error(error)}): pass a folder you "
                       "can write (it will hold the downloads and the prepared dataset)") from None
  return path


def check_manual_dir(name: str, manual_dir: Optional[str]) -> Optional[pathlib.Path]:
  """ImageNet's MANUAL folder, after checking both tars are there and readable as tar files; other sets: as given."""
  if name != "imagenet2012":
    return pathlib.Path(manual_dir).expanduser().absolute() if manual_dir else None
  fix = (f"download {' and '.join(IMAGENET_FILES)} from {IMAGENET_SITE} (an account is needed) into one folder "
         f"and pass it as --manual_dir")
  if not manual_dir:
    raise PrepareError(f"imagenet2012 cannot be downloaded by a program: {fix}", 2)
  folder = pathlib.Path(manual_dir).expanduser().absolute()
  missing = [f for f in IMAGENET_FILES if not (folder / f).is_file()]
  if missing:
    raise PrepareError(f"--manual_dir {folder} lacks {' and '.join(missing)}: {fix}")
  for file in IMAGENET_FILES:
    if not tarfile.is_tarfile(folder / file):  # an interrupted download or an HTML error page
      raise PrepareError(f"{folder / file} is not a tar file (an interrupted download?): download it again from "
                         f"{IMAGENET_SITE}")
  return folder


# module -> (pip package, why tfds's builders need it); none of them is needed to train
PREPARATION_PACKAGES = {
    "tensorflow": ("tensorflow-cpu", "tfds and the builders read and extract the downloads with tf.io.gfile and "
                   "encode the images with tf.image (all but ImageNet's, stored as they are)"),
    "importlib_resources": ("importlib_resources", "tfds 4.9 imports it to build any dataset but declares it only "
                            "for Python < 3.9"),
    "scipy": ("scipy", "svhn_cropped's builder reads MATLAB files with scipy.io.loadmat"),
}


def missing_packages(name: str) -> list[str]:
  """The modules of PREPARATION_PACKAGES that preparing ``name`` needs and that are not installed."""
  needed = [module for module in PREPARATION_PACKAGES if module != "scipy" or name == "svhn_cropped"]
  return [module for module in needed if importlib.util.find_spec(module) is None]


def check_packages(name: str) -> None:
  missing = missing_packages(name)
  if missing:
    why = "; ".join(f"{module}: {PREPARATION_PACKAGES[module][1]}" for module in missing)
    install = " ".join(PREPARATION_PACKAGES[module][0] for module in missing)
    raise PrepareError(f"preparing {name} runs tfds's builder, which needs packages nc-jax does not install ({why}): "
                       f"pip install {install} (for preparation only: training reads the prepared files without them)")


PROXY_TIMEOUT_S = 2.0  # a proxy on the same network answers a connect in milliseconds


def _proxy_for(host: str) -> Optional[str]:
  """The proxy URL requests would use for https://HOST (HTTPS_PROXY, else ALL_PROXY), or None (direct or bypassed
  by NO_PROXY)."""
  proxies = urllib.request.getproxies()
  proxy = proxies.get("https") or proxies.get("all")
  if not proxy or urllib.request.proxy_bypass(host):
    return None
  return proxy


def check_network(name: str) -> None:
  """Fails fast when the download host cannot be reached: offline, tfds's downloader retries for minutes.

  Direct: the host's name must resolve. Behind a proxy (which resolves names itself): the proxy's host:port must
  accept a TCP connection within PROXY_TIMEOUT_S. Nothing to check for ImageNet (nothing is downloaded).
  """
  host = DOWNLOAD_HOSTS.get(name)
  if host is None:
    return
  proxy = _proxy_for(host)
  if proxy is not None:
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default_port = {"https": 443, "socks5": 1080, "socks5h": 1080, "socks4": 1080}.get(parts.scheme, 80)
    try:
      address = (parts.hostname or "", parts.port or default_port)
      socket.create_connection(address, timeout=PROXY_TIMEOUT_S).close()
    except (OSError, ValueError) as error:  # ValueError: a port that is not a number
      reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
      raise PrepareError(f"cannot reach the proxy {proxy} ({reason}), set by HTTPS_PROXY / ALL_PROXY for "
                         f"downloads from {host}: fix or unset that variable and rerun, or prepare {name} on a "
                         "machine with internet and copy --data_dir here") from None
    return
  try:
    socket.getaddrinfo(host, 443)
  except OSError as error:
    raise PrepareError(f"cannot reach {host} ({error.strerror or error}), where {name}'s files are downloaded from: "
                       "connect this machine to the internet (or set HTTPS_PROXY) and rerun, or prepare it on a "
                       "machine with internet and copy --data_dir here") from None


# ------------------------------------------------------------------ the builder
@dataclasses.dataclass(frozen=True)
class Prepared:
  """Where a prepared dataset is (``folder`` = data_dir/NAME/VERSION) and its splits' sizes."""

  name: str
  data_dir: pathlib.Path
  folder: pathlib.Path
  split_sizes: dict
  built: bool  # False: it was there already


def _download_failure(error: BaseException) -> Optional[str]:
  """A one-line reason when ``error`` (or its cause) is a failed download, else None."""
  import requests
  import tensorflow_datasets as tfds

  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, requests.exceptions.RequestException):
      url = getattr(getattr(error, "request", None), "url", None)
      reason = getattr(error.args[0], "reason", None) if error.args else None  # urllib3's, under requests'
      text = str(reason or error).split(": ", 1)[-1]  # without urllib3's "HTTPSConnection(host=...)" prefix
      return f"cannot download{' ' + url if url else ''} ({type(reason or error).__name__}: {text[:200]})"
    if isinstance(error, tfds.download.DownloadError):
      return f"download failed ({cli.one_line(error)[:300]})"
    error = error.__cause__ or error.__context__
  return None


def _read_back(name: str, data_dir: pathlib.Path) -> dict:
  """{split: number of examples}, after reading record 0 of each split as training will (no TensorFlow)."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  sizes = {}
  for split in builder.info.splits:
    source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)
    if len(source):
      source[0]
    sizes[split] = len(source)
  return sizes


def _existing(name: str, root: pathlib.Path) -> Optional[Prepared]:
  """The dataset already prepared in ``root`` (it must be ArrayRecord), or None."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=os.fspath(root))
  if not builder.is_prepared():
    return None
  stored = builder.info.file_format
  if stored is not None and stored != tfds.core.FileFormat.ARRAY_RECORD:
    raise PrepareError(f"{builder.data_path} holds {name} as {stored.value} files, which training cannot read: pass "
                       "another --data_dir, or delete that folder and rerun")
  folder = pathlib.Path(os.fspath(builder.data_path))
  return Prepared(name, root, folder, _checked_read_back(name, root, folder), built=False)


def _checked_read_back(name: str, root: pathlib.Path, folder: pathlib.Path) -> dict:
  """``_read_back``, with a dataset whose files cannot be read (truncated, a shard deleted) as a PrepareError
  naming its folder and the fix (ArrayRecord's own RuntimeError names neither)."""
  try:
    return _read_back(name, root)
  except Exception as error:  # noqa: BLE001  (ArrayRecord and tfds raise several types)
    detail = " ".join(str(error).split())[:300] or type(error).__name__
    raise PrepareError(f"{folder} is damaged ({type(error).__name__}: {detail}): delete that folder and rerun "
                       f"this command (downloads already made in {root / 'downloads'} are kept)") from None


def _remove_partial_downloads(downloads: pathlib.Path) -> None:
  """Deletes what tfds's downloader left half-written (NAME.tmp.UUID files and folders); finished downloads stay."""
  for path in sorted(downloads.rglob("*.tmp.*")) if downloads.is_dir() else []:
    try:
      shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except OSError:  # already gone with its parent folder, or not ours to remove: left
      pass


def prepare(name: str, data_dir: str, manual_dir: Optional[str] = None, *, download_config=None) -> Prepared:
  """Runs tfds's builder of ``name`` into ``data_dir`` as ArrayRecord (a dataset already there is reused).

  download_config: a ``tfds.download.DownloadConfig`` (default: manual_dir set, no GCS look-up: tfds's GCS copies
  are TFRecord files, which training cannot read without TensorFlow).
  """
  check_dataset(name)
  root = pathlib.Path(data_dir).expanduser().absolute()
  existing = _existing(name, root) if root.is_dir() else None  # needs none of the checks below
  if existing is not None:
    return existing
  manual = check_manual_dir(name, manual_dir)
  check_not_a_file(data_dir)  # before the packages: the path, not TensorFlow, is then what must change
  check_packages(name)
  check_writable(root)
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=os.fspath(root))
  check_network(name)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notices would bury the result
  if download_config is None:
    download_config = tfds.download.DownloadConfig(manual_dir=manual and os.fspath(manual), try_download_gcs=False)
  try:
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
  except Exception as error:  # tfds and its builders raise many types; each becomes one line
    reason = _download_failure(error)
    downloads = root / "downloads"
    _remove_partial_downloads(downloads)
    if reason:
      raise PrepareError(f"{reason}: preparing {name} needs internet access to its original files; rerun with "
                         f"internet (finished downloads in {downloads} are kept), or prepare it on a machine with "
                         f"internet and copy {root} here") from None
    if type(error).__name__ == "NonMatchingChecksumError":  # not exported by tfds.download
      raise PrepareError(f"a download of {name} is not the file tfds expects ({cli.one_line(error)[:200]}): "
                         f"delete it from {downloads} and rerun") from None
    if isinstance(error, ImportError):
      raise PrepareError(f"preparing {name} needs a package that is missing ({cli.one_line(error)}): install it "
                         "and rerun (finished downloads are kept)") from None
    if isinstance(error, OSError):
      raise PrepareError(f"preparing {name} in {root} failed: {cli.describe_os_error(error)}; free the space or "
                         "fix the folder, then rerun (finished downloads are kept)") from None
    raise PrepareError(f"preparing {name} failed: {type(error).__name__}: {cli.one_line(error)[:400]}") from None
  folder = pathlib.Path(os.fspath(builder.data_path))
  return Prepared(name, root, folder, _checked_read_back(name, root, folder), built=True)


# ------------------------------------------------------------------ what to run next
def paper_configs(name: str) -> list[str]:
  """The paper's config files for ``name`` (configs/paper/NAME_NET.py) as absolute paths (the printed command
  works from any folder), ResNet first; [] outside a checkout."""
  found = sorted(PAPER_CONFIGS.glob(f"{name}_*.py"), key=lambda p: ("resnet" not in p.stem, p.stem))
  return [str(path) for path in found]


def train_command(name: str, data_dir: pathlib.Path) -> str:
  """The command that trains on the prepared set (Fashion-MNIST's configs read Debian's IDX files unless told)."""
  configs = paper_configs(name)
  config = shlex.quote(configs[0]) if configs else f"configs/paper/{name}_NET.py"
  source = " --config.data_source=tfds" if name == "fashion_mnist" else ""
  data = shlex.quote(f"--config.data_dir={data_dir}")  # a folder with a space still pastes as one argument
  return f"python -m nc_jax.train --config {config} --workdir WORKDIR {data}{source}"


def summary(prepared: Prepared) -> str:
  sizes = ", ".join(f"{split} {count}" for split, count in prepared.split_sizes.items())
  state = "prepared" if prepared.built else "already prepared"
  others = paper_configs(prepared.name)[1:]
  lines = [f"{state}: {prepared.name} as ArrayRecord in {prepared.folder} ({sizes} examples)",
           "train with:", f"  {train_command(prepared.name, prepared.data_dir)}"]
  if others:
    lines.append(f"  (or --config {' / '.join(map(shlex.quote, others))}; copy {prepared.data_dir} to every host of "
                 "a multi-host run)")
  return "\n".join(lines)


# ------------------------------------------------------------------ command line
def _flags():
  from absl import flags

  values = flags.FlagValues()  # its own: tfds and the trainer define global flags of their own
  flags.DEFINE_string("data_dir", None, "Folder for the downloads and the prepared dataset (created if absent).",
                      flag_values=values)
  flags.DEFINE_string("manual_dir", None, "imagenet2012 only: the folder holding ILSVRC2012_img_train.tar and "
                      "ILSVRC2012_img_val.tar.", flag_values=values)
  return values


def main(argv: Sequence[str]) -> None:
  import logging as std_logging

  from absl import logging

  logging.set_verbosity(logging.ERROR)  # tfds's warnings (no OpenCV, ImageNet's absent test split) are not ours
  std_logging.getLogger("urllib3").setLevel(std_logging.ERROR)  # its retry warnings come before our one line
  values = _flags()
  if any(arg in ("-h", "--help", "-?") for arg in argv[1:]):
    print(__doc__)
    return
  arguments = cli.parse_flags(list(argv), values, required=("data_dir",), usage=USAGE)[1:]
  if len(arguments) != 1:
    what = "the dataset must be given" if not arguments else f"one dataset at a time, not {arguments}"
    cli.fail(f"{what}: {USAGE} (DATASET: {', '.join(DATASETS)})", 2)
  try:
    prepared = prepare(arguments[0], values.data_dir, values.manual_dir)
  except PrepareError as error:
    cli.fail(str(error), error.code)
  except KeyboardInterrupt:
    cli.fail(f"interrupted: rerun the same command to go on (finished downloads in {values.data_dir}/downloads "
             "are kept; an unfinished dataset is rebuilt)", 130)
  print(summary(prepared), flush=True)


if __name__ == "__main__":
  main(sys.argv)
