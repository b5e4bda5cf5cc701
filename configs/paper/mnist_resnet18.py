"""MNIST / resnet18: one cell of the paper's grid (lr: the sweep's known pick).

    python -m nc_jax.train --config configs/paper/mnist_resnet18.py --workdir DIR
"""

from nc_jax.schema import paper_config


def get_config(variant: str = ""):
  return paper_config("mnist", "resnet18", variant)
