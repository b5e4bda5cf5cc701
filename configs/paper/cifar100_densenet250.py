"""CIFAR-100 / densenet250: one cell of the paper's grid (lr: not known, run the sweep (default: the notebook's 0.0679)).

    python -m nc_jax.train --config configs/paper/cifar100_densenet250.py --workdir DIR
"""

from nc_jax.schema import paper_config


def get_config(variant: str = ""):
  return paper_config("cifar100", "densenet250", variant)
