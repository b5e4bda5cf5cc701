"""What the paper's 21 cells share: the grid, the training protocol, and the seconds-long 'smoke' variant.

Each cell file (configs/paper/DATASET_NET.py) states its own values: dataset, net, stem, epochs, batch, lr,
weight decay and TPT threshold. The rest is the protocol of Papyan, Han & Donoho (2020) and the authors'
notebook, set here once: cross-entropy, SGD with momentum 0.9, the lr x0.1 at epochs num_epochs // 3 and
2 * num_epochs // 3, balanced classes at the paper's per-class counts, one global mean/std, NC measured on the
notebook's epoch schedule. Every key and what it means: nc_jax/schema.py.

The lr of most cells is not known: they start at the notebook's 0.0679 and want the sweep
(``python experiments/grid.py run``), 25 values log-spaced on [1e-4, 0.25].
"""

import importlib.util
import pathlib

import ml_collections

from nc_jax import schema

# The grid: each dataset's three nets (the paper's depths as recalled, unconfirmed), in the paper's order.
NETS = {
    "mnist": ("vgg11", "resnet18", "densenet40"),
    "svhn_cropped": ("vgg11", "resnet18", "densenet40"),
    "fashion_mnist": ("vgg11", "resnet18", "densenet250"),
    "cifar10": ("vgg13", "resnet18", "densenet40"),
    "cifar100": ("vgg13", "resnet50", "densenet250"),
    "stl10": ("vgg13", "resnet50", "densenet250"),
    "imagenet2012": ("vgg19", "resnet152", "densenet201"),
}
# The protocol every cell follows (the values of nc_jax.schema.base_config, stated here for the reader).
PROTOCOL = {
    "loss": "cross_entropy",
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr_decay_factor": 0.1,
    "lr_decay_epochs": (),  # () = (num_epochs // 3, 2 * num_epochs // 3): 116 and 233 of 350
    "per_class": "paper",  # MNIST 5000, SVHN 4600, ImageNet 600 per class; the others are balanced already
    "standardization": "global",  # the notebook's one mean/std from the training set, no augmentation
    "measure_epochs": (),  # () = the notebook's schedule, rescaled to num_epochs
}
# The smoke variant: 2 epochs of 8-image batches on every training example of the mock data, each net narrowed.
SMOKE = {"num_epochs": 2, "per_class": "none", "batch_size": 8, "eval_batch_size": 16, "measure_epochs": (1, 2),
         "deepfool_samples": 4}
SMOKE_OPTIONS = {"vgg": {"classifier_width": 8, "width_multiplier": 1 / 16}, "resnet": {"width": 4},
                 "densenet": {"growth_rate": 2}}
FOLDER = pathlib.Path(__file__).resolve().parent


def cells() -> list[tuple[str, str]]:
  """The paper's 21 (dataset, net) cells, in the paper's order."""
  return [(dataset, net) for dataset, nets in NETS.items() for net in nets]


def protocol(*, dataset: str, data_source: str, model: str, stem: str) -> ml_collections.ConfigDict:
  """Every key at the paper's protocol (``PROTOCOL``) for one dataset and net; the cell sets its own values.

  ``stem``: 'small' (3x3 stride 1, the notebook's on small images) or 'imagenet' (7x7 stride 2 and a max-pool).
  """
  config = schema.base_config(dataset=dataset, data_source=data_source, model=model, model_options={"stem": stem})
  config.update(PROTOCOL)
  return config


def variant(config: ml_collections.ConfigDict, name: str, config_file: str) -> ml_collections.ConfigDict:
  """``config`` as the cell built it (name ''), or 'smoke': ``SMOKE`` and the net narrowed (``SMOKE_OPTIONS``;
  DenseNets one layer a block), the same code in seconds on a CPU. Another name is refused naming the file."""
  if name == "smoke":
    config.update(SMOKE)
    family = next(f for f in SMOKE_OPTIONS if config.model.startswith(f))
    config.model_options.update(SMOKE_OPTIONS[family])
    if family == "densenet":
      config.model_options.block_sizes = (1,) * len(config.model_options.block_sizes)
  elif name:
    raise ValueError(f"unknown variant {name!r} of {config_file}; choose '' or 'smoke'")
  return config


def load(dataset: str, net: str, name: str = "") -> ml_collections.ConfigDict:
  """``get_config(name)`` of the cell's file, configs/paper/DATASET_NET.py (for tests and benchmarks)."""
  if (dataset, net) not in cells():
    raise ValueError(f"({dataset!r}, {net!r}) is not a cell of the paper's grid; cells: {cells()}")
  path = FOLDER / f"{dataset}_{net}.py"
  spec = importlib.util.spec_from_file_location(f"configs.paper.{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(name)
