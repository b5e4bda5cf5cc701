"""The embedded default main job: MNIST-1D on a 3x512 BatchNorm MLP, the paper's full protocol.

350 epochs of SGD (momentum 0.9, weight decay 5e-4, batch 128, lr x0.1 at epochs
116 and 233), NC measured on the notebook's epoch schedule. Generated offline;
about a minute on 2 CPU cores. Every key, and what it means: nc_jax/schema.py.

    python -m nc_jax.train --workdir workdirs/default
    python -m nc_jax.train --config configs/default.py:smoke --workdir /tmp/smoke
"""

import ml_collections

from nc_jax import schema


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = schema.base_config(dataset="mnist1d", data_source="generated", model="mlp",
                              model_options={"width": 512, "depth": 3})
  if variant == "smoke":
    config.num_epochs = 6
    config.model_options.width = 32
    config.measure_epochs = (1, 3, 6)
    config.deepfool_samples = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/default.py; choose '' or 'smoke'")
  return config
