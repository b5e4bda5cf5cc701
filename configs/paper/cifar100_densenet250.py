"""CIFAR-100 on DenseNet-250: one cell of the paper's grid (its lr not known: run the sweep).

    python -m nc_jax.train --config configs/paper/cifar100_densenet250.py --workdir DIR

':smoke' after the file name runs the same code in seconds on a CPU. What the 21 cells share (loss,
optimizer, lr schedule, balancing, measurement) is in configs/paper/common.py.
"""

import pathlib
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[2])  # this checkout: configs/ imports from any folder
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from configs.paper import common  # noqa: E402


def get_config(variant: str = ""):
  config = common.protocol(dataset="cifar100", data_source="tfds", model="densenet250", stem="small")
  config.num_epochs = 350
  config.batch_size = 128
  config.lr = 0.0679  # not known: the notebook's, until the sweep picks one
  config.weight_decay = 5e-4
  config.tpt_threshold = 0.999  # TPT starts at train accuracy >= 99.9%
  return common.variant(config, variant, "configs/paper/cifar100_densenet250.py")
