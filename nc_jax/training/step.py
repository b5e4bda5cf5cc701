"""Pure, jitted training and evaluation steps over device-resident data.

A train step is (state, batch) -> (state, metrics); a whole epoch is a
``lax.scan`` of it over the epoch's batches, drawn on device, so the host sees
the metrics once per epoch. Under ``jit`` with batches sharded along a 'data'
mesh axis and params replicated, BatchNorm statistics are computed over the
global batch (XLA all-reduces them), as on one device.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nc_jax.data import device
from nc_jax.names import LOSSES


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(model: nn.Module, tx: optax.GradientTransformation, input_shape, seed: int) -> TrainState:
  """Initial state from PRNGKey(seed) and an input of shape (1, *input_shape)."""
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def loss_function(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Per-example loss (B,) from logits (B, C) and int labels (B,).

  'cross_entropy': softmax cross-entropy. 'mse': (1/C) ||logits - onehot(y)||^2,
  so that its batch mean is torch's MSELoss(reduction='mean') on one-hot targets.
  """
  if name == "cross_entropy":
    return optax.softmax_cross_entropy_with_integer_labels
  if name == "mse":
    return lambda logits, labels: jnp.mean((logits - jax.nn.one_hot(labels, logits.shape[-1])) ** 2, axis=-1)
  raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def train_step(state: TrainState, batch, *, model, tx, loss_fn, feature_decay: float = 0.0, num_train: int = 0):
  """One optimiser step on batch = (inputs (B, ...), labels (B,)) -> (state, {loss, correct}) summed over B.

  The objective is mean_B loss(W h_i + b, y_i), plus, with feature_decay = lambda_H > 0,
  (lambda_H / 2) N mean_B ||h_i||^2 with N = num_train: the batch's unbiased estimate of the
  unconstrained features model's (lambda_H / 2) ||H||_F^2 over all N training features next to
  the mean loss over them (nc_jax/ufm.py's objective), so the same lambda_H means the same there.
  The weight decay lambda_W is the optimiser's (tx). The reported loss is the data loss alone.
  """
  inputs, labels = batch
  if feature_decay and num_train < 1:
    raise ValueError(f"feature_decay={feature_decay} needs num_train, the training set's size N, got {num_train}")

  def objective(params):
    (logits, features), updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs,
                                              train=True, mutable=["batch_stats"])
    losses = loss_fn(logits, labels)
    value = jnp.mean(losses)
    if feature_decay:
      value += 0.5 * feature_decay * num_train * jnp.mean(jnp.sum(features**2, axis=-1))
    return value, (losses, logits, updates)

  grads, (losses, logits, updates) = jax.grad(objective, has_aux=True)(state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                            batch_stats=updates["batch_stats"], opt_state=opt_state)
  metrics = {"loss": jnp.sum(losses), "correct": jnp.sum(jnp.argmax(logits, -1) == labels)}
  return new_state, metrics


def train_epoch(state: TrainState, inputs, labels, epoch, *, model, tx, loss_fn, batch_size, seed, mesh,
                feature_decay: float = 0.0):
  """All full batches of ``epoch`` (a traced int) as one lax.scan; returns (state, summed metrics)."""
  batches = device.epoch_batches(inputs, labels, seed, epoch, batch_size, mesh)
  step = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn, feature_decay=feature_decay,
                           num_train=inputs.shape[0])
  state, per_step = jax.lax.scan(step, state, batches)
  totals = jax.tree_util.tree_map(jnp.sum, per_step)
  totals["count"] = jnp.asarray(batches[1].size, jnp.int32)
  return state, totals


def stepwise_epoch(state: TrainState, inputs, labels, epoch, *, draw_batches, step):
  """The epoch as a host loop over a jitted ``step`` (state donated) instead of one lax.scan.

  XLA:CPU runs convolutions inside a while loop ~90x slower than outside one
  (measured: 4 scanned CNN steps 11.2 s, unrolled 0.46 s), so conv nets on CPU
  step from the host. Batches are still drawn on device; only dispatches cross
  to the host, and the metrics are fetched once per epoch.
  """
  batch_inputs, batch_labels = draw_batches(inputs, labels, epoch=epoch)
  totals = None
  for i in range(batch_labels.shape[0]):
    state, metrics = step(state, (batch_inputs[i], batch_labels[i]))
    totals = metrics if totals is None else jax.tree_util.tree_map(jnp.add, totals, metrics)
  totals["count"] = jnp.asarray(batch_labels.size, jnp.int32)
  return state, totals


def forward_all(variables, inputs, *, model, batch_size, mesh, per_layer=False):
  """Eval-mode (logits (N, C), features (N, p)[, {layer: (N, ...)}]) of every example, on device.

  Runs ``lax.map`` over padded batches; padding rows are cut off, so N is exact.
  """
  num_examples = inputs.shape[0]
  indices, _ = device.padded_batches(num_examples, batch_size)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(device.DATA_AXIS))

  def one_batch(batch_indices):
    batch = jax.lax.with_sharding_constraint(inputs[batch_indices], spec)
    if per_layer:
      (logits, features), state = model.apply(variables, batch, train=False, mutable=["intermediates"])
      layers = {name: value[0] for name, value in state["intermediates"].items()}
      return logits, features, layers
    logits, features = model.apply(variables, batch, train=False)
    return logits, features

  outputs = jax.lax.map(one_batch, jnp.asarray(indices))
  return jax.tree_util.tree_map(lambda x: x.reshape((-1, *x.shape[2:]))[:num_examples], outputs)


def mean_loss_and_accuracy(logits, labels, loss_fn):
  return jnp.mean(loss_fn(logits, labels)), jnp.mean(jnp.argmax(logits, -1) == labels)


def as_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
