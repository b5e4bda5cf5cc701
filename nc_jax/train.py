"""python -m nc_jax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Trains a net into the terminal phase, measuring Neural Collapse in-graph; writes
config.json, metrics.jsonl, tpt.json and checkpoints/ to DIR. Rerunning the same
command resumes from the latest good checkpoint. ``--resume_from OTHER[:EPOCH]``
starts DIR from another run's checkpoint (e.g. with a lower lr after a
divergence). Multi-host: pass --coordinator_address, --num_processes and
--process_id (detected automatically on TPU VMs and SLURM).

Exit codes: 0 done, 1 refused or failed (one line on stderr saying why and what
to do), 2 bad command line, 130 SIGINT / 143 SIGTERM after checkpointing.
"""

from __future__ import annotations

import pathlib
import shlex
import sys

from absl import flags
from ml_collections import config_flags

from nc_jax import cli

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")

config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (get_config), optionally FILE:variant.")
flags.DEFINE_string("workdir", "workdirs/default", "Where config.json, metrics.jsonl and checkpoints/ go.")
flags.DEFINE_bool("overwrite", False, "Discard a previous run with a different config in --workdir.")
flags.DEFINE_string("resume_from", None, "OTHER_WORKDIR[:EPOCH]: start from that run's checkpoint (latest good "
                    "one without EPOCH) when --workdir has none; sets config.resume_from.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with each mistake (missing config file, unknown key, bad value) as one line."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get("model")  # config_flags defers a failed load to the first use: fail here instead
    return remaining
  except flags.Error as error:
    message = cli.one_line(error)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of an undeclared key
    text = str(error).replace("\\n", "\n").replace("\\'", "'")  # a KeyError's repr inside an AttributeError
    lines = [line.strip().strip("'\"").strip() for line in text.splitlines() if line.strip().strip("'\"")]
    name = lines[0] if lines else "?"
    key = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0].split(".")),
               f"--config.{name}")
    hint = " ".join(lines[1:]).strip() or "see the config file (and nc_jax/schema.py) for the keys it declares"
    message = f"{key}: no such config key; {hint}"
  except Exception as error:  # noqa: BLE001  (a config file that does not load: missing, or raising)
    reason = next((line.strip() for line in str(error).splitlines() if "Errno" in line), cli.one_line(error))
    message = f"cannot load the config: {reason}"
  cli.fail(message, 2)


def rerun_command(argv: list[str], *, workdir: str, resume_from: str, lr: float) -> str:
  """``argv`` as a command with another --workdir, --resume_from and --config.lr (the advice after a divergence)."""
  replaced = ("--workdir", "--resume_from", "--config.lr", "--overwrite", "--nooverwrite", "--config.resume_from")
  kept, skip = [], False
  for argument in argv[1:]:
    if skip:
      skip = False
      continue
    name = argument.split("=")[0]
    if name in replaced:
      skip = "=" not in argument and name not in ("--overwrite", "--nooverwrite")
      continue
    kept.append(argument)
  return shlex.join([sys.executable, "-m", "nc_jax.train", *kept, "--workdir", workdir, "--resume_from",
                     resume_from, f"--config.lr={lr:.3g}"])


def main(argv) -> None:
  cli.start(argv)
  from nc_jax import records, schema
  from nc_jax.training import Diverged, Preempted, train_and_evaluate
  from nc_jax.training.workdir import WorkdirError

  config = FLAGS.config
  if FLAGS.resume_from is not None:
    config.resume_from = FLAGS.resume_from
  try:
    train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except Preempted as stopped:
    print(stopped, flush=True)
    sys.exit(130 if stopped.signal_name == "SIGINT" else 143)
  except KeyboardInterrupt:
    cli.fail("interrupted twice; stopped without a final checkpoint. Rerun the command to resume from the last one",
             130)
  except Diverged as diverged:
    if diverged.last_good_epoch is None:
      cli.fail(str(diverged))
    new_workdir = f"{FLAGS.workdir.rstrip('/')}_lr{diverged.lr / 10:.3g}"
    command = rerun_command(sys.argv, workdir=new_workdir, resume_from=f"{FLAGS.workdir}:{diverged.last_good_epoch}",
                            lr=diverged.lr / 10)
    cli.fail(f"training loss is {diverged.loss} at epoch {diverged.epoch}; stopped. The last good checkpoint is "
             f"epoch {diverged.last_good_epoch}; to go on from it with a 10x lower lr: {command}")
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


if __name__ == "__main__":
  cli.run(main, _parse_flags)
