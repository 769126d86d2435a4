#!/usr/bin/env bash
# The docs/finetune.md recipe on an imported model: build a tiny random-weight Llama as a transformers
# folder (examples/make_tiny_llama.py: its own BPE and Llama-3-style chat template, nothing downloaded),
# import it, score its greedy tool calls on held-out prompts, SFT it with LoRA plus three added tokens
# on examples/toolcall.py data, score again, merge the adapters, export back to transformers and load it.
#   bash examples/finetune_llama_demo.sh [WORKDIR]      (default /tmp/slmlab-finetune-llama)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/slmlab-finetune-llama}
SFT_STEPS=${SFT_STEPS:-800}
LR=${LR:-3e-3}
# One thread: see examples/finetune_demo.sh (two oversubscribe a shared 2-core machine).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ADDED='["<think>","</think>","TOOL_USE["]'
source examples/demo_stages.sh

stage "data"
python examples/toolcall.py make --out "$W/toolcall"

stage "a tiny random Llama as a transformers folder"
python examples/make_tiny_llama.py --out "$W/hf"

stage "import it (convert.py --from-hf)"
python convert.py --from-hf "$W/hf" --out "$W/base" --force

stage "before: greedy tool calls of the imported model"
score_tool_calls "$W/base" before 80

stage "SFT with LoRA and added tokens ($SFT_STEPS steps)"
# --config keeps the imported model's shape; data.tokenizer the Llama's own BPE and chat template.
python train.py --config "$W/base/config.yaml" --data "$W/toolcall/train.jsonl" --out "$W/sft" --force \
    train.init_from="$W/base" data.tokenizer="$W/base" data.added_tokens="$ADDED" \
    train.lora.r=16 train.lora.alpha=32 optim.lr="$LR" train.phases=[] train.seq_len=128 train.batch_size=16 \
    train.steps="$SFT_STEPS" train.warmup_steps=20 train.eval_every=200 train.ckpt_every=0 \
    train.sft_eval_examples=8 logging.progress=false | grep -E "added_tokens|LoRA|val loss|run saved"

stage "after: greedy tool calls of the fine-tuned model"
score_tool_calls "$W/sft" after 80

stage "merge the adapters, export to transformers, load it there"
python convert.py --merge-lora "$W/sft" --out "$W/merged" --force
python convert.py --run "$W/merged" --to hf --out "$W/hf-tuned" --force
python - "$W/hf-tuned" "$W/toolcall/test.jsonl" <<'PY'
import json
import sys

import transformers

folder, test = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
tok = transformers.AutoTokenizer.from_pretrained(folder)
ex = json.loads(open(test).readline())
ids = tok.apply_chat_template([{"role": "user", "content": ex["prompt"]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
print(f"transformers {type(model).__name__}, vocab {model.config.vocab_size}: {ex['prompt']!r} ->",
      repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
PY
stage "done"
