"""``NCOptions``: the metric conventions that sources disagree on, as one frozen value.

Every entry point (``neural_collapse``, ``further_collapse``, the two-pass engine, streamed training, ``collect``)
takes the same value, so a convention chosen once is the one every path measures with. Defaults are the
paper's (Papyan, Han & Donoho 2020) or, where it is silent, the authors' notebook.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

GLOBAL_MEANS = ("class_means", "samples")
SOLVERS = ("svd", "gram", "auto")


@dataclasses.dataclass(frozen=True)
class NCOptions:
  """Metric conventions (hashable: usable as a static argument under ``jit``).

  Attributes:
    global_mean: 'class_means' (the notebook: mu_G = (1/C) sum_c mu_c) or 'samples' (mu_G = (1/N) sum_i h_i).
    solver: how Sigma_B^+ is computed. 'svd': the SVD of M (accurate to eps s_max). 'gram': eigh of M M^T
      (squares M's condition number; directions with s_k < sqrt(C eps) s_max are dropped). 'auto' (default):
      chosen where the program is lowered (``jax.lax.platform_dependent``): exactly 'svd' on CPU (bit-identical
      results); on GPU and TPU a factor of (M^T M)^+ by CholeskyQR2, else eigh of the smaller Gram matrix with a
      Rayleigh-Ritz step, else the SVD (each with the SVD's accuracy, ~eps cond(M); no cuSOLVER SVD where the
      first applies). Pass 2 is the same float32 computation for every solver. A program exported for 'cuda'
      on a CPU host carries the GPU choice. The trainer's and collect's conventions
      (``nc_jax.schema.NC_OPTIONS``) keep 'svd' as their default, so every run directory keeps its config
      digest (``--config.nc.solver=auto`` opts in).
    rcond: directions of M with s_k <= rcond s_max are not inverted in Sigma_B^+ (None: max(C, p) eps).
    divide_nc1_by_classes: NC1 = Tr(Sigma_W Sigma_B^+)/C (paper) or without the 1/C (notebook).
    std_ddof: the std's delta degrees of freedom in equinorm/equiangularity: 1 unbiased (notebook), 0 population.
    self_duality_squared: NC3 as the squared Frobenius distance (paper) or its root.
    ncc_use_bias: NC4 compares the NCC rule with argmax(W h + b) (paper) or argmax(W h).
    min_count: None (an empty class makes every metric NaN) or k: classes with fewer than k samples are left out.
  """

  global_mean: str = "class_means"
  solver: str = "auto"
  rcond: Optional[float] = None
  divide_nc1_by_classes: bool = True
  std_ddof: int = 1
  self_duality_squared: bool = True
  ncc_use_bias: bool = True
  min_count: Optional[int] = None

  def __post_init__(self):
    problems = []
    if self.global_mean not in GLOBAL_MEANS:
      problems.append(f"global_mean={self.global_mean!r}: choose one of {', '.join(GLOBAL_MEANS)}")
    if self.solver not in SOLVERS:
      problems.append(f"solver={self.solver!r}: choose one of {', '.join(SOLVERS)}")
    if self.rcond is not None and (isinstance(self.rcond, bool) or not isinstance(self.rcond, numbers.Real)
                                   or not self.rcond >= 0):
      problems.append(f"rcond={self.rcond!r}: must be None or a number >= 0")
    for name in ("divide_nc1_by_classes", "self_duality_squared", "ncc_use_bias"):
      if not isinstance(getattr(self, name), bool):
        problems.append(f"{name}={getattr(self, name)!r}: must be True or False")
    if isinstance(self.std_ddof, bool) or not isinstance(self.std_ddof, numbers.Integral) or self.std_ddof < 0:
      problems.append(f"std_ddof={self.std_ddof!r}: must be an int >= 0 (1 unbiased, 0 population)")
    if self.min_count is not None and (isinstance(self.min_count, bool)
                                       or not isinstance(self.min_count, numbers.Integral) or self.min_count < 0):
      problems.append(f"min_count must be None or a non-negative int (classes with fewer samples are left out), "
                      f"got {self.min_count!r}")
    if problems:
      raise ValueError("NCOptions: " + "; ".join(problems))
    # numpy scalars as Python numbers: one hash and one repr for equal options under jit's static arguments.
    for name, kind in (("rcond", float), ("std_ddof", int), ("min_count", int)):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, kind(getattr(self, name)))

  def replace(self, **changes) -> "NCOptions":
    """A copy with ``changes`` (checked as the constructor checks)."""
    return dataclasses.replace(self, **changes)


PAPER = NCOptions()


class _Unset:
  """The default of a convention keyword in a keyword face: not given (``options``' value is used)."""

  def __repr__(self) -> str:
    return "UNSET"


UNSET = _Unset()


def resolve(options: Optional[NCOptions], where: str, **keywords) -> NCOptions:
  """The ``NCOptions`` a keyword face measures with.

  ``keywords`` are the face's convention keywords by field name, ``UNSET`` where the caller gave
  none. Without ``options`` they fill in ``NCOptions()`` (the paper's defaults); with it, a given
  keyword must agree with ``options`` (one ValueError naming each that does not).
  """
  given = {name: value for name, value in keywords.items() if value is not UNSET}
  if options is None:
    return NCOptions(**given)
  if not isinstance(options, NCOptions):
    raise ValueError(f"{where}: options must be an nc_jax.metrics.NCOptions or None, got a {type(options).__name__}")
  clashes = [f"{name}={value!r} against options.{name}={getattr(options, name)!r}"
             for name, value in given.items() if value != getattr(options, name)]
  if clashes:
    raise ValueError(f"{where}: {'; '.join(clashes)}: give each convention once, as a keyword or in options")
  return options
