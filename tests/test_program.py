"""nc_jax.training.program: one config -> one compiled program, shared by training and collect."""

import hashlib
import json
import subprocess
import sys

import pytest

from configs import default as default_config
from nc_jax import schema
from nc_jax.data import device
from nc_jax.training import program as program_lib

INPUT_SHAPE = (40,)  # one MNIST-1D example
NUM_CLASSES = 10


def smoke(**overrides):
  config = default_config.get_config("smoke")
  config.update(overrides)
  return config


def build(config):
  return program_lib.build_program(config, device.data_mesh(), NUM_CLASSES, INPUT_SHAPE, steps_per_epoch=4)


def test_equal_configs_get_the_same_program():
  assert build(smoke()) is build(smoke())


@pytest.mark.parametrize("neutral", [dict(measure_epochs=(1,)), dict(tpt_threshold=0.5), dict(deepfool_samples=3),
                                     dict(checkpoint_every_epochs=7), dict(data_dir="/elsewhere")],
                         ids=lambda overrides: next(iter(overrides)))
def test_a_program_neutral_key_shares_the_program_and_the_run_digest(neutral):
  assert set(neutral) <= set(schema.PROGRAM_NEUTRAL_KEYS)
  assert build(smoke(**neutral)) is build(smoke())
  assert program_lib.run_digest(smoke(**neutral)) == program_lib.run_digest(smoke())


def test_a_program_key_gets_another_program_built_with_its_value():
  base, changed = build(smoke()), build(smoke(lr=0.0123))
  assert changed is not base
  assert float(changed.learning_rate(0)) == pytest.approx(0.0123)
  assert program_lib.run_digest(smoke(lr=0.0123)) != program_lib.run_digest(smoke())


def test_the_key_is_hashable_and_ignores_list_or_tuple():
  key = program_lib.program_key(smoke(adam_betas=[0.9, 0.99]))
  assert hash(key) == hash(program_lib.program_key(smoke(adam_betas=(0.9, 0.99))))
  assert not set(dict(key)) & set(schema.PROGRAM_NEUTRAL_KEYS)


def test_the_run_digest_is_the_one_mid_epoch_checkpoints_on_disk_carry():
  # Mid-epoch checkpoints written before the program moved out of the loop carry this digest: sha256 of the
  # config's JSON without the neutral keys, keys sorted. Another formula would orphan them. (Those configs had no
  # nc group; at its defaults run_digest leaves it out.)
  config = smoke()
  values = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
            if k not in schema.PROGRAM_NEUTRAL_KEYS + ("nc",)}
  expected = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
  assert program_lib.run_digest(config) == expected


def test_collect_does_not_import_the_training_loop():
  code = ("import sys, nc_jax.collect.workdir, nc_jax.training.program; "
          "print('nc_jax.training.loop' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
  assert result.stdout.strip() == "False"
