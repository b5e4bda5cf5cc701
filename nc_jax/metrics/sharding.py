"""Mesh plumbing of the metrics: meshes checked, Explicit axes run as Auto, tiles dealt to devices.

The metrics are written for Auto sharding (``jax.jit`` with ``NamedSharding`` inputs). Three
things need a mesh by name: inputs typed on Explicit axes (``jax.make_mesh``'s default), which
``explicit_mesh`` finds and ``run_auto`` computes on Auto axes; and ``geometry.pair_sums``'s sweep
over the tiles of a Gram matrix, which ``sharded_tile_sweep`` deals round-robin to the devices of a
mesh under ``jax.shard_map``, one ``psum`` adding their partial sums.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def check_mesh(mesh) -> None:
  """TypeError unless ``mesh`` (``pair_mesh``) is None or a concrete ``jax.sharding.Mesh``."""
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"pair_mesh / mesh must be None or a jax.sharding.Mesh over the devices that hold the inputs "
                    f"(e.g. jax.make_mesh((jax.device_count(),), ('data',))), got {type(mesh).__name__}: {mesh!r:.80}")


def deals_tiles(mesh, num_classes: int, block: int) -> bool:
  """Whether ``pair_sums`` deals its tiles to the devices of ``mesh``: a mesh of D > 1 devices, and > 1 tile."""
  return mesh is not None and mesh.size > 1 and block < num_classes


def explicit_mesh(*trees, shares_tiles: bool = False):
  """The ``AbstractMesh`` with Explicit axes (jax.make_mesh's default) that a metric must run under
  ``run_auto`` on, or None: that of an input typed on one, or that of ``jax.set_mesh`` when ``shares_tiles``
  (``shard_map`` cannot close over values typed on Explicit axes). The metrics are written for Auto
  sharding: on Explicit axes, sums over a sharded axis (segment sums, tile slices) have no output type."""
  for leaf in jax.tree_util.tree_leaves(trees):
    if not isinstance(leaf, jax.Array):  # numpy, Python numbers, bad input (refused later, by name)
      continue
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if mesh is not None and mesh.explicit_axes:
      concrete = not isinstance(leaf, jax.core.Tracer)
      return leaf.sharding.mesh if concrete else mesh  # eagerly, the Mesh itself: its devices run the computation
  context = jax.sharding.get_abstract_mesh()
  return context if shares_tiles and context.explicit_axes else None


def run_auto(fn: Callable, mesh, *args):
  """fn(*args) with every axis of ``mesh`` (a Mesh eagerly, else an AbstractMesh) Auto
  (``jax.sharding.auto_axes``); replicated results."""
  context = jax.set_mesh(mesh) if isinstance(mesh, jax.sharding.Mesh) else jax.sharding.use_abstract_mesh(mesh)
  with context:
    return jax.sharding.auto_axes(fn, out_sharding=jax.sharding.PartitionSpec())(*args)


def _check_mesh_placement(mesh, *trees) -> None:
  """One ValueError, naming the fix, where ``shard_map`` over ``mesh`` could not run: a ``jax.set_mesh``
  context with another mesh, or (eagerly; under jit JAX itself refuses) inputs committed to other devices."""
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and (context.axis_names, context.axis_sizes) != (mesh.axis_names, mesh.axis_sizes):
    raise ValueError(f"pair_mesh / mesh has axes {dict(zip(mesh.axis_names, mesh.axis_sizes))} but the mesh in use "
                     f"(set by jax.set_mesh, or that of inputs on Explicit axes) has "
                     f"{dict(zip(context.axis_names, context.axis_sizes))}: pass that mesh")
  devices = set(np.asarray(mesh.devices).flat)
  for leaf in jax.tree_util.tree_leaves(trees):
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed
        and leaf.sharding.device_set != devices):
      ids = lambda found: sorted(device.id for device in found)
      raise ValueError(f"pair_mesh / mesh spans devices {ids(devices)} but the inputs are committed to devices "
                       f"{ids(leaf.sharding.device_set)}: pass the mesh the inputs are sharded on, or put them on "
                       f"this one (jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))")


def sharded_tile_sweep(tile, add, zeros, num_blocks: int, mesh, vectors, row_data, valid):
  """``pair_sums``'s sweep with the tiles i <= j dealt round-robin to the devices of ``mesh``."""
  _check_mesh_placement(mesh, vectors, row_data, valid)
  num_devices = mesh.size
  tiles_i, tiles_j = np.triu_indices(num_blocks)
  per_device = -(-len(tiles_i) // num_devices)
  padding = per_device * num_devices - len(tiles_i)
  live = np.concatenate([np.ones(len(tiles_i), bool), np.zeros(padding, bool)])
  tiles_i, tiles_j = np.pad(tiles_i, (0, padding)), np.pad(tiles_j, (0, padding))
  # Device d gets tiles d, d + D, d + 2D, ...: rows of the (per_device, D) layout, read as columns.
  deal = lambda x: jnp.asarray(x.reshape(per_device, num_devices).T)
  # The tiles' axis is split over every axis of the mesh. The mesh's own axes (not a flat copy): shard_map's mesh
  # must equal jax.set_mesh's; all Auto, as that context is inside ``run_auto`` (``explicit_mesh``).
  axes = tuple(mesh.axis_names)
  mesh = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  spec = jax.sharding.PartitionSpec(axes)
  replicated = jax.sharding.PartitionSpec()

  def local_sweep(tiles_i, tiles_j, live, vectors, row_data, valid):
    def step(k, carry):
      return add(carry, tile(tiles_i[0, k], tiles_j[0, k], vectors, row_data, valid, live[0, k]))

    totals, compensations = jax.lax.fori_loop(0, per_device, step, (zeros, list(zeros)))
    return [jax.lax.psum(t, axes) - jax.lax.psum(c, axes) if jnp.issubdtype(t.dtype, jnp.floating)
            else jax.lax.psum(t, axes) for t, c in zip(totals, compensations)]

  sweep = jax.shard_map(local_sweep, mesh=mesh, in_specs=(spec, spec, spec, replicated, replicated, replicated),
                        out_specs=replicated, check_vma=False)  # the psum makes every output replicated
  return sweep(deal(tiles_i), deal(tiles_j), deal(live), vectors, row_data, valid)
