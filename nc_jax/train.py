"""python -m nc_jax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Trains a net into the terminal phase, measuring Neural Collapse in-graph; writes
config.json, metrics.jsonl, tpt.json and checkpoints/ to DIR. Rerunning the same
command resumes from the latest good checkpoint. ``--resume_from OTHER[:EPOCH]``
starts DIR from another run's checkpoint (e.g. with a lower lr after a
divergence); ``--resume_from DIR:EPOCH`` restarts DIR itself from its epoch (with
--overwrite when it holds anything after that epoch). A ``--config.KEY`` given
more than once takes its last value, whatever its type. ``--lrs A,B,...`` trains
the config at each lr as one population (one jitted program, ``training.population``):
each member is a single run's workdir DIR/lr_<lr> (as experiments/grid.py names
them), the population's checkpoints in DIR/population_<id>/; a rerun resumes it. Multi-host: pass
--coordinator_address, --num_processes and --process_id (detected automatically
on TPU VMs and SLURM).

Exit codes: 0 done, 1 refused or failed (one line on stderr saying why and what
to do), 2 bad command line, 130 SIGINT / 143 SIGTERM after checkpointing.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from nc_jax import cli
from nc_jax.cli import last_values, rerun_command  # noqa: F401  (their names here: older callers import them)

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")

cli.define_config_flag(DEFAULT_CONFIG)
flags.DEFINE_string("workdir", "workdirs/default", "Where config.json, metrics.jsonl and checkpoints/ go.")
flags.DEFINE_bool("overwrite", False, "Discard a previous run with a different config in --workdir.")
flags.DEFINE_string("resume_from", None, "OTHER_WORKDIR[:EPOCH]: start from that run's checkpoint (latest good "
                    "one without EPOCH) when --workdir has none; WORKDIR:EPOCH restarts --workdir from its own "
                    "epoch; sets config.resume_from.")
flags.DEFINE_string("lrs", None, "A,B,...: train the config at each of these learning rates as one population "
                    "(members in DIR/lr_<lr>; config.lr is ignored).")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def _parse_flags(argv: list[str]) -> list[str]:
  """The flags, the config loaded (``cli.parse_config_flags``), and the folders checked: each mistake one line, exit 2."""
  remaining = cli.parse_config_flags(argv, FLAGS, default=DEFAULT_CONFIG)
  if not FLAGS.workdir.strip():  # pathlib reads '' as the current folder: the run would land there
    cli.fail("--workdir is empty: pass the run's folder, e.g. --workdir=workdirs/NAME", 2)
  if FLAGS.resume_from is not None and not FLAGS.resume_from.strip():
    cli.fail("--resume_from is empty: pass OTHER_WORKDIR[:EPOCH], or leave the flag out", 2)
  if FLAGS.lrs is not None:
    population_lrs()  # a bad list is a bad command line
    if FLAGS.resume_from is not None:
      cli.fail("--lrs and --resume_from: a population starts from scratch or resumes itself; start a member from "
               "another run with a single run (no --lrs)", 2)
  return remaining


def population_lrs() -> list[float]:
  """--lrs as floats, each positive and finite; a bad list exits 2 with one line."""
  try:
    values = [float(x) for x in FLAGS.lrs.split(",")]
    if values and all(0 < v < float("inf") for v in values):
      return values
  except ValueError:
    pass
  cli.fail(f"--lrs {FLAGS.lrs!r}: give comma-separated positive learning rates, e.g. --lrs=0.01,0.03,0.1", 2)


def main(argv) -> None:
  """Trains FLAGS.config into FLAGS.workdir; every failure is one line on stderr and exit status 1, 130 or 143."""
  cli.start(argv)
  from nc_jax import records, schema
  from nc_jax.training import Diverged, Preempted, train_and_evaluate
  from nc_jax.training.workdir import WorkdirError

  config = FLAGS.config
  if FLAGS.resume_from is not None:
    config.resume_from = FLAGS.resume_from
  try:
    if FLAGS.lrs is not None:
      _train_population(config)
    else:
      train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except Preempted as stopped:
    print(stopped, flush=True)
    sys.exit(130 if stopped.signal_name == "SIGINT" else 143)
  except KeyboardInterrupt:
    cli.fail("interrupted twice; stopped without a final checkpoint. Rerun the command to resume from the last one",
             130)
  except Diverged as diverged:
    command = None
    if diverged.last_good_epoch is not None:  # the advice as the whole command, the same flags otherwise
      command = rerun_command(sys.argv, workdir=diverged.rerun_workdir(FLAGS.workdir),
                              resume_from=f"{FLAGS.workdir}:{diverged.last_good_epoch}", lr=diverged.advised_lr)
    cli.fail(diverged.message(command))
  except (schema.ConfigError, WorkdirError, records.RecordsError) as error:
    cli.fail(str(error))
  except Exception as error:  # noqa: BLE001  (one line for the user; the traceback helps nobody here)
    os_error = cli.os_error(error)
    if isinstance(os_error, FileNotFoundError) and os_error.strerror is None and os_error.filename is None:
      cli.fail(cli.one_line(os_error))  # raised with a message of its own (missing data, ...): the message is the fix
    if os_error is not None:
      cli.fail(f"{cli.describe_os_error(os_error)}; nothing already written is lost: free space or fix "
               "permissions, then rerun the same command to resume")
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError, ImportError)):
      cli.fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    raise


def _train_population(config) -> None:
  """The population of --lrs in FLAGS.workdir; one line per member at the end; exit 1 if every member diverged."""
  from nc_jax.training import population, population_disk

  members = population.train_population(config, population_lrs(), workdir=FLAGS.workdir,
                                        overwrite=FLAGS.overwrite)
  for m in members:
    where = pathlib.Path(FLAGS.workdir) / population_disk.member_name(m.lr)
    last = m.records[-1] if m.records else {}
    state = (f"stopped: {m.diverged}" if m.diverged else
             f"epoch {last.get('epoch')}  test_acc {last.get('test_acc', float('nan')):.4f}  nc1 "
             f"{last.get('nc1', float('nan')):.3e}")
    print(f"member lr {m.lr:.6g} ({where}): {state}", flush=True)
  if all(m.diverged for m in members):
    cli.fail(f"every member of the population diverged; lower --lrs (each member's reason is above)")


if __name__ == "__main__":
  cli.run(main, _parse_flags)
