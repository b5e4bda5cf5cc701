"""The accumulators' states and their jitted per-batch updates.

pass 1  ``streaming.ClassMeansState``: per-class sums of h (``means_step``)
pass 2  ``DeviationPass``: ``streaming.DeviationState`` of d_i = h_i - mu_{y_i} and, with a loss, the
        ``LossState`` sums (``deviations_step``); pass 3 (held-out data) the same against the training means.

Each update is one jitted function of (state, params, batch) with the state donated; per-process states
are folded in process order (``merge_across_processes``) so the result does not depend on timing.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics import streaming


@flax.struct.dataclass
class LossState:
  """Sums over the valid rows: loss_sum = sum_i loss(logits_i, y_i), correct = #{argmax logits_i = y_i}, count."""

  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array


def init_loss() -> LossState:
  """Zero sums (float32 loss, int32 counts)."""
  return LossState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def merge_loss(a: LossState, b: LossState) -> LossState:
  """The sums of two disjoint sets of rows."""
  return jax.tree_util.tree_map(jnp.add, a, b)


@flax.struct.dataclass
class DeviationPass:
  """A deviation pass's state: the NC sums (``DeviationState``) and the loss/accuracy sums."""

  nc: streaming.DeviationState
  loss: LossState


def merge_deviation_pass(a: DeviationPass, b: DeviationPass) -> DeviationPass:
  """The state of two disjoint sets of rows (``streaming.merge_deviations`` and ``merge_loss``)."""
  return DeviationPass(streaming.merge_deviations(a.nc, b.nc), merge_loss(a.loss, b.loss))


@functools.lru_cache(maxsize=16)
def jitted(function: Callable, **static) -> Callable:
  """``jax.jit(partial(function, **static))``, one per (function, options), so repeated measurements reuse it."""
  return jax.jit(functools.partial(function, **static))


@functools.lru_cache(maxsize=16)
def means_step(apply_fn):
  """Pass 1, jitted, state donated: (ClassMeansState, params, inputs (B, ...), labels (B,), mask (B,)) ->
  the state with the batch's features h = apply_fn(params, inputs)[1], flattened to (B, p), folded in."""
  def step(state, params, inputs, labels, mask):
    _, features = apply_fn(params, inputs)
    return streaming.update_class_means(state, jnp.reshape(features, (features.shape[0], -1)), labels, mask)
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def deviations_step(apply_fn, loss_fn, ncc_use_bias: bool):
  """Pass 2, jitted, state donated: (DeviationPass, ClassGeometry, params, inputs, labels, mask) -> the state
  with the batch's deviations h_i - mu_{y_i} folded in (``update_deviations``) and, with ``loss_fn``, its
  sum of losses, of argmax(logits_i) = y_i and its count of valid rows."""
  def step(state: DeviationPass, geometry, params, inputs, labels, mask):
    logits, features = apply_fn(params, inputs)
    nc = streaming.update_deviations(state.nc, geometry, jnp.reshape(features, (features.shape[0], -1)), labels,
                                     mask, ncc_use_bias=ncc_use_bias)
    loss = state.loss
    if loss_fn is not None:
      valid = mask & (labels >= 0) & (labels < geometry.means.shape[0])
      losses = jnp.where(valid, loss_fn(logits, jnp.where(valid, labels, 0)), 0.0)
      loss = merge_loss(loss, LossState(jnp.sum(losses, dtype=jnp.float32),
                                        jnp.sum(valid & (jnp.argmax(logits, -1) == labels), dtype=jnp.int32),
                                        jnp.sum(valid, dtype=jnp.int32)))
    return DeviationPass(nc, loss)
  return jax.jit(step, donate_argnums=0)


def local_shardings(batch_size: Optional[int]):
  """(replicated, batch-sharded) over this process's devices, or (None, None) on one device or for batches
  that do not split evenly: a batch's rows are then spread over every local device (a 1-D 'data' mesh)."""
  from nc_jax.data import device
  devices = jax.local_devices()
  if len(devices) == 1 or not batch_size or batch_size % len(devices):
    return None, None
  mesh = device.data_mesh(devices)
  return device.replicated(mesh), device.batch_sharding(mesh)


def merge_across_processes(local, merge: Callable):
  """The states of every process, folded with ``merge`` in process order 0, 1, ..., P-1 (identity for P = 1)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(jax.device_get(local))
  parts = [jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], gathered) for i in range(jax.process_count())]
  return functools.reduce(jax.jit(merge), parts)

