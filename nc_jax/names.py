"""The names the code knows, in one light module (standard library only, no JAX).

Each table is owned here and imported by the module that acts on it (nc_jax.data, nc_jax.models,
nc_jax.training) and by ``nc_jax.schema``, which checks configs without loading JAX.
"""

from typing import Any

TFDS_DATASETS = {  # name -> (num_classes, test split): the datasets tfds prepares (nc_jax.prepare)
    "mnist": (10, "test"),
    "fashion_mnist": (10, "test"),
    "cifar10": (10, "test"),
    "cifar100": (100, "test"),
    "svhn_cropped": (10, "test"),
    "stl10": (10, "test"),
    "imagenet2012": (1000, "validation"),
}
GENERATED_DATASETS = ("mnist1d", "synthetic")  # made offline; data_source is not used for them
IDX_DATASETS = ("mnist", "fashion_mnist")  # the ones data_source='idx' (MNIST-format files) can read
DATASETS = tuple(TFDS_DATASETS) + GENERATED_DATASETS
DATA_SOURCES = ("tfds", "idx", "generated")

STANDARDIZATIONS = ("global", "channel", "pixel", "none")  # nc_jax.data.preprocess.standardize
IMBALANCES = ("none", "step", "exponential")  # nc_jax.data.preprocess's class-size profiles
INPUT_PIPELINES = ("auto", "memory", "stream")  # nc_jax.data.stream.choose_pipeline

STEMS = ("small", "imagenet")  # ResNet's, VGG's and DenseNet's first layers

LOSSES = ("cross_entropy", "mse")  # nc_jax.training.step.loss_function
OPTIMIZERS = ("sgd", "adam", "adamw")  # nc_jax.training.schedule.optimizer
COMPUTE_DTYPES = ("float32", "bfloat16")
EVAL_DTYPES = ("float32", "same")  # nc_jax.training.evaluate.eval_model
EPOCH_LOOPS = ("auto", "scan", "steps")  # nc_jax.training.program.epoch_loop

# Every model and its options: a copy of nc_jax.models (which imports flax), kept equal by tests/test_schema.py.
# Each model's constructor options (its flax dataclass fields but num_classes and dtype, which the trainer sets)
# at the model's own defaults: the class defaults, overridden by the name's functools.partial.
VGG_POOL = "M"  # nc_jax.models.vgg.POOL: a 2x2 max-pool in a VGG layer list
_POOL = VGG_POOL
_VGG_LAYERS = {  # nc_jax.models.vgg.CONFIGS
    11: (64, _POOL, 128, _POOL, 256, 256, _POOL, 512, 512, _POOL, 512, 512, _POOL),
    13: (64, 64, _POOL, 128, 128, _POOL, 256, 256, _POOL, 512, 512, _POOL, 512, 512, _POOL),
    16: (64, 64, _POOL, 128, 128, _POOL, 256, 256, 256, _POOL, 512, 512, 512, _POOL, 512, 512, 512, _POOL),
    19: (64, 64, _POOL, 128, 128, _POOL, 256, 256, 256, 256, _POOL, 512, 512, 512, 512, _POOL,
         512, 512, 512, 512, _POOL),
}
_HEAD = {"fixed_etf": False, "head_bias": True}  # nc_jax.models.head.Head's options, on every model
_VGG = {"stem": "small", "classifier_width": None, "width_multiplier": 1.0, **_HEAD}
_RESNET = {"stem": "small", "width": 64, **_HEAD}
_DENSENET_BC = {"bottleneck": True, "compression": 0.5}
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 512, "depth": 3, "batch_norm": True, "feature_dim": None, **_HEAD},
    "cnn": {"channels": (32, 64, 128), "width": 128, **_HEAD},
    **{f"vgg{depth}": {"config": layers, **_VGG} for depth, layers in _VGG_LAYERS.items()},
    "resnet18": {"stage_sizes": (2, 2, 2, 2), **_RESNET},
    "resnet34": {"stage_sizes": (3, 4, 6, 3), **_RESNET},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), **_RESNET},
    "resnet101": {"stage_sizes": (3, 4, 23, 3), **_RESNET},
    "resnet152": {"stage_sizes": (3, 8, 36, 3), **_RESNET},
    "densenet40": {"block_sizes": (12, 12, 12), "growth_rate": 12, "bottleneck": False, "compression": 1.0,
                   "init_features": 16, "stem": "small", **_HEAD},
    "densenet250": {"block_sizes": (41, 41, 41), "growth_rate": 24, **_DENSENET_BC, "init_features": 48,
                    "stem": "small", **_HEAD},
    "densenet121": {"block_sizes": (6, 12, 24, 16), "growth_rate": 32, **_DENSENET_BC, "init_features": 64,
                    "stem": "imagenet", **_HEAD},
    "densenet201": {"block_sizes": (6, 12, 48, 32), "growth_rate": 32, **_DENSENET_BC, "init_features": 64,
                    "stem": "imagenet", **_HEAD},
}
MODELS = tuple(MODEL_OPTIONS)  # nc_jax.models.NAMES
