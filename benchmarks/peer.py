"""rhubarbwu/neural-collapse (PyTorch) run on the features that benchmarks/metrics.py --large-c uses.

The peer's own pipeline, as its README and examples/mnist.py run it: MeanAccumulator over the
training features; VarNormAccumulator and CovarAccumulator against those means; DecAccumulator
(NCC vs the linear classifier, its NC4); then covariance_ratio (pinv: Papyan's NC1; quotient),
variability_cdnv, simplex_etf_error, kernel_stats with the distance and the log kernel (GNC2),
self_duality_error, the variance of similarities (uNC3) and clf_ncc_agreement. Classes with no
sample are dropped with the peer's ``filter_indices_by_n_samples(1)``, as nc-jax drops them with
``min_count=1``. covariance_ratio's "svd" metric is left out: it calls svds(k=C-1), which needs
C - 1 < p. NC5 is left out: it needs OOD features.

The three tiled C x C grids (CDNV, distance and log kernels) cost ~t^2 p work per tile pair of
t rows in the peer's Python loop; at C = 50,257 each takes about an hour on two CPU cores. A grid that
would run past ``grid_budget_s`` is stopped after that long and its time is extrapolated from
the tile pairs done (every tile pair but the ragged last ones does the same work); such a row
says "est.". The reduction over the grid (the peer's symm_reduce) is then timed in full on a
zero grid of the same size (its cost does not depend on the values), so only the tile loop is
extrapolated.

Needs torch and a copy of the peer's repository (its folder holding ``neural_collapse/``).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import numpy as np


class _OverBudget(Exception):
  pass


def _import_peer(peer_dir: str):
  sys.path.insert(0, peer_dir)
  try:
    from neural_collapse import accumulate, kernels, measure, util  # noqa: PLC0415  (the peer's package)
  except ImportError as error:
    raise SystemExit(f"--peer {peer_dir}: cannot import the peer's neural_collapse package ({error}); "
                     "point --peer at a copy of rhubarbwu/neural-collapse (the folder holding neural_collapse/), "
                     "with torch and scipy installed") from None
  return accumulate, kernels, measure, util


@contextlib.contextmanager
def _budgeted_tiling(kernels, util, budget_s: float, record: dict):
  """Swaps the peer's ``tiling`` for one that stops after ``budget_s`` and records the tile pairs done."""
  original = util.tiling

  def tiling(data, kernel, tile_size=None):
    size = len(data)
    tile = tile_size or size
    tiles = -(-size // tile)
    done = [0]
    start = time.perf_counter()

    def counted(tile_i, tile_j):
      if time.perf_counter() - start > budget_s:
        raise _OverBudget
      done[0] += 1
      return kernel(tile_i, tile_j)

    grid = None
    try:
      grid = original(data, counted, tile_size)
      elapsed = time.perf_counter() - start
      record["grid_s"] = record.get("grid_s", 0.0) + elapsed
    except _OverBudget:
      elapsed = time.perf_counter() - start
      record["grid_s"] = record.get("grid_s", 0.0) + elapsed * tiles * tiles / done[0]
      record["estimated"] = True
    record["loop_s"] = record.get("loop_s", 0.0) + elapsed
    if grid is None:  # outside the except block, so the partial C x C grid is freed first
      grid = util.pt.zeros((size, size))  # the reduction's cost does not depend on the values
    return grid

  kernels.tiling = tiling
  try:
    yield
  finally:
    kernels.tiling = original


def peer_row(peer_dir: str, features: np.ndarray, labels: np.ndarray, weights: np.ndarray, *,
             batch_size: int = 1024, tile_size: int = 256, grid_budget_s: float = 300.0) -> dict:
  """Times the peer's pipeline on (N, p) features, (N,) labels, (C, p) weights; its values for a cross-check."""
  accumulate, kernels, measure, util = _import_peer(peer_dir)
  import torch as pt  # noqa: PLC0415  (only when a peer is given)
  num_classes, feature_dim = weights.shape
  x_all, y_all, w_all = pt.from_numpy(features), pt.from_numpy(labels.astype(np.int64)), pt.from_numpy(weights)
  batches = [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
  row = {"threads": pt.get_num_threads(), "tile": tile_size}
  with pt.no_grad():
    start = time.perf_counter()
    mean_accum = accumulate.MeanAccumulator(num_classes, feature_dim, "cpu")
    for x, y in batches:
      mean_accum.accumulate(x, y)
    kept = mean_accum.filter_indices_by_n_samples(1)
    means_all, _ = mean_accum.compute()
    var_accum = accumulate.VarNormAccumulator(num_classes, feature_dim, "cpu", M=means_all)
    covar_accum = accumulate.CovarAccumulator(num_classes, feature_dim, "cpu", M=means_all)
    for x, y in batches:
      var_accum.accumulate(x, y, means_all)
      covar_accum.accumulate(x, y, means_all)
    dec_accum = accumulate.DecAccumulator(num_classes, feature_dim, "cpu", M=means_all, W=w_all)
    for x, y in batches:
      dec_accum.accumulate(x, y, w_all, means_all)
    row["passes_s"] = time.perf_counter() - start

    start = time.perf_counter()
    means, global_mean = mean_accum.compute(kept)
    var_norms, _ = var_accum.compute(kept)
    covar_within = covar_accum.compute()  # pooled (p, p): empty classes add nothing (compute(kept) indexes it by class)
    w = w_all[kept]
    values = {"nc1": measure.covariance_ratio(covar_within, means, global_mean),
              "nc1_quotient": measure.covariance_ratio(covar_within, means, global_mean, "quotient"),
              "etf_error": measure.simplex_etf_error(means, global_mean),
              "self_duality_error": measure.self_duality_error(w, means, global_mean),
              "unc3": measure.similarities(w, means, global_mean).var().item(),
              "ncc_agreement": measure.clf_ncc_agreement(dec_accum)}
    dense_s = time.perf_counter() - start
    record = {}
    start = time.perf_counter()
    with _budgeted_tiling(kernels, util, grid_budget_s, record):
      values["cdnv"] = measure.variability_cdnv(var_norms, means, tile_size=tile_size)
      values["gnc2_dist"] = kernels.kernel_stats(means, global_mean, tile_size=tile_size)[1]
      values["gnc2_log"] = kernels.kernel_stats(means, global_mean, kernel=kernels.log_kernel, tile_size=tile_size)[1]
    reductions_s = time.perf_counter() - start - record["loop_s"]  # symm_reduce and the grids' set-up
  row["measures_s"] = dense_s + reductions_s
  row["grids_s"] = record["grid_s"]
  row["estimated"] = bool(record.get("estimated"))
  row["total_s"] = row["passes_s"] + row["measures_s"] + row["grids_s"]
  if row["estimated"]:  # grids stopped early give no values
    for key in ("cdnv", "gnc2_dist", "gnc2_log"):
      values[key] = float("nan")
  row["values"] = values
  row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return row
