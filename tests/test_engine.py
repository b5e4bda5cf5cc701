"""nc_jax.metrics.engine: the two passes over batches give the in-memory suite's metrics on the same rows, and the
loss/accuracy sums of a float64 computation; padding rows (mask False) count for nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nc_jax.metrics import engine, neural_collapse
from nc_jax.metrics.options import NCOptions

C, D, P = 4, 6, 5


def apply_fn(params, inputs):
  """A hand-made net: features h = 3 tanh(x A) + 1 (B, p), logits W h + b."""
  features = 3.0 * jnp.tanh(inputs @ params["a"]) + 1.0
  return features @ params["w"].T + params["b"], features


def cross_entropy(logits, labels):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(3)
  params = {"a": rng.normal(size=(D, P)).astype(np.float32), "w": rng.normal(size=(C, P)).astype(np.float32),
            "b": rng.normal(size=(C,)).astype(np.float32)}
  means = 2.0 * rng.normal(size=(C, D))

  def draw(n):
    labels = rng.integers(0, C, n).astype(np.int32)
    return (means[labels] + rng.normal(size=(n, D))).astype(np.float32), labels

  return params, draw(150), draw(70)


def padded_batches(inputs, labels, size=32):
  """Batches of ``size`` rows; the last one filled with rows unlike any real one (mask False)."""
  batches = []
  for start in range(0, len(labels), size):
    x, y = inputs[start:start + size], labels[start:start + size]
    pad = size - len(y)
    mask = np.arange(size) < len(y)
    x = np.concatenate([x, np.full((pad, D), 50.0, np.float32)])
    y = np.concatenate([y, np.zeros(pad, np.int32)])
    batches.append((x, y, mask))
  assert not batches[-1][2].all()  # the case has padding
  return batches


def in_memory(params, data, test, **conventions):
  _, features = apply_fn(params, data[0])
  _, test_features = apply_fn(params, test[0])
  return neural_collapse(features, data[1], C, params["w"], params["b"], test_features=test_features,
                         test_labels=test[1], **conventions)


@pytest.mark.parametrize("conventions", [{}, dict(global_mean="samples", ncc_use_bias=False,
                                                  divide_nc1_by_classes=False, std_ddof=0)],
                         ids=["paper", "other_conventions"])
@pytest.mark.parametrize("track_max_abs", [True, False])
def test_measure_over_batches_equals_the_in_memory_suite(case, conventions, track_max_abs):
  params, data, test = case
  expected = in_memory(params, data, test, **conventions)
  got = engine.measure(apply_fn, params, padded_batches(*data), C, weights=params["w"], bias=params["b"],
                       test_batches=padded_batches(*test), options=NCOptions(**conventions),
                       track_max_abs=track_max_abs)
  assert set(expected) <= set(got)
  for key, value in expected.items():
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), rtol=2e-4, atol=1e-6, err_msg=key)
  assert int(got["num_samples"]) == len(data[1])  # the padding rows are not samples


def test_loss_and_accuracy_equal_a_float64_computation(case):
  params, data, test = case
  got = engine.measure(apply_fn, params, lambda: iter(padded_batches(*data)), C, test_batches=padded_batches(*test),
                       loss_fn=cross_entropy)
  for name, (inputs, labels) in (("train", data), ("test", test)):
    features = 3.0 * np.tanh(inputs.astype(np.float64) @ params["a"].astype(np.float64)) + 1.0
    logits = features @ params["w"].T.astype(np.float64) + params["b"]
    shifted = logits - logits.max(-1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(labels)), labels]
    assert float(got[f"{name}_loss"]) == pytest.approx(losses.mean(), rel=1e-5)
    assert float(got[f"{name}_acc"]) == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-7)
  assert "accuracy" not in got  # no W given: the keys that need it are absent


def test_batch_loss_ignores_padding_and_out_of_range_labels():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [9.0, -9.0], [0.0, 5.0]])
  labels = jnp.asarray([0, 0, 1, 7])
  sums = engine.batch_loss(logits, labels, jnp.asarray([True, True, False, True]), cross_entropy)
  expected = np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))  # rows 0 and 1 only
  assert int(sums.count) == 2 and int(sums.correct) == 1
  assert float(sums.loss_sum) == pytest.approx(expected, rel=1e-6)
  keys = engine.loss_keys(sums, "train")
  assert float(keys["train_loss"]) == pytest.approx(expected / 2, rel=1e-6) and float(keys["train_acc"]) == 0.5


def test_no_batch_is_one_clear_error(case):
  with pytest.raises(ValueError, match="no batch"):
    engine.measure(apply_fn, case[0], [], C)
