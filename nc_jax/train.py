"""python -m nc_jax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Trains a net into the terminal phase, measuring Neural Collapse in-graph; writes
config.json, metrics.jsonl, tpt.json and checkpoints/ to DIR. Rerunning the same
command resumes from the latest checkpoint. Multi-host: pass --coordinator_address,
--num_processes and --process_id (detected automatically on TPU VMs and SLURM).
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (get_config), optionally FILE:variant.")
flags.DEFINE_string("workdir", "workdirs/default", "Where config.json, metrics.jsonl and checkpoints/ go.")
flags.DEFINE_bool("overwrite", False, "Discard a previous run with a different config in --workdir.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives backend for multi-process CPU runs.")
FLAGS = flags.FLAGS


def _cluster_detected() -> bool:
  """True on multi-host TPU VMs and multi-task SLURM jobs, where jax.distributed finds its peers itself."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def _initialize_distributed() -> None:
  import jax

  if FLAGS.coordinator_address or FLAGS.num_processes:
    if None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if jax.config.jax_platforms in (None, "", "cpu") and FLAGS.cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _cluster_detected():
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  _initialize_distributed()
  from nc_jax.training import Preempted, train_and_evaluate

  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except Preempted as stopped:
    print(stopped, flush=True)
    sys.exit(143)
  except (ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
