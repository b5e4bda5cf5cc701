"""Raw (unprocessed) splits from each source: tfds, IDX folders, MNIST-1D, synthetic.

Each loader returns ``RawSplits``: train/test inputs as stored (uint8 images
(N, H, W, C), or float vectors (N, d)), int32 labels and the class count.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
from typing import Optional

import numpy as np

from nc_jax.data import idx

# TFDS_DATASETS: name -> (num_classes, test split); IDX_DATASETS: MNIST-format files, what ``from_idx`` reads;
# GENERATED_DATASETS: made here, ``from_mnist1d`` and ``synthetic``.
from nc_jax.names import DATA_SOURCES as SOURCES, GENERATED_DATASETS, IDX_DATASETS, TFDS_DATASETS


def sources_of(name: str) -> tuple[str, ...]:
  """The sources that can read dataset ``name`` ('generated' data ignores ``source``)."""
  if name in GENERATED_DATASETS:
    return ("generated",)
  return ("tfds", "idx") if name in IDX_DATASETS else ("tfds",)


def check_source(name: str, source: str) -> None:
  """Raises a one-line ValueError when ``source`` cannot read ``name``, naming the sources that can."""
  if source in sources_of(name) or (name in GENERATED_DATASETS and source in SOURCES):
    return
  if source == "generated":
    why = f"only {' and '.join(GENERATED_DATASETS)} are generated"
  elif source == "idx":
    why = f"'idx' reads MNIST-format files ({', '.join(IDX_DATASETS)}) only"
  else:
    why = (f"unknown source; there are 'tfds' (prepared tfds datasets), 'idx' ({', '.join(IDX_DATASETS)}) "
           f"and 'generated' ({', '.join(GENERATED_DATASETS)})")
  choices = " or ".join(repr(s) for s in sources_of(name))
  raise ValueError(f"source={source!r} cannot read {name!r}: {why}; for {name} use source={choices}")


class DamagedDataset(ValueError):
  """A prepared tfds dataset whose files are there but cannot be read (truncated, edited, a shard deleted)."""


def prepare_command(name: str, data_dir: Optional[str]) -> str:
  """The command that (re)builds ``name`` in ``data_dir``: nc_jax.prepare for its seven sets, tfds build else."""
  where = shlex.quote(str(data_dir)) if data_dir else "DIR"
  manual = " --manual_dir DIR_WITH_ILSVRC2012_TARS" if name == "imagenet2012" else ""
  if name in TFDS_DATASETS:
    return f"python -m nc_jax.prepare {name} --data_dir {where}{manual}"
  return f"tfds build {name} --file_format=array_record --data_dir {where}{manual}"


def damaged(name: str, data_dir: Optional[str], folder, error: BaseException, where: str = "") -> DamagedDataset:
  """The one-line error for a prepared dataset in ``folder`` (DATA_DIR/NAME/VERSION) that cannot be read:
  ``where`` (a file and record, if known) and the reader's own first line, then the fix. The folder is deleted
  first: tfds reuses a folder it finds prepared, and nc_jax.prepare keeps the downloads (in DATA_DIR/downloads)."""
  detail = " ".join(str(error).split())[:300] or type(error).__name__
  return DamagedDataset(f"the prepared {name} in {folder} is damaged ({where + ': ' if where else ''}"
                        f"{type(error).__name__}: {detail}): delete {folder} and rerun "
                        f"`{prepare_command(name, data_dir)}` (downloads already made are kept), then rerun this")


@dataclasses.dataclass(frozen=True)
class RawSplits:
  train_inputs: np.ndarray
  train_labels: np.ndarray
  test_inputs: np.ndarray
  test_labels: np.ndarray
  num_classes: int


def from_tfds(name: str, data_dir: Optional[str] = None) -> RawSplits:
  """Through ``tfds.data_source`` (ArrayRecord files, no TensorFlow); nothing is downloaded."""
  import tensorflow_datasets as tfds  # heavy: only imported when used

  if name == "imagenet2012":
    raise ValueError("imagenet2012 does not fit in memory as arrays and is not supported by nc_jax.data.load: "
                     "stream it (nc_jax.data.stream; --config.input_pipeline=stream, the 'auto' choice)")
  num_classes, test_split = TFDS_DATASETS[name]
  try:
    sources = tfds.data_source(name, split=["train", test_split], data_dir=data_dir, download=False)
  except Exception as error:  # tfds raises several types for a missing dataset
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared as ArrayRecord in {where} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Prepare it on a machine with internet: "
        f"`{prepare_command(name, None)}`, then pass data_dir=DIR (--config.data_dir=DIR), copying DIR here if "
        "it was prepared elsewhere") from None

  def arrays(source):
    try:
      records = [source[i] for i in range(len(source))]
    except Exception as error:  # ArrayRecord's reader raises RuntimeError naming neither folder nor fix
      folder = getattr(getattr(source, "dataset_info", None), "data_dir", None) or data_dir
      raise damaged(name, data_dir, folder, error) from None
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels

  (train_inputs, train_labels), (test_inputs, test_labels) = (arrays(s) for s in sources)
  return RawSplits(train_inputs, train_labels, test_inputs, test_labels, num_classes)


def from_idx(name: str = "fashion_mnist", data_dir: Optional[str] = None) -> RawSplits:
  """MNIST-format IDX files; images get a channel axis.

  Fashion-MNIST defaults to Debian's dataset-fashion-mnist folder; MNIST has no system package, so its folder
  (the four standard files, e.g. from yann.lecun.com or any mirror) must be given.
  """
  if data_dir:
    directory = pathlib.Path(data_dir)
  elif name == "fashion_mnist":
    directory = idx.DEBIAN_FASHION_MNIST
  else:
    raise FileNotFoundError(
        f"{name} from IDX files needs their folder: set data_dir (--config.data_dir=DIR) to a folder holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz")
  train_images, train_labels = idx.load_split(directory, "train")
  test_images, test_labels = idx.load_split(directory, "test")
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  return RawSplits(train_images[..., None], train_labels, test_images[..., None], test_labels, num_classes)


def from_mnist1d(num_samples: int = 5000, seed: int = 42) -> RawSplits:
  """MNIST-1D (Greydanus 2020) generated offline by ``mnist1d.data.make_dataset``: vectors (N, 40)."""
  try:
    from mnist1d.data import get_dataset_args, make_dataset
  except ImportError:
    raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from None
  args = get_dataset_args()
  args.num_samples, args.seed = num_samples, seed
  data = make_dataset(args)  # generates; never the download path
  return RawSplits(data["x"].astype(np.float32), data["y"].astype(np.int32),
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int32), 10)


def synthetic(num_classes: int = 10, feature_dim: int = 32, train_per_class: int = 100, test_per_class: int = 50,
              separation: float = 3.0, seed: int = 0) -> RawSplits:
  """A Gaussian mixture: class means N(0, separation^2 / d) per coordinate, unit isotropic noise."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(num_classes, feature_dim)) * separation / np.sqrt(feature_dim)

  def sample(per_class):
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    noise = rng.normal(size=(labels.size, feature_dim)) / np.sqrt(feature_dim)
    return (means[labels] + noise).astype(np.float32), labels

  (train_inputs, train_labels), (test_inputs, test_labels) = sample(train_per_class), sample(test_per_class)
  return RawSplits(train_inputs, train_labels, test_inputs, test_labels, num_classes)


def raw_splits(name: str, source: str, data_dir: Optional[str], seed: int, synthetic_options: dict) -> RawSplits:
  """Dataset ``name`` read whole from ``source`` (after ``check_source``): generated, IDX files or tfds.

  synthetic_options: ``from_mnist1d``'s (num_samples, mnist1d_seed) or ``synthetic``'s keywords (its seed is
  ``seed``)."""
  check_source(name, source)
  if name == "mnist1d":
    return from_mnist1d(seed=synthetic_options.get("mnist1d_seed", 42),
                        num_samples=synthetic_options.get("num_samples", 5000))
  if name == "synthetic":
    return synthetic(seed=seed, **synthetic_options)
  if source == "idx":
    return from_idx(name, data_dir)
  return from_tfds(name, data_dir)
