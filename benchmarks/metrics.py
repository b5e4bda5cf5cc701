"""Speed of the jitted NC suite against a floor and two baselines, in one run.

    python benchmarks/metrics.py [--sizes small|all] [--no-baselines] [--no-append]
    python benchmarks/metrics.py --large-c [--no-append]   # vocabulary-sized C only
    python benchmarks/metrics.py --tiles [--no-append]     # dense vs tiled pair statistics
    python benchmarks/metrics.py --large-c --peer DIR      # + rhubarbwu/neural-collapse on the same features

For each (N, p, C) it times, on the same features:
  floor     one jitted pass argmax(H W^T + b) (what any NC4 evaluation must at least do);
  suite     jax.jit(neural_collapse) with W, b (solver 'svd', and 'gram');
  numpy64   an efficient numpy float64 implementation of the same formulas
            (one-hot means, centred deviations, rank-(C-1) projection);
  notebook  the authors' notebook algorithm in numpy float32: per batch of 128 and
            per class, per-sample outer products summed into Sigma_W (p x p), then
            scipy.sparse.linalg.svds(Sigma_B, k=C-1), Tr(Sigma_W Sigma_B^+), and an
            NCC pass with (B, C, p) distances. Timed on a subset of the samples and
            scaled linearly to N (its per-sample work is the same for every sample);
            the one-off svds/trace is timed once and added.
numpy64 and notebook run on the host CPU whatever the device; --no-baselines skips them
(on an accelerator, where the host's time is not what is being measured).
--large-c times the suite (min_count=1, so the classes a row lacks are dropped, not NaN)
against the floor chunked over N as the suite's pass 2 is, one call each after compiling,
each size in a fresh process: compiled temporary memory (memory_analysis) and the
process's peak RSS, against the input size (features + W).
--peer DIR adds, for each --large-c size, the peer library rhubarbwu/neural-collapse (PyTorch, CPU)
run on the same features in its own fresh process (benchmarks/peer.py says what it runs), its time
against the suite's, and the largest relative difference of the metrics both compute. DIR is a copy
of its repository (`git clone https://github.com/rhubarbwu/neural-collapse`); it needs torch and scipy.
--tiles times ``geometry.pair_geometry`` as one dense tile and in tiles of PAIR_BLOCK rows,
the measurement behind ``geometry.DENSE_MAX_CLASSES``.
Prints a markdown table and appends it, with the machine and versions, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing
import platform
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import common
from nc_jax.metrics import collapse, geometry, neural_collapse

SIZES = {"small": [(50_000, 512, 10), (50_000, 512, 100)],
         "all": [(50_000, 512, 10), (50_000, 512, 100), (200_000, 2048, 1000)]}
LARGE_C = [(100_000, 768, 8192), (100_000, 768, 32_768), (50_000, 768, 50_257)]
TILE_SIZES = [(256, 768), (512, 768), (1024, 768), (4096, 768)]


def make_data(num_samples, feature_dim, num_classes, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int32)
  means = rng.normal(size=(num_classes, feature_dim)).astype(np.float32)
  features = means[labels]
  features += 0.5 * rng.standard_normal(size=features.shape, dtype=np.float32)
  features += 1.0  # a common offset, like ReLU features
  weights = (rng.normal(size=(num_classes, feature_dim)) / np.sqrt(feature_dim)).astype(np.float32)
  bias = np.zeros(num_classes, np.float32)
  return features, labels, weights, bias


def numpy_float64(features, labels, num_classes, weights, bias):
  h = features.astype(np.float64)
  onehot = np.eye(num_classes)[labels]
  counts = onehot.sum(0)
  means = onehot.T @ h / counts[:, None]
  deviations = h - means[labels]
  within_sq = np.einsum("ij,ij->i", deviations, deviations)
  centred = means - means.mean(0)
  u, s, _ = np.linalg.svd(centred, full_matrices=False)
  u, s = u[:, : num_classes - 1], s[: num_classes - 1]
  along = deviations @ centred.T
  nc1 = np.sum((along @ u / s**2) ** 2) / len(labels)
  gram = centred @ centred.T
  sq = np.diag(gram)
  ncc = np.argmin(-2 * along + (sq[:, None] + sq[None, :] - 2 * gram)[labels] + 2 * along[np.arange(len(labels)), labels][:, None], axis=1)
  network = np.argmax(h @ weights.T.astype(np.float64) + bias, axis=1)
  norms = np.linalg.norm(centred, axis=1)
  cos = gram / np.outer(norms, norms)
  off = ~np.eye(num_classes, dtype=bool)
  return {"nc1": nc1, "trace_within": within_sq.sum() / len(labels), "equinorm": norms.std(ddof=1) / norms.mean(),
          "equiangular": cos[off].std(ddof=1), "max_angle": np.abs(cos[off] + 1 / (num_classes - 1)).mean(),
          "mismatch": np.mean(ncc != network)}


def notebook_per_sample_work(features, labels, num_classes, weights, bias, means, batch_size=128):
  """The notebook's second pass: per-batch, per-class outer products and NCC distances."""
  feature_dim = features.shape[1]
  sigma_w = np.zeros((feature_dim, feature_dim), np.float32)
  mismatches = 0
  for start in range(0, len(labels), batch_size):
    h, y = features[start:start + batch_size], labels[start:start + batch_size]
    for c in range(num_classes):
      z = h[y == c] - means[c]
      if len(z):
        sigma_w += np.sum(z[:, :, None] * z[:, None, :], axis=0)  # torch: z.unsqueeze(-1) @ z.unsqueeze(1)
    network = np.argmax(h @ weights.T + bias, axis=1)
    ncc = np.array([np.argmin(np.linalg.norm(x - means, axis=1)) for x in h])  # per sample, as the notebook
    mismatches += int(np.sum(network != ncc))
  return sigma_w, mismatches


def notebook_one_off(sigma_w, means, num_classes):
  centred = means - means.mean(0)
  sigma_b = (centred.T @ centred / num_classes).astype(np.float64)
  eigvec, eigval, _ = scipy.sparse.linalg.svds(sigma_b, k=num_classes - 1)
  inverse = eigvec @ np.diag(eigval ** (-1)) @ eigvec.T
  return np.trace(sigma_w @ inverse) / num_classes


def run_size(num_samples, feature_dim, num_classes, repeats, baselines=True):
  features, labels, weights, bias = make_data(num_samples, feature_dim, num_classes)
  device = jax.devices()[0]
  h, y, w, b = (jax.device_put(x, device) for x in (features, labels, weights, bias))

  floor_fn = jax.jit(lambda h, w, b: jnp.argmax(h @ w.T + b, axis=-1))
  suite_svd = jax.jit(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b))
  suite_gram = jax.jit(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b, solver="gram"))
  row = {"size": (num_samples, feature_dim, num_classes)}
  row["floor"] = common.median_time(lambda: floor_fn(h, w, b), repeats)
  row["suite"] = common.median_time(lambda: suite_svd(h, y, w, b), repeats)
  row["suite_gram"] = common.median_time(lambda: suite_gram(h, y, w, b), repeats)
  if not baselines:
    return row

  start = time.perf_counter()
  numpy_float64(features, labels, num_classes, weights, bias)
  row["numpy64"] = time.perf_counter() - start

  subset = min(num_samples, 4_000 if feature_dim < 1024 else 512)
  start = time.perf_counter()
  means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])  # the notebook's first pass
  means_time = time.perf_counter() - start
  start = time.perf_counter()
  sigma_w, _ = notebook_per_sample_work(features[:subset], labels[:subset], num_classes, weights, bias, means)
  per_sample = (time.perf_counter() - start) / subset
  start = time.perf_counter()
  notebook_one_off(sigma_w, means, num_classes)
  row["notebook"] = per_sample * num_samples + means_time + (time.perf_counter() - start)
  row["notebook_subset"] = subset
  return row


def _compiled(fn, *args):
  """(compiled executable, its temporary memory in bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes


def _time_once(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def large_c_row(size):
  """One --large-c row, run in a fresh process so that its peak RSS is its own."""
  num_samples, feature_dim, num_classes = size
  features, labels, weights, bias = make_data(num_samples, feature_dim, num_classes)
  h, y, w, b = (jax.device_put(x) for x in (features, labels, weights, bias))
  del features
  rows = collapse._chunk_rows(num_classes, "auto")
  floor, floor_temp = _compiled(lambda h, w, b: jax.lax.map(lambda x: jnp.argmax(x @ w.T + b, -1), h, batch_size=rows),
                                h, w, b)
  suite, suite_temp = _compiled(lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b, min_count=1), h, y, w, b)
  row = {"size": size, "floor": _time_once(floor, h, w, b), "suite": _time_once(suite, h, y, w, b),
         "floor_temp": floor_temp, "suite_temp": suite_temp, "input": (h.nbytes + w.nbytes),
         "rows": rows, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  result = suite(h, y, w, b)
  row["values"] = {k: float(result[k]) for k in ("nc1", "nc1_tirer", "cdnv", "ncc_mismatch")}
  row["filtered"] = int(result["num_filtered_classes"])
  row["finite"] = all(bool(np.isfinite(result[k])) for k in ("nc1", "cdnv", "equiangular_means", "gnc2_means",
                                                              "etf_deviation_weights", "ncc_mismatch"))
  return row


def peer_process_row(peer_dir, size, tile_size, grid_budget_s):
  """The peer's row on make_data's features for ``size``, in a fresh process (its own peak RSS)."""
  import peer  # noqa: PLC0415  (torch only when asked for)
  features, labels, weights, _ = make_data(*size)  # bias is zero: the peer's NC4 has no bias
  return peer.peer_row(peer_dir, features, labels, weights, tile_size=tile_size, grid_budget_s=grid_budget_s)


def _peer_difference(ours: dict, theirs: dict) -> str:
  """Largest relative difference over the metrics both compute (theirs mapped to our keys)."""
  pairs = {"nc1": "nc1", "nc1_tirer": "nc1_quotient", "cdnv": "cdnv"}
  relative = lambda a, b: abs(a - b) / abs(b) if b else abs(a - b)  # absolute where ours is 0 (one sample a class)
  diffs = {ours_key: relative(theirs[key], ours[ours_key]) for ours_key, key in pairs.items()
           if np.isfinite(theirs[key])}
  diffs["ncc_mismatch (abs)"] = abs((1 - theirs["ncc_agreement"]) - ours["ncc_mismatch"])
  worst = max(diffs, key=diffs.get)
  return f"{diffs[worst]:.1e} ({worst}; {len(diffs)} compared)"


def format_peer(rows, header):
  lines = [header, "",
           "| N, p, C | nc-jax suite (s) | peer total (s) | peer passes (s) | peer C x C grids (s) "
           "| peer other measures (s) | peer / nc-jax | peer peak RSS (GiB) | nc-jax peak RSS (GiB) "
           "| largest difference |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for row in rows:
    theirs = row["peer"]
    est = " est." if theirs["estimated"] else ""
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]:,} | {row['suite']:.3g} | "
        f"{theirs['total_s']:.3g}{est} | {theirs['passes_s']:.3g} | {theirs['grids_s']:.3g}{est} | "
        f"{theirs['measures_s']:.3g} | {theirs['total_s'] / row['suite']:.2g}x{est} | "
        f"{theirs['peak_rss'] / 2**30:.2f} | {row['peak_rss'] / 2**30:.2f} | "
        f"{_peer_difference(row['values'], theirs['values'])} |")
  return "\n".join(lines)


def format_large_c(rows, header):
  lines = [header, "",
           "| N, p, C | floor (s) | suite (s) | suite/floor | temp suite (GiB) | temp floor (GiB) | peak RSS (GiB) "
           "| input (GiB) | chunk rows | classes dropped (min_count=1) | metrics finite |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for row in rows:
    gb = lambda key: f"{row[key] / 2**30:.2f}"
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]:,} | {row['floor']:.1f} | {row['suite']:.1f} | "
        f"{row['suite'] / row['floor']:.1f}x | {gb('suite_temp')} | {gb('floor_temp')} | {gb('peak_rss')} | "
        f"{gb('input')} | {row['rows']} | {row['filtered']} | {row['finite']} |")
  return "\n".join(lines)


def tile_rows(repeats):
  """pair_geometry of centred means (C, p) (with CDNV and the coincidence count) as one tile vs PAIR_BLOCK tiles."""
  rows = []
  for num_classes, feature_dim in TILE_SIZES:
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(num_classes, feature_dim)), jnp.float32)
    variances = jnp.ones((num_classes,), jnp.float32)
    time_with = lambda block: common.median_time(functools.partial(jax.jit(lambda v: geometry.pair_geometry(
        v, variances=variances, coincident_floor_sq=jnp.float32(0.0), block_rows=block)), vectors), repeats)
    rows.append((num_classes, feature_dim, time_with(num_classes), time_with(geometry.PAIR_BLOCK)))
  return rows


def format_tiles(rows, header):
  lines = [header, "", f"| C, p | dense, one tile (ms) | tiles of {geometry.PAIR_BLOCK} rows (ms) | tiled/dense |",
           "| --- | ---: | ---: | ---: |"]
  for num_classes, feature_dim, dense, tiled in rows:
    lines.append(f"| {num_classes}, {feature_dim} | {1e3 * dense:.1f} | {1e3 * tiled:.1f} | {tiled / dense:.2f}x |")
  return "\n".join(lines)


def format_table(rows, header):
  lines = [header, "",
           "| N, p, C | floor (ms) | suite svd (ms) | suite gram (ms) | numpy f64 (ms) | notebook (ms) | suite/floor | notebook/suite | numpy64/suite |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    ms = {k: 1e3 * v for k, v in row.items() if isinstance(v, float)}
    if "numpy64" in row:
      baselines = (f"{ms['numpy64']:.0f} | {ms['notebook']:.0f} (scaled from {row['notebook_subset']:,})",
                   f"{row['notebook'] / row['suite']:.0f}x | {row['numpy64'] / row['suite']:.1f}x")
    else:
      baselines = ("not run | not run", "n/a | n/a")
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]} | {ms['floor']:.1f} | {ms['suite']:.1f} | "
        f"{ms['suite_gram']:.1f} | {baselines[0]} | {row['suite'] / row['floor']:.1f}x | {baselines[1]} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default="all")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-baselines", action="store_true", help="skip the host-CPU numpy64 and notebook columns")
  parser.add_argument("--no-append", action="store_true")
  parser.add_argument("--large-c", action="store_true", help=f"only the vocabulary-sized rows {LARGE_C}")
  parser.add_argument("--tiles", action="store_true", help="only dense vs tiled pair statistics")
  parser.add_argument("--size", action="append", metavar="N,p,C",
                      help="with --large-c: measure this size instead of the defaults (repeatable)")
  parser.add_argument("--peer", metavar="DIR", help="with --large-c: also run rhubarbwu/neural-collapse from DIR")
  parser.add_argument("--peer-tile", type=int, default=256, help="the peer's tile_size (its examples use 64; "
                      "256 was fastest per grid entry here)")
  parser.add_argument("--peer-grid-budget", type=float, default=120.0,
                      help="seconds per peer C x C grid before its time is extrapolated from the tile pairs done")
  args = parser.parse_args()
  rows = []
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # a time limit's SIGTERM keeps the rows measured so far
  device = jax.devices()[0]
  machine = (f"{device.platform} ({device.device_kind}), {jax.device_count()} device(s), "
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
  if args.tiles:
    header = f"### benchmarks/metrics.py --tiles, {datetime.date.today()}: {machine}; median of {args.repeats} runs"
    common.report(format_tiles(tile_rows(args.repeats), header), append=not args.no_append)
    return
  if args.large_c:
    sizes = [tuple(int(v) for v in size.split(",")) for size in args.size] if args.size else LARGE_C
    try:
      for size in sizes:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
          row = pool.apply(large_c_row, (size,))
        print(f"done {size}: {row}", flush=True)
        if args.peer:
          with multiprocessing.get_context("spawn").Pool(1) as pool:
            row["peer"] = pool.apply(peer_process_row, (args.peer, size, args.peer_tile, args.peer_grid_budget))
          print(f"peer done {size}: {row['peer']}", flush=True)
        rows.append(row)
    except KeyboardInterrupt:
      print(f"stopped after {len(rows)} of {len(sizes)} sizes", flush=True)
      if not rows:
        raise SystemExit(143)
    header = (f"### benchmarks/metrics.py --large-c, {datetime.date.today()}: {machine}; one call each after "
              "compiling; synthetic Gaussian classes (N/C samples per class)")
    common.report(format_large_c(rows, header), append=not args.no_append)
    if args.peer:
      import torch  # noqa: PLC0415
      theirs = rows[0]["peer"]
      header = (f"### benchmarks/metrics.py --large-c --peer, {datetime.date.today()}: rhubarbwu/neural-collapse "
                f"(torch {torch.__version__}, CPU, {theirs['threads']} threads, tile_size {theirs['tile']}, batches of "
                f"1024) against nc-jax's suite on the same features, same run; 'est.': C x C grids stopped after "
                f"{args.peer_grid_budget:.0f} s each and extrapolated from the tile pairs done")
      common.report(format_peer(rows, header), append=not args.no_append)
    return
  try:
    for size in SIZES[args.sizes]:
      repeats = args.repeats if size[0] * size[1] * size[2] < 1e10 else 2
      rows.append(run_size(*size, repeats, baselines=not args.no_baselines))
      print(f"done {size}", flush=True)
  except KeyboardInterrupt:
    print(f"stopped after {len(rows)} of {len(SIZES[args.sizes])} sizes", flush=True)
    if not rows:
      raise SystemExit(143)
  device = jax.devices()[0]
  header = (f"### benchmarks/metrics.py, {datetime.date.today()}: {device.platform} ({device.device_kind}), "
            f"{jax.device_count()} device(s), {platform.processor() or platform.machine()}, "
            f"jax {jax.__version__}, numpy {np.__version__}; median of {args.repeats} runs after warm-up")
  table = format_table(rows, header)
  common.report(table, append=not args.no_append)

if __name__ == "__main__":
  main()
