"""metrics.jsonl: one JSON object per evaluation, written by process 0 only, durable line by line."""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import numpy as np


def _plain(value):
  value = np.asarray(value)
  if value.dtype.kind in "iub":
    return int(value)
  number = float(value)
  return number if math.isfinite(number) else str(number)  # JSON has no NaN/inf


class MetricsWriter:
  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self.enabled = jax.process_index() == 0

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

  def keep_until(self, epoch: int) -> None:
    """Drops records past ``epoch`` (written after the checkpoint a resumed run restarts from)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [record for record in self.read() if record["epoch"] <= epoch]
    temporary = self.path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(temporary, self.path)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")
      f.flush()
      os.fsync(f.fileno())
