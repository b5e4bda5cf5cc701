"""The paper's grid as configs: one (dataset, net) cell -> a ConfigDict with PAPER.md's values.

The configs/paper/*.py files are one line over ``paper_config``. Fields are the
same as configs/default.py's (a test keeps them in step).
"""

from __future__ import annotations

import ml_collections

# PAPER.md, "depths" (an unconfirmed recollection of the paper's table).
NETS = {
    "mnist": ("vgg11", "resnet18", "densenet40"),
    "svhn_cropped": ("vgg11", "resnet18", "densenet40"),
    "fashion_mnist": ("vgg11", "resnet18", "densenet250"),
    "cifar10": ("vgg13", "resnet18", "densenet40"),
    "cifar100": ("vgg13", "resnet50", "densenet250"),
    "stl10": ("vgg13", "resnet50", "densenet250"),
    "imagenet2012": ("vgg19", "resnet152", "densenet201"),
}
# Learning rates known to be the sweep's pick (PAPER.md); other cells default to the notebook's.
KNOWN_LR = {("mnist", "resnet18"): 0.0679, ("cifar10", "resnet18"): 0.13025, ("cifar100", "resnet50"): 0.18045}
NOTEBOOK_LR = 0.0679
SMOKE_OPTIONS = {"vgg": {"classifier_width": 8, "width_multiplier": 1 / 16}, "resnet": {"width": 4}, "densenet": {"growth_rate": 2}}


def cells() -> list[tuple[str, str]]:
  return [(dataset, net) for dataset, nets in NETS.items() for net in nets]


def paper_config(dataset: str, net: str, variant: str = "") -> ml_collections.ConfigDict:
  """The paper's protocol for one cell; ``variant='smoke'`` is a seconds-long CPU run of the same code."""
  if (dataset, net) not in cells():
    raise ValueError(f"({dataset!r}, {net!r}) is not a cell of the paper's grid; cells: {cells()}")
  imagenet = dataset == "imagenet2012"
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.data_source = "idx" if dataset == "fashion_mnist" else "tfds"  # Fashion-MNIST: offline Debian files
  config.data_dir = ""
  config.per_class = "paper"
  config.standardization = "global"
  config.data_seed = 0
  config.model = net
  config.model_options = ml_collections.ConfigDict(
      {"stem": "imagenet"} if imagenet and not net.startswith("densenet") else
      ({} if net.startswith("densenet") else {"stem": "small"}))
  config.compute_dtype = "float32"
  config.loss = "cross_entropy"
  config.num_epochs = 300 if imagenet else 350
  config.batch_size = 128
  config.lr = KNOWN_LR.get((dataset, net), NOTEBOOK_LR)
  config.momentum = 0.9
  config.weight_decay = 1e-4 if imagenet else 5e-4
  config.lr_decay_factor = 0.1
  config.lr_decay_epochs = ()
  config.seed = 0
  config.measure_epochs = ()
  config.tpt_threshold = 0.996 if imagenet else 0.999
  config.eval_batch_size = 1024
  config.per_layer_nc = False
  config.deepfool_samples = 100
  config.keep_checkpoints = 3
  config.num_devices = 0
  config.epoch_loop = "auto"  # "scan" (one lax.scan per epoch), "steps" (host loop; auto on CPU for conv nets)
  if variant == "smoke":
    config.num_epochs = 2
    config.per_class = None
    config.batch_size = 8
    config.eval_batch_size = 16
    config.measure_epochs = (1, 2)
    config.deepfool_samples = 4
    family = next(f for f in SMOKE_OPTIONS if net.startswith(f))
    config.model_options.update(SMOKE_OPTIONS[family])
    if family == "densenet":
      config.model_options.block_sizes = (1,) * (4 if imagenet else 3)
    if imagenet:
      config.data_source = "tfds"
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
  return config
