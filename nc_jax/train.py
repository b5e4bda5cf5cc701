"""python -m nc_jax.train --config configs/NAME.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

Trains a net into the terminal phase, measuring Neural Collapse in-graph; writes
config.json, metrics.jsonl, tpt.json and checkpoints/ to DIR. Rerunning the same
command resumes from the latest good checkpoint. ``--resume_from OTHER[:EPOCH]``
starts DIR from another run's checkpoint (e.g. with a lower lr after a
divergence); ``--resume_from DIR:EPOCH`` restarts DIR itself from its epoch (with
--overwrite when it holds anything after that epoch). A ``--config.KEY`` given
more than once takes its last value, whatever its type. Multi-host: pass
--coordinator_address, --num_processes and --process_id (detected automatically
on TPU VMs and SLURM).

Exit codes: 0 done, 1 refused or failed (one line on stderr saying why and what
to do), 2 bad command line, 130 SIGINT / 143 SIGTERM after checkpointing.
"""

from __future__ import annotations

import difflib
import pathlib
import re
import shlex
import sys

from absl import flags
from ml_collections import config_dict, config_flags

from nc_jax import cli

DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")
CONFIG_CHOICES = "--config=configs/NAME.py[:variant] (the experiments are in configs/ and configs/paper/)"

# No default here: config_flags loads a default, overrides and all, while it defines the flag (at import, where
# a mistake escapes as a traceback); _parse_flags names DEFAULT_CONFIG on the command line instead.
try:
  config_flags.DEFINE_config_file("config", None, "Config file (get_config), optionally FILE:variant.")
except flags.Error:  # a --flagfile it cannot read (it reads them to find --config): _parse_flags says which
  config_flags.DEFINE_config_file("config", None, "Config file (get_config), optionally FILE:variant.", sys_argv=[])
flags.FLAGS["config"].default_as_str = repr(DEFAULT_CONFIG)  # what --help shows
flags.DEFINE_string("workdir", "workdirs/default", "Where config.json, metrics.jsonl and checkpoints/ go.")
flags.DEFINE_bool("overwrite", False, "Discard a previous run with a different config in --workdir.")
flags.DEFINE_string("resume_from", None, "OTHER_WORKDIR[:EPOCH]: start from that run's checkpoint (latest good "
                    "one without EPOCH) when --workdir has none; WORKDIR:EPOCH restarts --workdir from its own "
                    "epoch; sets config.resume_from.")
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with each mistake (missing config file, unknown key, bad value) as one line and exit 2."""
  try:
    argv = FLAGS.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile expanded, for the hints too
    spec = _config_spec(argv)
    if spec is None:
      argv.insert(1, f"--config={DEFAULT_CONFIG}")
    elif spec.endswith(":"):  # get_config('') is the file's default (full-size) job: ':$UNSET' would run it
      cli.fail(f"--config={spec} names an empty variant after ':'; drop the ':' for the file's default job or "
               f"name a variant ({spec}smoke, ...)", 2)
    argv = last_values(argv)
    remaining = FLAGS(argv)
    FLAGS.config.get("model")  # config_flags defers a failed load to the first use: fail here instead
    if not FLAGS.workdir.strip():  # pathlib reads '' as the current folder: the run would land there
      cli.fail("--workdir is empty: pass the run's folder, e.g. --workdir=workdirs/NAME", 2)
    if FLAGS.resume_from is not None and not FLAGS.resume_from.strip():
      cli.fail("--resume_from is empty: pass OTHER_WORKDIR[:EPOCH], or leave the flag out", 2)
    return remaining
  except flags.Error as error:
    message = _flag_error(str(error), argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of an undeclared key
    message = _unknown_key(str(error), argv)
  except Exception as error:  # noqa: BLE001  (a config file that does not load: missing, or raising)
    message = _load_error(error, argv)
  cli.fail(message, 2)


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config (FILE or FILE:variant) in ``argv``, or None when it names none."""
  spec = None
  for i, argument in enumerate(argv[1:], 1):
    found = re.match(r"^--?config(=|$)", argument)
    if found:
      spec = argument[found.end():] if found.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return spec


def _override_name(argument: str) -> str | None:
  """The dotted key of a --config.KEY[=VALUE] or --noconfig.KEY argument ('lr', 'model_options.width'), else None."""
  found = re.match(r"^--?(no)?config\.([\w.]+)(=|$)", argument)
  return found.group(2) if found else None


def last_values(argv: list[str]) -> list[str]:
  """``argv`` with each --config.KEY, and --config itself, kept only where last given: the last value wins, for
  every type (a second --config would otherwise define every override flag twice).

  config_flags joins the values of a repeated tuple key ('(2,)' then '(4,)' gives (2, 4)) where a repeated
  scalar takes the last; dropping the earlier ones makes one rule. '--config.KEY VALUE' (two arguments) is
  read as absl reads it: the value is the next argument unless KEY is a boolean (``--config.KEY`` alone
  sets it, ``--noconfig.KEY`` clears it). Arguments after '--' are left alone.
  """
  end = argv.index("--") if "--" in argv else len(argv)
  keys = None  # the config's keys, loaded only when a two-argument override needs its type
  spans, i = [], 1  # (name, first, last + 1) of each override
  while i < end:
    if re.match(r"^--?config(=|$)", argv[i]):  # the config file itself: the last --config wins too
      width = 1 if "=" in argv[i] else 2
      spans.append((" config", i, min(i + width, end)))
      i += width
      continue
    name = _override_name(argv[i])
    width = 1
    if name is not None and "=" not in argv[i] and not argv[i].lstrip("-").startswith("no"):
      keys = _config_keys(argv) if keys is None else keys
      if not isinstance(keys.get(name), bool) and i + 1 < end:
        width = 2
    if name is not None:
      spans.append((name, i, i + width))
    i += width
  last = {name: first for name, first, _ in spans}
  dropped = {j for name, first, stop in spans if last[name] != first for j in range(first, stop)}
  return [argument for j, argument in enumerate(argv) if j not in dropped]


def _config_keys(argv: list[str]) -> dict:
  """Every key of the config that ``argv`` names, dotted ('model_options.width'), with its value; {} when the
  config does not load."""
  def walk(config, prefix):
    for key, value in config.items():
      keys[prefix + key] = value
      if isinstance(value, config_dict.ConfigDict):
        walk(value, f"{prefix}{key}.")
  keys, values = {}, flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=["load"])  # no overrides
  try:
    values(["load", f"--config={_config_spec(argv)}"])
    walk(values.config, "")
  except Exception:  # noqa: BLE001  (only a hint is lost)
    return {}
  return keys


def _load_error(error: Exception, argv: list[str]) -> str:
  """One line for a config file that does not load: unreadable (pass another one), or raising (fix it)."""
  errno = re.search(r"\[Errno \d+\][^\n]*", str(error))
  spec = _config_spec(argv)
  if errno or not spec:
    return f"cannot load the config: {errno.group(0) if errno else cli.one_line(error)}; pass {CONFIG_CHOICES}"
  return f"cannot load the config {spec}: {type(error).__name__}: {cli.one_line(error)}; fix the file"


def _unknown_key(text: str, argv: list[str]) -> str:
  """One line for ml_collections' KeyError/AttributeError on an override of a key the config does not declare:
  the --config.KEY given, the close keys the config does declare, and where they are listed."""
  keys = _config_keys(argv)
  overrides = [a.split("=")[0].lstrip("-")[len("config."):] for a in argv[1:] if re.match(r"^--?config\.", a)]
  missing = re.search(r"'(\w+)'", text)  # the first part of the path that is not there
  name = next((o for o in overrides if keys and o not in keys), None) or next(
      (o for o in overrides if missing and missing.group(1) in o.split(".")), missing.group(1) if missing else "?")
  parts = name.split(".")
  depth = next((i for i in range(len(parts)) if ".".join(parts[:i + 1]) not in keys), len(parts) - 1)
  parent = ".".join(parts[:depth])  # close keys are looked for beside the first part that is not there
  siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
  close = [siblings[c] for c in difflib.get_close_matches(parts[depth], list(siblings), n=3)]
  hint = f"did you mean {' or '.join('--config.' + c for c in close)}? " if close else ""
  where = _config_spec(argv) or DEFAULT_CONFIG
  return f"--config.{name}: no such config key; {hint}{where} declares the keys (nc_jax/schema.py says what each means)"


def _flag_error(text: str, argv: list[str]) -> str:
  """One line for absl's error on a flag: for a --config.KEY=VALUE of the wrong type, what KEY takes."""
  line = " ".join(cli.one_line(RuntimeError(text)).split()).removeprefix("ERROR:: ")
  if "before a value for --config was specified" in text:  # config_flags' FlagOrderError
    return f"{line}; put --config FILE before the --config.KEY=VALUE overrides"
  if text.startswith("flag --config="):  # the config file raised (an unknown variant, ...): its last line
    return f"cannot load the config: {line.split(': ', 1)[-1]}"
  found = re.match(r"flag --config\.([\w.]+)=", text)
  if not found:
    return f"{line}; --help lists the flags"
  value = _config_keys(argv).get(found.group(1))
  kinds = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple like '(1, 2)'",
           config_dict.ConfigDict: "a dict like '{\"key\": value}'"}
  kind = next((kinds[t] for t in kinds if isinstance(value, t)), None)
  if kind is None:
    return line
  if isinstance(value, config_dict.ConfigDict):  # its repr is many lines of YAML: name the keys instead
    return (f"{line.removeprefix('flag ')}; config.{found.group(1)} is a group: set one of its keys, "
            f"--config.{found.group(1)}.KEY=VALUE (KEY one of {', '.join(sorted(value.keys()))})")
  return f"{line.removeprefix('flag ')}; config.{found.group(1)} takes {kind} (the config file has {value!r})"


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


if __name__ == "__main__":
  cli.run(main, _parse_flags)
