"""The README's table of every size x {transformer, hybrid}, from slmlab/estimate.py.

    python bench/sizes_table.py            # print the markdown table
    python bench/sizes_table.py --write    # replace the table between the markers in README.md

Training memory is the estimated peak per GPU (bf16 autocast, the default optimizer: Muon, one device) over the default
phases (4096 tokens per step at seq_len 256, 1024, 2048), without and with model.grad_checkpoint;
the largest micro-batch is for the first and last phase's sequence length, without checkpointing.
Inference is batch 1 at 2048 tokens of context: weights plus the KV cache / conv state in fp16.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- sizes-table:begin (bench/sizes_table.py --write) -->", "<!-- sizes-table:end -->"


def table() -> str:
    from slmlab.config import load_config, sizes
    from slmlab.estimate import GB, estimate

    def gb(n):
        return f"{n / GB:.2f}"

    rows = ["| size | arch | params | non-embedding | train GB (no ckpt / ckpt) | max micro-batch 16 GB "
            "(T=256 / 2048) | 24 GB (T=256 / 2048) | inference GB fp16 / int8 @2048 |",
            "|---|---|---|---|---|---|---|---|"]
    for size in sizes():
        for arch in ("transformer", "hybrid"):
            cfg = load_config(arch=arch, size=size)
            fits = {}
            for mem in (16, 24):
                est = estimate(cfg, device="cuda", mem=mem * GB)
                fits[mem] = [p["no_checkpoint"]["max_micro_batch"] for p in est["phases"]]
            peak = {k: max(p[k]["peak"] for p in est["phases"]) for k in ("no_checkpoint", "grad_checkpoint")}
            inf = est["inference"]
            rows.append(f"| {size} | {arch} | {est['params'] / 1e6:.1f}M | {est['params_non_embedding'] / 1e6:.1f}M "
                        f"| {gb(peak['no_checkpoint'])} / {gb(peak['grad_checkpoint'])} "
                        f"| {fits[16][0]} / {fits[16][-1]} | {fits[24][0]} / {fits[24][-1]} "
                        f"| {gb(inf['weights']['fp16'] + inf['state_at_context'])} / "
                        f"{gb(inf['weights']['int8'] + inf['state_at_context'])} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update README.md between the sizes-table markers")
    args = p.parse_args(argv)
    text = table()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    s = readme.read_text()
    if BEGIN not in s or END not in s:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = s.split(BEGIN, 1)
    readme.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote the table ({text.count(chr(10)) - 1} rows) to {readme}")


if __name__ == "__main__":
    main()
