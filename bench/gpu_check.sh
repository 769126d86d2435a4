#!/usr/bin/env bash
# Every GPU check of issue 15 in ONE device call under one time budget, prepared so a session with a
# lent GPU spends its minutes running them, not writing them. A task's device time is 15 minutes in
# all, a machine start included (a minute or more), so the first call gets about 8 minutes and a
# second, shorter call stays possible for a rerun after a fix. From the repo root, on the GPU machine:
#
#   bash bench/gpu_check.sh                      # all steps in order, within GPU_CHECK_BUDGET s (default 470)
#   bash bench/gpu_check.sh kernels decode       # named steps only (a second call)
#   GPU_CHECK_BUDGET=200 bash bench/gpu_check.sh suite
#
# Steps, in priority order (each gets min(its own cap, the time left); one with under 20 s left is
# skipped and says so):
#   env       nvidia-smi, versions
#   suite     the test suite with CUDA visible (kernel tests compile the real kernels; tests/test_cuda.py
#             runs), 12 workers, then what failed once more alone (a clash of workers or a real failure)
#   torchrun  train.py under torchrun --nproc_per_node 1, DDP and FSDP2 on NCCL, a few steps
#   kernels   python -m kernels.bench at the issue's shapes (T 2048/8192, W 256/1024/full, hd 64)
#   train     bench/gpu.py env + train: 124m transformer/hybrid, bf16, eager/compiled/transformers
#   decode    bench/gpu.py decode: batch 1 and 8, eager/compiled/CUDA graph/transformers generate
#   bands     (named only, not in the default run) bench/gpu.py train --band 256: the 124m transformer
#             with every attention layer a 256 window: our band kernel against flex_attention and
#             SDPA with a band mask, eager and compiled (whether model.kernels=auto should pick flex)
#
# Before the call, here: `bash bench/gpu_wheels.sh` (pure-Python test dependencies the GPU image
# lacks, into .whl/; name .whl in the call's carry). Logs: one file per step plus summary.txt in
# $OUT (./gpu_out without $OUT): 7 files, under the 8 a call brings back. The summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
ALL=(env suite torchrun kernels train decode)
declare -A CAP=([env]=20 [suite]=150 [torchrun]=60 [kernels]=100 [train]=170 [decode]=100 [bands]=170)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${ALL[@]}")
for s in "${steps[@]}"; do
    [ -n "${CAP[$s]:-}" ] || { echo "unknown step '$s'; steps: ${ALL[*]} bands" >&2; exit 2; }
done
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-470}))
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=()

run() {  # run STEP COMMAND...: the command under the step's limit, appended to $OUT/STEP.log
    local name=$1
    shift
    local limit=$(( DEADLINE - SECONDS < CAP[$name] ? DEADLINE - SECONDS : CAP[$name] ))
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped, ${limit} s of the budget left (${*:1:3} ...)" | tee -a "$OUT/$name.log"
        return 124
    fi
    local t0=$SECONDS
    echo "=== $name (limit ${limit} s): $*" | tee -a "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    CAP[$name]=$(( CAP[$name] - (SECONDS - t0) ))  # a step's later commands share its cap
    echo "=== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
    return "$rc"
}

step_env() {
    run env bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
        python3 -c "import torch, triton, transformers, numpy; print(torch.__version__, torch.version.cuda,
        triton.__version__, transformers.__version__, numpy.__version__, torch.cuda.get_device_name())"'
}

step_suite() {
    local per_test=()
    python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
    run suite python3 -m pytest -q -n 12 -rfEs --maxfail 40 "${per_test[@]}"
    grep -qE "[0-9]+ (failed|error)" "$OUT/suite.log" && run suite python3 -m pytest -q --lf -rfE "${per_test[@]}"
}

step_torchrun() {
    # compile off: the train step times compiled training; this checks the process group and wrapping.
    local ov=(model.d_model=128 model.n_layers=3 model.n_heads=4 model.n_kv_heads=2 train.steps=6 train.eval_every=3
        train.log_every=1 train.sample_tokens=8 train.eval_tokens=2048 train.device=cuda "train.phases=[]"
        train.seq_len=128 train.batch_size=8 train.compile=false logging.progress=false)
    run torchrun torchrun --standalone --nproc_per_node 1 train.py --arch hybrid --out /tmp/gpu_ddp --force "${ov[@]}"
    run torchrun torchrun --standalone --nproc_per_node 1 train.py --arch hybrid --out /tmp/gpu_fsdp --force "${ov[@]}" \
        train.parallel=fsdp
}

step_kernels() {
    run kernels python3 -m kernels.bench --head-dims 64 --warmup 3 --iters 10
}

step_train() {
    run train python3 bench/gpu.py --only env --only train --rounds 3
}

step_decode() {
    run decode python3 bench/gpu.py --only decode --rounds 3
}

step_bands() {
    run bands python3 bench/gpu.py --only train --archs transformer --band 256 --rounds 3
}

for s in "${steps[@]}"; do
    "step_$s"
    summary+=("$(grep -E '^=== '"$s"': (rc|skipped)' "$OUT/$s.log" | cut -c5- | paste -sd ';' -)")
done
{
    echo "=== summary ($OUT, $SECONDS s of ${GPU_CHECK_BUDGET:-470})"
    printf '%s\n' "${summary[@]}"
    echo "--- suite"; grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/suite.log" 2>/dev/null | tail -n 25
    echo "--- kernels targets"; grep -A6 "^targets" "$OUT/kernels.log" 2>/dev/null
    echo "--- train, decode"; grep -hE "^\||^## |^measured|^datasheet|^[A-Z].*SMs" "$OUT/train.log" "$OUT/decode.log" "$OUT/bands.log" \
        2>/dev/null
} | tee "$OUT/summary.txt"
