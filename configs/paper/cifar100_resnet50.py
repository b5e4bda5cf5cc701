"""CIFAR-100 / resnet50: one cell of the paper's grid (lr: the sweep's known pick).

    python -m nc_jax.train --config configs/paper/cifar100_resnet50.py --workdir DIR
"""

from nc_jax.schema import paper_config


def get_config(variant: str = ""):
  return paper_config("cifar100", "resnet50", variant)
