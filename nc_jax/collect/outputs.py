"""A finished measurement's two files, written as a checkable pair: ``nc.json`` and ``class_stats.npz``.

class_stats.npz is written first, then nc.json, each atomically; nc.json records the sha256 of
class_stats.npz's bytes under ``class_stats_sha256`` and the sha256 of its own other keys under ``sha256``
(``own_digest``). A kill between the two renames leaves a new class_stats.npz beside an older nc.json whose
recorded digest no longer matches, and an edited nc.json no longer matches its own: ``read_outputs`` refuses
either, naming the command that rewrites both, and the next measurement into the folder warns and rewrites both.
nc.json files written before ``sha256`` existed are read without that check.
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from typing import Optional

import numpy as np

from nc_jax.files import write_atomically
from nc_jax.collect.errors import CollectError

NC_FILE = "nc.json"
STATS_FILE = "class_stats.npz"
STATS_DIGEST_KEY = "class_stats_sha256"
OWN_DIGEST_KEY = "sha256"
OPTIONS_KEY = "nc_options"  # the metric conventions measured with (nc_jax.metrics.NCOptions' fields)
# The conventions ``python -m nc_jax.collect`` takes as flags: NCOptions' fields but min_count (collect measures
# every class, since class_stats.npz and the later metrics have no filtered form).
CONVENTIONS = ("global_mean", "solver", "rcond", "divide_nc1_by_classes", "std_ddof", "self_duality_squared",
               "ncc_use_bias")


def stats_payload(stats: dict[str, np.ndarray]) -> bytes:
  """class_stats.npz's bytes (``np.savez`` of ``stats``: the same arrays give the same bytes)."""
  buffer = io.BytesIO()
  np.savez(buffer, **stats)
  return buffer.getvalue()


def sha256(payload: bytes) -> str:
  """The hex sha256 of ``payload``."""
  return hashlib.sha256(payload).hexdigest()


def own_digest(result: dict) -> str:
  """sha256 of nc.json's keys other than ``OWN_DIGEST_KEY``, as compact JSON with sorted keys (so a file
  re-indented keeps its digest, any changed value or key does not)."""
  rest = {key: value for key, value in result.items() if key != OWN_DIGEST_KEY}
  return sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def stamped(result: dict, payload: bytes) -> dict:
  """``result`` with the sha256 of class_stats.npz's bytes ``payload`` under ``STATS_DIGEST_KEY``, then its
  own digest (``own_digest``) under ``OWN_DIGEST_KEY``."""
  result = {key: value for key, value in result.items() if key != OWN_DIGEST_KEY}
  result[STATS_DIGEST_KEY] = sha256(payload)
  return {**result, OWN_DIGEST_KEY: own_digest(result)}


def convention_flags(conventions) -> list[str]:
  """The command-line flags of the conventions given (name -> value; None or absent: not given), in
  ``CONVENTIONS`` order: ['--solver', 'gram', '--nodivide_nc1_by_classes', ...]."""
  line = []
  for name in CONVENTIONS:
    value = conventions.get(name) if isinstance(conventions, dict) else None
    if isinstance(value, bool):
      line.append(f"--{'' if value else 'no'}{name}")
    elif isinstance(value, (str, int, float)):
      line += [f"--{name}", str(value)]
  return line


def rerun_command(out_dir: pathlib.Path, result) -> str:
  """The command that measures ``out_dir`` again, from nc.json's own record of its workdir, options and
  conventions when it has them (a measurement of a run directory), else a description."""
  import shlex
  if not isinstance(result, dict) or not isinstance(result.get("workdir"), str):
    return "rerun the measurement into that folder"
  line = ["python", "-m", "nc_jax.collect", "--workdir", result["workdir"], "--out", str(out_dir)]
  for flag in ("split", "epoch", "batch_size"):
    if isinstance(result.get(flag), (str, int)) and not isinstance(result.get(flag), bool):
      line += [f"--{flag}", str(result[flag])]
  # every convention recorded, explicitly: the run's config.nc need not be what was measured with
  return f"rerun `{shlex.join(line + convention_flags(result.get(OPTIONS_KEY)))}`"


def write_outputs(out_dir: pathlib.Path, result: dict, payload: bytes) -> None:
  """Writes ``payload`` (``stats_payload``) to out_dir/class_stats.npz, then ``result`` (``stamped`` with
  that payload) to out_dir/nc.json, each atomically, in that order."""
  write_atomically(out_dir / STATS_FILE, payload)
  write_atomically(out_dir / NC_FILE, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())


def mismatch(out_dir: pathlib.Path) -> Optional[str]:
  """Why out_dir's nc.json and class_stats.npz are not one measurement's pair (or nc.json is not as written),
  or None when they are (or when nc.json is absent, unreadable or predates the digests: nothing to check
  against)."""
  out_dir = pathlib.Path(out_dir)
  try:
    result = json.loads((out_dir / NC_FILE).read_text())
    expected = result.get(STATS_DIGEST_KEY)
  except (OSError, ValueError, AttributeError):
    return None
  if OWN_DIGEST_KEY in result and result[OWN_DIGEST_KEY] != own_digest(result):
    return (f"{out_dir / NC_FILE} is not as it was written (its values do not match its recorded sha256: edited or "
            "damaged since)")
  if expected is None:
    return None
  try:
    actual = sha256((out_dir / STATS_FILE).read_bytes())
  except FileNotFoundError:
    return f"{out_dir / STATS_FILE} is missing beside {out_dir / NC_FILE}"
  except OSError as error:  # a folder in its place, unreadable, ...
    return f"{out_dir / STATS_FILE} cannot be read beside {out_dir / NC_FILE} ({error.strerror or error})"
  if actual != expected:
    return (f"{out_dir / STATS_FILE} (sha256 {actual[:12]}...) is not the one {out_dir / NC_FILE} was written "
            f"with ({expected[:12]}...): damaged or replaced since, or a measurement was stopped between writing "
            "the two")
  return None


def read_outputs(out_dir) -> tuple[dict, dict[str, np.ndarray]]:
  """(nc.json's metrics, class_stats.npz's arrays) of a finished measurement in ``out_dir``.

  CollectError when nc.json is missing, when it was edited since it was written (its own sha256 differs), or
  when class_stats.npz is not the file nc.json was written with (its sha256 differs: a measurement was stopped
  between the two writes, or either was replaced); the message gives the command that rewrites both.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise CollectError(f"{out_dir} is a file, not a measurement's folder; pass the --out of a measurement")
  if not (out_dir / NC_FILE).exists():
    raise CollectError(f"{out_dir} has no {NC_FILE}: no measurement finished there; run (or rerun) it")
  problem = mismatch(out_dir)
  if problem is not None:
    try:
      recorded = json.loads((out_dir / NC_FILE).read_text())
    except (OSError, ValueError):
      recorded = None
    raise CollectError(f"{problem}; {rerun_command(out_dir, recorded)} to rewrite both")
  try:
    result = json.loads((out_dir / NC_FILE).read_text())
    with np.load(out_dir / STATS_FILE, allow_pickle=False) as stored:
      stats = {name: stored[name] for name in stored.files}
  except Exception as error:  # json, zipfile and numpy raise many types for a damaged file
    raise CollectError(f"{out_dir}: cannot read the measurement ({' '.join(str(error).split())[:200]}); "
                       "rerun it") from None
  if not isinstance(result, dict):
    raise CollectError(f"{out_dir / NC_FILE} holds a JSON {type(result).__name__}, not a measurement's metrics "
                       "(an object); rerun the measurement")
  return result, stats
