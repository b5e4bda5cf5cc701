"""The main job (configs/default.py) under the MSE loss, at the notebook's MSE learning rate 0.0184.

MSE on one-hot targets, mean over batch x classes (torch's MSELoss); everything else as
configs/default.py. Each measurement also logs Han, Papyan & Donoho's (ICLR 2022) split of
the last layer's regularised MSE on the training features, mse_total = mse_lnc1 + mse_lnc23
+ mse_lperp, which ``python -m nc_jax.report`` draws as fig9_mse_decomposition.png.

    python -m nc_jax.train --config configs/default_mse.py --workdir workdirs/default_mse
    python -m nc_jax.train --config configs/default_mse.py:smoke --workdir /tmp/smoke_mse
"""

import ml_collections

from nc_jax import schema

NOTEBOOK_MSE_LR = 0.0184  # the authors' notebook's lr for MSE (0.0679 for cross-entropy)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = schema.base_config(dataset="mnist1d", data_source="generated", model="mlp",
                              model_options={"width": 512, "depth": 5})  # configs/default.py's net
  config.loss = "mse"
  config.lr = NOTEBOOK_MSE_LR
  return schema.mlp_variant(config, variant, "configs/default_mse.py")
