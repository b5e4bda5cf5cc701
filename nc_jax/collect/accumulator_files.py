"""The accumulator file: a measurement's resumable state on disk.

``DIR/accumulators.npz`` (``accumulators.I-of-P.npz`` for process I of P) holds every accumulator (a pytree
of arrays, leaves named by their pytree paths) and a JSON ``__meta__``: format, fingerprint of what is
measured, the pass and the number of this process's batches done in it, and a sha256 of all of it. Files
are written whole or not at all (``nc_jax.files.write_atomically``), so a kill leaves the old file or the
new one; a file that fails its checksum is moved to ``DIR/corrupt/`` and the measurement restarts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from nc_jax.collect.errors import CollectError
from nc_jax.files import write_atomically

FORMAT = "nc_jax.collect/1"
CORRUPT_DIR = "corrupt"


def _named_leaves(tree) -> dict[str, np.ndarray]:
  """{pytree path (``jax.tree_util.keystr``): numpy leaf}."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _checksum(arrays: dict, meta: dict) -> str:
  """sha256 of the named arrays (name, dtype, shape, bytes, in name order) and of ``meta`` less its sha256."""
  digest = hashlib.sha256()
  for name in sorted(arrays):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  digest.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
  return digest.hexdigest()


def save_accumulators(path: pathlib.Path, tree, meta: dict) -> None:
  """``tree``'s leaves (named by their pytree paths) and ``meta`` (JSON, with a sha256 of both) -> ``path``."""
  arrays = _named_leaves(tree)
  meta = {**meta, "sha256": _checksum(arrays, meta)}
  buffer = io.BytesIO()
  np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8), **arrays)
  write_atomically(path, buffer.getvalue())


class AccumulatorsDamaged(Exception):
  """An accumulator file that cannot be read or fails its checksum."""


def load_accumulators(path: pathlib.Path) -> tuple[dict, dict]:
  """({leaf name: array}, meta) from ``path``; AccumulatorsDamaged if it cannot be read or fails its sha256."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      arrays = {name: stored[name] for name in stored.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
  except Exception as error:  # zipfile, numpy and json raise many types for a damaged file
    raise AccumulatorsDamaged(f"{type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
  if not isinstance(meta, dict) or meta.get("sha256") != _checksum(arrays, meta):
    raise AccumulatorsDamaged("its content does not match its sha256 checksum")
  return arrays, meta


def unflatten_like(template, arrays: dict):
  """``arrays`` (named leaves) as a tree of ``template``'s structure, shapes and dtypes, or None if they differ."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, leaf in paths:
    array = arrays.get(jax.tree_util.keystr(path))
    if array is None or array.shape != tuple(leaf.shape) or array.dtype != leaf.dtype:
      return None
    leaves.append(array)
  if len(arrays) != len(leaves):
    return None
  return jax.tree_util.tree_unflatten(treedef, leaves)



def accumulator_path(out_dir: pathlib.Path) -> pathlib.Path:
  """This process's accumulator file in ``out_dir``: accumulators.npz, or accumulators.I-of-P.npz."""
  if jax.process_count() == 1:
    return out_dir / "accumulators.npz"
  return out_dir / f"accumulators.{jax.process_index()}-of-{jax.process_count()}.npz"


def move_aside(path: pathlib.Path) -> pathlib.Path:
  """Moves a damaged file to ``corrupt/NAME-DATE-TIME-PID`` beside it; returns where it went."""
  target = path.parent / CORRUPT_DIR / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
  target.parent.mkdir(parents=True, exist_ok=True)
  os.replace(path, target)
  return target


def resume_point(path: pathlib.Path, template, fingerprint: str,
                 warn: Callable[[str], None]) -> tuple[Any, int, int]:
  """(state, pass, batches done in it) from ``path``, or (None, 0, 0) when there is nothing to resume.

  A damaged file is moved aside (with a warning); one of another measurement (``fingerprint``) or of other
  shapes than ``template`` is refused (CollectError), not mixed in.
  """
  if not path.exists():
    return None, 0, 0
  try:
    arrays, meta = load_accumulators(path)
  except AccumulatorsDamaged as error:
    warn(f"{path} is damaged ({error}); moved to {move_aside(path)}, measuring from the start")
    return None, 0, 0
  if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
    raise CollectError(f"{path} holds the accumulators of another measurement (another model, checkpoint, data, "
                       "batch size, options or process layout); delete it or choose another --out")
  state = unflatten_like(template, arrays)
  if state is None:
    raise CollectError(f"{path} holds accumulators of other shapes than this measurement's; delete it or choose "
                       "another --out")
  return state, int(meta["pass"]), int(meta["position"])
