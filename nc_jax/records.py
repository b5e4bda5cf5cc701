"""Run records: the one reader (and appender) of a run's metrics.jsonl.

A run directory written by ``python -m nc_jax.train`` holds ``metrics.jsonl``:
one JSON object per measurement, in increasing ``epoch``, each carrying
``tpt_start_epoch`` (the first epoch whose train-mode accuracy reached the
threshold, -1 before). Everything that reads runs (the trainer on resume,
``nc_jax.report``, ``experiments/``, the tests) goes through ``read`` and the
TPT rule below, so there is one definition of each.

Faults it is built for: a process killed (or a disk filling up) mid-append
leaves a *torn last line*, which ``read`` drops with a warning naming the file
(and, with ``repair=True``, rewrites the file without it); any other line that
is not a JSON object, or epochs that do not increase (two runs writing one
file), is a ``RecordsError`` naming the file and line. Appends write one whole
line with a single ``write`` and ``fsync`` it. This module imports no JAX.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shlex
import sys
from typing import Callable, Optional

from nc_jax.files import write_atomically

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
DIVERGED_FILE = "diverged.txt"  # a population member that stopped alone: why (training.population_disk)


class RecordsError(ValueError):
  """A run record file that cannot be read as a run's measurements."""


def _warn(message: str) -> None:
  print(f"WARNING: {message}", file=sys.stderr, flush=True)


def plain(value):
  """A JSON-ready scalar: ints stay ints, non-finite floats become the strings 'nan'/'inf'/'-inf'."""
  if hasattr(value, "dtype") and getattr(value, "shape", ()) == ():
    value = value.item()
  if isinstance(value, bool) or isinstance(value, int):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else str(value)
  return value


def read(path, *, repair: bool = False, warn: Callable[[str], None] = _warn) -> list[dict]:
  """The records of ``path`` (a metrics.jsonl file or a run directory); [] if there is none.

  A torn last line (no newline at its end, or not JSON) is dropped with a warning;
  ``repair=True`` also rewrites the file without it (atomically). Raises
  RecordsError naming file and line for a bad line before the last, a record
  without an integer 'epoch', or epochs that do not increase.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  if not path.exists():
    return []
  text = path.read_bytes().decode("utf-8", errors="replace")
  lines = text.split("\n")
  complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline ("" when none)
  torn = tail.strip() != ""
  records = []
  for number, line in enumerate(complete, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if number == len(complete) and not torn:
        torn, tail = True, line  # the last line, half written then newline-terminated by a later append
        break
      raise RecordsError(f"{path}, line {number}: not a JSON record ({error.msg}); "
                         "delete that line (or the run) and rerun") from None
    records.append(_checked(record, path, number, records))
  if torn:
    warn(f"{path}: dropped a torn last line ({len(tail)} characters, an interrupted write)"
         + ("; rewrote the file without it" if repair else ""))
    if repair:
      rewrite(path, records)
  return records


def _checked(record, path: pathlib.Path, number: int, previous: list) -> dict:
  if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
    raise RecordsError(f"{path}, line {number}: a record must be a JSON object with an integer 'epoch'")
  if previous and record["epoch"] <= previous[-1]["epoch"]:
    raise RecordsError(f"{path}, line {number}: epoch {record['epoch']} follows epoch {previous[-1]['epoch']} "
                       "(two runs wrote to one workdir?); keep one run's records or rerun with --overwrite")
  return record


def line_of(record: dict) -> str:
  return json.dumps({key: plain(value) for key, value in record.items()}) + "\n"


def append(path, record: dict) -> None:
  """Appends one record as one whole line, flushed and fsynced before returning."""
  data = line_of(record).encode()
  descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    written = os.write(descriptor, data)
    if written != len(data):
      raise OSError(f"short write to {path} ({written} of {len(data)} bytes); the disk may be full")
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def rewrite(path, records: list[dict]) -> None:
  """Replaces the file by ``records`` atomically and durably (``nc_jax.files.write_atomically``)."""
  write_atomically(path, "".join(line_of(r) for r in records).encode())


# ----------------------------------------------------------------------------
# The TPT rule.
# ----------------------------------------------------------------------------


def tpt_start(records: list[dict]) -> Optional[int]:
  """The epoch the terminal phase started, as the trainer recorded it (latest record), or None.

  The trainer declares TPT at the first epoch whose training accuracy, accumulated
  in train mode over that epoch's batches, reaches ``tpt_threshold``; it writes
  that epoch into every later record, and measures that epoch itself.
  """
  starts = [r.get("tpt_start_epoch") for r in records]
  starts = [s for s in starts if isinstance(s, int) and s > 0]
  return starts[-1] if starts else None


def first_in_tpt(records: list[dict]) -> Optional[dict]:
  """The first measurement at or after the TPT start (the TPT start itself for runs that measure it)."""
  start = tpt_start(records)
  return None if start is None else next((r for r in records if r["epoch"] >= start), None)


def summary(records: list[dict], workdir, threshold: Optional[float] = None) -> list[str]:
  """What a run found, as lines for the end of ``python -m nc_jax.train``.

  The TPT start, NC1 at the first and last measurement and their ratio, test
  accuracy at the first measurement in TPT and at the last one (Table 1's pair),
  and the command that draws the figures.
  """
  workdir = str(workdir)
  if not records:
    return [f"summary: no measurements in {workdir} yet"]
  first, last, start, in_tpt = records[0], records[-1], tpt_start(records), first_in_tpt(records)
  lines = [f"summary of {workdir}: {len(records)} measurements, epochs {first['epoch']}..{last['epoch']}"]
  if start is None:
    bar = "" if threshold is None else f" >= {threshold:g}"
    lines.append(f"  TPT: not reached (train accuracy{bar} at no epoch; {_fixed(last.get('epoch_acc'))} "
                 f"at epoch {last['epoch']})")
  else:
    lines.append(f"  TPT: from epoch {start}")
  nc1_first, nc1_last = number(first.get("nc1")), number(last.get("nc1"))
  change = ""
  if (nc1_first or 0) > 0 and (nc1_last or 0) > 0:
    ratio = nc1_first / nc1_last
    change = f" ({ratio:.3g}x lower)" if ratio >= 1 else f" ({1 / ratio:.3g}x higher)"
  lines.append(f"  NC1: {_general(nc1_first)} at epoch {first['epoch']} -> {_general(nc1_last)} at epoch "
               f"{last['epoch']}{change}")
  end = f"{_fixed(last.get('test_acc'))} at the end (epoch {last['epoch']})"
  if in_tpt is None:
    lines.append(f"  test accuracy: {end}")
  else:
    where = "the TPT start" if in_tpt["epoch"] == start else "the first measurement in TPT"
    at_end, at_start = number(last.get("test_acc")), number(in_tpt.get("test_acc"))
    points = "" if None in (at_end, at_start) else f", {100 * (at_end - at_start):+.2f} points"
    lines.append(f"  test accuracy: {_fixed(in_tpt.get('test_acc'))} at {where} (epoch {in_tpt['epoch']}) -> "
                 f"{end}{points}")
  quoted = shlex.quote(workdir)
  lines.append(f"  figures: python -m nc_jax.report {quoted} --out {shlex.quote(workdir + '/report')}")
  return lines


def _fixed(value) -> str:
  value = number(value)
  return "n/a" if value is None else f"{value:.4f}"


def _general(value) -> str:
  return "n/a" if value is None else f"{value:.3g}"


def number(value, invert: bool = False) -> Optional[float]:
  """A record value as a finite float (1 - value with ``invert``), or None for missing/NaN/inf."""
  if value is None:
    return None
  value = float(value)  # "nan"/"inf" strings parse too
  if invert:
    value = 1.0 - value
  return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------
# Run directories.
# ----------------------------------------------------------------------------


def read_config(run_dir) -> dict:
  """The run's config.json as a dict ({} if absent), every key an earlier version did not write at today's
  default (``nc_jax.schema.fill_defaults``, as the trainer reads it); RecordsError naming the file if it is
  not a JSON object."""
  path = pathlib.Path(run_dir) / CONFIG_FILE
  if not path.exists():
    return {}
  try:
    values = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise RecordsError(f"{path}: not JSON ({getattr(error, 'msg', error)}); restore it or rerun with "
                       "--overwrite") from None
  except OSError as error:
    raise RecordsError(f"{path}: cannot be read ({error.strerror or error})") from None
  if not isinstance(values, dict):
    raise RecordsError(f"{path}: holds a JSON {type(values).__name__}, not a config (an object); restore it or "
                       "rerun with --overwrite")
  from nc_jax import schema  # ml_collections, no JAX
  return schema.fill_defaults(values)


def finished(run_dir, records: Optional[list[dict]] = None) -> bool:
  """True when the run's last record is at (or past) its config's num_epochs."""
  config = read_config(run_dir)
  records = read(run_dir, warn=lambda _: None) if records is None else records
  return bool(records) and "num_epochs" in config and records[-1]["epoch"] >= int(config["num_epochs"])
