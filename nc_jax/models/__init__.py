"""nc_jax.models: the paper's nets (and small ones for CPU) by name.

    model = nc_jax.models.create("resnet18", num_classes=10)
    variables = model.init(key, images, train=False)
    logits, features = model.apply(variables, images, train=False)
    W, b = nc_jax.models.classifier_weights(variables["params"])

Every model maps images (B, H, W, C) (or vectors (B, d) for the MLP) to
(logits (B, C) float32, features (B, p) float32), features being the input of the
final linear classifier. Options: ``fixed_etf`` (freeze W to a simplex ETF),
``head_bias`` (False: logits = W h),
``dtype`` (compute dtype, e.g. jnp.bfloat16; params and BatchNorm statistics
stay float32, so ``model.clone(dtype=jnp.float32)`` is the same net in float32 on
the same variables: the trainer measures NC so), ``stem`` ('small' or 'imagenet',
for VGG/ResNet; DenseNets fix it by name) and family-specific widths.
"""

from __future__ import annotations

import flax.linen as nn

from nc_jax.models import densenet, resnet, small, vgg
from nc_jax.models.features import apply_with_intermediates, final_layer_features
from nc_jax.models.head import Head, classifier_weights, simplex_etf_weights

REGISTRY = {
    "mlp": small.MLP,
    "cnn": small.SimpleCNN,
    "vgg11": vgg.VGG11,
    "vgg13": vgg.VGG13,
    "vgg16": vgg.VGG16,
    "vgg19": vgg.VGG19,
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,
    "resnet101": resnet.ResNet101,
    "resnet152": resnet.ResNet152,
    "densenet40": densenet.DenseNet40,
    "densenet250": densenet.DenseNet250,
    "densenet121": densenet.DenseNet121,
    "densenet201": densenet.DenseNet201,
}
NAMES = tuple(REGISTRY)


def create(name: str, num_classes: int, **options) -> nn.Module:
  """The model called ``name`` with ``num_classes`` outputs; options go to its constructor."""
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
  try:
    return REGISTRY[name](num_classes=num_classes, **options)
  except TypeError as error:
    raise ValueError(f"bad options for model {name!r}: {error}") from None


__all__ = ["NAMES", "REGISTRY", "Head", "apply_with_intermediates", "classifier_weights", "create",
           "final_layer_features", "simplex_etf_weights"]
