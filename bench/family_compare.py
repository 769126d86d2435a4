"""Compare the architecture families on one corpus at equal steps and tokens: transformer (AR),
hybrid (AR), spiking (AR), diffusion (ELBO bound) and AR -> diffusion (init from the hybrid run).

    python bench/family_compare.py --data ../shared/data/tinyshakespeare.txt --steps 200 --batch-size 8

Prints a markdown table. tokens/s is wall-clock on whatever machine runs it (on a shared CPU,
indicative only). Diffusion bpb is an upper bound (the ELBO), AR bpb is exact.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--out", default="runs/family_compare")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--only", default=None, help="comma list of rows to run (others are read from --out): "
                   "transformer, hybrid, spiking, diffusion, hybrid_to_diffusion (or hybrid→diffusion); "
                   "'none' just prints the table")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = p.parse_args()

    from arch.registry import LETTERS
    from slmlab.config import load_config
    from slmlab.rundir import RunDir
    from slmlab.trainer import train

    letter = {name: ch for ch, name in LETTERS.items()}

    # train.phases=[]: the table was measured at one stage of seq_len 128 (before phases existed); with the
    # default phases, train.seq_len and train.batch_size are not read (slmlab/unused.py says so).
    common = [f"data.spec={args.data}", f"train.steps={args.steps}", "model.vocab_size=1024", "model.d_model=128",
              "model.n_layers=6", "model.n_heads=4", "model.n_kv_heads=2", "train.phases=[]", "train.seq_len=128",
              f"train.batch_size={args.batch_size}", f"train.eval_every={args.steps}", "train.sample_tokens=64",
              "train.sample_prompt=\"ROMEO:\"", "logging.progress=false", *args.overrides]
    out = Path(args.out)
    rows = [  # (row name, preset, extra overrides, objective label)
        ("transformer", "transformer", [], "AR"),
        ("hybrid", "hybrid", [], "AR"),
        ("spiking", "spiking", [], "AR"),
        ("diffusion", "diffusion", [], "MDLM"),
        ("hybrid→diffusion", "diffusion", [f"train.init_from={out / 'hybrid'}"], "MDLM (init: hybrid AR)"),
    ]
    dirs = {name: name.replace("→", "_to_") for name, *_ in rows}
    only = None
    if args.only:  # a row's name or its run directory's (hybrid_to_diffusion: no arrow to type)
        only = {next((n for n, d in dirs.items() if w in (n, d)), w) for w in args.only.split(",") if w != "none"}
        if only - set(dirs):
            p.error(f"--only: unknown rows {', '.join(sorted(only - set(dirs)))}; rows: {', '.join(dirs.values())}")
    results = []
    for name, preset, extra, obj in rows:
        run_dir = out / dirs[name]
        if only is None or name in only:
            cfg = load_config(arch=preset, overrides=common + extra)
            train(cfg, run_dir, force=True)
        if (run_dir / "summary.json").exists():  # rows neither run now nor before are left out
            results.append((name, obj, json.loads((run_dir / "summary.json").read_text()), RunDir(run_dir).config()))
    if not results:
        sys.exit(f"no finished runs in {out}: nothing to print")

    def shape(s, c):  # what a row was trained with, read from its run (rows read from --out may differ from the flags)
        return (f"{s['steps']} steps x {c.train.batch_size * c.train.seq_len} tokens, d_model {c.model.d_model}, "
                f"{c.model.n_layers} layers, vocab {c.model.vocab_size}, seq_len {c.train.seq_len}, data {c.data.spec}")

    shapes = {shape(s, c) for _, _, s, c in results}
    print(f"\n{shapes.pop()}" if len(shapes) == 1 else "\nrows trained differently:\n"
          + "\n".join(f"  {name}: {shape(s, c)}" for name, _, s, c in results), end="\n\n")
    print("| model | objective | layers | params | val bpb | tokens/s | spike rate (mean) | energy vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name, obj, s, c in results:
        bpb = f"≤ {s['val_bpb']:.3f} (bound)" if s.get("val_bpb_is_bound") else f"{s['val_bpb']:.3f}"
        rate = f"{s['spike_rate_mean']:.3f}" if "spike_rate_mean" in s else "–"
        energy = f"{s['energy_vs_dense']:.2f}" if "energy_vs_dense" in s else "–"
        layers = "".join(letter.get(t, "?") for t in c.model.layer_types())
        layers += " (+LIF MLP)" if c.model.mlp == "lif" else ""
        layers += "" if c.model.causal else " (bidir.)"
        print(f"| {name} | {obj} | {layers} | {s['params'] / 1e6:.2f}M | {bpb} | {s['tokens_per_s']:,.0f} | {rate} | {energy} |")
    print(f"\ngzip -9: {results[0][2]['gzip_bpb']:.3f} bpb, xz -9: {results[0][2]['xz_bpb']:.3f} bpb on the same validation split")
    for name, _, s, _ in results:
        rates = {k.split(".", 1)[1]: round(v, 3) for k, v in s.items() if k.startswith("spike_rate.")}
        if rates:
            print(f"{name} spike rates per layer: {rates}")


if __name__ == "__main__":
    main()
