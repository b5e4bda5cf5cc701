"""Streamed input speed: decode + preprocess per host core, the streamed epoch against the in-memory one.

    python benchmarks/input.py [--jpeg-images 256] [--cifar-images 5000] [--no-append]

Writes two tfds ArrayRecord datasets with tfds's own builder (offline, PIL-encoded, as `tfds build
--file_format=array_record` stores them) in a temporary folder, then times, in this one process (one core):
  224 px JPEG  ImageNet-like JPEGs (500 x 375, quality 90, smooth content plus noise: ~ImageNet's bytes per
               image) read through ``tfds.data_source``, decoded, shorter side resized to 256, centre 224 crop,
               standardised (``stream.TrainStream`` rows, worker_count 0): images/s per core;
  32 px PNG    CIFAR-size PNGs read, decoded, standardised the same way: images/s per core;
  epoch        one streamed epoch of global batches of 128 on the 'data' mesh (CIFAR-size, one core) against the
               in-memory path's epoch of batches (``device.epoch_batches`` gather, jitted, on device), input only:
               the training step is the same in both and is not timed.
From these, the host cores needed to feed one H100: at 45 000 img/s (ResNet18 on 32 px, a scanned JAX step at
batch 128, measured on an H200: BENCHMARKS.md) and at ~7 300 img/s (ResNet50 v1.5 on 224 px, mixed precision:
MLPerf Training v3.0 closed, 8x H100-SXM5-80GB, MXNet, ID 3.0-2053: 13.47 min to 75.9% top-1; at ~37 epochs of
1.281 M images that is 58 700 img/s per node, 7 300 per GPU, a lower bound since the time includes evaluation).
Prints a markdown table and appends it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

import common
from nc_jax.data import device, stream

H100_RESNET18_CIFAR = 45_000  # img/s, BENCHMARKS.md (H200 measurement; an H100 is taken as equal)
H100_RESNET50_IMAGENET = 7_300  # img/s, from MLPerf Training v3.0 3.0-2053 (see the docstring)


def _builder(name: str, images_fn, count: int, classes: int, encoding: str):
  """A tfds GeneratorBasedBuilder class writing ``count`` images from ``images_fn(i)`` (uint8 HWC)."""

  def info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding.lower()),
        "label": tfds.features.ClassLabel(num_classes=classes)}))

  def split_generators(self, dl_manager):
    return {"train": self._generate_examples(count), "test": self._generate_examples(classes)}

  def generate_examples(self, n):
    for i in range(n):
      yield i, {"image": stream.encode_image(images_fn(i), encoding), "label": i % classes}

  # The class name gives the dataset's name; a one-part module name spares tfds a code-path lookup that needs
  # importlib_resources.
  return type("".join(part.title() for part in name.split("_")), (tfds.core.GeneratorBasedBuilder,), {
      "VERSION": tfds.core.Version("1.0.0"), "__module__": name, "_info": info,
      "_split_generators": split_generators, "_generate_examples": generate_examples})


def natural_like(height: int, width: int, seed: int) -> np.ndarray:
  """Smooth random colour fields plus mild noise: JPEG sizes near a photograph's (not white noise's)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 25 + 2, width // 25 + 2, 3))
  rows, cols = np.linspace(0, coarse.shape[0] - 1.001, height), np.linspace(0, coarse.shape[1] - 1.001, width)
  r0, c0 = rows.astype(int), cols.astype(int)
  fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
  field = (coarse[r0][:, c0] * (1 - fr) * (1 - fc) + coarse[r0 + 1][:, c0] * fr * (1 - fc)
           + coarse[r0][:, c0 + 1] * (1 - fr) * fc + coarse[r0 + 1][:, c0 + 1] * fr * fc)
  return np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)


def images_per_second(data, batch_size: int, steps: int) -> float:
  train = stream.TrainStream(data, batch_size=batch_size, seed=0)
  next(train)  # warm-up (PIL and tfds lazy imports)
  start = time.perf_counter()
  for _ in range(steps):
    next(train)
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--jpeg-images", type=int, default=256)
  parser.add_argument("--cifar-images", type=int, default=5000)
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as data_dir:
    _builder("nc_bench_jpeg", lambda i: natural_like(375, 500, i), args.jpeg_images, 10, "JPEG")(
        data_dir=data_dir, file_format="array_record").download_and_prepare()
    cifar = _builder("nc_bench_cifar", lambda i: natural_like(32, 32, i), args.cifar_images, 10, "PNG")
    cifar(data_dir=data_dir, file_format="array_record").download_and_prepare()
    jpeg_bytes = np.mean([len(stream.encode_image(natural_like(375, 500, i), "JPEG")) for i in range(8)])

    jpeg = stream.open_dataset("nc_bench_jpeg", data_dir=data_dir, per_class=None, image_size=(256, 224))
    jpeg_rate = images_per_second(jpeg, 32, max(1, args.jpeg_images // 32 - 1))
    small = stream.open_dataset("nc_bench_cifar", data_dir=data_dir, per_class=None)
    small_rate = images_per_second(small, 128, 10)

    mesh = device.data_mesh()
    train = stream.TrainStream(small, batch_size=128, seed=0, mesh=mesh)
    start = time.perf_counter()
    for batch in train.epoch(1):
      jax.block_until_ready(batch)
    streamed_epoch = time.perf_counter() - start

    images = np.stack([image for image, _ in small.train_source.read(small.train_indices)])
    inputs = device.put_replicated(small.transform.batch(list(images)), mesh)
    labels = device.put_replicated(small.train_labels, mesh)
    draw = jax.jit(lambda x, y, epoch: device.epoch_batches(x, y, 0, epoch, 128, mesh))
    memory_epoch = common.median_time(lambda: draw(inputs, labels, 1), 3)

  cores = lambda rate, need: f"{need / rate:.1f}"
  header = (f"### benchmarks/input.py, {datetime.date.today()}: host {platform.processor() or platform.machine()}, "
            f"one core (worker_count 0), jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} "
            f"device(s); tfds ArrayRecord data written here ({args.jpeg_images} JPEGs of 500x375, "
            f"{jpeg_bytes / 1000:.0f} kB each; {args.cifar_images} PNGs of 32x32)")
  table = "\n".join([
      header, "",
      "| input | decode + preprocess (img/s per core) | to feed | img/s needed | host cores needed |",
      "| --- | ---: | --- | ---: | ---: |",
      f"| 224 px JPEG (resize 256, crop 224) | {jpeg_rate:,.0f} | ResNet50 / ImageNet, one H100 (MLPerf v3.0) | "
      f"{H100_RESNET50_IMAGENET:,} | {cores(jpeg_rate, H100_RESNET50_IMAGENET)} |",
      f"| 32 px PNG (CIFAR size) | {small_rate:,.0f} | ResNet18 / CIFAR, one H100 (45k img/s, scanned) | "
      f"{H100_RESNET18_CIFAR:,} | {cores(small_rate, H100_RESNET18_CIFAR)} |",
      "",
      f"Epoch of {train.steps_per_epoch} batches of 128 (CIFAR size, input only): streamed "
      f"{streamed_epoch:.2f} s, in memory (on-device gather) {memory_epoch * 1000:.1f} ms: "
      f"ratio {streamed_epoch / memory_epoch:,.0f}x (one run). The in-memory path needs the standardised set "
      "on every device; the streamed one needs host cores as above."])
  common.report(table, append=not args.no_append)


if __name__ == "__main__":
  main()
