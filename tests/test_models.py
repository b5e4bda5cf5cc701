"""nc_jax.models: the registry, torchvision's parameter counts, shapes, heads and feature capture."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax import models
from nc_jax.metrics import neural_collapse


def count_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def abstract_init(model, shape):
  """Shapes of ((logits, features), variables) without computing anything."""
  return jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize("name,options,expected", [
    ("resnet18", {"stem": "imagenet"}, 11_689_512),
    ("resnet50", {"stem": "imagenet"}, 25_557_032),
    ("vgg16", {"stem": "imagenet"}, 138_365_992),
    ("densenet201", {}, 20_013_928),
])
def test_imagenet_parameter_counts_equal_torchvision(name, options, expected):
  _, variables = abstract_init(models.create(name, 1000, **options), (1, 224, 224, 3))
  assert count_params(variables["params"]) == expected


@pytest.mark.parametrize("name,published", [("densenet40", 1.0e6), ("densenet250", 15.3e6)])
def test_cifar_densenets_have_the_published_size(name, published):
  # Huang et al. (2017), Table 2: DenseNet (L=40, k=12) 1.0M, DenseNet-BC (L=250, k=24) 15.3M on CIFAR-10.
  _, variables = abstract_init(models.create(name, 10), (1, 32, 32, 3))
  assert count_params(variables["params"]) == pytest.approx(published, rel=0.025)


@pytest.mark.parametrize("name", [n for n in models.NAMES if n != "mlp"])
def test_small_image_variants_give_logits_and_features(name):
  options = {"stem": "small"} if name.startswith(("vgg", "resnet")) else {}
  if name in ("densenet121", "densenet201"):
    options = {"stem": "small"}
  (logits, features), variables = abstract_init(models.create(name, 10, **options), (2, 32, 32, 3))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert features.ndim == 2 and features.shape[0] == 2
  head = variables["params"]["head"]["dense"]
  assert head["kernel"].shape == (features.shape[1], 10) and head["bias"].shape == (10,)


@pytest.mark.parametrize("name,options,shape", [
    ("mlp", {"width": 16, "depth": 2}, (4, 40)),
    ("cnn", {"channels": (4, 8, 8), "width": 8}, (4, 28, 28, 1)),
    ("resnet18", {"width": 4}, (4, 32, 32, 3)),
    ("vgg11", {"classifier_width": 16, "width_multiplier": 1 / 8}, (4, 32, 32, 3)),
    ("densenet40", {"growth_rate": 4, "block_sizes": (2, 2, 2)}, (4, 32, 32, 3)),
])
def test_real_forward_pass_and_batch_stats_update(name, options, shape):
  model = models.create(name, 3, **options)
  inputs = jax.random.normal(jax.random.PRNGKey(1), shape)
  variables = model.init(jax.random.PRNGKey(0), inputs, train=False)
  (logits, features), updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 3) and np.isfinite(np.asarray(logits)).all()
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
  assert any(jax.tree_util.tree_leaves(changed))
  logits_eval, features_eval, intermediates = models.apply_with_intermediates(model, variables, inputs)
  weights, bias = models.classifier_weights(variables["params"])
  np.testing.assert_allclose(features_eval @ weights.T + bias, logits_eval, rtol=1e-5, atol=1e-5)
  assert intermediates and all(v.shape[0] == 4 for v in intermediates.values())
  np.testing.assert_allclose(logits_eval, model.apply(variables, inputs)[0], rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_statistics():
  model = models.create("resnet18", 10, width=4, dtype=jnp.bfloat16)
  inputs = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), inputs)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  (logits, features), updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
  assert {x.dtype for x in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_fixed_etf_head_is_a_frozen_simplex():
  model = models.create("mlp", 5, width=16, depth=1, fixed_etf=True)
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 8)))
  assert "dense" not in variables["params"]["head"]
  with pytest.raises(ValueError, match="feature_dim"):
    models.classifier_weights(variables["params"])
  weights, _ = models.classifier_weights(variables["params"], feature_dim=16)
  gram = np.asarray(weights @ weights.T)
  np.testing.assert_allclose(np.diag(gram), 1.0, rtol=1e-5)
  np.testing.assert_allclose(gram[~np.eye(5, dtype=bool)], -1 / 4, atol=1e-6)
  with pytest.raises(ValueError, match="feature_dim >= num_classes"):
    models.create("mlp", 5, width=3, depth=1, fixed_etf=True).init(jax.random.PRNGKey(0), jnp.ones((2, 8)))


def test_resnet_init_matches_torchvision_kaiming_fan_out():
  variables = models.create("resnet18", 10).init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
  kernel = np.asarray(variables["params"]["stage3_block0"]["Conv_0"]["kernel"])  # (3, 3, 256, 512)
  assert kernel.std() == pytest.approx(np.sqrt(2.0 / (3 * 3 * 512)), rel=0.02)


def test_unknown_model_and_bad_option_are_named():
  with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18"):
    models.create("resnet19", 10)
  with pytest.raises(ValueError, match="bad options for model 'mlp'"):
    models.create("mlp", 10, colour="blue")
  with pytest.raises(ValueError, match="unknown stem"):
    models.create("resnet18", 10, stem="huge").init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))


class UsersOwnNet(nn.Module):
  """A model nc-jax did not define: its classifier is a Dense named 'classifier'."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6, name="hidden")(x))
    return nn.Dense(3, name="classifier")(h)


def test_final_layer_features_of_a_users_model():
  model = UsersOwnNet()
  inputs = jax.random.normal(jax.random.PRNGKey(2), (30, 4))
  variables = model.init(jax.random.PRNGKey(0), inputs)
  features, weights, bias = jax.jit(lambda v, x: models.final_layer_features(model, v, x, "classifier"))(
      variables, inputs)
  hidden = variables["params"]["hidden"]
  expected = np.tanh(np.asarray(inputs) @ hidden["kernel"] + hidden["bias"])
  np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(features @ weights.T + bias, model.apply(variables, inputs), rtol=1e-5, atol=1e-6)
  labels = np.arange(30) % 3
  assert np.isfinite(float(neural_collapse(features, labels, 3, weights, bias)["nc1"]))
  with pytest.raises(ValueError, match="no nn.Dense named 'head'"):
    models.final_layer_features(model, variables, inputs, "head")
