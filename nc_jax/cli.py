"""What the command-line entry points (``python -m nc_jax.train``, ``python -m nc_jax.collect``) share.

Both report every failure as one line on stderr (``error: ...``) with exit status 1 (refused or failed)
or 2 (bad command line), start ``jax.distributed`` from the same four flags, and keep orbax's
background-thread noise (the "Event loop is closed" tracebacks and unraisable exceptions its threads
leave after a failed save or restore) out of that one line. A config file flag (``--config FILE[:variant]
--config.KEY=VALUE ...``, ml_collections' ``config_flags``) is parsed here too: a repeated ``--config.KEY``
takes its last value (``last_values``, which experiments/grid.py applies as well), and each mistake
(a file that does not load, an undeclared key, a value of the wrong type) is one line naming the fix.

Usage, in an entry point::

  cli.define_config_flag(DEFAULT_CONFIG)  # a command that takes a config file
  cli.define_distributed_flags()          # once, with the command's own flags
  def main(argv):
    cli.start(argv)                       # extra arguments refused, logging quiet, jax.distributed up
    ...
  if __name__ == "__main__":
    cli.run(main, flags_parser)           # absl's app.run with stderr filtered; flags_parser calls
                                          # parse_config_flags or parse_flags
"""

from __future__ import annotations

import difflib
import io
import os
import re
import shlex
import sys
from typing import Callable, NoReturn, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from nc_jax import files

# The flags below are attributed (in --help) to the entry point that asks for them, not to this module.
flags.disclaim_key_flags()

DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id", "cpu_collectives")


def define_distributed_flags(values: Optional[flags.FlagValues] = None) -> flags.FlagValues:
  """Defines --coordinator_address, --num_processes, --process_id and --cpu_collectives on ``values``
  (default absl's global ``flags.FLAGS``) and returns it; a second call on the same values does nothing."""
  values = flags.FLAGS if values is None else values
  if all(name in values for name in DISTRIBUTED_FLAGS):
    return values
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.",
                      flag_values=values)
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.", flag_values=values)
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", flag_values=values)
  flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives backend for multi-process CPU runs.",
                      flag_values=values)
  return values


def fail(message: str, code: int = 1, *, drop_unraisable: bool = False) -> NoReturn:
  """Prints ``error: message`` on stderr and exits with ``code``.

  drop_unraisable: also silence exceptions reported at exit ("Exception ignored in ..." with a traceback),
  as orbax's reads abandoned by a failed restore report themselves: the failure is this line.
  """
  if drop_unraisable:
    sys.unraisablehook = lambda unraisable: None
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def one_line(error: BaseException) -> str:
  """An exception's message as one line: the last line of an embedded traceback, else all lines joined."""
  text = str(error).strip()
  if "Traceback (most recent call last)" in text:
    return text.splitlines()[-1].strip()
  return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


# The OSError behind an exception, and its one line (``files``: every command describes them the same way).
os_error = files.os_error
describe_os_error = files.describe_os_error


def parse_flags(argv: Sequence[str], values: Optional[flags.FlagValues] = None, *, required: Sequence[str] = (),
                usage: str = "") -> list[str]:
  """absl's parsing of ``argv`` into ``values`` (default the global FLAGS), each mistake one line and exit 2.

  required: flags that must be given (their default is None); missing ones are named with ``usage``, e.g.
  'error: --out must be given: python -m nc_jax.collect --workdir RUN --out DIR'.
  """
  values = flags.FLAGS if values is None else values
  try:
    remaining = values(list(argv))
  except flags.Error as error:
    fail(f"{' '.join(one_line(error).split())}; --help lists the flags", 2)
  missing = [name for name in required if getattr(values, name) is None]
  if missing:
    fail(f"{' and '.join('--' + name for name in missing)} must be given" + (f": {usage}" if usage else ""), 2)
  empty = [name for name in required if not str(getattr(values, name)).strip()]
  if empty:  # pathlib reads '' as the current folder, where nothing was meant to go
    fail(f"{' and '.join('--' + name for name in empty)} is empty" + (f": {usage}" if usage else ""), 2)
  return remaining


# ------------------------------------------------------------------ a config file on the command line
CONFIG_CHOICES = "--config=configs/NAME.py[:variant] (the experiments are in configs/ and configs/paper/)"
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")  # --config FILE, --config=FILE (not --config.KEY)
_OVERRIDE_FLAG = re.compile(r"^--?(no)?config\.([\w.]+)(=|$)")  # --config.KEY[=VALUE], --noconfig.KEY


def define_config_flag(default: str, values: Optional[flags.FlagValues] = None) -> flags.FlagValues:
  """Defines --config (FILE or FILE:variant, with --config.KEY=VALUE overrides) on ``values`` (default absl's
  FLAGS); ``default`` is the file ``parse_config_flags`` names when none is given, and what --help shows."""
  values = flags.FLAGS if values is None else values
  # No default in the flag itself: config_flags would load it, overrides and all, right here (at import, where a
  # mistake escapes as a traceback); parse_config_flags names ``default`` on the command line instead.
  try:
    config_flags.DEFINE_config_file("config", None, "Config file (get_config), optionally FILE:variant.",
                                    flag_values=values)
  except flags.Error:  # a --flagfile it cannot read (it reads them to find --config): parse_config_flags says which
    config_flags.DEFINE_config_file("config", None, "Config file (get_config), optionally FILE:variant.",
                                    flag_values=values, sys_argv=[])
  values["config"].default_as_str = repr(default)
  return values


def parse_config_flags(argv: Sequence[str], values: Optional[flags.FlagValues] = None, *, default: str) -> list[str]:
  """absl's parsing of ``argv`` with a --config flag (``define_config_flag``), each mistake (missing config
  file, unknown key, bad value) as one line and exit 2; the config is loaded here, not at its first use.

  --flagfile is expanded first; without --config, ``--config=default`` is inserted; a repeated --config or
  --config.KEY takes its last value (``last_values``).
  """
  values = flags.FLAGS if values is None else values
  try:
    argv = values.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile expanded, for the hints too
    spec = config_spec(argv)
    if spec is None:
      argv.insert(1, f"--config={default}")
    elif spec.endswith(":"):  # get_config('') is the file's default (full-size) job: ':$UNSET' would run it
      fail(f"--config={spec} names an empty variant after ':'; drop the ':' for the file's default job or "
           f"name a variant ({spec}smoke, ...)", 2)
    argv = last_values(argv)
    remaining = values(argv)
    values.config.get("model")  # config_flags defers a failed load to the first use: fail here instead
    return remaining
  except flags.Error as error:
    message = _flag_error(str(error), argv)
  except (AttributeError, KeyError) as error:  # ml_collections: an override of an undeclared key
    message = _unknown_key(str(error), argv, default)
  except Exception as error:  # noqa: BLE001  (a config file that does not load: missing, or raising)
    message = _load_error(error, argv)
  fail(message, 2)


def config_spec(argv: Sequence[str]) -> Optional[str]:
  """The value of the last --config (FILE or FILE:variant) in ``argv``, or None when it names none."""
  spec = None
  for i, argument in enumerate(argv[1:], 1):
    found = _CONFIG_FLAG.match(argument)
    if found:
      spec = argument[found.end():] if found.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return spec


def override_name(argument: str) -> Optional[str]:
  """The dotted key of a --config.KEY[=VALUE] or --noconfig.KEY argument ('lr', 'model_options.width'), else None."""
  found = _OVERRIDE_FLAG.match(argument)
  return found.group(2) if found else None


def last_values(argv: Sequence[str]) -> list[str]:
  """``argv`` with each --config.KEY, and --config itself, kept only where last given: the last value wins, for
  every type (a second --config would otherwise define every override flag twice).

  config_flags joins the values of a repeated tuple key ('(2,)' then '(4,)' gives (2, 4)) where a repeated
  scalar takes the last; dropping the earlier ones makes one rule. '--config.KEY VALUE' (two arguments) is
  read as absl reads it: the value is the next argument unless KEY is a boolean (``--config.KEY`` alone
  sets it, ``--noconfig.KEY`` clears it). Arguments after '--' are left alone.
  """
  argv = list(argv)
  end = argv.index("--") if "--" in argv else len(argv)
  keys = None  # the config's keys, loaded only when a two-argument override needs its type
  spans, i = [], 1  # (name, first, last + 1) of each override
  while i < end:
    if _CONFIG_FLAG.match(argv[i]):  # the config file itself: the last --config wins too
      width = 1 if "=" in argv[i] else 2
      spans.append((" config", i, min(i + width, end)))
      i += width
      continue
    name = override_name(argv[i])
    width = 1
    if name is not None and "=" not in argv[i] and not argv[i].lstrip("-").startswith("no"):
      keys = config_keys(argv) if keys is None else keys
      if not isinstance(keys.get(name), bool) and i + 1 < end:
        width = 2
    if name is not None:
      spans.append((name, i, i + width))
    i += width
  last = {name: first for name, first, _ in spans}
  dropped = {j for name, first, stop in spans if last[name] != first for j in range(first, stop)}
  return [argument for j, argument in enumerate(argv) if j not in dropped]


def config_keys(argv: Sequence[str]) -> dict:
  """Every key of the config that ``argv``'s --config names (without its overrides), dotted
  ('model_options.width'), with its value; {} when the config does not load."""
  def walk(config, prefix):
    for key, value in config.items():
      keys[prefix + key] = value
      if isinstance(value, config_dict.ConfigDict):
        walk(value, f"{prefix}{key}.")
  keys, values = {}, flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=["load"])  # no overrides
  try:
    values(["load", f"--config={config_spec(argv)}"])
    walk(values.config, "")
  except Exception:  # noqa: BLE001  (only a hint is lost)
    return {}
  return keys


def _load_error(error: Exception, argv: Sequence[str]) -> str:
  """One line for a config file that does not load: unreadable (pass another one), or raising (fix it)."""
  errno = re.search(r"\[Errno \d+\][^\n]*", str(error))
  spec = config_spec(argv)
  if errno or not spec:
    return f"cannot load the config: {errno.group(0) if errno else one_line(error)}; pass {CONFIG_CHOICES}"
  return f"cannot load the config {spec}: {type(error).__name__}: {one_line(error)}; fix the file"


def _unknown_key(text: str, argv: Sequence[str], default: str) -> str:
  """One line for ml_collections' KeyError/AttributeError on an override of a key the config does not declare:
  the --config.KEY given, the close keys the config does declare, and where they are listed."""
  keys = config_keys(argv)
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
  where = config_spec(argv) or default
  return f"--config.{name}: no such config key; {hint}{where} declares the keys (nc_jax/schema.py says what each means)"


def _flag_error(text: str, argv: Sequence[str]) -> str:
  """One line for absl's error on a flag: for a --config.KEY=VALUE of the wrong type, what KEY takes."""
  line = " ".join(one_line(RuntimeError(text)).split()).removeprefix("ERROR:: ")
  if "before a value for --config was specified" in text:  # config_flags' FlagOrderError
    return f"{line}; put --config FILE before the --config.KEY=VALUE overrides"
  if text.startswith("flag --config="):  # the config file raised (an unknown variant, ...): its last line
    return f"cannot load the config: {line.split(': ', 1)[-1]}"
  found = re.match(r"flag --config\.([\w.]+)=", text)
  if not found:
    return f"{line}; --help lists the flags"
  keys = config_keys(argv)
  value = keys.get(found.group(1))
  kinds = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple like '(1, 2)'",
           config_dict.ConfigDict: "a dict like '{\"key\": value}'"}
  kind = next((kinds[t] for t in kinds if isinstance(value, t)), None)
  if value is None and found.group(1) in keys:  # a placeholder (None until set), e.g. nc.min_count
    return (f"{line.removeprefix('flag ')}; config.{found.group(1)} is None unless set: leave the flag out to keep "
            f"None, or give it a value of its type")
  if kind is None:
    return line
  if isinstance(value, config_dict.ConfigDict):  # its repr is many lines of YAML: name the keys instead
    return (f"{line.removeprefix('flag ')}; config.{found.group(1)} is a group: set one of its keys, "
            f"--config.{found.group(1)}.KEY=VALUE (KEY one of {', '.join(sorted(value.keys()))})")
  return f"{line.removeprefix('flag ')}; config.{found.group(1)} takes {kind} (the config file has {value!r})"


def rerun_command(argv: Sequence[str], *, workdir: str, resume_from: str, lr: float) -> str:
  """``argv`` (nc_jax.train's) as a command with another --workdir, --resume_from and --config.lr (the advice
  after a divergence)."""
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


# ------------------------------------------------------------------ processes and stderr
def cluster_detected() -> bool:
  """True on multi-host TPU VMs and multi-task SLURM jobs, where jax.distributed finds its peers itself."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(values: Optional[flags.FlagValues] = None, *, detect_cluster: bool = True) -> None:
  """Starts ``jax.distributed`` from the distributed flags (all three of address, count and index, or none),
  or, with ``detect_cluster``, by itself on a TPU VM pod slice or a SLURM job of several tasks."""
  import jax

  values = flags.FLAGS if values is None else values
  given = [values.coordinator_address, values.num_processes, values.process_id]
  if any(value is not None for value in given):
    if None in given or not values.coordinator_address:
      fail("--coordinator_address, --num_processes and --process_id go together: pass all three (e.g. "
           "--coordinator_address=HOST:PORT --num_processes=2 --process_id=0) or none", 2)
    if values.num_processes < 1 or not 0 <= values.process_id < values.num_processes:
      fail(f"--process_id={values.process_id} --num_processes={values.num_processes}: need num_processes >= 1 and "
           f"0 <= process_id < num_processes (one process each, numbered from 0)", 2)
    if jax.config.jax_platforms in (None, "", "cpu") and values.cpu_collectives:
      jax.config.update("jax_cpu_collectives_implementation", values.cpu_collectives)
    jax.distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
  elif detect_cluster and cluster_detected():
    jax.distributed.initialize()


def quiet_closed_event_loops(hook: Callable) -> Callable:
  """An unraisable-exception hook that drops "Event loop is closed" (orbax's threads after a failed save)
  and passes everything else to ``hook``."""
  def quiet(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
      hook(unraisable)
  return quiet


def start(argv: Sequence[str], values: Optional[flags.FlagValues] = None, *, detect_cluster: bool = True) -> None:
  """An entry point's first steps in ``main(argv)``: refuse arguments that are not flags (exit 2), quiet
  absl logging (orbax logs every save and restore at INFO, a failed background save at ERROR, with
  tracebacks: every failure reaches ``main`` as an exception and is reported there, in one line), drop
  "Event loop is closed" unraisable exceptions, and start ``jax.distributed`` (``initialize_distributed``)."""
  if len(argv) > 1:
    fail(f"unexpected arguments {list(argv[1:])}", 2)
  logging.set_verbosity(logging.FATAL)
  sys.unraisablehook = quiet_closed_event_loops(sys.unraisablehook)
  initialize_distributed(values, detect_cluster=detect_cluster)


def run(main: Callable[[list[str]], None], flags_parser: Callable[[list[str]], list[str]]) -> None:
  """``absl.app.run(main, flags_parser=flags_parser)`` with stderr through ``WithoutClosedLoopTracebacks``."""
  if not isinstance(sys.stderr, WithoutClosedLoopTracebacks):
    sys.stderr = WithoutClosedLoopTracebacks(sys.stderr)
  app.run(main, flags_parser=flags_parser)


class WithoutClosedLoopTracebacks(io.TextIOBase):
  """stderr without the "RuntimeError: Event loop is closed" tracebacks that orbax's background threads print
  after a failed restore or save (the failure itself is the command's one line); everything else passes
  through, a partial line (a '\\r' progress line) at each flush."""

  def __init__(self, stream):
    self.stream, self.held, self.line = stream, [], ""

  def write(self, text: str) -> int:
    self.line += text
    while "\n" in self.line:
      line, self.line = self.line.split("\n", 1)
      self._line(line + "\n")
    return len(text)

  def _line(self, line: str) -> None:
    if not self.held and not line.startswith("Traceback (most recent call last)"):
      self.stream.write(line)
    elif line.startswith((" ", "Traceback (most recent call last)")):
      self.held.append(line)
    else:  # the exception line ends the traceback
      if not line.startswith("RuntimeError: Event loop is closed"):
        self.stream.write("".join(self.held) + line)
      self.held = []

  def flush(self) -> None:
    if self.line and not self.held:
      self.stream.write(self.line)
      self.line = ""
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def fileno(self) -> int:
    return self.stream.fileno()

  @property
  def encoding(self):
    return getattr(self.stream, "encoding", None)

  @property
  def errors(self):
    return getattr(self.stream, "errors", None)
