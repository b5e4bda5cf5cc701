"""Tiny copies of the paper's datasets in their original download formats, for tfds's real builders offline.

Each ``write_NAME(folder)`` writes the files tfds's builder downloads (or, for ImageNet, the two tars it reads
from the manual folder), named as at their source, and returns a ``Written``: the file for each URL basename
and, per split, the (N, H, W, C) uint8 images (ImageNet: JPEG bytes) and (N,) labels the builder must produce
from them (tfds writes examples in an order of its own: compare as sets).
The formats, from each dataset's own documentation:
  * MNIST / Fashion-MNIST: gzip IDX; images magic 2051, big-endian (count, rows, cols), then row-major bytes;
    labels magic 2049, count, then one byte each.
  * CIFAR-10 binary: cifar-10-batches-bin/data_batch_{1..5}.bin, test_batch.bin, records of 1 label byte + 3072
    bytes (the R, G, B planes, 32x32 each, row-major); batches.meta.txt, one class name a line.
    CIFAR-100 binary: cifar-100-binary/{train,test}.bin, records of coarse byte, fine byte, 3072 bytes;
    coarse_label_names.txt, fine_label_names.txt.
  * SVHN cropped: {train,test,extra}_32x32.mat, X (32, 32, 3, N) uint8, y (N, 1) with digit 0 written as 10.
  * STL-10: stl10_binary.tar.gz holding stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin, class_names.txt;
    X column-major per image (3, 96, 96 stored as channel, column, row), y one byte 1..10.
  * ImageNet 2012: ILSVRC2012_img_train.tar of one tar per synset (n01440764.tar of n01440764_K.JPEG),
    ILSVRC2012_img_val.tar of ILSVRC2012_val_%08d.JPEG; validation labels are tfds's validation_labels.txt
    (the synset of each file in sorted order), the class index a synset's line in tfds's labels.txt.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import struct
import tarfile

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Written:
  files: dict  # URL basename (or manual file name) -> local path
  splits: dict  # split -> (images (N, H, W, C) uint8, labels (N,) int)


def _images(rng, count, height, width, channels, labels):
  """Label-dependent brightness plus noise: each class looks different, every pixel value is exercised."""
  base = (np.asarray(labels) * 37 % 200).reshape(-1, 1, 1, 1)
  return np.clip(base + rng.integers(0, 56, (count, height, width, channels)), 0, 255).astype(np.uint8)


def _balanced(rng, classes, per_class):
  return rng.permutation(np.repeat(np.arange(classes), per_class))


def write_mnist(folder: pathlib.Path, seed: int = 0, train_per_class: int = 4, test_per_class: int = 2) -> Written:
  """The four gzip IDX files (MNIST and Fashion-MNIST share the format and the names)."""
  rng = np.random.default_rng(seed)
  files, splits = {}, {}
  for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
    labels = _balanced(rng, 10, per_class)
    images = _images(rng, len(labels), 28, 28, 1, labels)
    name = f"{prefix}-images-idx3-ubyte.gz"
    header = struct.pack(">IIII", 2051, len(labels), 28, 28)
    files[name] = _write(folder / name, gzip.compress(header + images.tobytes()))
    name = f"{prefix}-labels-idx1-ubyte.gz"
    header = struct.pack(">II", 2049, len(labels))
    files[name] = _write(folder / name, gzip.compress(header + labels.astype(np.uint8).tobytes()))
    splits[split] = (images, labels)
  return Written(files, splits)


def _tar(members: dict, mode: str = "w") -> bytes:
  """A tar ('w') or tar.gz ('w:gz') archive of {name: bytes}."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode=mode) as archive:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      archive.addfile(info, io.BytesIO(payload))
  return buffer.getvalue()


def _write(path: pathlib.Path, payload: bytes) -> pathlib.Path:
  path.write_bytes(payload)
  return path


def _planes(images: np.ndarray) -> np.ndarray:
  """(N, 32, 32, 3) -> (N, 3072): CIFAR's R, G, B planes, row-major."""
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(folder: pathlib.Path, seed: int = 1, per_batch: int = 8, test: int = 20) -> Written:
  rng = np.random.default_rng(seed)
  members, parts = {}, []
  for name, count in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", test)]:
    labels = rng.integers(0, 10, count)
    images = _images(rng, count, 32, 32, 3, labels)
    records = np.concatenate([labels.astype(np.uint8)[:, None], _planes(images)], axis=1)
    members[f"cifar-10-batches-bin/{name}"] = records.tobytes()
    parts.append((images, labels))
  names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  members["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(names) + "\n\n").encode()
  train = tuple(np.concatenate(x) for x in zip(*parts[:5]))
  path = _write(folder / "cifar-10-binary.tar.gz", _tar(members, "w:gz"))
  return Written({path.name: path}, {"train": train, "test": parts[5]})


def write_cifar100(folder: pathlib.Path, seed: int = 2, train: int = 60, test: int = 20) -> Written:
  rng = np.random.default_rng(seed)
  members, splits = {}, {}
  for split, count in (("train", train), ("test", test)):
    fine = rng.integers(0, 100, count)
    images = _images(rng, count, 32, 32, 3, fine)
    coarse = fine // 5
    records = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], _planes(images)],
                             axis=1)
    members[f"cifar-100-binary/{split}.bin"] = records.tobytes()
    splits[split] = (images, fine)
  members["cifar-100-binary/coarse_label_names.txt"] = "\n".join(f"coarse_{i}" for i in range(20)).encode()
  members["cifar-100-binary/fine_label_names.txt"] = "\n".join(f"fine_{i}" for i in range(100)).encode()
  path = _write(folder / "cifar-100-binary.tar.gz", _tar(members, "w:gz"))
  return Written({path.name: path}, splits)


def write_svhn_cropped(folder: pathlib.Path, seed: int = 3) -> Written:
  from scipy import io as scipy_io

  rng = np.random.default_rng(seed)
  files, splits = {}, {}
  for split, per_class in (("train", 3), ("test", 2), ("extra", 1)):
    labels = _balanced(rng, 10, per_class)
    images = _images(rng, len(labels), 32, 32, 3, labels)
    name = f"{split}_32x32.mat"
    stored = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)  # SVHN writes digit 0 as 10
    scipy_io.savemat(folder / name, {"X": images.transpose(1, 2, 3, 0), "y": stored})
    files[name] = folder / name
    splits[split] = (images, labels)
  return Written(files, splits)


def write_stl10(folder: pathlib.Path, seed: int = 4) -> Written:
  rng = np.random.default_rng(seed)
  members, splits = {}, {}

  def column_major(images):  # (N, 96, 96, 3) as (row, column, channel) -> (N, channel, column, row) bytes
    return images.transpose(0, 3, 2, 1).tobytes()

  for split, per_class in (("train", 2), ("test", 1)):
    labels = _balanced(rng, 10, per_class)
    images = _images(rng, len(labels), 96, 96, 3, labels)
    members[f"stl10_binary/{split}_X.bin"] = column_major(images)
    members[f"stl10_binary/{split}_y.bin"] = (labels + 1).astype(np.uint8).tobytes()  # stored 1..10
    splits[split] = (images, labels)
  unlabelled = _images(rng, 3, 96, 96, 3, np.zeros(3, int))
  members["stl10_binary/unlabeled_X.bin"] = column_major(unlabelled)
  splits["unlabelled"] = (unlabelled, np.full(3, -1))
  names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
  members["stl10_binary/class_names.txt"] = ("\n".join(names) + "\n").encode()
  path = _write(folder / "stl10_binary.tar.gz", _tar(members, "w:gz"))
  return Written({path.name: path}, splits)


def _jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def decode_jpeg(payload: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))


def write_imagenet2012(folder: pathlib.Path, tfds_folder: pathlib.Path, seed: int = 5, synsets: int = 3,
                       per_synset: int = 4, validation: int = 12) -> Written:
  """The two ILSVRC tars; ``tfds_folder`` is tfds's datasets/imagenet2012 (labels.txt, validation_labels.txt),
  the published lists that give the classes their indices and the validation files their synsets."""
  rng = np.random.default_rng(seed)
  classes = (tfds_folder / "labels.txt").read_text().split()
  val_synsets = (tfds_folder / "validation_labels.txt").read_text().split()

  def image():  # JPEGs of 30..70 px a side, portrait and landscape
    height, width = (int(x) for x in rng.integers(30, 71, 2))
    return np.clip(rng.integers(0, 256, (height, width, 3)), 0, 255).astype(np.uint8)

  train_members, images, labels = {}, [], []
  for k in range(synsets):
    synset = classes[k * 300]  # classes far apart in the list: 0, 300, 600
    inner = {f"{synset}_{i}.JPEG": _jpeg(image()) for i in range(per_synset)}
    train_members[f"{synset}.tar"] = _tar(inner)
    for payload in inner.values():
      images.append(payload)
      labels.append(k * 300)
  val_members = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": _jpeg(image()) for i in range(validation)}
  val_labels = [classes.index(val_synsets[i]) for i in range(validation)]  # sorted names <-> the file's lines
  manual = folder / "manual"
  manual.mkdir()
  files = {"ILSVRC2012_img_train.tar": _write(manual / "ILSVRC2012_img_train.tar", _tar(train_members)),
           "ILSVRC2012_img_val.tar": _write(manual / "ILSVRC2012_img_val.tar", _tar(val_members))}
  return Written(files, {"train": (images, np.asarray(labels)),
                         "validation": (list(val_members.values()), np.asarray(val_labels))})


WRITERS = {"mnist": write_mnist, "fashion_mnist": write_mnist, "cifar10": write_cifar10,
           "cifar100": write_cifar100, "svhn_cropped": write_svhn_cropped, "stl10": write_stl10}
