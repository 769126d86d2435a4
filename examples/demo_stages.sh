# Sourced (not run) by examples/finetune_demo.sh and examples/finetune_llama_demo.sh, after they set W
# (the work directory): the stage timer and the held-out tool-call scoring both demos run twice.
mkdir -p "$W"
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s so far)"; }

# score_tool_calls RUN NAME MAX_NEW_TOKENS: RUN's greedy completions of the held-out prompts in
# $W/NAME.jsonl, their score (examples/toolcall.py score) printed and kept in $W/NAME_score.json.
score_tool_calls() {
    python sample.py --run "$1" --prompts "$W/toolcall/test_prompts.jsonl" --out "$W/$2.jsonl" \
        --temperature 0 --max-new-tokens "$3"
    python examples/toolcall.py score --data "$W/toolcall/test.jsonl" --pred "$W/$2.jsonl" | tee "$W/$2_score.json"
}
