"""The measurement's one error type and its default warning printer."""

from __future__ import annotations

import sys


class CollectError(ValueError):
  """A measurement that cannot be done as asked; ``code`` is the exit status (2: the command line's fault)."""

  def __init__(self, message: str, code: int = 1):
    super().__init__(message)
    self.code = code


def warn(message: str) -> None:
  """The default ``warn``: one ``WARNING: ...`` line on stderr."""
  print(f"WARNING: {message}", file=sys.stderr, flush=True)
