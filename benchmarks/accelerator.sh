#!/usr/bin/env bash
# The first lent accelerator's one command: throughput rows, the paper's MNIST/ResNet18 cell, metric rows.
#
#   benchmarks/accelerator.sh --mnist DIR [--budget SECONDS] [--wheels DIR] [--smoke]
#
# Runs, in this order, each stage within what is left of --budget (default 540 s, to end inside a
# 10-minute call), and is resumable: a finished stage leaves STAGE.done and is skipped on the next call,
# and the MNIST run resumes from its last checkpoint (it is stopped by SIGTERM, which checkpoints).
#   env        jax, the devices, nvidia-smi, benchmarks/bf16_check.py        -> OUT/env.txt
#   train      benchmarks/train.py: ResNet18 on 32x32x3 at batch 128 and 512, bf16, scanned epoch,
#              NC evaluation as a fraction of the epoch, TFLOP/s and MFU       -> BENCHMARKS.md
#   mnist      the notebook's cell: MNIST (real, IDX files in --mnist), ResNet18, lr 0.0679, the paper's
#              350-epoch protocol in float32 (the notebook's precision; XLA's default conv precision)
#                                                                             -> OUT/mnist_resnet18/
#   report     python -m nc_jax.report on that run (also on a partial one)    -> OUT/report/
#   metrics    benchmarks/metrics.py at every size, without the host-CPU baselines -> BENCHMARKS.md
# OUT is results/accelerator (results/accelerator-smoke with --smoke, which runs every stage at sizes
# that take seconds on a CPU: the rehearsal). Nothing is fetched from the network. A machine without
# ml_collections (or tensorflow-datasets, mnist1d) gets them from --wheels DIR (default wheels/), made
# where pip works: see README, "On an accelerator". Exit status: 0 when every stage is done, 3 when some
# are not (the budget ran out: run it again), 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 budget=540 mnist=${NC_JAX_MNIST_DIR:-} wheels=wheels
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --budget|--mnist|--wheels)
      if [ $# -lt 2 ]; then echo "accelerator.sh: $1 needs a value (see the comment at the top of $0)"; exit 2; fi
      case "$1" in --budget) budget=$2 ;; --mnist) mnist=$2 ;; --wheels) wheels=$2 ;; esac
      shift ;;
    *) echo "accelerator.sh: unknown argument $1 (see the comment at the top of $0)"; exit 2 ;;
  esac
  shift
done
if ! [[ "$budget" =~ ^[0-9]+$ ]]; then
  echo "accelerator.sh: --budget $budget: must be a whole number of seconds, e.g. --budget 540"; exit 2
fi
if [ -z "$mnist" ] || [ ! -f "$mnist/train-images-idx3-ubyte.gz" ]; then
  echo "accelerator.sh: --mnist DIR must hold the four MNIST IDX files (train-images-idx3-ubyte.gz, ...); got '$mnist'"
  exit 2
fi

out=results/accelerator
[ $smoke = 1 ] && out=results/accelerator-smoke
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { echo "[accelerator $(( $(date +%s) - start ))s] $*" | tee -a "$out/progress.log"; }

python=${PYTHON:-python3}
if compgen -G "$wheels/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/nc_jax_site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/nc_jax_site${PYTHONPATH:+:$PYTHONPATH} || { say "installing $wheels/*.whl failed"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# stage NAME SECONDS_NEEDED COMMAND...: runs COMMAND within the time left (SIGTERM at the end), logs to OUT/NAME.log
stage() {
  local name=$1 need=$2; shift 2
  if [ -f "$out/$name.done" ]; then say "$name: done in an earlier call, skipped"; return 0; fi
  local remaining; remaining=$(left)
  if [ "$remaining" -lt "$need" ]; then say "$name: skipped, ${remaining}s left of the budget, needs ${need}s"; return 1; fi
  say "$name: starting (${remaining}s left)"
  timeout -s TERM -k 30 "$remaining" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then touch "$out/$name.done"; say "$name: finished"; else say "$name: exit $rc (log: $out/$name.log)"; fi
  tail -n 15 "$out/$name.log"
  return $rc
}

append=() peak=0
[ $smoke = 1 ] && append=(--no-append)
{ $python -c "import jax; print('jax', jax.__version__); print(jax.devices())"; nvidia-smi 2>/dev/null
  $python benchmarks/bf16_check.py; } >"$out/env.txt" 2>&1
grep "bf16 ResNet18" "$out/env.txt" | tee -a "$out/progress.log"
kind=$($python -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null)
case "$kind" in *H100*|*H200*) peak=989 ;; *v5*lite*|*v5e*) peak=197 ;; *v4*) peak=275 ;; esac
say "device: $kind (bf16 dense peak ${peak} TFLOP/s; 0 = unknown)"

workdir=$out/mnist_resnet18
if [ $smoke = 1 ]; then
  stage train 30 $python benchmarks/train.py --cases mlp --num-images 512 --batch-sizes 32,64 --dtype bfloat16 \
    --repeats 1 --no-torch "${append[@]}"
  run_config=(--config configs/paper/mnist_resnet18.py:smoke --config.per_class=20 --config.num_epochs=4
              --config.epoch_loop=scan)
else
  stage train 150 $python benchmarks/train.py --cases resnet18 --batch-sizes 128,512 --dtype bfloat16 \
    --peak-tflops "$peak" --repeats 3 --no-torch
  run_config=(--config configs/paper/mnist_resnet18.py)
fi
# the run gets all but the last 75 s (report and metric rows); SIGTERM checkpoints it, a rerun resumes
budget_before=$budget; budget=$(( budget - 75 ))
stage mnist 60 $python -m nc_jax.train "${run_config[@]}" --config.data_source=idx --config.data_dir="$mnist" \
  --workdir "$workdir"
budget=$budget_before
if [ -f "$workdir/metrics.jsonl" ]; then
  rm -f "$out/report.done"
  stage report 15 $python -m nc_jax.report "$workdir" --out "$out/report"
  [ -f "$out/mnist.done" ] || rm -f "$out/report.done"  # a partial run's report is redone next time
fi
if [ $smoke = 1 ]; then
  stage metrics 10 $python benchmarks/metrics.py --sizes small --no-baselines --repeats 1 "${append[@]}"
else
  stage metrics 30 $python benchmarks/metrics.py --sizes all --no-baselines --repeats 3
fi
say "end; stages done: $(cd "$out" && ls *.done 2>/dev/null | tr '\n' ' ')"
for name in train mnist report metrics; do
  if [ ! -f "$out/$name.done" ]; then say "not finished: $name; run the same command again to go on"; exit 3; fi
done
