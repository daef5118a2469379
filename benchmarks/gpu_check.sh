#!/usr/bin/env bash
# GPU readiness in one prepared run of a few minutes: what the CPU-only CI cannot check.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: benchmarks/runs_gpu
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_STEPS=4 bash benchmarks/gpu_check.sh out/gpu_dry   # dry run on a CPU
#
# On a machine where torch sees CUDA it runs, each step logged to OUT_DIR/gpu_check.log:
#   1. 200 steps of every variant with --amp bf16 and --amp fp16 on the built-in dataset,
#      all ten runs at once on the one GPU (they only have to finish, not be timed): the
#      losses must stay finite and an AP line must be logged;
#   2. torchrun --nproc_per_node 1 (NCCL) for 50 steps of dn, the DDP code path on a GPU,
#      beside step 1;
#   3. benchmarks/speed.py on the GPU alone: step time, images/s and the fraction of the
#      GPU's dense peak (MFU) at the tiny and the paper preset, fp32 / bf16 / fp16;
#   4. the test suite with MINIDETR_TEST_DEVICE=cuda (tests that take the `device` fixture
#      run on the GPU; the rest, CPU-only by nature, run as usual; pytest-xdist spreads them
#      over the machine's cores when it is installed).
# It prints a summary line per step and ends with the count of failed steps (its exit code).
# On a machine without CUDA it says so and exits 0, so CI can call it harmlessly.
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (no tests, no speed table) with
# GPU_CHECK_STEPS steps per run: a dry run of the script itself before spending GPU time.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
device=${GPU_CHECK_DEVICE:-cuda}
steps=${GPU_CHECK_STEPS:-200}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"      # minidetr from this checkout

if ! "$python" -c "import torch, minidetr" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch and minidetr; activate the project's environment" \
         "(or set PYTHON=...) first" >&2
    exit 1
fi
if [ "$device" = cuda ] && ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device on this machine; nothing to check (exit 0)."
    exit 0
fi

out=${1:-benchmarks/runs_gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
export MINIDETR_DATA=${MINIDETR_DATA:-$out/data}
name=$("$python" -c "import torch; print(torch.cuda.get_device_name(0) if '$device' == 'cuda' else 'cpu (dry run)')")
echo "gpu_check on $name, torch $("$python" -c 'import torch; print(torch.__version__)'), $(nproc) cores" | tee -a "$log"
failed=0

report() {   # report NAME START_SECONDS STATUS: one summary line
    if [ "$3" -eq 0 ]; then echo "ok   $1 ($((SECONDS - $2)) s)" | tee -a "$log"
    else echo "FAIL $1 ($((SECONDS - $2)) s, exit $3): see $log" | tee -a "$log"; failed=$((failed + 1)); fi
}
step() {     # step NAME COMMAND...: run in the foreground, log, report
    local name=$1 start=$SECONDS; shift
    echo "== $name: $*" >> "$log"
    "$@" >> "$log" 2>&1
    report "$name" "$start" $?
}

# the dataset once, before several runs would race to write it
step "built-in dataset" "$python" -c "from minidetr.config import Config; from minidetr.shapes import make_shapes_dataset; c = Config.for_variant('dn', 'tiny'); make_shapes_dataset(num_train=c.shapes_train, num_val=c.shapes_val)"

# 1 and 2 at once: each run in the background with its own log, then checked in turn
declare -A pids
start=$SECONDS
for variant in detr conditional smca dn dab; do
    for amp in bf16 fp16; do
        run="${variant}_$amp"
        OMP_NUM_THREADS=1 "$python" train.py --variant "$variant" --device "$device" --amp "$amp" \
            --max_steps "$steps" --epochs 1 --output_dir "$out/$run" > "$out/$run.log" 2>&1 &
        pids[$run]=$!
    done
done
OMP_NUM_THREADS=1 "$python" -m torch.distributed.run --nproc_per_node 1 train.py --variant dn \
    --device "$device" --max_steps 50 --epochs 1 --output_dir "$out/ddp_dn" > "$out/ddp_dn.log" 2>&1 &
pids[ddp_dn]=$!
for run in "${!pids[@]}"; do
    wait "${pids[$run]}"
    status=$?
    cat "$out/$run.log" >> "$log"
    if [ $status -eq 0 ] && [ "$run" != ddp_dn ]; then    # a finished run must have logged finite numbers
        "$python" -c "
import json, math
rows = [json.loads(l) for l in open('$out/$run/log.txt') if l.strip()]
last = rows[-1]
assert math.isfinite(last['train_loss']), last['train_loss']
print('$run: train_loss', round(last['train_loss'], 3), 'AP/AP50', [round(x, 3) for x in last['test_coco_eval_bbox'][:2]])" 2>&1 | tee -a "$log"
        status=${PIPESTATUS[0]}
    fi
    if [ "$run" = ddp_dn ]; then label="torchrun --nproc_per_node 1, dn, 50 steps"
    else label="$run, $steps steps, AP logged"; fi
    report "$label" "$start" "$status"
done

if [ "$device" = cuda ]; then   # last, with the GPU to itself
    step "speed.py --device cuda" "$python" benchmarks/speed.py --device cuda --iters 10 \
        --results "$out/RESULTS.md"
    cp benchmarks/speed.json "$out/speed.json" 2>/dev/null
    # the suite last: the longest step, and the one a GPU is least likely to change;
    # -v names each test as it ends, so a run cut short still says which ones failed
    xdist=()
    "$python" -c "import xdist" 2>/dev/null && xdist=(-n 8)
    step "tests on cuda" env MINIDETR_TEST_DEVICE=cuda OMP_NUM_THREADS=2 "$python" -m pytest -v -rf "${xdist[@]}" tests
fi
echo "gpu_check: $failed failed step(s) on $name; log in $log" | tee -a "$log"
exit $failed
