#!/usr/bin/env bash
# GPU readiness in one prepared run of a few minutes: what the CPU-only CI cannot check.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: benchmarks/runs_gpu
#
# On a machine where torch sees CUDA it runs, in order, each step logged to OUT_DIR/gpu_check.log:
#   1. the test suite with MINIDETR_TEST_DEVICE=cuda (tests that take the `device` fixture
#      run on the GPU; the rest, CPU-only by nature, run as usual);
#   2. 200 steps of every variant with --amp bf16 and --amp fp16 on the built-in dataset
#      (--eval_every 1 at the end: the losses must stay finite and an AP line must appear);
#   3. torchrun --nproc_per_node 1 (NCCL) for 50 steps of dn, the DDP code path on a GPU;
#   4. benchmarks/speed.py --device cuda: step time, images/s and the fraction of the GPU's
#      dense peak (MFU) at the tiny and the paper preset, fp32 / bf16 / fp16.
# It stops at the first failing step (set -e) and prints a summary line per step.
# On a machine without CUDA it says so and exits 0, so CI can call it harmlessly.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

if ! "$python" -c "import torch, minidetr" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch and minidetr; activate the project's environment" \
         "(or set PYTHON=...) first" >&2
    exit 1
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device on this machine; nothing to check (exit 0)."
    exit 0
fi

out=${1:-benchmarks/runs_gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
export MINIDETR_DATA=${MINIDETR_DATA:-$out/data}
gpu=$("$python" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check on $gpu, torch $("$python" -c 'import torch; print(torch.__version__)')" | tee -a "$log"

step() {   # step NAME COMMAND...: run, log, and print one summary line with the wall time
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*" >> "$log"
    if "$@" >> "$log" 2>&1; then
        echo "ok   $name ($((SECONDS - start)) s)" | tee -a "$log"
    else
        echo "FAIL $name ($((SECONDS - start)) s): see $log" | tee -a "$log"
        exit 1
    fi
}

step "tests on cuda" env MINIDETR_TEST_DEVICE=cuda "$python" -m pytest -q -x tests

for variant in detr conditional smca dn; do
    for amp in bf16 fp16; do
        step "$variant --amp $amp, 200 steps" "$python" train.py --variant "$variant" --device cuda \
            --amp "$amp" --max_steps 200 --epochs 1 --output_dir "$out/${variant}_$amp"
        # the run must have logged an evaluation with finite numbers
        step "$variant --amp $amp, AP written" "$python" -c "
import json, math, sys
rows = [json.loads(l) for l in open('$out/${variant}_$amp/log.txt') if l.strip()]
last = rows[-1]
assert math.isfinite(last['train_loss']), last['train_loss']
print('train_loss', round(last['train_loss'], 3), 'AP/AP50', last['test_coco_eval_bbox'][:2])"
    done
done

step "torchrun --nproc_per_node 1 (NCCL), dn, 50 steps" "$python" -m torch.distributed.run \
    --nproc_per_node 1 train.py --variant dn --device cuda --max_steps 50 --epochs 1 \
    --output_dir "$out/ddp_dn"

step "speed.py --device cuda" "$python" benchmarks/speed.py --device cuda --results "$out/RESULTS.md"
echo "gpu_check: all steps passed on $gpu; speed table in $out/RESULTS.md, log in $log" | tee -a "$log"
