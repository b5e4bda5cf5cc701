"""Fashion-MNIST (real, offline: Debian's dataset-fashion-mnist) on a 3x1024 BatchNorm MLP, the paper's protocol.

The largest paper-protocol run that fits in about an hour on a 2-core CPU: conv nets
train at ~1k img/s there (BENCHMARKS.md), i.e. ~6 h for 350 epochs of a tiny CNN, so the
paper's VGG/ResNet/DenseNet cells need an accelerator (configs/paper/fashion_mnist_*.py).

    python -m nc_jax.train --config configs/fashion_mnist_mlp.py --workdir results/fashion_mnist/fashion_mnist_mlp/lr_0.0679
    python experiments/grid.py run --root results/fashion_mnist --cells configs/fashion_mnist_mlp.py \
        --lrs 0.0184202,0.0679,0.13025    # the committed sweep (~30-55 min per lr on 2 CPU cores)
    python experiments/grid.py report --root results/fashion_mnist
"""

import ml_collections

from nc_jax import schema


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  config = schema.base_config(dataset="fashion_mnist", data_source="idx", model="mlp",
                              model_options={"width": 1024, "depth": 3})
  config.per_class = "paper"  # 6000 per class: all 60 000 training images
  return schema.mlp_variant(config, variant, "configs/fashion_mnist_mlp.py")
