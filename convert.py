"""Export a trained run to other runtimes, or import a Hugging Face checkpoint as a run.

    python convert.py --run runs/hybrid --to hf --out export/hybrid-hf
    python convert.py --run runs/hybrid --to onnx --out export/hybrid-onnx
    python convert.py --run runs/hybrid --to executorch --out export/hybrid.pte [--quant int8]
    python convert.py --run runs/hybrid --to coreml --out export/hybrid.mlpackage
    python convert.py --run runs/hybrid --to gguf --out export/hybrid.gguf [--dtype fp16 | --quant q8_0]
    python convert.py --from-hf path/to/LFM2-350M --out runs/lfm2-350m     # see --help for the families
    python convert.py --merge-lora runs/sft-lora --out runs/sft-merged     # a train.lora run -> a plain run

Nothing is written at --out unless the whole export succeeds; an existing --out needs --force.
See docs/export.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from slmlab.cli import run_cli


def parse_args(argv=None):
    from slmlab.export import FORMATS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (config.yaml, model.safetensors, tokenizer.json)")
    src.add_argument("--from-hf", dest="from_hf",
                     help="import a transformers folder into a run directory: Lfm2, Lfm2Moe, Qwen3, Qwen3Moe, "
                          "Qwen2Moe, Olmoe, Mixtral, "
                          "Qwen2, Llama, GPT-2, Mamba2, GraniteMoeHybrid")
    src.add_argument("--merge-lora", dest="merge_lora", metavar="RUN",
                     help="fold a train.lora run's adapters into its base: a plain run every exporter accepts")
    p.add_argument("--to", dest="fmt", help=f"export format: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output path (a folder for hf/onnx/coreml/--from-hf, a file otherwise)")
    p.add_argument("--dtype", default=None, help="weight dtype: fp32 | fp16 | bf16 (default fp32)")
    p.add_argument("--quant", default=None, help="int8 (weight-only; executorch, onnx) | q8_0 (gguf)")
    p.add_argument("--max-len", type=int, default=None,
                   help="KV-cache length of decode graphs (default 1024, or model.max_positions when smaller); "
                        "hf/gguf: the stated context length (default model.max_positions for learned positions, else "
                        "model.context_length, else 4096)")
    p.add_argument("--no-eval", action="store_true", help="with --quant int8: skip the val-bpb before/after report")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (never the source, a folder holding it or inside it, nor a file "
                        "with a folder or a folder with a file)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from slmlab.errors import ConfigError

    if args.no_eval and args.quant != "int8":
        raise ConfigError("--no-eval applies to --quant int8 (it skips the val-bpb report); drop it")
    if args.merge_lora or args.from_hf:  # a run directory is written as the source's fp32 weights
        flag = "--merge-lora" if args.merge_lora else "--from-hf"
        given = [f for f, v in (("--to", args.fmt), ("--dtype", args.dtype), ("--quant", args.quant),
                                ("--max-len", args.max_len)) if v is not None]
        if given:
            raise ConfigError(f"{flag} writes a run directory; it takes no {'/'.join(given)}")
        if args.merge_lora:
            report = merge_lora_run(args.merge_lora, args.out, force=args.force)
        else:
            from slmlab.export.hf import import_hf

            report = import_hf(args.from_hf, args.out, force=args.force)
    else:
        if not args.fmt:
            raise ConfigError("--to FORMAT is required with --run")
        from slmlab.coerce import Range

        if args.max_len is not None:  # the decode graphs preallocate this many KV slots
            Range(1, 2 ** 20).check("--max-len", args.max_len)
        from slmlab.export import ExportOptions, convert

        opts = ExportOptions(dtype=args.dtype or "fp32", quant=args.quant, max_len=args.max_len,
                             eval_bpb=not args.no_eval)
        report = convert(args.run, args.fmt, args.out, opts, force=args.force)
    print(json.dumps(report))


def merge_lora_run(src: str, out: str, force: bool = False) -> dict:
    """A copy of the train.lora run `src` with the adapters merged into the weights and train.lora off,
    published whole (an existing --out is replaced only once the new run is complete)."""
    from slmlab.checkpoint import publish, weights_for_save
    from slmlab.errors import ConfigError
    from slmlab.export import check_out
    from slmlab.rundir import CHAT_TEMPLATE, CONFIG, WEIGHTS, RunDir

    run = RunDir.open(src, label="--merge-lora ")
    cfg = run.config()
    if not cfg.train.lora.r:
        raise ConfigError(f"--merge-lora: {run.path} has no LoRA adapters (its train.lora.r is 0)")
    check_out(out, force, source=src)
    check_out(out, force, source=run.lora_base().path)  # its base is read too (and other runs may build on it)
    cfg, model, tok = run.load("cpu")  # base + adapters, merged
    cfg.train.lora.r, cfg.train.init_from = 0, ""
    with publish(out) as staged:
        dst = RunDir.create(staged)
        dst.write_config(cfg)
        dst.write_tokenizer(tok)
        template = run.chat_template()
        if template is not None:
            dst.write_text(CHAT_TEMPLATE, template)
        dst.write_weights(weights_for_save(model), metadata={"arch": cfg.arch, "merged_from": str(run.path)})
    return {"merged": str(run.path), "out": str(out), "files": [CONFIG, WEIGHTS]}


if __name__ == "__main__":
    sys.exit(run_cli(main))
