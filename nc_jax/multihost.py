"""Agreement between the processes of a multi-host run: one place for every ``process_allgather``.

Each helper is the identity in a single-process run, so callers need no ``process_count() == 1`` branch.
"""

from __future__ import annotations

import jax
import numpy as np


def gather(tree):
  """Every process's ``tree`` (host values) stacked along a new leading process axis, on every process.

  tree: a pytree of arrays or scalars of the same shapes on each process. Returns numpy arrays of shape
  (P, ...) with row i from process i; for P = 1, shape (1, ...) without communication.
  """
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], jax.device_get(tree))
  from jax.experimental import multihost_utils
  return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(jax.device_get(tree)))


def fetch(tree):
  """Every leaf's global value as a host numpy array, on every process: ``jax.device_get`` where this process
  holds the whole array, else one ``process_allgather`` of it (every process must call ``fetch`` alike)."""
  def one(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))
  return jax.tree_util.tree_map(one, tree)


def per_process(tree) -> list:
  """``gather(tree)`` split into one tree per process, in process order 0, 1, ..., P-1."""
  gathered = gather(tree)
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], gathered) for i in range(jax.process_count())]


def sync(name: str) -> None:
  """A barrier: returns on each process once every process has reached ``sync(name)``."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
