"""The embedded default main job: MNIST-1D on a 3x512 BatchNorm MLP, the paper's full protocol.

350 epochs of SGD (momentum 0.9, weight decay 5e-4, batch 128, lr x0.1 at epochs
116 and 233), NC measured on the notebook's epoch schedule. Generated offline;
about a minute on 2 CPU cores.

    python -m nc_jax.train --workdir workdirs/default
    python -m nc_jax.train --config configs/default.py:smoke --workdir /tmp/smoke
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = "mnist1d"
  config.data_source = "generated"
  config.data_dir = ""  # tfds data_dir or IDX folder; "" = the source's default
  config.per_class = "paper"  # int, "paper" (the paper's counts; smallest class for generated data) or None
  config.standardization = "global"
  config.data_seed = 0

  config.model = "mlp"
  config.model_options = ml_collections.ConfigDict({"width": 512, "depth": 3})
  config.compute_dtype = "float32"

  config.loss = "cross_entropy"  # or "mse" (one-hot targets, mean over B x C as torch's MSELoss)
  config.num_epochs = 350
  config.batch_size = 128
  config.lr = 0.0679
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.lr_decay_factor = 0.1
  config.lr_decay_epochs = ()  # () = the paper's (num_epochs // 3, 2 * num_epochs // 3)
  config.seed = 0

  config.measure_epochs = ()  # () = the notebook's schedule, rescaled to num_epochs
  # TPT starts at the first epoch whose training accuracy, accumulated in train mode over that
  # epoch's batches (free; no extra pass), is >= this; that epoch is also measured.
  config.tpt_threshold = 0.999
  config.eval_batch_size = 1024
  config.per_layer_nc = False
  config.deepfool_samples = 100  # DeepFool robustness on this many fixed test inputs per measurement (0 = off)
  config.keep_checkpoints = 3
  config.num_devices = 0  # 0 = every device of every process; n = the first n (tests)
  config.epoch_loop = "auto"  # "scan" (one lax.scan per epoch), "steps" (host loop; auto on CPU for conv nets)

  if variant == "smoke":
    config.num_epochs = 6
    config.model_options.width = 32
    config.measure_epochs = (1, 3, 6)
    config.deepfool_samples = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/default.py; choose '' or 'smoke'")
  return config
