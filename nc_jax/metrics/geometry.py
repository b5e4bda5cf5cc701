"""NC2 and NC3: the geometry of class means and classifier rows.

Pure functions of small arrays: ``vectors`` is (C, p), one row per class (centred
class means M_c - mu_G, or classifier rows w_c). Pair statistics run over the
C(C-1) ordered pairs c != c' of a C x C Gram matrix, so nothing of size C*C*p is
ever formed (C = 1000, p = 2048 needs a 4 MB Gram, not 8 GB of differences).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def matmul_highest(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b at full float32 precision (TPUs otherwise use bfloat16 passes)."""
  return jnp.matmul(a, b, precision=HIGHEST)


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
  return matmul_highest(a, b.T)


def _unit_rows(vectors: jax.Array) -> jax.Array:
  return vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True)


def _off_diagonal(num_classes: int) -> jax.Array:
  return ~jnp.eye(num_classes, dtype=bool)


def off_diagonal_mean(matrix: jax.Array) -> jax.Array:
  """Mean of the C(C-1) off-diagonal entries of a (C, C) matrix (the diagonal may hold anything).

  The count is a Python float: C(C-1) overflows int32 from C = 46 342 (a vocabulary's size).
  """
  num_classes = matrix.shape[0]
  return jnp.sum(jnp.where(_off_diagonal(num_classes), matrix, 0.0)) / (num_classes * (num_classes - 1.0))


def _off_diagonal_mean_std(matrix: jax.Array, ddof: int) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the C(C-1) off-diagonal entries of a (C, C) matrix, two-pass."""
  num_classes = matrix.shape[0]
  mean = off_diagonal_mean(matrix)
  centred_sq = jnp.where(_off_diagonal(num_classes), (matrix - mean) ** 2, 0.0)
  return mean, jnp.sqrt(jnp.sum(centred_sq) / (num_classes * (num_classes - 1.0) - ddof))


def pairwise_distance_sq(vectors: jax.Array) -> jax.Array:
  """(C, C) ||v_a - v_c||^2 from the Gram matrix of ``vectors`` (C, p): no (C, C, p) intermediate.

  Use centred vectors (e.g. M = mu - mu_G): a large common offset would cancel digits.
  """
  gram = _gram(vectors, vectors)
  norms_sq = jnp.diagonal(gram)
  return norms_sq[:, None] + norms_sq[None, :] - 2.0 * gram


def cosines(vectors: jax.Array) -> jax.Array:
  """(C, C) matrix of cos angle(v_c, v_c') for rows of ``vectors`` (C, p)."""
  unit = _unit_rows(vectors)
  return _gram(unit, unit)


def equinorm(vectors: jax.Array, ddof: int = 1) -> jax.Array:
  """Std_c ||v_c|| / Avg_c ||v_c|| (paper Fig. 2); 0 when all rows have one norm.

  Args:
    vectors: (C, p) centred class means or classifier rows.
    ddof: 1 is the notebook's unbiased std (torch.std), 0 the population std.
  """
  norms = jnp.linalg.norm(vectors, axis=-1)
  return jnp.std(norms, ddof=ddof) / jnp.mean(norms)


def equiangularity(vectors: jax.Array, ddof: int = 1) -> jax.Array:
  """Std over pairs c != c' of cos angle(v_c, v_c') (paper Fig. 3); 0 for an ETF."""
  return _off_diagonal_mean_std(cosines(vectors), ddof)[1]


def max_angle(vectors: jax.Array) -> jax.Array:
  """Avg over pairs c != c' of |cos angle(v_c, v_c') + 1/(C-1)| (paper Fig. 4).

  The notebook calls it "coherence"; 0 when every angle is the simplex's maximal one.
  """
  return off_diagonal_mean(jnp.abs(cosines(vectors) + 1.0 / (vectors.shape[0] - 1)))


def simplex_etf_gram(num_classes: int, dtype=jnp.float32) -> jax.Array:
  """E = I - 11^T/C, the Gram matrix of a simplex ETF up to scale, (C, C)."""
  return jnp.eye(num_classes, dtype=dtype) - 1.0 / num_classes


def etf_deviation(vectors: jax.Array) -> jax.Array:
  """|| G/||G||_F - E/||E||_F ||_F with G = V V^T (C, C) and E = I - 11^T/C.

  Computed as the norm of the difference (never as sqrt(2 - 2<G,E>), which
  loses half the digits near zero): an exact simplex ETF gives ~1e-7 in float32.
  """
  gram = _gram(vectors, vectors)
  target = simplex_etf_gram(vectors.shape[0], gram.dtype)
  difference = gram / jnp.linalg.norm(gram) - target / jnp.linalg.norm(target)
  return jnp.linalg.norm(difference)


def self_duality(weights: jax.Array, centred_means: jax.Array, squared: bool = True) -> jax.Array:
  """NC3 (paper Fig. 5): || W/||W||_F - M/||M||_F ||_F^2, W and M both (C, p).

  W is not centred and the bias is not used, as in the paper. ``squared=False``
  gives the unsquared Frobenius distance some later papers plot.
  """
  difference = weights / jnp.linalg.norm(weights) - centred_means / jnp.linalg.norm(centred_means)
  distance_sq = jnp.sum(difference**2)
  return distance_sq if squared else jnp.sqrt(distance_sq)


def gnc2(vectors: jax.Array, ddof: int = 1) -> jax.Array:
  """Generalised NC2 (Wu & Papyan 2024): Var_{c != c'} log(1 / ||u_c - u_c'||), u_c = v_c/||v_c||.

  Hyperspherical uniformity by the logarithmic energy: small when the normalised
  means spread evenly, which is what remains of the ETF when C - 1 > p.
  ||u_c - u_c'||^2 = 2 - 2 cos comes from the Gram, so near-duplicate
  directions (distance below ~1e-3) are resolved only to float32 accuracy, and
  two directions that coincide in float32 give an infinite log energy: +inf.
  """
  off_diagonal = _off_diagonal(vectors.shape[0])
  distance_sq = jnp.where(off_diagonal, jnp.maximum(2.0 - 2.0 * cosines(vectors), 0.0), 1.0)
  log_energy = -0.5 * jnp.log(distance_sq)
  variance = _off_diagonal_mean_std(log_energy, ddof)[1] ** 2
  return jnp.where(jnp.any(distance_sq == 0.0), jnp.inf, variance)


def unc3(weights: jax.Array, centred_means: jax.Array, ddof: int = 1) -> jax.Array:
  """Uniform duality (Wu & Papyan 2024): coefficient of variation over c of cos angle(w_c, M_c).

  Both (C, p). 0 when every classifier row makes the same angle with its class mean.
  """
  alignment = jnp.sum(_unit_rows(weights) * _unit_rows(centred_means), axis=-1)
  return jnp.std(alignment, ddof=ddof) / jnp.mean(alignment)
