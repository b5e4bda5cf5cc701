#!/usr/bin/env bash
# The first lent accelerator's one command: throughput rows, population rows, the paper's MNIST/ResNet18 cell,
# metric rows.
#
#   benchmarks/accelerator.sh --mnist DIR [--fashion-mnist DIR] [--budget SECONDS] [--wheels DIR] [--out DIR] [--smoke]
#                             [--only-queue]   (the reproduction queue alone, with the whole budget: a call for a cell)
#
# Runs, in this order, each stage within what is left of --budget (default 540 s, to end inside a
# 10-minute call), and is resumable: a finished stage leaves STAGE.done and is skipped on the next call,
# and the MNIST run resumes from its last checkpoint (it is stopped by SIGTERM, which checkpoints).
# Every stage has a budget (the seconds it needs to start, NEEDS below) and starts only if that much is left:
#   env        jax, the devices, nvidia-smi, benchmarks/bf16_check.py        -> OUT/env.txt
#   train      benchmarks/train.py: ResNet18 on 32x32x3 at batch 128 and 512, bf16, scanned epoch,
#              NC evaluation as a fraction of the epoch, TFLOP/s and MFU       -> BENCHMARKS.md
#   population benchmarks/population.py --case resnet18: the CIFAR ResNet18 lr sweep as populations of K = 25,
#              1, 2, 4, 8, 16 members (vmapped) against sequential runs, compiles included, and the compiled
#              convolutions (grouped or not, which cuDNN call); it plans within its own budget (NEEDS) and
#              skips the K that would not fit, so it is given no more than that  -> BENCHMARKS.md
#   mnist      the reproduction queue (benchmarks/reproduce.py): the paper's reachable cells, the notebook's
#              MNIST/ResNet18 first, then Fashion-MNIST/ResNet18, the VGG11s, the DenseNets, each whole (350
#              epochs, bf16 compute, float32 NC measurement) inside one call or measured not to fit
#              (real MNIST in --mnist, Fashion-MNIST in --fashion-mnist, default DIR/../fashion_mnist)
#                                                                             -> OUT/CELL/, OUT/results.md
#              (it keeps the last RESERVE seconds of the budget for report and metrics)
#   report     python -m nc_jax.report on that run (also on a partial one)    -> OUT/report/
#   metrics    benchmarks/metrics.py at every size, without the host-CPU baselines -> BENCHMARKS.md
# OUT is results/accelerator (results/accelerator-smoke with --smoke, which runs every stage at sizes
# that take seconds on a CPU: the rehearsal), or --out DIR. Nothing is fetched from the network. A machine
# without ml_collections (or tensorflow-datasets, mnist1d) gets them from --wheels DIR (default wheels/),
# made where pip works: see README, "On an accelerator".
# Exit status: 0 every stage done; 3 some stage finished, or the MNIST run saved a new checkpoint, in this call
# and others remain: run the same command again to go on; 4 no stage can start within --budget, or the stages
# that started all ran out of time without finishing or checkpointing (it names a larger budget; rerunning the
# same command would never progress); 1 a stage failed (its log is named) or OUT is full; 2 bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 only_queue=0 budget=540 mnist=${NC_JAX_MNIST_DIR:-} fashion= wheels=wheels out=
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --only-queue) only_queue=1 ;;
    --budget|--mnist|--fashion-mnist|--wheels|--out)
      if [ $# -lt 2 ]; then echo "accelerator.sh: $1 needs a value (see the comment at the top of $0)"; exit 2; fi
      case "$1" in --budget) budget=$2 ;; --mnist) mnist=$2 ;; --fashion-mnist) fashion=$2 ;; --wheels) wheels=$2 ;;
                   --out) out=$2 ;; esac
      shift ;;
    *) echo "accelerator.sh: unknown argument $1 (see the comment at the top of $0)"; exit 2 ;;
  esac
  shift
done
if ! [[ "$budget" =~ ^[0-9]{1,7}$ ]]; then  # bash's integers overflow past 18 digits; 10^7 s is 115 days
  echo "accelerator.sh: --budget $budget: must be a whole number of seconds (at most 7 digits), e.g. --budget 540"; exit 2
fi
if [ -z "$mnist" ] || [ ! -f "$mnist/train-images-idx3-ubyte.gz" ]; then
  echo "accelerator.sh: --mnist DIR must hold the four MNIST IDX files (train-images-idx3-ubyte.gz, ...); got '$mnist'"
  exit 2
fi

if [ -z "$out" ]; then out=results/accelerator; [ $smoke = 1 ] && out=results/accelerator-smoke; fi
if ! mkdir -p "$out" 2>/dev/null || [ ! -w "$out" ]; then
  echo "accelerator.sh: cannot write to $out; pass a writable --out DIR"; exit 2
fi
# full: true when OUT cannot take a small write (a full disk): then every log would be empty and every stage fail
full() {
  local probe="$out/.space_probe.$$"
  if head -c 65536 /dev/zero 2>/dev/null >"$probe"; then rm -f "$probe"; return 1; fi
  rm -f "$probe" 2>/dev/null; return 0
}
full_exit() {
  echo "accelerator.sh: $out is full (a 64 KiB write fails there): free space on it or pass another --out DIR," \
       "then run the same command again (finished stages and checkpoints are kept)"
  exit 1
}
full && full_exit

# Seconds each stage needs to start (its budget); the MNIST run also leaves RESERVE seconds for the stages after it.
STAGES=(env train population mnist report metrics)
if [ $smoke = 1 ]; then NEEDS=(30 30 90 60 15 10); else NEEDS=(60 150 240 60 15 30); fi
RESERVE=75
if [ $only_queue = 1 ]; then STAGES=(mnist) NEEDS=(60) RESERVE=15; fi
# need NAME: the seconds of budget NAME needs to start (the MNIST run's own need plus the reserve)
need() {
  local i
  for i in "${!STAGES[@]}"; do
    if [ "${STAGES[$i]}" = "$1" ]; then
      if [ "$1" = mnist ]; then echo $(( NEEDS[i] + RESERVE )); else echo "${NEEDS[$i]}"; fi
    fi
  done
}
# The stages still to do, and the smallest budget that lets one of them start. The report needs the run's
# metrics.jsonl (a later call, once mnist has measured an epoch), so it counts only when that exists.
workdir=$out/work/mnist_resnet18  # the queue's first cell: the report stage draws it, finished or not
[ -n "$fashion" ] || fashion=$(dirname "$mnist")/fashion_mnist
pending=() smallest=
for name in "${STAGES[@]}"; do
  [ -f "$out/$name.done" ] && continue
  [ "$name" = report ] && [ ! -f "$workdir/metrics.jsonl" ] && [ ! -f "$out/mnist.done" ] && continue
  pending+=("$name")
  n=$(need "$name")
  if [ -z "$smallest" ] || [ "$n" -lt "$smallest" ]; then smallest=$n; fi
done
if [ ${#pending[@]} = 0 ] && [ -f "$out/report.done" ]; then
  echo "accelerator.sh: every stage is done in $out (remove $out/STAGE.done to run a stage again)"; exit 0
fi
needs_line() { local s=""; for name in "${pending[@]}"; do s+="$name $(need "$name")s, "; done; echo "${s%, }"; }
if [ -n "$smallest" ] && [ "$budget" -lt "$smallest" ]; then
  echo "accelerator.sh: --budget ${budget}s is too small for any stage left ($(needs_line)): no stage can start," \
       "so rerunning this command would never progress; rerun with --budget $smallest or more"
  exit 4
fi

start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { echo "[accelerator $(( $(date +%s) - start ))s] $*" | tee -a "$out/progress.log" 2>/dev/null; }
# queue_progress: the newest checkpoint epochs of the queue's cells (OUT/work/CELL), summed (0 if none): what a
# queue stopped by its time limit must have advanced (the queue says so itself when it exits on its own)
queue_progress() {
  local total=0 newest e cell
  for cell in "$out"/work/*/; do
    newest=0
    for e in "$cell"checkpoints/*; do
      e=${e##*/}
      [[ "$e" =~ ^[0-9]{1,9}$ ]] && [ "$((10#$e))" -gt "$newest" ] && newest=$((10#$e))
    done
    total=$((total + newest))
  done
  echo "$total"
}

python=${PYTHON:-python3}
if compgen -G "$wheels/*.whl" >/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/nc_jax_site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/nc_jax_site${PYTHONPATH:+:$PYTHONPATH} || { say "installing $wheels/*.whl failed"; exit 1; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

ran=() failed=() advanced=0 timed_out=()
# stage NAME COMMAND...: runs COMMAND within the time left (SIGTERM at the end) if need(NAME) is left,
# logs to OUT/NAME.log; a timeout (the budget ran out: 124) is not a failure, any other non-zero exit is
stage() {
  local name=$1; shift
  [ -n "$(need "$name")" ] || return 0  # not a stage of this call (--only-queue)
  if [ -f "$out/$name.done" ]; then say "$name: done in an earlier call, skipped"; return 0; fi
  local remaining needed; remaining=$(left); needed=$(need "$name")
  if [ "$remaining" -lt "$needed" ]; then say "$name: skipped, ${remaining}s left of the budget, needs ${needed}s"; return 1; fi
  say "$name: starting (${remaining}s left)"
  ran+=("$name")
  local limit=$remaining before
  [ "$name" = mnist ] && limit=$(( remaining - RESERVE ))
  [ "$name" = population ] && limit=$needed  # it plans within its budget (its --budget is 30 s less)
  before=$(queue_progress)
  timeout -s TERM -k 30 "$limit" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then touch "$out/$name.done" && advanced=1; say "$name: finished"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    # progress only if a queue cell checkpointed a newer epoch: other stages restart from scratch next call
    if [ "$name" = mnist ] && [ "$(queue_progress)" -gt "$before" ]; then advanced=1; fi
    timed_out+=("$name (${limit}s)"); say "$name: stopped at its time limit (log: $out/$name.log)"
  elif [ "$name" = mnist ] && { [ $rc = 3 ] || [ $rc = 4 ]; }; then
    # the queue's own verdict: 3 cells left and it advanced (a cell finished, was measured not to fit, or
    # checkpointed), 4 cells left and nothing advanced
    [ $rc = 3 ] && advanced=1
    timed_out+=("$name (${limit}s)"); say "$name: cells left (exit $rc; log: $out/$name.log)"
  else
    full && full_exit
    failed+=("$name (exit $rc, log: $out/$name.log)"); say "$name: exit $rc (log: $out/$name.log)"
  fi
  tail -n 15 "$out/$name.log"
  return $rc
}

# env: informational (a non-finite bf16 result is recorded, not a failure); the device kind for the MFU column
stage env bash -c "{ $python -c \"import jax; print('jax', jax.__version__); print(jax.devices()); \
print('device_kind:', jax.devices()[0].device_kind)\"; nvidia-smi 2>/dev/null; \
$python benchmarks/bf16_check.py || echo 'bf16 check: not finite (above)'; } >'$out/env.txt' 2>&1"
grep "bf16 ResNet18" "$out/env.txt" 2>/dev/null | tee -a "$out/progress.log"
kind=$(sed -n 's/^device_kind: //p' "$out/env.txt" 2>/dev/null | head -n 1)
peak=0
case "$kind" in *H100*|*H200*) peak=989 ;; *v5*lite*|*v5e*) peak=197 ;; *v4*) peak=275 ;; esac
say "device: ${kind:-unknown} (bf16 dense peak ${peak} TFLOP/s; 0 = unknown)"

append=()
[ $smoke = 1 ] && append=(--no-append)
if [ $smoke = 1 ]; then
  stage train $python benchmarks/train.py --cases mlp --num-images 512 --batch-sizes 32,64 --dtype bfloat16 \
    --repeats 1 --no-torch "${append[@]}"
else
  stage train $python benchmarks/train.py --cases resnet18 --batch-sizes 128,512 --dtype bfloat16 \
    --peak-tflops "$peak" --repeats 3 --no-torch
fi
# population: synthetic CIFAR-shaped images (nothing read from disk); the smoke variant rehearses it on a CPU
if [ $smoke = 1 ]; then
  stage population $python benchmarks/population.py --case resnet18 --smoke --ks 2 \
    --budget $(( $(need population) - 30 )) --out ''
else
  stage population $python benchmarks/population.py --case resnet18 --num-images 25000 \
    --budget $(( $(need population) - 30 )) --out BENCHMARKS.md
fi
# the queue gets all but the last RESERVE seconds (report and metric rows), and plans within 20 s less; a cell
# the budget interrupts is checkpointed (SIGTERM) and resumes where OUT/work/CELL is still there
queue=(benchmarks/reproduce.py --mnist "$mnist" --fashion-mnist "$fashion" --out "$out" --call-seconds "$budget")
[ $smoke = 1 ] && queue+=(--smoke --cells mnist_resnet18)
stage mnist $python "${queue[@]}" --budget $(( $(left) - RESERVE - 20 ))
if [ -f "$workdir/metrics.jsonl" ]; then
  rm -f "$out/report.done"
  stage report $python -m nc_jax.report "$workdir" --out "$out/report"
  [ -f "$out/mnist.done" ] || rm -f "$out/report.done"  # a partial run's report is redone next time
fi
if [ $smoke = 1 ]; then
  stage metrics $python benchmarks/metrics.py --sizes small --no-baselines --repeats 1 "${append[@]}"
else
  stage metrics $python benchmarks/metrics.py --sizes all --no-baselines --repeats 3 --breakdown
fi
say "end; stages done: $(cd "$out" && ls *.done 2>/dev/null | tr '\n' ' ')"
if [ ${#failed[@]} -gt 0 ]; then
  say "failed: ${failed[*]}; fix the cause, then run the same command again"; exit 1
fi
missing=()
for name in "${STAGES[@]}"; do [ -f "$out/$name.done" ] || missing+=("$name"); done
if [ ${#missing[@]} = 0 ]; then exit 0; fi
if [ $advanced = 1 ]; then
  say "not finished: ${missing[*]}; run the same command again to go on"; exit 3
fi
if [ ${#ran[@]} -gt 0 ]; then  # every stage that started ran out of time having finished and saved nothing
  say "no progress within --budget ${budget}s: ${timed_out[*]} ran out of time without finishing or saving a" \
      "checkpoint, so rerunning this command would never progress; rerun with --budget $(( budget * 2 )) or more"
  exit 4
fi
say "no stage could start within --budget ${budget}s (not finished: ${missing[*]}); rerun with --budget" \
    "$smallest or more"
exit 4
