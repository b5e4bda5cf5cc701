"""NC2 and NC3: the geometry of class means and classifier rows.

Pure functions of (C, p) arrays: ``vectors`` holds one row per class (centred
class means M_c - mu_G, or classifier rows w_c). Pair statistics run over the
C(C-1) ordered pairs c != c' of the C x C Gram matrix, and nothing of size C*C*p
is ever formed.

At vocabulary scale (C = 50 257) even the Gram matrix is 10 GB in float32, so
every pair statistic goes through one primitive, ``pair_sums``: it sums a per-tile
statistic over the tiles (rows a, rows b) of the Gram matrix, a tile at a time,
visiting only tiles i <= j (the matrix is symmetric; an off-diagonal tile stands for
itself and its transpose). Temporary memory is O(C p + block^2). Up to
``DENSE_MAX_CLASSES`` classes the whole Gram matrix is one tile (the dense path, which is
faster there); beyond it tiles have ``PAIR_BLOCK`` rows. ``pair_geometry`` computes
every NC2 pair statistic (and CDNV and the coincident-means count) in one sweep. Dealing
the tiles to the devices of a mesh, and inputs on Explicit mesh axes, are ``sharding``'s
(``check_mesh``, ``explicit_mesh``, ``run_auto`` are re-exported here).

Spreads (equiangularity, gnc2) need a mean first. Rather than a second sweep
over the Gram matrix, the sweep sums x - m0 and (x - m0)^2 around a pilot mean m0
taken over the pairs of an evenly strided subset of at most one tile's rows of classes
(all of them on the dense path, where m0 is the exact mean and this is the
two-pass algorithm). Then Var = (S2 - S1^2/n)/(n - ddof) loses only about
log10(1 + (m - m0)^2/Var) digits, none when the pilot is representative.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nc_jax.metrics.sharding import check_mesh, deals_tiles, explicit_mesh, run_auto, sharded_tile_sweep
HIGHEST = jax.lax.Precision.HIGHEST
# Measured (benchmarks/metrics.py --tiles, p = 768, 2 CPU cores): tiles of 256 rows beat one dense tile
# from C = 512 on (1.5x there, 2.5x at C = 4096, 7x at C = 8192), and beat tiles of 512 or more.
DENSE_MAX_CLASSES = 256  # up to this C the Gram matrix is one tile
PAIR_BLOCK = 256  # rows per tile beyond it: a 256 KB float32 tile, which stays in cache


def matmul_highest(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b at full float32 precision (TPUs otherwise use bfloat16 passes)."""
  return jnp.matmul(a, b, precision=HIGHEST)


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
  return matmul_highest(a, b.T)


# A pair whose ||a||^2 + ||b||^2 exceeds this many times ||a - b||^2 lost more than two bits of the Gram formula
# ||a||^2 + ||b||^2 - 2<a, b> to cancellation: ``refined_distance_sq`` takes its tile again from the differences.
CANCELLATION_LIMIT = 4.0


def refined_distance_sq(distance_sq: jax.Array, norm_sq_a: jax.Array, norm_sq_b: jax.Array, rows_a: jax.Array,
                        rows_b: jax.Array, mask: jax.Array) -> jax.Array:
  """Squared distances (A, B) of a tile, exact to float32 rounding where the Gram formula is not.

  ``distance_sq`` = ||a||^2 + ||b||^2 - 2<a, b> from a Gram tile carries an error of about
  sqrt(p) eps (||a||^2 + ||b||^2), which is large relative to ||a - b||^2 for two rows close to each other
  but far from the origin (two class means near each other, early in training: CDNV off by 3% was seen).
  When a pair of ``mask`` (A, B) is such that ||a||^2 + ||b||^2 > ``CANCELLATION_LIMIT`` ||a - b||^2,
  the whole tile is taken again as sum_k (a_k - b_k)^2 from its rows ``rows_a`` (A, p) and ``rows_b``
  (B, p): no cancellation, O(A B p) elementwise work (``lax.cond``: only such tiles pay it; under ``vmap``
  every tile does). Well-separated means (an ETF, or random ones in high dimension: ratio ~1) never
  take it. ``norm_sq_a`` (A,), ``norm_sq_b`` (B,).
  """
  ill = mask & (norm_sq_a[:, None] + norm_sq_b[None, :] > CANCELLATION_LIMIT * distance_sq)

  def from_differences():
    return jax.lax.map(lambda row: jnp.sum((row[None, :] - rows_b) ** 2, axis=-1), rows_a)

  return jax.lax.cond(jnp.any(ill), from_differences, lambda: distance_sq)


def _power_of_two_exponent(values: jax.Array) -> jax.Array:
  """The int e with max finite |v| 2^-e in [0.5, 1) (0 when there is none), clipped to the normal range."""
  magnitude = jnp.abs(values)
  _, exponent = jnp.frexp(jnp.max(jnp.where(jnp.isfinite(magnitude), magnitude, 0.0), initial=0.0))
  info = jnp.finfo(values.dtype)
  return jnp.clip(exponent, info.minexp, info.maxexp - 2)


def _scale_free(values: jax.Array) -> jax.Array:
  """``values`` times the exact power of two that brings max |v| into [0.5, 1): for scale-invariant
  statistics, whose squares would otherwise over- or underflow (|v| ~ 1e20 or 1e-20 in float32)."""
  return values * jnp.ldexp(jnp.ones((), values.dtype), -_power_of_two_exponent(values))


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


def pairwise_distance_sq(vectors: jax.Array) -> jax.Array:
  """(C, C) ||v_a - v_c||^2 from the Gram matrix of ``vectors`` (C, p): no (C, C, p) intermediate.

  Use centred vectors (e.g. M = mu - mu_G): a large common offset would cancel digits.
  Dense (C x C): the suite itself uses ``pair_sums`` / ``pair_geometry`` instead.
  """
  gram = _gram(vectors, vectors)
  norms_sq = jnp.diagonal(gram)
  return norms_sq[:, None] + norms_sq[None, :] - 2.0 * gram


def cosines(vectors: jax.Array) -> jax.Array:
  """(C, C) matrix of cos angle(v_c, v_c') for rows of ``vectors`` (C, p); dense, see ``pair_geometry``."""
  unit = _unit_rows(vectors)
  return _gram(unit, unit)


def _block_rows(num_classes: int, block_rows: Optional[int]) -> int:
  """Rows per tile: all C up to ``DENSE_MAX_CLASSES`` (one dense tile), else ``PAIR_BLOCK``; at most C."""
  if block_rows is None:
    block_rows = num_classes if num_classes <= DENSE_MAX_CLASSES else PAIR_BLOCK
  elif not isinstance(block_rows, (int, np.integer)) or isinstance(block_rows, bool) or block_rows < 1:
    raise ValueError(f"pair_block_rows / block_rows must be None or an int >= 1 (rows per tile), got {block_rows!r}")
  return min(int(block_rows), num_classes)


def _tile_share(part, on_diagonal):
  """A tile's partial sums as its share of the whole matrix: floats count the tile and its mirror
  (x2 off the diagonal), integers each unordered pair once (halved on the diagonal)."""
  def share(x):
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.where(on_diagonal, x // 2, x)
    return jnp.where(on_diagonal, x, 2 * x)
  return jax.tree_util.tree_map(share, part)


def _kahan_add(carry, part):
  """Adds a tile's partial sums (a pytree) to ``carry`` = (totals, compensations), lists of leaves:
  integers exactly, floats with Kahan compensation (which holds what the last addition lost)."""
  totals, compensations = carry
  new_totals, new_compensations = [], []
  for total, compensation, part in zip(totals, compensations, jax.tree_util.tree_leaves(part)):
    if jnp.issubdtype(part.dtype, jnp.integer):
      new_totals.append(total + part)
      new_compensations.append(compensation)
    else:
      corrected = part - compensation
      summed = total + corrected
      new_totals.append(summed)
      new_compensations.append((summed - total) - corrected)
  return new_totals, new_compensations


def _tile_function(statistic: Callable, num_classes: int, block: int) -> Callable:
  """tile(i, j, vectors, row_data, valid, live=True): ``statistic`` on the tile (block rows i, block
  rows j) of the Gram matrix, as its share of the whole (``_tile_share``)."""
  offsets = jnp.arange(block)

  def tile(i, j, vectors, row_data, valid, live=True):
    # The last block starts at C - block (no padded copy of V): its rows below i * block belong to
    # the block before, and are masked out here. A tile that is not ``live`` (padding of a device's
    # share) has an empty mask, so it adds 0.
    start = lambda k: jnp.minimum(k * block, num_classes - block)
    rows = lambda x, k: jax.lax.dynamic_slice_in_dim(x, start(k), block)
    ids_a, ids_b = start(i) + offsets, start(j) + offsets
    own_a, own_b = rows(valid, i) & (ids_a >= i * block), rows(valid, j) & (ids_b >= j * block)
    mask = own_a[:, None] & own_b[None, :] & (ids_a[:, None] != ids_b[None, :]) & live
    part = statistic(_gram(rows(vectors, i), rows(vectors, j)), jax.tree_util.tree_map(lambda x: rows(x, i), row_data),
                     jax.tree_util.tree_map(lambda x: rows(x, j), row_data), mask)
    return _tile_share(part, i == j)

  return tile


def _serial_tile_sweep(tile: Callable, zeros: list, num_blocks: int, vectors, row_data, valid) -> list:
  """The tiles i <= j one after another on one device: the leaves of their Kahan-summed shares."""
  # Nested loops, not the sharded path's flat list of tiles: row i's slice of V stays put while j runs
  # (one flat loop measured 12% slower at C = 12,288, p = 768 on this CPU).
  def row_of_tiles(i, carry):
    return jax.lax.fori_loop(i, num_blocks, lambda j, carry: _kahan_add(carry, tile(i, j, vectors, row_data, valid)),
                             carry)

  totals, _ = jax.lax.fori_loop(0, num_blocks, row_of_tiles, (zeros, list(zeros)))
  return totals


def pair_sums(statistic: Callable, vectors: jax.Array, row_data=None, *, valid: Optional[jax.Array] = None,
              block_rows: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None):
  """Sums of a pair statistic over the Gram matrix G = V V^T of ``vectors`` V (C, p), tile by tile.

  Contract of ``statistic(gram, rows_a, rows_b, mask) -> pytree of arrays``:
    gram    (A, B) the tile G[a, b] = <v_a, v_b> of rows a against rows b (A = B = block rows);
    rows_a  ``row_data`` sliced to rows a (each leaf (A, ...)); rows_b likewise (B, ...);
            ``row_data`` defaults to the squared norms ||v_c||^2 (C,);
    mask    (A, B) bool, True exactly on the pairs c != c' with valid[c] and valid[c'] that this
            tile owns (the last tile overlaps the one before it; the overlap is masked);
    returns partial sums over the masked entries of a *symmetric* pair function
            g(c, c') = g(c', c), e.g. ``jnp.sum(jnp.where(mask, g, 0.0))``. Unmasked entries are
            real pairs (or a class with itself) counted elsewhere or not at all: select them away
            with ``jnp.where``, never multiply by the mask (0 * inf = NaN).
  Returns the same pytree, summed over the whole matrix: a floating leaf is the sum over the
  ordered pairs c != c' (C(C-1) terms), an integer leaf the count over unordered pairs c < c'
  (C(C-1)/2 terms, so int32 counts hold up to C = 65 536).

  Only tiles i <= j are visited (``lax.fori_loop`` over i, then j >= i): an off-diagonal tile
  counts twice for floats and once for integer counts, a diagonal tile once for floats and half
  for counts (its mask is symmetric). Floating partials are accumulated across tiles with Kahan
  compensation, so the result matches a one-tile sum to float32 rounding. Temporary memory is
  O(block_rows^2 + block_rows p) per tile, no copy of V; with one tile (C <= block rows) it is
  the dense (C, C) computation, without a loop. Without ``mesh`` the tiles run one after another
  on one device. With a ``mesh`` of D > 1 devices the T = n_b(n_b + 1)/2 tiles i <= j (n_b =
  ceil(C / block_rows)) are dealt round-robin to the D devices (``jax.shard_map`` over every mesh
  axis; V and ``row_data`` replicated to each): each device sweeps ceil(T/D) tiles with its own
  Kahan sums, then one ``psum`` adds the D partial sums. The result equals the one-device sweep
  up to float32 rounding of that last sum; per-device work and temporary memory are those of
  ceil(T/D) tiles.

  Args:
    statistic: the per-tile function above.
    vectors: (C, p) rows v_c.
    row_data: pytree of (C, ...) arrays sliced along with the rows, or None for ||v_c||^2 (C,).
    valid: (C,) bool, False for classes left out of every pair, or None (all).
    block_rows: rows per tile; None: all C up to ``DENSE_MAX_CLASSES``, else ``PAIR_BLOCK``.
    mesh: a ``jax.sharding.Mesh`` whose devices share the tiles (the mesh the inputs live on, any
      shape and axis types; that of ``jax.set_mesh`` if one is set), or None. Ignored on the dense
      path (one tile) and for a one-device mesh. Inputs committed to other devices are a ValueError
      (under jit, JAX's). Inputs typed on Explicit axes are computed on Auto ones (``run_auto``).
  """
  check_mesh(mesh)
  num_classes = vectors.shape[0]
  if row_data is None:
    row_data = jnp.sum(vectors**2, axis=-1)
  valid = jnp.ones((num_classes,), bool) if valid is None else valid.astype(bool)
  block = _block_rows(num_classes, block_rows)
  explicit = explicit_mesh(vectors, row_data, valid, shares_tiles=deals_tiles(mesh, num_classes, block))
  if explicit is not None:
    return run_auto(lambda v, r, ok: pair_sums(statistic, v, r, valid=ok, block_rows=block, mesh=mesh), explicit,
                    vectors, row_data, valid)
  if block >= num_classes:
    mask = _off_diagonal(num_classes) & valid[:, None] & valid[None, :]
    return _tile_share(statistic(_gram(vectors, vectors), row_data, row_data, mask), True)

  num_blocks = -(-num_classes // block)
  tile = _tile_function(statistic, num_classes, block)
  shapes = jax.eval_shape(tile, 0, 0, vectors, row_data, valid)
  zeros = [jnp.zeros(shape.shape, shape.dtype) for shape in jax.tree_util.tree_leaves(shapes)]
  if mesh is None or mesh.size == 1:
    totals = _serial_tile_sweep(tile, zeros, num_blocks, vectors, row_data, valid)
  else:
    totals = sharded_tile_sweep(tile, _kahan_add, zeros, num_blocks, mesh, vectors, row_data, valid)
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), totals)


def pilot_rows(num_classes: int, block: int) -> np.ndarray:
  """At most ``block`` class indices spread evenly over [0, C) (all of them when C <= block)."""
  if block >= num_classes:
    return np.arange(num_classes)
  return np.unique(np.linspace(0, num_classes - 1, block).round().astype(np.int64))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` where ``mask`` (same shape) is True; 0 when none is."""
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask, dtype=values.dtype), 1.0)


def _in_unit_scale(vectors: jax.Array, valid: jax.Array, variances, coincident_floor_sq):
  """(vectors, variances, coincident_floor_sq) in exact power-of-two units with max |v_ij| in [0.5, 1)
  over the valid rows: no norm over- or underflows (|v| ~ 1e20 would otherwise give norms of inf,
  unit rows of 0 and finite, wrong angles); the unit-bearing inputs follow (None stays None)."""
  dtype = vectors.dtype
  exponent = _power_of_two_exponent(jnp.where(valid[:, None], vectors, 0.0))
  vectors = vectors * jnp.ldexp(jnp.ones((), dtype), -exponent)
  unit_sq = jnp.ldexp(jnp.ones((), dtype), -2 * exponent)
  if variances is not None:
    variances = variances.astype(dtype) * unit_sq
  if coincident_floor_sq is not None:
    coincident_floor_sq = coincident_floor_sq * unit_sq
  return vectors, variances, coincident_floor_sq


def _pilot_shifts(unit: jax.Array, valid: jax.Array, block: int):
  """(cos_shift, log_shift, pilot_cos, pilot_mask): the means of cos and of log(1/||u_c - u_c'||) over
  the pairs of ``pilot_rows`` (all pairs on the dense path), and that pilot's (P, P) cosines and pairs."""
  pilot = pilot_rows(unit.shape[0], block)
  pilot_cos = _gram(unit[pilot], unit[pilot])
  pilot_mask = _off_diagonal(len(pilot)) & valid[pilot][:, None] & valid[pilot][None, :]
  pilot_distance = jnp.maximum(2.0 - 2.0 * pilot_cos, 0.0)
  pilot_separate = pilot_mask & (pilot_distance > 0)
  cos_shift = masked_mean(pilot_cos, pilot_mask)
  log_shift = masked_mean(-0.5 * jnp.log(jnp.where(pilot_separate, pilot_distance, 1.0)), pilot_separate)
  return cos_shift, log_shift, pilot_cos, pilot_mask


def _gram_frobenius(unit, ratio, valid, block: int, mesh, pilot_cos, pilot_mask) -> jax.Array:
  """||G-hat||_F of G-hat = cos r r^T (r = ``ratio``): from the dense tile (the pilot is every class),
  from the p x p matrix V^T V when p <= C, else from a first sweep of ``pair_sums``."""
  num_classes, feature_dim = unit.shape
  if block >= num_classes:
    gram_hat = pilot_cos * ratio[:, None] * ratio[None, :]
    gram_frob_sq = jnp.sum(jnp.where(pilot_mask, gram_hat**2, 0.0)) + jnp.sum(ratio**4)
  elif feature_dim <= num_classes:
    scaled = unit * ratio[:, None]
    gram_frob_sq = jnp.sum(matmul_highest(scaled.T, scaled) ** 2)
  else:
    gram_frob_sq = pair_sums(lambda g, a, b, m: jnp.sum(jnp.where(m, (g * a[:, None] * b[None, :]) ** 2, 0.0)),
                             unit, ratio, valid=valid, block_rows=block, mesh=mesh) + jnp.sum(ratio**4)
  return jnp.sqrt(gram_frob_sq)


def _pair_statistic(constants: dict, with_cdnv: bool, coincident_floor_sq, feature_dim: int) -> Callable:
  """``pair_geometry``'s per-tile sums for ``pair_sums``; ``constants``: kept (C'), cos_shift, log_shift,
  gram_frob, etf_off and eps (see ``pair_geometry``)."""
  kept, gram_frob, etf_off = constants["kept"], constants["gram_frob"], constants["etf_off"]

  def statistic(cos, rows_a, rows_b, mask):
    select = lambda x: jnp.where(mask, x, 0.0)
    centred_cos = select(cos - constants["cos_shift"])
    distance = jnp.maximum(2.0 - 2.0 * cos, 0.0)  # NaN stays NaN
    touching = mask & (distance == 0.0)
    log_energy = -0.5 * jnp.log(jnp.where(touching, 1.0, distance))
    centred_log = jnp.where(mask & ~touching, log_energy - constants["log_shift"], 0.0)
    gram_hat = cos * rows_a["ratio"][:, None] * rows_b["ratio"][None, :]
    sums = {
        "cos": jnp.sum(centred_cos), "cos_sq": jnp.sum(centred_cos**2),
        "angle": jnp.sum(select(jnp.abs(cos + 1.0 / (kept - 1.0)))),
        "etf": jnp.sum(select((gram_hat / gram_frob + etf_off) ** 2)),
        "log": jnp.sum(centred_log), "log_sq": jnp.sum(centred_log**2),
        "touching": jnp.sum(touching, dtype=jnp.int32),
    }
    if with_cdnv or coincident_floor_sq is not None:
      norm_sq_a, norm_sq_b = rows_a["norm_sq"][:, None], rows_b["norm_sq"][None, :]
      distance_sq = norm_sq_a + norm_sq_b - 2.0 * cos * jnp.sqrt(norm_sq_a) * jnp.sqrt(norm_sq_b)
      if with_cdnv:
        spread = rows_a["variance"][:, None] + rows_b["variance"][None, :]
        exact_sq = refined_distance_sq(distance_sq, rows_a["norm_sq"], rows_b["norm_sq"], rows_a["vectors"],
                                       rows_b["vectors"], mask)
        sums["cdnv"] = jnp.sum(select(spread / (2.0 * jnp.where(mask, exact_sq, 1.0))))
      if coincident_floor_sq is not None:
        resolution = coincident_floor_sq + 2.0 * np.sqrt(feature_dim) * constants["eps"] * (norm_sq_a + norm_sq_b)
        sums["coincident"] = jnp.sum(mask & (distance_sq <= resolution), dtype=jnp.int32)
    return sums

  return statistic


def pair_geometry(
    vectors: jax.Array,
    *,
    ddof: int = 1,
    valid: Optional[jax.Array] = None,
    variances: Optional[jax.Array] = None,
    coincident_floor_sq: Optional[jax.Array] = None,
    block_rows: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> dict:
  """Every NC2 pair statistic of the rows of ``vectors`` V (C, p), in one sweep of ``pair_sums``
  (its tiles shared by the devices of ``mesh``, if given).

  Over the n = C'(C'-1) ordered pairs c != c' of valid classes (C' = sum(valid) as a float, C by
  default), with cos_cc' = <v_c, v_c'>/(||v_c|| ||v_c'||), G = V V^T and E = I - 11^T/C' over the
  valid rows, ||E||_F = sqrt(C' - 1):
    equiangularity  Std_{c != c'} cos_cc' (``ddof``);
    max_angle       Avg_{c != c'} |cos_cc' + 1/(C'-1)|;
    etf_deviation   ||G/||G||_F - E/||E||_F||_F, summed entry by entry (never as 2 - 2<G,E>/.., which
                    loses half the digits near 0); ||G||_F comes from the dense tile, or from the
                    p x p matrix V^T V (||V V^T||_F = ||V^T V||_F) when p <= C, else from a first sweep;
    gnc2            Var_{c != c'} log(1/||u_c - u_c'||), u_c = v_c/||v_c||, ||u_c - u_c'||^2 = 2 - 2 cos;
                    +inf when two directions coincide in float32;
  and, if given, with ``variances`` V_c (C,) (any units):
    cdnv            Avg_{c != c'} (V_c + V_c') / (2 ||v_c - v_c'||^2), the distances of close pairs taken
                    from the differences (``refined_distance_sq``);
  with ``coincident_floor_sq`` f (scalar, units of V squared):
    num_coincident  #{c < c' valid : ||v_c - v_c'||^2 <= f + 2 sqrt(p) eps (||v_c||^2 + ||v_c'||^2)}
                    (int32), the second term being the rounding of the Gram formula.
  ||v_c - v_c'||^2 = ||v_c||^2 + ||v_c'||^2 - 2 G_cc': use centred vectors (no large common offset).
  The direction statistics (equiangularity, max_angle, gnc2) are NaN when a valid row is zero.
  Means for the spreads come from a pilot (see the module docstring): exact on the dense path.
  """
  check_mesh(mesh)
  num_classes, feature_dim = vectors.shape
  inputs = (vectors, valid, variances, coincident_floor_sq)
  explicit = explicit_mesh(*inputs, shares_tiles=deals_tiles(mesh, num_classes, _block_rows(num_classes, block_rows)))
  if explicit is not None:  # every value the tile statistic closes over is then made on Auto axes
    return run_auto(lambda v, ok, var, floor: pair_geometry(v, ddof=ddof, valid=ok, variances=var,
                                                            coincident_floor_sq=floor, block_rows=block_rows,
                                                            mesh=mesh), explicit, *inputs)
  dtype = vectors.dtype
  valid = jnp.ones((num_classes,), bool) if valid is None else valid.astype(bool)
  vectors, variances, coincident_floor_sq = _in_unit_scale(vectors, valid, variances, coincident_floor_sq)
  kept = jnp.sum(valid, dtype=dtype)
  norms = jnp.where(valid, jnp.linalg.norm(vectors, axis=-1), 0.0)
  unit = jnp.where(valid[:, None], vectors / jnp.where(norms > 0, norms, 1.0)[:, None], 0.0)  # dropped: 0, not NaN
  ratio = norms / jnp.max(norms)  # G / ||G||_F is scale-free: G-hat = cos r r^T cannot underflow
  block = _block_rows(num_classes, block_rows)
  cos_shift, log_shift, pilot_cos, pilot_mask = _pilot_shifts(unit, valid, block)
  constants = {"kept": kept, "cos_shift": cos_shift, "log_shift": log_shift, "eps": float(jnp.finfo(dtype).eps),
               "gram_frob": _gram_frobenius(unit, ratio, valid, block, mesh, pilot_cos, pilot_mask),
               "etf_off": 1.0 / (kept * jnp.sqrt(kept - 1.0))}  # -E_cc'/||E||_F for c != c'
  row_data = {"ratio": ratio, "norm_sq": norms**2}
  if variances is not None:
    row_data["variance"] = variances.astype(dtype)
    row_data["vectors"] = vectors  # for CDNV's distances where the Gram formula cancels (refined_distance_sq)
  statistic = _pair_statistic(constants, variances is not None, coincident_floor_sq, feature_dim)
  sums = pair_sums(statistic, unit, row_data, valid=valid, block_rows=block, mesh=mesh)
  return _pair_results(sums, constants, valid, norms, ratio, ddof)


def _pair_results(sums: dict, constants: dict, valid, norms, ratio, ddof: int) -> dict:
  """``pair_geometry``'s keys from the swept sums (cdnv and num_coincident where they were summed)."""
  kept, gram_frob = constants["kept"], constants["gram_frob"]
  num_pairs = kept * (kept - 1.0)
  undirected = jnp.any(valid & (norms == 0.0))
  spread = lambda s1, s2, count: jnp.maximum(s2 - s1**2 / count, 0.0) / (count - ddof)
  diagonal = jnp.sum(jnp.where(valid, (ratio**2 / gram_frob - (1.0 - 1.0 / kept) / jnp.sqrt(kept - 1.0)) ** 2, 0.0))
  result = {
      "equiangularity": jnp.where(undirected, jnp.nan, jnp.sqrt(spread(sums["cos"], sums["cos_sq"], num_pairs))),
      "max_angle": jnp.where(undirected, jnp.nan, sums["angle"] / num_pairs),
      "etf_deviation": jnp.sqrt(sums["etf"] + diagonal),
      "gnc2": jnp.where(undirected, jnp.nan, jnp.where(sums["touching"] > 0, jnp.inf,
                                                        spread(sums["log"], sums["log_sq"], num_pairs))),
  }
  if "cdnv" in sums:
    result["cdnv"] = sums["cdnv"] / num_pairs
  if "coincident" in sums:
    result["num_coincident"] = sums["coincident"]
  return result


def equinorm(vectors: jax.Array, ddof: int = 1, valid: Optional[jax.Array] = None) -> jax.Array:
  """Std_c ||v_c|| / Avg_c ||v_c|| (paper Fig. 2); 0 when all rows have one norm.

  Args:
    vectors: (C, p) centred class means or classifier rows.
    ddof: 1 is the notebook's unbiased std (torch.std), 0 the population std.
    valid: (C,) bool, the classes to include (None: all).
  """
  norms = jnp.linalg.norm(_scale_free(vectors if valid is None else jnp.where(valid[:, None], vectors, 0.0)), axis=-1)
  if valid is None:
    return jnp.std(norms, ddof=ddof) / jnp.mean(norms)
  return _masked_std(norms, valid, ddof) / masked_mean(norms, valid)


def _masked_std(values: jax.Array, valid: jax.Array, ddof: int) -> jax.Array:
  """Std over the entries of ``values`` (C,) where ``valid``, two-pass."""
  count = jnp.sum(valid, dtype=values.dtype)
  centred = jnp.where(valid, values - masked_mean(values, valid), 0.0)
  return jnp.sqrt(jnp.sum(centred**2) / (count - ddof))


def equiangularity(vectors: jax.Array, ddof: int = 1) -> jax.Array:
  """Std over pairs c != c' of cos angle(v_c, v_c') (paper Fig. 3); 0 for an ETF. See ``pair_geometry``."""
  return pair_geometry(vectors, ddof=ddof)["equiangularity"]


def max_angle(vectors: jax.Array) -> jax.Array:
  """Avg over pairs c != c' of |cos angle(v_c, v_c') + 1/(C-1)| (paper Fig. 4).

  The notebook calls it "coherence"; 0 when every angle is the simplex's maximal one.
  """
  return pair_geometry(vectors)["max_angle"]


def simplex_etf_gram(num_classes: int, dtype=jnp.float32) -> jax.Array:
  """E = I - 11^T/C, the Gram matrix of a simplex ETF up to scale, (C, C)."""
  return jnp.eye(num_classes, dtype=dtype) - 1.0 / num_classes


def etf_deviation(vectors: jax.Array) -> jax.Array:
  """|| G/||G||_F - E/||E||_F ||_F with G = V V^T (C, C) and E = I - 11^T/C (see ``pair_geometry``).

  Computed as the norm of the difference (never as sqrt(2 - 2<G,E>), which
  loses half the digits near zero): an exact simplex ETF gives ~1e-7 in float32.
  """
  return pair_geometry(vectors)["etf_deviation"]


def self_duality(weights: jax.Array, centred_means: jax.Array, squared: bool = True,
                 valid: Optional[jax.Array] = None) -> jax.Array:
  """NC3 (paper Fig. 5): || W/||W||_F - M/||M||_F ||_F^2, W and M both (C, p), over the rows ``valid`` (C,).

  W is not centred and the bias is not used, as in the paper. ``squared=False``
  gives the unsquared Frobenius distance some later papers plot.
  """
  if valid is not None:
    weights, centred_means = (jnp.where(valid[:, None], x, 0.0) for x in (weights, centred_means))
  weights, centred_means = _scale_free(weights), _scale_free(centred_means)
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
  See ``pair_geometry``, which computes it with the other pair statistics.
  """
  return pair_geometry(vectors, ddof=ddof)["gnc2"]


def unc3(weights: jax.Array, centred_means: jax.Array, ddof: int = 1, valid: Optional[jax.Array] = None) -> jax.Array:
  """Uniform duality (Wu & Papyan 2024): coefficient of variation over c of cos angle(w_c, M_c).

  Both (C, p), over the rows ``valid`` (C,) (None: all). 0 when every classifier row makes the
  same angle with its class mean.
  """
  alignment = jnp.sum(_unit_rows(_scale_free(weights)) * _unit_rows(_scale_free(centred_means)), axis=-1)
  if valid is None:
    return jnp.std(alignment, ddof=ddof) / jnp.mean(alignment)
  return _masked_std(alignment, valid, ddof) / masked_mean(alignment, valid)
