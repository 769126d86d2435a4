#!/usr/bin/env bash
# The GPU checks in three device calls, prepared so a session with a lent GPU spends its minutes on
# running them, not on writing them. From the repo root, on the GPU machine:
#
#   bash bench/gpu_check.sh a   # env, the test suite with CUDA visible, kernels.bench, torchrun DDP/FSDP2
#   bash bench/gpu_check.sh b   # bench/gpu.py env + train: 124m transformer/hybrid, bf16, eager/compiled/transformers
#   bash bench/gpu_check.sh c   # bench/gpu.py decode: batch 1 and 8, eager/compiled/CUDA graph/transformers generate
#
# Before the first call, here: `bash bench/gpu_wheels.sh` (pure-Python test dependencies the GPU
# image lacks, into .whl/; carry it). Logs: one file per step in $OUT (./gpu_out without $OUT);
# the summary is printed last. Each step has its own time limit, so one hang cannot eat the call.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    a|b|c) ;;
    *) echo "usage: bash bench/gpu_check.sh a|b|c" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=()
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $OUT/NAME.log, keep its last line
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    summary+=("$name: rc $rc in $((SECONDS - t0)) s: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-160)")
}

part_a() {
    step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
        python3 -c "import torch, triton, transformers, numpy; print(torch.__version__, torch.version.cuda,
        triton.__version__, transformers.__version__, numpy.__version__, torch.cuda.get_device_name())"'
    # The suite: CUDA visible, so tests/conftest.py leaves TRITON_INTERPRET unset and the kernel tests
    # compile the real kernels; tests/test_cuda.py runs. Spread over 8 workers (the torchrun tests use
    # distinct ports), then whatever failed once more alone, to tell a parallelism clash from a real failure.
    step suite 330 python3 -m pytest -q -n 8 -rs --maxfail 30
    grep -q " failed" "$OUT/suite.log" && step suite_rerun 120 python3 -m pytest -q --lf -rs
    step kernels 240 python3 -m kernels.bench --iters 20
    local ov="model.d_model=128 model.n_layers=3 model.n_heads=4 model.n_kv_heads=2 train.steps=6 train.eval_every=3
        train.log_every=1 train.sample_tokens=8 train.eval_tokens=2048 train.device=cuda train.phases=[]
        train.seq_len=128 train.batch_size=8 logging.progress=false"
    # shellcheck disable=SC2086
    step ddp 120 torchrun --standalone --nproc_per_node 1 train.py --arch hybrid --out /tmp/gpu_ddp --force $ov
    # shellcheck disable=SC2086
    step fsdp 120 torchrun --standalone --nproc_per_node 1 train.py --arch hybrid --out /tmp/gpu_fsdp --force $ov \
        train.parallel=fsdp
}

part_b() {
    step train 560 python3 bench/gpu.py --only env --only train
}

part_c() {
    step decode 560 python3 bench/gpu.py --only decode
}

"part_$1"
echo
echo "=== summary ($OUT)"
printf '%s\n' "${summary[@]}"
