"""What the tests that run the trainer share: its command line in a subprocess, a run's records and final state.

Used by test_reliability.py and test_stream_faults.py; runs are the default config's smoke variant.
"""

import os
import pathlib
import resource
import socket
import subprocess
import sys
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from nc_jax import records
from nc_jax.training import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("wall_time", "images_per_sec")  # the only fields that may differ between runs
QUIET = dict(log=lambda *a, **k: None)


def free_port() -> int:
  """A TCP port on 127.0.0.1 free now (the coordinator of a multi-process test)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def cpu_env(extra: Optional[dict] = None) -> dict:
  """This process's environment for a child on the CPU: JAX_PLATFORMS=cpu, without XLA_FLAGS, plus ``extra``."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra or {})}
  env.pop("XLA_FLAGS", None)
  return env


def train_command(workdir, *arguments) -> list[str]:
  """python -m nc_jax.train with the smoke config on ``workdir``, then ``arguments``."""
  return [sys.executable, "-m", "nc_jax.train", "--config", str(REPO / "configs/default.py:smoke"),
          "--workdir", str(workdir), *arguments]


def cli(workdir, *arguments, limit_file_bytes=None, env_extra=None, timeout=300):
  """Runs the train command line to its end; ``limit_file_bytes`` is ulimit -f (every file stops there)."""
  limit = None if limit_file_bytes is None else (
      lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes)))
  return subprocess.run(train_command(workdir, *arguments), cwd=REPO, env=cpu_env(env_extra), capture_output=True,
                        text=True, timeout=timeout, preexec_fn=limit)


def comparable(run):
  """A run's records without the fields that may differ between runs (``NOISE``)."""
  return [{k: v for k, v in r.items() if k not in NOISE} for r in records.read(run)]


def saved_epochs(run):
  return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def final_state(run):
  """The last checkpoint's (epoch, arrays as host numpy), restored read-only."""
  manager = checkpoints.Checkpoints(run / "checkpoints", read_only=True)
  try:
    epoch = manager.latest_epoch()
    restored = manager.manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                      meta=ocp.args.JsonRestore()))
    return epoch, jax.tree_util.tree_leaves(jax.device_get(restored["state"]))
  finally:
    manager.close()


def assert_same_run(run, straight, *, last_epoch: Optional[int] = None):
  """Every record key but ``NOISE``, and the last checkpoint's arrays, bit for bit (and its epoch)."""
  assert comparable(run) == comparable(straight)
  (epoch, leaves), (straight_epoch, straight_leaves) = final_state(run), final_state(straight)
  assert epoch == straight_epoch
  if last_epoch is not None:
    assert epoch == last_epoch
  for a, b in zip(leaves, straight_leaves):
    np.testing.assert_array_equal(a, b)
