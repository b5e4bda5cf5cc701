"""configs/: the default job and the paper's 21 cells load, share one schema, and their smoke variants run."""

import importlib.util
import pathlib

import pytest
import tensorflow_datasets as tfds

from configs.paper import common as paper
from nc_jax.data import idx
from nc_jax.training import train_and_evaluate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(path, variant=""):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


PAPER_FILES = sorted(p for p in (CONFIGS / "paper").glob("*.py") if p.stem != "common")  # common: what they share


def test_one_config_per_cell_of_the_grid():
  assert len(paper.cells()) == 21
  assert sorted(p.stem for p in PAPER_FILES) == sorted(f"{d}_{n}" for d, n in paper.cells())


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_configs_share_the_default_schema(path):
  default = load_config(CONFIGS / "default.py")
  for variant in ("", "smoke"):
    config = load_config(path, variant)
    assert set(config.keys()) == set(default.keys())
  full = load_config(path)
  assert full.num_epochs in (300, 350) and full.batch_size == 128 and full.momentum == 0.9
  assert full.weight_decay == (1e-4 if "imagenet" in path.stem else 5e-4)


@pytest.mark.parametrize("cell", ["cifar10_vgg13", "cifar10_resnet18", "cifar10_densenet40", "mnist_resnet18"])
def test_smoke_variants_train_under_mock_data(cell, tmp_path):
  config = load_config(CONFIGS / "paper" / f"{cell}.py", "smoke")
  with tfds.testing.mock_data(num_examples=200):
    last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  assert last["epoch"] == 2 and last["num_samples"] == 200


def test_imagenet_smoke_in_memory_says_to_stream(tmp_path):
  config = load_config(CONFIGS / "paper" / "imagenet2012_resnet152.py", "smoke")
  config.input_pipeline = "memory"  # 'auto' streams it (tests/test_stream.py trains it)
  with pytest.raises(ValueError, match="not supported by nc_jax.data.load: stream it"):
    train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)


def test_fashion_mnist_mlp_is_the_default_job_on_other_data():
  for variant in ("", "smoke"):
    default, fashion = (load_config(CONFIGS / name, variant).to_dict()
                        for name in ("default.py", "fashion_mnist_mlp.py"))
    assert (fashion["dataset"], fashion["data_source"]) == ("fashion_mnist", "idx")
    assert (fashion["model_options"]["width"], fashion["model_options"]["depth"]) == (32 if variant else 1024, 3)
    assert (default["model_options"]["width"], default["model_options"]["depth"]) == (32 if variant else 512, 5)
    fashion["model_options"] = default["model_options"]
    # the main job's 5x512 at lr 0.0255 (configs/default.py says why); Fashion-MNIST's sweep starts at the notebook's
    assert (default["lr"], fashion["lr"]) == (0.0255, 0.0679)
    assert {**fashion, "dataset": default["dataset"], "data_source": default["data_source"],
            "lr": default["lr"]} == default


@pytest.mark.skipif(not idx.DEBIAN_FASHION_MNIST.exists(),
                    reason=f"no Fashion-MNIST in {idx.DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_smoke_run_on_the_real_data(tmp_path):
  config = load_config(CONFIGS / "fashion_mnist_mlp.py", "smoke")
  config.num_epochs, config.measure_epochs, config.deepfool_samples = 2, (1, 2), 4
  last = train_and_evaluate(config, str(tmp_path), log=lambda *a, **k: None)
  assert last["num_samples"] == 60_000 and last["train_acc"] > 0.7 and last["nc1"] > 0
