#!/usr/bin/env bash
# The docs/finetune.md worked example, end to end, with the wall time of each stage:
# pretrain a small transformer on stdlib, score its greedy tool calls on held-out prompts, SFT it
# with LoRA on examples/toolcall.py data, score again, merge the adapters.
#   bash examples/finetune_demo.sh [WORKDIR]      (default /tmp/slmlab-finetune)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/slmlab-finetune}
BASE_STEPS=${BASE_STEPS:-300}
SFT_STEPS=${SFT_STEPS:-800}
# One thread: these models are small, and on a 2-core machine shared with other jobs two OpenMP
# threads oversubscribe the cores (greedy decode measured ~100x slower, 13 s vs 0.1 s per 64 tokens).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source examples/demo_stages.sh

stage "data"
python examples/toolcall.py make --out "$W/toolcall"

stage "pretrain on stdlib ($BASE_STEPS steps)"
# optim.name=adamw: the optimizer docs/finetune.md's numbers were measured with (the default is now Muon)
python train.py --arch transformer --data stdlib --out "$W/base" --force optim.name=adamw model.vocab_size=1024 \
    model.d_model=128 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 train.phases=[] train.seq_len=256 train.batch_size=16 \
    train.steps="$BASE_STEPS" train.eval_every=2000 train.ckpt_every=0 logging.progress=false | tail -n 3

stage "before: greedy tool calls of the pretrained model"
score_tool_calls "$W/base" before 96

stage "SFT with LoRA ($SFT_STEPS steps)"
python train.py --data "$W/toolcall/train.jsonl" --out "$W/sft" --force train.init_from="$W/base" \
    model.vocab_size=1024 model.d_model=128 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 --arch transformer \
    train.lora.r=16 train.lora.alpha=32 optim.lr=1e-2 train.phases=[] train.seq_len=128 train.batch_size=16 \
    train.steps="$SFT_STEPS" train.warmup_steps=20 train.eval_every=200 train.ckpt_every=0 \
    train.sft_eval_examples=8 logging.progress=false | grep -E "LoRA|val loss|run saved"
python train.py --dry-run --arch transformer train.init_from="$W/base" model.vocab_size=1024 model.d_model=128 \
    model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 train.lora.r=16 train.phases=[] train.seq_len=128 \
    train.batch_size=16 | grep -E "^LoRA|weights"

stage "after: greedy tool calls of the fine-tuned model"
score_tool_calls "$W/sft" after 96

stage "merge the adapters into a plain run"
python convert.py --merge-lora "$W/sft" --out "$W/merged" --force
stage "done"
