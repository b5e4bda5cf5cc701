"""Protocol variants, each trained end to end on MNIST-1D with the default config's small MLP:
a fixed simplex-ETF classifier (p = width, p = C as tding1's --fixdim, p = C - 1; with and without bias),
weight decay on the penultimate features (lambda_H, the unconstrained features model's), and torch's
Adam / AdamW in place of the paper's SGD. The paper's protocol stays the default of every key."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import default as default_config
from nc_jax import models, records, schema
from nc_jax.metrics import neural_collapse
from nc_jax.training import checkpoints, program as program_lib, schedule, step as step_lib, train_and_evaluate
from tests.test_reliability import comparable, final_state, stop_after

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a, **k: None)
NUM_CLASSES = 10


def small(**overrides):
  """The smoke config (width-32 MLP) on 100 examples per class: ~10 s a run on 2 cores, 8 fake devices."""
  config = default_config.get_config("smoke")
  config.update({**dict(num_epochs=3, measure_epochs=(1, 3), per_class="100", batch_size=64, deepfool_samples=0),
                 **overrides})
  return config


def final_variables(workdir: pathlib.Path) -> dict:
  """{'params', 'batch_stats'} of the run's last checkpoint, as host arrays."""
  manager = checkpoints.Checkpoints(workdir / "checkpoints", read_only=True)
  try:
    restored = manager.manager.restore(manager.latest_epoch(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  state = jax.device_get(restored["state"])
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def train_features(config, workdir: pathlib.Path):
  """(logits, features, labels, variables) of the trained model on its whole training set, eval mode."""
  variables = final_variables(workdir)
  model = models.create(config.model, NUM_CLASSES, **config.model_options)
  dataset = program_lib.load_dataset(config)  # in memory: mnist1d is small
  logits, features = model.apply(variables, dataset.train_inputs, train=False)
  return np.asarray(logits), np.asarray(features), dataset.train_labels, variables


# ------------------------------------------------------------------------- fixed simplex-ETF classifier


@pytest.mark.parametrize("feature_dim", [NUM_CLASSES - 1, NUM_CLASSES, 32])
def test_the_fixed_frame_is_an_exact_simplex_etf_in_any_dimension_from_c_minus_1(feature_dim):
  weights = models.simplex_etf_weights(NUM_CLASSES, feature_dim)
  assert weights.shape == (NUM_CLASSES, feature_dim)
  simplex = NUM_CLASSES / (NUM_CLASSES - 1) * (np.eye(NUM_CLASSES) - 1 / NUM_CLASSES)
  np.testing.assert_allclose(weights @ weights.T, simplex, atol=1e-6)  # unit rows at cosine -1/(C-1)
  np.testing.assert_array_equal(weights, models.simplex_etf_weights(NUM_CLASSES, feature_dim))  # a fixed frame
  with pytest.raises(ValueError, match="feature_dim >= num_classes - 1"):
    models.simplex_etf_weights(NUM_CLASSES, NUM_CLASSES - 2)


@pytest.mark.parametrize("feature_dim,head_bias", [(None, True), (NUM_CLASSES, False), (NUM_CLASSES - 1, True)],
                         ids=["p=width", "p=C,no-bias", "p=C-1"])
def test_a_fixed_etf_classifier_trains_with_its_frame_frozen(feature_dim, head_bias, tmp_path):
  config = small()
  config.model_options.update(fixed_etf=True, feature_dim=feature_dim, head_bias=head_bias)
  train_and_evaluate(config, str(tmp_path), **QUIET)
  logged = records.read(tmp_path)
  assert logged[-1]["epoch_loss"] < logged[0]["epoch_loss"]

  logits, features, labels, variables = train_features(config, tmp_path)
  p = feature_dim or config.model_options.width
  assert features.shape[1] == p
  head = variables["params"].get("head", {})
  assert set(head) == ({"bias"} if head_bias else set())  # no W parameter: neither the optimiser nor decay moves it
  etf = models.simplex_etf_weights(NUM_CLASSES, p)
  bias = head.get("bias", np.zeros(NUM_CLASSES, np.float32))
  weights, read_bias = models.classifier_weights(variables["params"], feature_dim=p, num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(weights, etf)
  np.testing.assert_array_equal(read_bias, bias)
  # After training, the net classifies with exactly that frame: logits = W_ETF h + b.
  np.testing.assert_allclose(logits, features @ etf.T + bias, rtol=1e-5, atol=1e-5)
  # NC3 (self-duality) is then the alignment of the centred class means with the fixed frame.
  expected = neural_collapse(features, labels, NUM_CLASSES, etf, bias)
  assert logged[-1]["self_duality"] == pytest.approx(float(expected["self_duality"]), rel=1e-4)


def test_the_issues_command_line_runs_every_variant_at_once(tmp_path):
  """A fixed ETF with d = C and no bias, AdamW, and feature decay, from the command line."""
  overrides = ["--config.model_options.fixed_etf=True", "--config.model_options.feature_dim=10",
               "--config.model_options.head_bias=False", "--config.optimizer=adamw", "--config.lr=0.001",
               "--config.adam_betas=(0.9,0.99)", "--config.feature_decay=1e-4", "--config.num_epochs=1",
               "--config.measure_epochs=1", "--config.per_class=100", "--config.deepfool_samples=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs/default.py:smoke"),
                           "--workdir", str(tmp_path / "run"), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  options = saved["model_options"]
  assert (options["fixed_etf"], options["feature_dim"], options["head_bias"]) == (True, 10, False)
  assert (saved["optimizer"], saved["adam_betas"], saved["feature_decay"]) == ("adamw", [0.9, 0.99], 1e-4)
  assert np.isfinite(records.read(tmp_path / "run")[-1]["self_duality"])


# ------------------------------------------------------------------------------------ feature decay


def test_feature_decay_adds_the_hand_computed_gradient():
  """lambda_H > 0 adds (lambda_H/2) N mean_B ||h_i||^2; with h = relu(x W1 + b1) its gradient is
  dW1 = (lambda_H N / B) sum_i x_i^T h_i, db1 = (lambda_H N / B) sum_i h_i, and nothing on the head."""
  model = models.create("mlp", 3, width=6, depth=1, batch_norm=False)
  rng = np.random.default_rng(0)
  inputs, labels = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
  tx = optax.sgd(1.0)  # updates = -gradients
  state = step_lib.create_state(model, tx, (5,), seed=0)
  loss_fn = step_lib.loss_function("cross_entropy")
  lambda_h, num_train = 1e-2, 1000
  plain, plain_metrics = step_lib.train_step(state, (inputs, labels), model=model, tx=tx, loss_fn=loss_fn)
  decayed, decayed_metrics = step_lib.train_step(state, (inputs, labels), model=model, tx=tx, loss_fn=loss_fn,
                                                 feature_decay=lambda_h, num_train=num_train)
  kernel, bias = (np.asarray(state.params["dense0"][k], np.float64) for k in ("kernel", "bias"))
  x = np.asarray(inputs, np.float64)
  h = np.maximum(x @ kernel + bias, 0.0)
  scale = lambda_h * num_train / len(x)
  moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                 decayed.params, plain.params)
  np.testing.assert_allclose(moved["dense0"]["kernel"], -scale * x.T @ h, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(moved["dense0"]["bias"], -scale * h.sum(0), rtol=1e-4, atol=1e-6)
  for leaf in jax.tree_util.tree_leaves(moved["head"]):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(decayed_metrics["loss"]) == float(plain_metrics["loss"])  # the logged loss is the data loss
  with pytest.raises(ValueError, match="num_train"):
    step_lib.train_step(state, (inputs, labels), model=model, tx=tx, loss_fn=loss_fn, feature_decay=lambda_h)


def test_feature_decay_ends_with_smaller_features_in_both_epoch_loops(tmp_path):
  runs = {}
  for name, overrides in {"off": {}, "scan": dict(feature_decay=5e-4),
                          "steps": dict(feature_decay=5e-4, epoch_loop="steps")}.items():
    config = small(**overrides)
    train_and_evaluate(config, str(tmp_path / name), **QUIET)
    _, features, _, _ = train_features(config, tmp_path / name)
    runs[name] = (records.read(tmp_path / name), float(np.mean(np.sum(features**2, axis=1))))
  assert runs["scan"][1] < 0.5 * runs["off"][1], {k: v[1] for k, v in runs.items()}
  # The host-stepped loop gets the same N (the penalty's scale) as the scanned one.
  assert runs["steps"][0][-1]["epoch_loss"] == pytest.approx(runs["scan"][0][-1]["epoch_loss"], rel=1e-3)
  assert runs["steps"][1] == pytest.approx(runs["scan"][1], rel=1e-2)


# --------------------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_steps_are_torchs_update_rule_written_out(name):
  """torch.optim.Adam (weight decay as coupled L2) and AdamW (decoupled), three steps in numpy, on the
  trainer's lr schedule (x0.1 from the third step)."""
  lr, weight_decay, (b1, b2), eps = 0.1, 0.05, (0.8, 0.95), 1e-3
  tx = schedule.optimizer(name, schedule.learning_rate(lr, 1, (2,), 0.1), momentum=0.9, weight_decay=weight_decay,
                          betas=(b1, b2), eps=eps)
  weights, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
  params = jnp.asarray(weights, jnp.float32)
  state = tx.init(params)
  for t, grad in enumerate((np.array([0.5, 0.1, -0.3]), np.array([-0.2, 0.3, 0.0]), np.array([0.0, 1.0, 0.2])), 1):
    step_lr = lr if t <= 2 else 0.1 * lr
    g = grad + weight_decay * weights if name == "adam" else grad
    if name == "adamw":
      weights = weights * (1 - step_lr * weight_decay)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
    weights = weights - step_lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, weights, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="unknown optimizer"):
    schedule.optimizer("lbfgs", optax.constant_schedule(lr), momentum=0.9, weight_decay=0.0)


def adam(**overrides):
  return small(**{**dict(optimizer="adam", lr=1e-3, num_epochs=4, measure_epochs=(1, 4)), **overrides})


@pytest.fixture(scope="module")
def adam_straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adam")
  train_and_evaluate(adam(), str(workdir), **QUIET)
  return workdir


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_train_end_to_end(name, adam_straight, tmp_path):
  workdir = adam_straight
  if name == "adamw":
    workdir = tmp_path
    train_and_evaluate(adam(optimizer="adamw", weight_decay=1e-2), str(workdir), **QUIET)
  logged = records.read(workdir)
  assert [r["epoch"] for r in logged] == [1, 4]
  assert logged[-1]["epoch_loss"] < logged[0]["epoch_loss"] and logged[-1]["epoch_acc"] > logged[0]["epoch_acc"]
  assert json.loads((workdir / "config.json").read_text())["optimizer"] == name


def test_an_adam_run_resumes_bit_identically(adam_straight, tmp_path):
  stop_after(adam(), tmp_path / "run", 2)  # checkpoints Adam's moments at epoch 2
  train_and_evaluate(adam(), str(tmp_path / "run"), **QUIET)
  assert comparable(tmp_path / "run") == comparable(adam_straight)
  (epoch, leaves), (straight_epoch, straight_leaves) = final_state(tmp_path / "run"), final_state(adam_straight)
  assert epoch == straight_epoch == 4 and len(leaves) == len(straight_leaves)
  for a, b in zip(leaves, straight_leaves):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("changes,key", [
    ({"optimizer": "lbfgs"}, "optimizer"), ({"adam_betas": (0.9,)}, "adam_betas"),
    ({"adam_betas": (0.9, 1.0)}, "adam_betas"), ({"adam_betas": "0.9"}, "adam_betas"),
    ({"adam_eps": 0.0}, "adam_eps"), ({"feature_decay": -1e-4}, "feature_decay"),
    ({"model_options__feature_dim": 0}, "model_options.feature_dim"),
    ({"model_options__head_bias": "no"}, "model_options.head_bias"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_variant_values_are_refused_naming_their_key(changes, key):
  from tests.test_schema import changed
  with pytest.raises(schema.ConfigError, match=rf"^config\.{key} = "):
    schema.validate(changed(default_config.get_config(), **changes))


def test_the_defaults_are_the_papers_protocol():
  config = default_config.get_config()
  assert (config.optimizer, config.feature_decay, config.model_options.fixed_etf, config.model_options.head_bias,
          config.model_options.feature_dim) == ("sgd", 0.0, False, True, None)
  for model in schema.MODELS:
    assert schema.MODEL_OPTIONS[model]["head_bias"] is True
