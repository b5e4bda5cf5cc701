"""What the command-line entry points (``python -m nc_jax.train``, ``python -m nc_jax.collect``) share.

Both report every failure as one line on stderr (``error: ...``) with exit status 1 (refused or failed)
or 2 (bad command line), start ``jax.distributed`` from the same four flags, and keep orbax's
background-thread noise (the "Event loop is closed" tracebacks and unraisable exceptions its threads
leave after a failed save or restore) out of that one line.

Usage, in an entry point::

  cli.define_distributed_flags()          # once, with the command's own flags
  def main(argv):
    cli.start(argv)                       # extra arguments refused, logging quiet, jax.distributed up
    ...
  if __name__ == "__main__":
    cli.run(main, flags_parser)           # absl's app.run with stderr filtered
"""

from __future__ import annotations

import io
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from absl import app, flags, logging

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


def os_error(error: Optional[BaseException]) -> Optional[OSError]:
  """The OSError behind an exception (itself, or one in its chain of causes and contexts: orbax wraps
  them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def describe_os_error(error: OSError) -> str:
  """``strerror (filename)``, e.g. 'No space left on device (/run/metrics.jsonl)'; the message when the
  error was raised with one of its own (no strerror)."""
  where = f" ({error.filename})" if error.filename else ""
  return f"{error.strerror or one_line(error)}{where}"


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
