"""How collapse depends on width and depth: the default MNIST-1D job across MLP shapes (CPU, a few minutes).

    python experiments/mnist1d_study.py --root results/mnist1d [--shapes 512x3,128x3,2048x3,512x1,512x2,512x4]

Runs ``python -m nc_jax.train`` (configs/default.py, the paper's full protocol, at the lr the committed
study used: the notebook's 0.0679, ``--lr``) once per
WIDTHxDEPTH into ROOT/w{width}_d{depth} (finished runs are skipped, interrupted ones
resume), then ``python -m nc_jax.report`` over all of them into ROOT/report, and writes
ROOT/summary.md: per shape, the TPT start, NC1 at the first and last measurement,
the NC2/NC3/NC4 numbers at the end, and test accuracy at the TPT start and the end.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nc_jax.records (no JAX), also when not installed
from nc_jax import files, records  # noqa: E402
DEFAULT_SHAPES = "128x3,512x3,2048x3,512x1,512x2,512x4"


def summary_row(run_dir: pathlib.Path, width: int, depth: int) -> str:
  run = records.read(run_dir)
  first, last = run[0], run[-1]
  tpt, at_tpt = records.tpt_start(run), records.first_in_tpt(run)
  tpt_acc = f"{100 * at_tpt['test_acc']:.1f}" if at_tpt else "-"
  return (f"| {width} | {depth} | {tpt or 'not reached'} | {first['nc1']:.3g} | {last['nc1']:.3g} | "
          f"{first['nc1'] / last['nc1']:.0f}x | {last['equinorm_means']:.3f} | {last['equiangular_means']:.3f} | "
          f"{last['self_duality']:.3f} | {last['ncc_mismatch']:.4f} | {tpt_acc} | {100 * last['test_acc']:.1f} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated WIDTHxDEPTH")
  parser.add_argument("--lr", type=float, default=0.0679, help="the study's lr (results/mnist1d used 0.0679)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
  rows = []
  for width, depth in shapes:
    run_dir = root / f"w{width}_d{depth}"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"width {width} depth {depth} -> {run_dir}", flush=True)
    with (run_dir / "train.log").open("a") as log:
      subprocess.run([sys.executable, "-m", "nc_jax.train", "--workdir", str(run_dir),
                      f"--config.model_options.width={width}", f"--config.model_options.depth={depth}",
                      f"--config.lr={args.lr}"],
                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows.append(summary_row(run_dir, width, depth))
  subprocess.run([sys.executable, "-m", "nc_jax.report", *[str(root / f"w{w}_d{d}") for w, d in shapes],
                  "--out", str(root / "report")], cwd=REPO, check=True)
  header = ["| width | depth | TPT start | NC1 first | NC1 last | NC1 fall | equinorm | equiangular | "
            "self-duality | NCC mismatch | test acc at TPT (%) | test acc last (%) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  files.write_atomically(root / "summary.md", ("\n".join(header + rows) + "\n").encode())
  print((root / "summary.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
