"""Which net and lr make the main job (configs/default.py) show the paper's four claims in one short CPU run.

    python experiments/default_sweep.py run --root results/default_sweep --runs 512x3@0.0184,512x4@0.0354,512x4@0.0354@1
    python experiments/default_sweep.py table --root results/default_sweep

``run`` trains ``python -m nc_jax.train`` (configs/default.py, the paper's protocol: SGD momentum 0.9,
weight decay 5e-4, lr x0.1 at 1/3 and 2/3 of 350 epochs) once per WIDTHxDEPTH@LR[@SEED] in a
temporary workdir, keeps its config.json, metrics.jsonl and tpt.json (no checkpoints) in
ROOT/w{W}_d{D}_lr{LR}_s{SEED} with the run's wall seconds in wall.json; finished runs are skipped.
``table`` writes ROOT/summary.md, one row per run against the four claims:

1. NC1 falls: nc1 at the first measurement / nc1 at the last >= 100.
2. NCC mismatch reaches 0 (at the last measurement; the first epoch it is 0 and stays 0 is shown).
3. Test accuracy rises in TPT: test_acc at the last measurement minus at the first measurement in
   TPT, in points and in test examples (x num_samples_test).
4. No spike: after the TPT start, eval-mode train accuracy stays >= SPIKE_TRAIN_ACC at every
   measurement and NC1 never rises more than SPIKE_NC1_RISE-fold between consecutive measurements.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # nc_jax.records (no JAX), also when not installed
from nc_jax import records  # noqa: E402

KEPT = ("config.json", "metrics.jsonl", "tpt.json")  # small files only: the checkpoints stay behind
NC1_FALL = 100.0  # claim 1: NC1 at least this many times lower at the end
SPIKE_TRAIN_ACC = 0.99  # ten times the 0.999 threshold's error rate: lower than this in TPT is a spike
SPIKE_NC1_RISE = 3.0  # NC1 rising more than this between two measurements in TPT is a spike


def parse_run(spec: str) -> tuple[int, int, float, int]:
  """'512x4@0.0354' or '512x4@0.0354@1' -> (width, depth, lr, seed); seed 0 when omitted."""
  try:
    shape, lr, *seed = spec.split("@")
    width, depth = (int(v) for v in shape.split("x"))
    if len(seed) > 1:
      raise ValueError
    return width, depth, float(lr), int(seed[0]) if seed else 0
  except ValueError:
    raise SystemExit(f"--runs: cannot read {spec!r}; write WIDTHxDEPTH@LR or WIDTHxDEPTH@LR@SEED, "
                     "e.g. 512x4@0.0354@1") from None


def run_name(width: int, depth: int, lr: float, seed: int) -> str:
  return f"w{width}_d{depth}_lr{lr:g}_s{seed}"


def train(root: pathlib.Path, width: int, depth: int, lr: float, seed: int) -> pathlib.Path:
  """One run of the main job at these values into ROOT/NAME (skipped when ROOT/NAME/wall.json exists)."""
  out = root / run_name(width, depth, lr, seed)
  if (out / "wall.json").exists():
    return out
  with tempfile.TemporaryDirectory(prefix="default_sweep_") as workdir:
    command = [sys.executable, "-m", "nc_jax.train", "--workdir", workdir,
               f"--config.model_options.width={width}", f"--config.model_options.depth={depth}",
               f"--config.lr={lr}", f"--config.seed={seed}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
      print(done.stdout[-3000:], file=sys.stderr)
      raise SystemExit(f"{out.name}: the trainer exited with {done.returncode} (its output above)")
    out.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
      shutil.copy(pathlib.Path(workdir) / name, out / name)
  (out / "wall.json").write_text(json.dumps({"wall_s": round(wall, 1), "command": command[1:3] + command[5:]}) + "\n")
  lines = done.stdout.splitlines()
  print("\n".join(lines[next((i for i, line in enumerate(lines) if line.startswith("summary")), len(lines)):]),
        flush=True)
  return out


def claims(run: list[dict]) -> dict:
  """The four claims of one run's records (see the module docstring); values, then verdicts."""
  first, last = run[0], run[-1]
  start, at_tpt = records.tpt_start(run), records.first_in_tpt(run)
  in_tpt = [r for r in run if start is not None and r["epoch"] >= start]
  rises = [b["nc1"] / a["nc1"] for a, b in zip(in_tpt, in_tpt[1:])]
  zero_from = next((r["epoch"] for i, r in enumerate(run) if all(s["ncc_mismatch"] == 0 for s in run[i:])), None)
  gain = (last["test_acc"] - at_tpt["test_acc"]) if at_tpt else None
  found = {
      "tpt": start, "nc1_first": first["nc1"], "nc1_last": last["nc1"], "nc1_fall": first["nc1"] / last["nc1"],
      "ncc_last": last["ncc_mismatch"], "ncc_zero_from": zero_from,
      "test_at_tpt": at_tpt["test_acc"] if at_tpt else None, "test_last": last["test_acc"],
      "gain_examples": round(gain * last["num_samples_test"]) if at_tpt else None,
      "min_train_in_tpt": min((r["train_acc"] for r in in_tpt), default=None),
      "max_nc1_rise": max(rises, default=None),
  }
  found["ok_nc1"] = found["nc1_fall"] >= NC1_FALL
  found["ok_ncc"] = found["ncc_last"] == 0
  found["ok_test"] = bool(found["gain_examples"] and found["gain_examples"] > 0)
  found["spike"] = bool(in_tpt) and (found["min_train_in_tpt"] < SPIKE_TRAIN_ACC
                                     or (found["max_nc1_rise"] or 0) > SPIKE_NC1_RISE)
  return found


def table(root: pathlib.Path) -> str:
  header = ["| net | lr | seed | TPT from | NC1 first | NC1 last | fall | NCC mismatch (last; 0 from) | "
            "test acc at TPT start -> last (examples of 1000) | min train acc in TPT | max NC1 rise in TPT | "
            "spike | all four | wall s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | ---: |"]
  rows = []
  for out in sorted(root.glob("w*_d*_lr*_s*")):
    if not (out / "wall.json").exists():
      continue
    config, wall = (json.loads((out / name).read_text()) for name in ("config.json", "wall.json"))
    c = claims(records.read(out))
    test = "-" if c["test_at_tpt"] is None else (f"{100 * c['test_at_tpt']:.1f} -> {100 * c['test_last']:.1f} "
                                                 f"({c['gain_examples']:+d})")
    ok = c["ok_nc1"] and c["ok_ncc"] and c["ok_test"] and not c["spike"]
    rows.append(
        f"| {config['model_options']['depth']}x{config['model_options']['width']} | {config['lr']:g} | "
        f"{config['seed']} | {c['tpt'] or '-'} | {c['nc1_first']:.3g} | {c['nc1_last']:.3g} | "
        f"{c['nc1_fall']:.0f}x | {c['ncc_last']:.4f}; {c['ncc_zero_from'] or '-'} | {test} | "
        f"{'-' if c['min_train_in_tpt'] is None else format(c['min_train_in_tpt'], '.4f')} | "
        f"{'-' if c['max_nc1_rise'] is None else format(c['max_nc1_rise'], '.3f')} | "
        f"{'yes' if c['spike'] else 'no'} | {'yes' if ok else 'no'} | {wall['wall_s']:.0f} |")
  note = ("NC1 first/last: at epoch 1 and 350. Test accuracy: at the first measurement in TPT and the last, the "
          "gain in test examples. Spike: train accuracy < 0.99 or NC1 up > 3x between measurements in TPT. "
          "Wall s: one run on 2 CPU cores shared with 4 other jobs (load 2-8), so not a clean timing.")
  return "\n".join(header + rows) + "\n\n" + note + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=("run", "table"))
  parser.add_argument("--root", required=True)
  parser.add_argument("--runs", default="", help="comma-separated WIDTHxDEPTH@LR[@SEED]")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.root)
  if args.action == "run":
    if not args.runs:
      raise SystemExit("run: name the runs with --runs, e.g. --runs 512x3@0.0184,512x4@0.0354")
    for spec in args.runs.split(","):
      width, depth, lr, seed = parse_run(spec)
      print(f"{run_name(width, depth, lr, seed)}", flush=True)
      train(root, width, depth, lr, seed)
  if not root.is_dir():
    raise SystemExit(f"table: {root} is not a folder; give the --root that 'run' wrote into")
  text = table(root)
  (root / "summary.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
