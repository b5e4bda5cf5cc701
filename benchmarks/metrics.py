"""Speed of the jitted NC suite against a floor and two baselines, in one run.

    python benchmarks/metrics.py [--sizes small|all] [--no-baselines] [--no-append]
    python benchmarks/metrics.py --large-c [--no-append]   # vocabulary-sized C only
    python benchmarks/metrics.py --tiles [--no-append]     # dense vs tiled pair statistics
    python benchmarks/metrics.py --predict [--no-append]   # no device: the H200 ratio predicted from the lowering
    python benchmarks/metrics.py ... --breakdown           # on a device: also time the suite's parts alone
    python benchmarks/metrics.py --large-c --peer DIR      # + rhubarbwu/neural-collapse on the same features

For each (N, p, C) it times, on the same features:
  floor     one jitted pass argmax(H W^T + b) (what any NC4 evaluation must at least do), at the platform's
            default precision (TF32 tensor cores for float32 on recent NVIDIA GPUs, bf16 passes on TPUs);
  exact floor  the same pass at float32's full precision (Precision.HIGHEST), the precision the suite's
            products take (its NC4 decisions are the network's own: see accumulators.update_deviations);
            on CPU the two floors are the same program;
  suite     jax.jit(neural_collapse) with W, b: the default solver 'auto' (on CPU the 'svd' program, on GPU/TPU
            the accelerator path), and 'svd' and 'gram' named;
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
--predict needs no device: it exports the suite for 'cuda' here (solver 'gram', measured on the H200, and the
default 'auto'), takes a census of the parts that differ (the factorisation that runs, pass 2: GEMM FLOPs by
precision, reads of the (N, p) features, kernels, cuSOLVER calls) and adds their difference, at assumed H200
unit costs (``ASSUMED``), to the last H200 'gram' row of BENCHMARKS.md: a predicted time and ratio per size.
--breakdown (with a device) also times the suite's parts alone: pass 1, each solver's factorisation, eigh of
the C x C Gram matrix (and Jacobi's, on a GPU), the Cholesky path, pass 2 (the same for every solver), finalize:
the unit costs --predict assumes, measured.
Prints a markdown table and appends it, with the machine and versions, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import multiprocessing
import pathlib
import platform
import re
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg

import common
from nc_jax.metrics import accumulators, collapse, finalize, geometry, neural_collapse

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


def default_floor(h, w, b):
  """argmax(H W^T + b) (N,) at the platform's default precision: what any NC4 evaluation must at least do."""
  return jnp.argmax(h @ w.T + b, axis=-1)


def exact_floor(h, w, b):
  """argmax(H W^T + b) (N,) with the product at float32's full precision, as the suite's pass 2 forms logits."""
  return jnp.argmax(geometry.matmul_highest(h, w.T) + b, axis=-1)


def run_size(num_samples, feature_dim, num_classes, repeats, baselines=True):
  features, labels, weights, bias = make_data(num_samples, feature_dim, num_classes)
  device = jax.devices()[0]
  h, y, w, b = (jax.device_put(x, device) for x in (features, labels, weights, bias))

  floor_fn = jax.jit(default_floor)
  exact_floor_fn = jax.jit(exact_floor)
  suites = {key: jax.jit(functools.partial(lambda h, y, w, b, solver: neural_collapse(h, y, num_classes, w, b,
                                                                                      solver=solver), solver=solver))
            for key, solver in (("suite", "auto"), ("suite_svd", "svd"), ("suite_gram", "gram"))}
  row = {"size": (num_samples, feature_dim, num_classes)}
  row["floor"] = common.median_time(lambda: floor_fn(h, w, b), repeats)
  row["floor_exact"] = common.median_time(lambda: exact_floor_fn(h, w, b), repeats)
  for key, suite in suites.items():
    row[key] = common.median_time(lambda: suite(h, y, w, b), repeats)
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
           "| N, p, C | floor (ms) | exact floor (ms) | suite (ms) | suite svd (ms) | suite gram (ms) | numpy f64 (ms) "
           "| notebook (ms) | suite/floor | suite/exact floor | notebook/suite | numpy64/suite |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    ms = {k: 1e3 * v for k, v in row.items() if isinstance(v, float)}
    if "numpy64" in row:
      baselines = (f"{ms['numpy64']:.0f} | {ms['notebook']:.0f} (scaled from {row['notebook_subset']:,})",
                   f"{row['notebook'] / row['suite']:.0f}x | {row['numpy64'] / row['suite']:.1f}x")
    else:
      baselines = ("not run | not run", "n/a | n/a")
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]} | {ms['floor']:.1f} | {ms['floor_exact']:.1f} | "
        f"{ms['suite']:.1f} | {ms['suite_svd']:.1f} | {ms['suite_gram']:.1f} | {baselines[0]} | "
        f"{row['suite'] / row['floor']:.1f}x | {row['suite'] / row['floor_exact']:.1f}x | {baselines[1]} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# --predict: the H200 ratio of the default path, from the programs lowered for 'cuda' on this host.
# ----------------------------------------------------------------------------

# NVIDIA H200 SXM dense peaks (datasheet): float32 SIMT FLOP/s, HBM bytes/s.
H200_PEAKS = {"fp32": 67e12, "hbm": 4.8e12}
# Unit costs assumed for the H200, none measured here: (central, favourable, unfavourable) to the new path.
ASSUMED = {
    "fp32_efficiency": (0.8, 0.7, 0.9),   # a HIGHEST (SIMT float32) GEMM, fraction of 67 TFLOP/s (slower: more saved)
    "hbm_efficiency": (0.8, 0.9, 0.7),    # one read of an (N, p) float32 array, fraction of 4.8 TB/s
    "kernel_us": (5.0, 3.0, 8.0),         # one small kernel of a census count: launch and tail
    "sync_us": (20.0, 10.0, 40.0),        # a lax.cond predicate copied to the host
    "syevd_us_per_n": (6.0, 10.0, 3.0),   # cuSOLVER syevd (n > 32): ~n dependent steps of its tridiagonalisation
    "syevj_us": (60.0, 100.0, 30.0),      # cuSOLVER syevj (n <= 32): one batched Jacobi call
    "potrf_us": (40.0, 20.0, 80.0),       # cuSOLVER potrf (n <= 1000), blocked: a few panels
    "tf32_share": (0.85, 0.8, 1.0),       # share of the measured floor that is its TF32 GEMM (the rest: argmax, I/O)
}
NON_ELEMENTWISE = ("dot_general", "reduce", "scatter", "custom_call", "cholesky", "triangular_solve", "sort")
FLOAT_TENSOR = re.compile(r"tensor<((?:\d+x)*\d+)xf32>")


def _export_text(fn, args, platform_name: str) -> str:
  import jax.export  # noqa: PLC0415  (jax 0.7 has jax.export only once it is imported)
  return jax.export.export(jax.jit(fn), platforms=[platform_name])(*args).mlir_module()


def _own_census(lines, row_type: str) -> tuple:
  """(flops Counter, reads, kernels, custom calls Counter, callees Counter) of one function's own lines."""
  flops, calls, callees = collections.Counter(), collections.Counter(), collections.Counter()
  reads = kernels = 0
  pending = None  # a generic-form op whose signature comes on its closing line
  for line in lines:
    for callee in re.findall(r"\bcall @([\w.$-]+)\(", line):
      callees[callee] += 1
    match = re.search(r"(?:stablehlo|chlo)\.(\w+)", line)
    kind = match.group(1) if match else None
    if '"stablehlo.' in line and kind in NON_ELEMENTWISE and " : (" not in line.split("}>")[-1]:
      pending = kind
      continue
    if pending and line.strip().startswith("})") and " : (" in line:
      kind, pending = pending, None
    elif kind not in NON_ELEMENTWISE:
      continue
    operands = line.rsplit(" : ", 1)[-1].split("->")[0]
    kernels += 1
    if kind in ("dot_general", "reduce", "scatter") and row_type in operands:
      reads += 1
    if kind in ("custom_call", "cholesky"):  # jax < 0.8 lowers Cholesky for GPUs as XLA's op (cuSOLVER potrf)
      target = re.search(r"custom_call @(\w+)", line).group(1) if kind == "custom_call" else "cholesky"
      shape = FLOAT_TENSOR.search(operands)
      calls[f"{target}({shape.group(1) if shape else ''})"] += 1
    if kind == "dot_general":
      shapes = [tuple(int(d) for d in m.split("x")) for m in FLOAT_TENSOR.findall(operands)]
      contracting = re.search(r"contracting_dims = \[([\d, ]*)\] x", line)
      precision = re.search(r"precision = \[(\w+),", line)
      if len(shapes) == 2 and contracting:
        size = np.prod([shapes[0][int(d)] for d in contracting.group(1).split(",") if d.strip()])
        work = 2.0 * np.prod(shapes[0]) * np.prod(shapes[1]) / size
        batch = re.search(r"batching_dims = \[([\d, ]*)\] x", line)
        if batch and batch.group(1).strip():
          work /= np.prod([shapes[0][int(d)] for d in batch.group(1).split(",")])
        side = "rows" if shapes[0][:2] == tuple(int(v) for v in row_type[7:-5].split("x")) else "small"
        flops[(side, precision.group(1) if precision else "DEFAULT")] += work
  return flops, reads, kernels, calls, callees


def program_census(text: str, rows: int, feature_dim: int, trips: int = 1) -> dict:
  """What a StableHLO module does to its (rows, p) float32 arrays and beyond, for ``trips`` runs of it.

  dots: FLOPs by precision, split into 'rows' (a (rows, p) left operand: pass 2's products) and 'small';
  reads: non-elementwise consumers (dot_general, reduce, scatter) of a (rows, p) array, each one read of it,
  counted ``trips`` times (chunks of pass 2: rows/N of a read of the whole (N, p) features each)
  (XLA fuses elementwise producers into them; sibling reductions may share a read, so an upper bound);
  kernels: non-elementwise ops (each ~ one kernel on a GPU; an upper bound for reductions that fuse);
  custom_calls: their targets with the first operand's shape. Each function counts as often as it is called
  from main (JAX outlines jitted helpers such as cholesky and calls them more than once); every branch of a
  cond counts, so lower the path that runs.
  """
  row_type = f"tensor<{rows}x{feature_dim}xf32>"
  functions, name, body = {}, None, []
  for line in text.splitlines():
    start = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
    if start:
      name, body = start.group(1), []
      continue
    if name is not None and re.match(r"^  }", line):
      functions[name], name = body, None
      continue
    if name is not None:
      body.append(line)
  own = {fn: _own_census(lines, row_type) for fn, lines in functions.items()}

  @functools.lru_cache(maxsize=None)
  def total(fn):
    flops, reads, kernels, calls, callees = own[fn]
    flops, calls = collections.Counter(flops), collections.Counter(calls)
    for callee, count in callees.items():
      if callee in own:
        sub = total(callee)
        for key, value in sub["flops"].items():
          flops[key] += count * value
        for key, value in sub["custom_calls"].items():
          calls[key] += count * value
        reads += count * sub["reads"]
        kernels += count * sub["kernels"]
    return {"flops": flops, "reads": reads, "kernels": kernels, "custom_calls": calls}

  result = total("main")
  return {"flops": {key: value * trips for key, value in result["flops"].items()}, "reads": result["reads"] * trips,
          "kernels": result["kernels"] * trips, "custom_calls": collections.Counter(
              {key: value * trips for key, value in result["custom_calls"].items()})}


def _abstract(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def lowered_parts(size, solver: str, platform_name: str = "cuda") -> dict:
  """Censuses of the suite's parts as lowered for ``platform_name`` with ``solver``: the factorisation that
  runs for full-rank means ('gram': eigh; 'auto': the Cholesky path), pass 2 (one chunk, times the chunks),
  and the whole suite (every branch)."""
  num_samples, feature_dim, num_classes = size
  rows = collapse._chunk_rows(num_classes, "auto", "cpu" if platform_name == "cpu" else platform_name)
  chunks, padded = collapse._chunking(num_samples, rows)
  rows = padded // chunks
  rank = min(feature_dim, num_classes - 1)
  centred = _abstract((num_classes, feature_dim))
  if solver == "auto":
    factorise = lambda m: accumulators._factorise_cholesky(m, rank, deflate=True)
  else:
    factorise = lambda m: accumulators._factorise(m, rank, solver, None)
  means = jax.eval_shape(lambda: accumulators.init_class_means(num_classes, feature_dim))
  weights, bias = _abstract((num_classes, feature_dim)), _abstract((num_classes,))
  geometry_shape = jax.eval_shape(lambda m, w, b: accumulators.finalize_class_means(m, w, b, solver=solver),
                                  means, weights, bias)
  state = jax.eval_shape(accumulators.init_deviations, geometry_shape)
  pass2 = lambda s, g, h, y: accumulators.update_deviations(s, g, h, y)
  suite = lambda h, y, w, b: neural_collapse(h, y, num_classes, w, b, solver=solver, chunk_rows=rows)
  texts = {
      "factorise": _export_text(factorise, [centred], platform_name),
      "pass2": _export_text(pass2, [state, geometry_shape, _abstract((rows, feature_dim)),
                                    _abstract((rows,), jnp.int32)], platform_name),
      "suite": _export_text(suite, [_abstract((num_samples, feature_dim)), _abstract((num_samples,), jnp.int32),
                                    weights, bias], platform_name),
  }
  return {"rows": rows, "chunks": chunks,
          "factorise": program_census(texts["factorise"], rows, feature_dim),
          "pass2": program_census(texts["pass2"], rows, feature_dim, trips=chunks),
          "suite": program_census(texts["suite"], rows, feature_dim)}


def cholesky_path_taken(size) -> bool:
  """Whether the Cholesky path accepts the class means of ``make_data`` at ``size`` (its generating means plus
  the sampling error of N/C samples a class), checked here in float32."""
  num_samples, feature_dim, num_classes = size
  rng = np.random.default_rng(0)
  rng.permutation(np.arange(num_samples) % num_classes)
  means = rng.normal(size=(num_classes, feature_dim))
  means = means + 0.5 * rng.normal(size=means.shape) / np.sqrt(num_samples / num_classes)
  centred = jnp.asarray(means - means.mean(0), jnp.float32)
  return bool(jax.jit(lambda m: accumulators._factorise_cholesky(m, min(feature_dim, num_classes - 1), True)[1])(
      centred))


def h200_measurements(path: pathlib.Path = common.BENCHMARKS_MD) -> dict:
  """{(N, p, C): {'floor': ms, 'suite svd': ms, 'suite gram': ms}} from the last benchmarks/metrics.py section of
  ``path`` measured on an H200, and that section's header."""
  sections = re.split(r"(?m)^### ", path.read_text())
  found = [s for s in sections if s.startswith("benchmarks/metrics.py,") and "NVIDIA H200" in s]
  if not found:
    raise SystemExit(f"--predict needs an H200 row of benchmarks/metrics.py in {path}; none found")
  lines = [line for line in found[-1].splitlines() if line.startswith("|")]
  names = [cell.strip() for cell in lines[0].strip("|").split("|")]
  result = {}
  for line in lines[2:]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    size = tuple(int(v.replace(",", "")) for v in cells[0].split(", "))
    values = dict(zip(names, cells))
    default = values.get("suite (ms)", values.get("suite svd (ms)"))  # the column suite/floor divides
    # the floor from the ratio: the table rounds it to 0.1 ms, which is +-30% at 0.2 ms
    floor = float(default) / float(values["suite/floor"].rstrip("x")) if "suite/floor" in values else float(
        values["floor (ms)"])
    result[size] = {"floor": floor, "suite svd": float(values["suite svd (ms)"]),
                    "suite gram": float(values["suite gram (ms)"])}
  return result, found[-1].splitlines()[0]


def _solver_us(calls: collections.Counter, pick: int) -> float:
  """Assumed time of the cuSOLVER calls in ``calls`` (µs); ``pick``: 0 central, 1 favourable, 2 unfavourable."""
  total = 0.0
  for call, count in calls.items():
    n = int(re.search(r"\((\d+)", call).group(1)) if re.search(r"\((\d+)", call) else 0
    if "syevd" in call:
      total += count * (ASSUMED["syevj_us"][pick] if n <= 32 else ASSUMED["syevd_us_per_n"][pick] * n)
    elif "potrf" in call or "cholesky" in call:
      total += count * ASSUMED["potrf_us"][pick]
  return total


def predict_row(size, measured: dict) -> dict:
  """The default path's predicted H200 time at ``size`` (central, favourable, unfavourable: ``ASSUMED``).

  The measured 'gram' suite splits into its pass-2 GEMMs and eigendecomposition (at the assumed unit costs) and
  the rest (pass 1, pass 2's other work, finalize, launches), which the new program shares but for the census
  differences (reads, kernels, the Cholesky path's cond). The rest is at least its memory traffic (pass 1: two
  reads, pass 2: its reads and its products' (N, r + 2C) outputs written and read once), so unit costs that
  would leave less are capped there. Prediction = rest + new GEMMs + new cuSOLVER calls + the differences."""
  num_samples, feature_dim, num_classes = size
  old, new = lowered_parts(size, "gram"), lowered_parts(size, "auto")
  largest = max(measured)
  gram_s = measured[size]["suite gram"] * 1e-3
  outputs = sum(v for (side, _), v in old["pass2"]["flops"].items() if side == "rows") / (2 * feature_dim)
  predictions = []
  for pick in range(3):
    fp32 = H200_PEAKS["fp32"] * ASSUMED["fp32_efficiency"][pick]
    tf32 = 2.0 * np.prod(largest) / (measured[largest]["floor"] * 1e-3 * ASSUMED["tf32_share"][pick])
    if pick == 0:  # the floor's GEMM (2NpC FLOPs) at HIGHEST instead of TF32, at the central rates
      floor_gemm = 2.0 * num_samples * feature_dim * num_classes
      exact_floor_ms = measured[size]["floor"] + 1e3 * max(floor_gemm / fp32 - floor_gemm / tf32, 0.0)
    bandwidth = H200_PEAKS["hbm"] * ASSUMED["hbm_efficiency"][pick]
    chunk_read = old["rows"] * feature_dim * 4 / bandwidth

    def gemms(part):
      return sum(v / (fp32 if precision == "HIGHEST" else tf32) for (_, precision), v in part["flops"].items())

    def overheads(part):
      return part["reads"] * chunk_read + part["kernels"] * ASSUMED["kernel_us"][pick] * 1e-6

    memory_floor = ((2 * num_samples * feature_dim * 4 + 2 * outputs * 4) / bandwidth
                    + old["pass2"]["reads"] * chunk_read)
    removed = sum(gemms(old[part]) for part in ("factorise", "pass2")) + _solver_us(old["factorise"]["custom_calls"],
                                                                                     pick) * 1e-6
    rest = max(gram_s - removed, memory_floor)
    added = sum(gemms(new[part]) + overheads(new[part]) - overheads(old[part]) for part in ("factorise", "pass2"))
    added += (_solver_us(new["factorise"]["custom_calls"], pick) + ASSUMED["sync_us"][pick]) * 1e-6
    predictions.append(1e3 * (rest + added))
  # No float32-exact path can beat its HIGHEST GEMMs at the H200's peak or one read of the features per pass.
  exact_gemms = sum(v for (side, precision), v in new["pass2"]["flops"].items() if precision == "HIGHEST")
  bound = 1e3 * max(exact_gemms / H200_PEAKS["fp32"], 2 * num_samples * feature_dim * 4 / H200_PEAKS["hbm"])
  return {"size": size, "old": old, "new": new, "predicted": predictions, "floor": measured[size]["floor"],
          "exact_floor": exact_floor_ms, "bound": bound,
          "svd": measured[size]["suite svd"], "gram": measured[size]["suite gram"],
          "cholesky": cholesky_path_taken(size)}


def _flops_text(part) -> str:
  flops = part["flops"]
  rows = {precision: v for (side, precision), v in flops.items() if side == "rows"}
  return ", ".join(f"{v / 1e9:.0f} GFLOP {p}" for p, v in sorted(rows.items())) or "none"


def _calls_text(calls) -> str:
  return ", ".join(f"{n} x {call}" for call, n in sorted(calls.items())) or "none"


def format_prediction(rows, tpu, header: str, source: str) -> str:
  lines = [header, "",
           "Method: `benchmarks/metrics.py --predict` exports the suite for 'cuda' on this CPU host (jax.export, "
           "pass 2 "
           "chunked as on a GPU) with solver 'gram' (the measured H200 column) and the default 'auto', and takes a "
           "census of each program's parts: the factorisation that runs for full-rank class means ('gram': eigh; "
           "'auto': the CholeskyQR2 path, whose acceptance is checked on the benchmark's class means), and pass 2 "
           "(one chunk, times the chunks): GEMM FLOPs by precision, reads of an (N, p) array (non-elementwise "
           "consumers of it), kernels (non-elementwise ops) and cuSOLVER calls. Prediction = the H200's measured "
           f"'gram' suite ({source}) + (new - old) x unit cost, the unit costs assumed (`ASSUMED`): HIGHEST GEMMs at "
           "70-90% of 67 TFLOP/s, HIGH (TF32) at the measured floor's rate at the largest size (80-100% of its time "
           "its GEMM), one (N, p) read at 70-90% of 4.8 TB/s, 3-8 µs a small kernel, 10-40 µs a host-synchronising "
           "cond, cuSOLVER syevd 3-10 µs per row (n > 32) or 30-100 µs (syevj, n <= 32), potrf 20-80 µs. The "
           "measured "
           "'gram' suite less its pass-2 GEMMs and eigh at those costs is the rest the two programs share (pass 1, "
           "finalize, launches), at least its memory traffic (where the costs would leave less, the rest is that "
           "floor); the prediction adds the new GEMMs, potrf and the census differences to it. Range: the least .. "
           "the greatest of the predictions at the central costs and at either end of their ranges (the cap at "
           "the memory traffic makes the prediction non-monotone in them), central first. Exact floor: the floor "
           "with its GEMM (2NpC FLOPs) at HIGHEST instead of TF32, at the central assumed rates. Bound: the least time any path whose products are "
           "float32-exact can take, its pass-2 HIGHEST GEMMs at 100% of 67 TFLOP/s or two reads of the features "
           "at 4.8 TB/s, whichever is longer, over the floor. Not measured: `--breakdown` on the H200 measures the "
           "parts.", "",
           "| N, p, C | floor (ms, from suite/floor) | measured svd / gram (ms) | pass-2 GEMMs gram -> auto "
           "| (N, p) reads gram -> auto (chunks) "
           "| kernels gram -> auto | cuSOLVER gram -> auto (runs) | Cholesky path | predicted auto (ms) "
           "| predicted auto / floor | measured svd / floor | exact floor (ms, predicted) "
           "| predicted auto / exact floor | bound / floor |",
           "| --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    old, new = row["old"], row["new"]
    central, good, bad = row["predicted"][0], min(row["predicted"]), max(row["predicted"])
    f = row["floor"]
    lines.append(
        f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]} | {f:.2f} | {row['svd']:.1f} / {row['gram']:.1f} | "
        f"{_flops_text(old['pass2'])} -> {_flops_text(new['pass2'])} | "
        f"{old['pass2']['reads'] / row['old']['chunks']:g} -> {new['pass2']['reads'] / row['old']['chunks']:g} "
        f"({row['old']['chunks']}) | "
        f"{old['pass2']['kernels'] + old['factorise']['kernels']} -> "
        f"{new['pass2']['kernels'] + new['factorise']['kernels']} | "
        f"{_calls_text(old['factorise']['custom_calls'])} -> {_calls_text(new['factorise']['custom_calls'])} | "
        f"{'taken' if row['cholesky'] else 'refused'} | {central:.1f} ({good:.1f} .. {bad:.1f}) | "
        f"{central / f:.1f}x ({good / f:.1f}x .. {bad / f:.1f}x) | {row['svd'] / f:.1f}x | "
        f"{row['exact_floor']:.2f} | {central / row['exact_floor']:.1f}x | {row['bound'] / f:.1f}x |")
  lines += ["", "Every cuSOLVER call in the default program as lowered (all branches; one factorisation path runs): "
            + "; ".join(f"{row['size'][2]} classes: {_calls_text(row['new']['suite']['custom_calls'])}"
                        for row in rows) + ".",
            "TPU (lowered for 'tpu', counts only): " + "; ".join(
                f"{size[2]} classes: pass-2 GEMMs {_flops_text(census['pass2'])}, linear algebra in the suite "
                f"{_calls_text(census['suite']['custom_calls'])}" for size, census in tpu) + "."]
  return "\n".join(lines)


def predict(args) -> None:
  measured, source = h200_measurements()
  rows = [predict_row(size, measured) for size in SIZES["all"]]
  tpu = [(size, lowered_parts(size, "auto", "tpu")) for size in SIZES["all"]]
  header = (f"### benchmarks/metrics.py --predict, {datetime.date.today()}: PREDICTED, not measured; the default "
            f"solver 'auto' on an NVIDIA H200, from the programs lowered for 'cuda' with jax {jax.__version__} on "
            f"{platform.processor() or platform.machine()}")
  common.report(format_prediction(rows, tpu, header, source.split(":")[0].strip() + ", " + source.split(":")[1]
                                  .split(",")[0].strip()), append=not args.no_append)


# ----------------------------------------------------------------------------
# --breakdown: where the suite's time goes, on the device (what --predict assumes).
# ----------------------------------------------------------------------------


def breakdown_row(num_samples, feature_dim, num_classes, repeats) -> dict:
  """Median times (s) of the suite's parts at one size, each jitted alone on the default device."""
  features, labels, weights, bias = make_data(num_samples, feature_dim, num_classes)
  h, y, w, b = (jax.device_put(x) for x in (features, labels, weights, bias))
  del features
  rank = min(feature_dim, num_classes - 1)
  time_of = lambda fn, *args: common.median_time(functools.partial(jax.jit(fn), *args), repeats)
  row = {"size": (num_samples, feature_dim, num_classes)}
  row["floor"] = time_of(default_floor, h, w, b)
  row["exact floor"] = time_of(exact_floor, h, w, b)
  means = jax.jit(lambda h, y: collapse._class_means(h, y, num_classes, None, track_max_abs=False))(h, y)
  row["pass 1"] = time_of(lambda h, y: collapse._class_means(h, y, num_classes, None, track_max_abs=False), h, y)
  geometries = {}
  for solver in ("svd", "gram", "auto"):
    finalize_fn = functools.partial(accumulators.finalize_class_means, solver=solver)
    row[f"geometry {solver}"] = time_of(finalize_fn, means, w, b)
    geometries[solver] = jax.jit(finalize_fn)(means, w, b)
  centred = geometries["svd"].centred_means
  gram_matrix = jax.jit(lambda m: geometry.matmul_highest(m, m.T))(centred)
  row["eigh C x C"] = time_of(jnp.linalg.eigh, gram_matrix)
  jacobi = getattr(jax.lax.linalg, "EighImplementation", None)  # jax >= 0.8
  row["eigh C x C jacobi"] = (time_of(functools.partial(jax.lax.linalg.eigh, implementation=jacobi.JACOBI), gram_matrix)
                              if jacobi is not None and jax.default_backend() == "gpu" else float("nan"))
  row["Cholesky path"] = time_of(lambda m: accumulators._factorise_cholesky(m, rank, True), centred)
  row["Cholesky path taken"] = bool(jax.jit(lambda m: accumulators._factorise_cholesky(m, rank, True)[1])(centred))
  row["pass 2"] = time_of(lambda g, h, y: collapse.deviations_pass(g, h, y), geometries["svd"], h, y)  # every solver's
  state = jax.jit(lambda g, h, y: collapse.deviations_pass(g, h, y))(geometries["svd"], h, y)
  row["finalize"] = time_of(lambda s, g: finalize.finalize_collapse(s, g), state, geometries["svd"])
  for solver in ("auto", "svd", "gram"):
    row[f"suite {solver}"] = time_of(lambda h, y, w, b, solver=solver: neural_collapse(h, y, num_classes, w, b,
                                                                                       solver=solver), h, y, w, b)
  return row


BREAKDOWN_KEYS = ("floor", "exact floor", "pass 1", "geometry svd", "geometry gram", "geometry auto", "eigh C x C",
                  "eigh C x C jacobi", "Cholesky path", "pass 2", "finalize", "suite auto",
                  "suite svd", "suite gram")


def format_breakdown(rows, header: str) -> str:
  lines = [header, "", "| N, p, C | " + " | ".join(f"{key} (ms)" for key in BREAKDOWN_KEYS)
           + " | Cholesky path taken | suite auto / floor | suite auto / exact floor |",
           "| --- | " + " | ".join("---:" for _ in BREAKDOWN_KEYS) + " | --- | ---: | ---: |"]
  for row in rows:
    lines.append(f"| {row['size'][0]:,}, {row['size'][1]}, {row['size'][2]} | "
                 + " | ".join(f"{1e3 * row[key]:.2f}" for key in BREAKDOWN_KEYS)
                 + f" | {row['Cholesky path taken']} | {row['suite auto'] / row['floor']:.1f}x "
                 f"| {row['suite auto'] / row['exact floor']:.1f}x |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", choices=sorted(SIZES), default="all")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-baselines", action="store_true", help="skip the host-CPU numpy64 and notebook columns")
  parser.add_argument("--no-append", action="store_true")
  parser.add_argument("--large-c", action="store_true", help=f"only the vocabulary-sized rows {LARGE_C}")
  parser.add_argument("--tiles", action="store_true", help="only dense vs tiled pair statistics")
  parser.add_argument("--predict", action="store_true",
                      help="no device: predict the default path's H200 ratio from its 'cuda' lowering and the last "
                      "H200 rows of BENCHMARKS.md")
  parser.add_argument("--breakdown", action="store_true",
                      help="after the table, time the suite's parts alone on the device (pass 1, each factorisation, "
                      "eigh, the Cholesky path, pass 2, finalize): what --predict assumes")
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
  if args.predict:
    predict(args)
    return
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
            f"jax {jax.__version__}, numpy {np.__version__}; median of {args.repeats} runs after warm-up; "
            f"suite: the default solver ('auto': the svd program on CPU, the accelerator path on GPU/TPU)")
  table = format_table(rows, header)
  common.report(table, append=not args.no_append)
  if args.breakdown:
    parts = []
    try:
      for size in SIZES[args.sizes]:
        parts.append(breakdown_row(*size, args.repeats if size[0] * size[1] * size[2] < 1e10 else 2))
        print(f"breakdown done {size}", flush=True)
    except KeyboardInterrupt:
      print(f"breakdown stopped after {len(parts)} sizes", flush=True)
    if parts:
      header = (f"### benchmarks/metrics.py --breakdown, {datetime.date.today()}: {device.platform} "
                f"({device.device_kind}), jax {jax.__version__}; each part jitted alone, median of {args.repeats} "
                f"runs after warm-up (2 at the largest size); the default solver 'auto' and what --predict assumed")
      common.report(format_breakdown(parts, header), append=not args.no_append)

if __name__ == "__main__":
  main()
