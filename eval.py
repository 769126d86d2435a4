"""Zero-shot downstream evaluation: multiple-choice and completion tasks scored by log-likelihood,
for runs and for transformers baselines side by side, with paired differences.

    python eval.py --run runs/hybrid --tasks hellaswag,arc_easy,piqa,lambada --limit 1000
    python eval.py --run runs/a --run runs/b --tasks hellaswag --out ab.json    # b - a, paired
    python eval.py --run runs/a --hf path/to/SmolLM2-135M --tasks arc_easy      # against a baseline
    python eval.py --run runs/a --tasks hellaswag=hellaswag_val.jsonl          # an offline copy
    python eval.py --run runs/a --tasks my_task.jsonl                          # your own items
    python eval.py --run runs/a --hf path/to/SmolLM2-135M --tasks book.txt      # bits per byte of a text
    python eval.py --hf path/to/Qwen3-0.6B --tasks mmlu --fewshot 5                # 5 solved examples first

Built-in tasks (rows from the Hugging Face hub through `datasets`, formatted as
lm-evaluation-harness's zero-shot versions): hellaswag, arc_easy, arc_challenge, piqa, winogrande,
openbookqa, sciq, mmlu, lambada, wikitext (bits per byte). The first model given is the reference the others' paired differences
are taken against. See docs/eval.md for the formats, the metrics and what the numbers mean.
"""
from __future__ import annotations

import argparse
import sys

from slmlab.cli import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", dest="models", action="append", type=lambda s: ("run", s), default=[],
                   metavar="RUN_DIR", help="a run directory written by train.py (repeat to compare runs)")
    p.add_argument("--hf", dest="models", action="append", type=lambda s: ("hf", s), metavar="FOLDER",
                   help="a transformers model folder, scored the same way (repeatable)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated: built-in NAME, NAME=SOURCE (a .jsonl copy of its rows or hf:...), "
                        "PATH.jsonl in the generic format, or PATH.txt (bits per byte of the text)")
    p.add_argument("--limit", type=int, default=None, help="score each task's first N items (default: all)")
    p.add_argument("--fewshot", type=int, default=0,
                   help="K solved examples of the task before each item (drawn from its other items; default 0)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens of context a pair may use, left-truncated beyond (default: a run's evaluation "
                        "context; a transformers model's max_position_embeddings, at most 2048)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward (memory vs speed)")
    p.add_argument("--mc-samples", type=int, default=None,
                   help="masked-diffusion runs: mask draws per pair for the Monte-Carlo ELBO estimate (default 16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast for every model, runs and --hf alike: auto = the trainer's default (bf16 on a "
                        "CUDA GPU with bf16, fp16 on one without, fp32 on CPU); fp32; bf16; fp16 (bf16 and fp16 "
                        "also on CPU, where they are slower)")
    p.add_argument("--out", help="write every number and the per-item results as JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    return p.parse_args(argv)


def check_args(args):
    from slmlab.errors import ConfigError

    if not args.models:
        raise ConfigError("give a model to evaluate: --run RUN_DIR or --hf FOLDER (repeatable)")
    if args.fewshot < 0:
        raise ConfigError(f"--fewshot must be >= 0, got {args.fewshot}")
    for flag, v in (("--limit", args.limit), ("--max-len", args.max_len), ("--batch-tokens", args.batch_tokens),
                    ("--mc-samples", args.mc_samples)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if args.force and not args.out:
        raise ConfigError("--force applies to --out PATH; give one or drop it")
    if args.out:
        from slmlab.export import check_out

        check_out(args.out, args.force, is_dir=False)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    from slmlab import tasks
    from slmlab.harness import evaluate_models, report, write_json
    from slmlab.runtime import resolve_device

    resolved = [t for _, t in tasks.resolve_all(args.tasks, "--tasks")]  # checked before any model loads
    device = resolve_device(args.device, flag="--device")
    results = evaluate_models(args.models, resolved, device, args.limit, args.max_len, args.batch_tokens,
                              samples=args.mc_samples, fewshot=args.fewshot, dtype=args.dtype)
    if args.out:
        write_json(results, args.out)
    report(results, as_json=args.json)
    if results["errors"]:  # everything that did score is in the table and --out; the exit says some did not
        print(f"error: {len(results['errors'])} model/task score(s) failed (above)", file=sys.stderr)
        return 1
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
