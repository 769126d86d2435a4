"""Experiments behind docs/training.md (not a test): Muon vs AdamW, and the phased context
curriculum vs a single long-context phase, on tinyshakespeare at equal tokens.

    python bench/optim_compare.py                       # everything (~30-40 min on a busy 2-core CPU)
    python bench/optim_compare.py --only optim          # the optimizer sweep + comparison
    python bench/optim_compare.py --only phases         # phased 256->1024->2048 vs single 2048
    python bench/optim_compare.py --only default        # Muon vs AdamW at the default shape, wall clock

1. Optimizer: for each of muon and adamw, a learning-rate sweep (same model, data, steps, WSD
   schedule); the best lr by final val loss is each optimizer's entry. Reports val-loss curves (PNG
   when matplotlib is installed, and a markdown table) and the ratio
   (steps Muon needs to reach AdamW's final val loss) / (AdamW's steps), interpolated between evals.
3. Default: `python train.py --arch transformer` exactly as shipped (d256 x 6, vocab 4096, the phased
   curriculum, 400 steps, default data), once with optim.name=adamw and once with muon, the two runs
   side by side (one thread each, so the machine's load hits both alike). Reports steps AND seconds
   Muon needs to reach AdamW's final val loss.
2. Phases: 256 -> 1024 -> 2048 (shares 0.7/0.2/0.1) vs one 2048 phase, 4096 tokens per step each,
   the same steps (so the same tokens): wall clock and final val loss at 2048.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmlab.config import load_config  # noqa: E402
from slmlab.errors import SlmlabError  # noqa: E402
from slmlab.rundir import RunDir  # noqa: E402
from slmlab.trainer import train  # noqa: E402

DATA = ROOT.parent / "shared/data/tinyshakespeare.txt"


def base(args, extra=()):
    return ["data.spec=" + str(args.data), "model.vocab_size=1024", "model.d_model=128", "model.n_layers=3",
            "model.n_heads=4", "model.n_kv_heads=2", "model.layers=" + args.layers, "train.device=cpu",
            "logging.progress=false", "train.sample_tokens=0", "train.ckpt_every=0", "train.warmup_steps=20",
            f"data.cache_dir={args.out}/cache", *extra]


def cached(out: Path, cfg, rerun: bool, name: str) -> bool:
    """A finished run in `out` trained with exactly `cfg` (a run left by other flags, say an earlier --steps or
    --layers, is retrained, not reported as this one)."""
    if rerun or not (out / "summary.json").is_file():
        return False
    try:
        same = RunDir(out).config() == cfg
    except SlmlabError:
        same = False
    print(f"[{name}] cached" if same else f"[{name}] {out} was trained with other settings: retraining", flush=True)
    return same


def run(args, name, overrides):
    out = Path(args.out) / name
    cfg = load_config(arch="hybrid", overrides=overrides)
    if not cached(out, cfg, args.rerun, name):
        print(f"[{name}] training ...", flush=True)
        train(cfg, out, force=True)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    return {"name": name, "curve": curve, **json.loads((out / "summary.json").read_text())}


def steps_to_reach(curve, target):
    """First (linearly interpolated) step at which the curve's val loss is <= target."""
    prev = None
    for s, v in curve:
        if v <= target:
            if prev is None:
                return float(s)
            (s0, v0) = prev
            return s0 + (s - s0) * (v0 - target) / (v0 - v) if v0 != v else float(s)
        prev = (s, v)
    return None


def optim_experiment(args):
    common = [f"train.steps={args.steps}", "train.phases=[]", "train.seq_len=128", "train.batch_size=16",
              f"train.eval_every={args.steps // 10}", "train.eval_tokens=16384", "train.eval_seq_len=128"]
    sweeps = {"adamw": args.adamw_lrs, "muon": args.muon_lrs}
    results = {}
    for opt, lrs in sweeps.items():
        for lr in lrs:
            r = run(args, f"{opt}_lr{lr:g}", base(args, common + [f"optim.name={opt}", f"optim.lr={lr}"]))
            results.setdefault(opt, []).append((lr, r))
    best = {opt: min(rs, key=lambda lr_r: lr_r[1]["val_loss"]) for opt, rs in results.items()}
    lines = ["| optimizer | lr | final val loss | val bpb | train time (s) | tokens/s |", "|---|---|---|---|---|---|"]
    for opt, rs in results.items():
        for lr, r in rs:
            mark = " **(best)**" if best[opt][0] == lr else ""
            lines.append(f"| {opt} | {lr:g}{mark} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
                         f"{r['train_time_s']:.0f} | {r['tokens_per_s']:,.0f} |")
    (_, am), (_, mu) = best["adamw"], best["muon"]
    reach = steps_to_reach(mu["curve"] + [(mu["steps"], mu["val_loss"])], am["val_loss"])
    ratio = reach / am["steps"] if reach is not None else None
    lines.append("")
    lines.append(f"Muon reaches AdamW's final val loss {am['val_loss']:.4f} at step "
                 f"{'never' if reach is None else f'{reach:.0f}'} of {am['steps']}: ratio "
                 f"{'n/a' if ratio is None else f'{ratio:.2f}'}")
    lines.append("")
    lines.append("| step | " + " | ".join(f"{o} (lr {best[o][0]:g})" for o in best) + " |")
    lines.append("|---|" + "---|" * len(best))
    for (s, a), (_, m) in zip(am["curve"], mu["curve"]):
        lines.append(f"| {s} | {a:.4f} | {m:.4f} |")
    text = "\n".join(lines)
    print(text)
    Path(args.out, "optim_compare.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for opt, (lr, r) in best.items():
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", label=f"{opt} (lr {lr:g})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"tinyshakespeare, {args.layers} d128 x3, {args.steps} x 2048 tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.out, "optim_compare.png"), dpi=110)
        print(f"plot: {Path(args.out, 'optim_compare.png')}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
    return {"best": {o: b[0] for o, b in best.items()}, "ratio": ratio}


def phases_experiment(args):
    common = [f"train.steps={args.phase_steps}", f"train.eval_every={args.phase_steps}", "train.eval_seq_len=2048",
              f"optim.name={args.phase_optim}", f"optim.lr={args.phase_lr}"]
    phased = run(args, "phased", base(args, common + [
        "train.phases=[{seq_len: 256, share: 0.7, tokens_per_step: 4096}, {seq_len: 1024, share: 0.2, "
        "tokens_per_step: 4096}, {seq_len: 2048, share: 0.1, tokens_per_step: 4096}]"]))
    single = run(args, "single2048", base(args, common + [
        "train.phases=[{seq_len: 2048, share: 1.0, tokens_per_step: 4096}]"]))
    lines = ["| schedule | tokens | train time (s) | tokens/s | final val loss @2048 | val bpb |",
             "|---|---|---|---|---|---|"]
    for label, r in (("256->1024->2048 (0.7/0.2/0.1)", phased), ("2048 only", single)):
        lines.append(f"| {label} | {r['tokens']:,} | {r['train_time_s']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    text = "\n".join(lines)
    print(text)
    Path(args.out, "phases_compare.md").write_text(text + "\n")


def default_experiment(args):
    """Both optimizers at the shipped shape, run concurrently with one thread each."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs, outs = {}, {}
    for opt in ("adamw", "muon"):
        outs[opt] = Path(args.out) / f"default_{args.default_arch}_{opt}"
        overrides = [f"optim.name={opt}", f"train.eval_every={args.default_eval_every}", "train.sample_tokens=0",
                     "logging.progress=false"]
        if cached(outs[opt], load_config(arch=args.default_arch, overrides=overrides), args.rerun, f"default {opt}"):
            continue
        cmd = [sys.executable, str(ROOT / "train.py"), "--arch", args.default_arch, "--out", str(outs[opt]),
               "--force", *overrides]
        print(f"[default {opt}] {' '.join(cmd[1:])}", flush=True)
        procs[opt] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    for opt, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"[default {opt}] train.py failed (exit {proc.returncode})")
    runs = {}
    for opt, out in outs.items():
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        curve = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r and "step" in r]
        runs[opt] = {"curve": curve + [(summary["steps"], summary["val_loss"])], **summary}
    am, mu = runs["adamw"], runs["muon"]
    reach = steps_to_reach(mu["curve"], am["val_loss"])
    lines = ["| optimizer | steps | final val loss | val bpb | train time (s) | s / step |", "|---|---|---|---|---|---|"]
    for opt, r in runs.items():
        lines.append(f"| {opt} | {r['steps']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['train_time_s']:.0f} | "
                     f"{r['train_time_s'] / r['steps']:.3f} |")
    if reach is None:
        lines.append(f"\nMuon does not reach AdamW's final val loss {am['val_loss']:.4f} in {mu['steps']} steps.")
    else:
        secs = reach * mu["train_time_s"] / mu["steps"]
        lines.append(f"\nMuon reaches AdamW's final val loss {am['val_loss']:.4f} at step {reach:.0f} of {am['steps']} "
                     f"(ratio {reach / am['steps']:.2f}) and after {secs:.0f} s of {am['train_time_s']:.0f} s "
                     f"(wall-clock ratio {secs / am['train_time_s']:.2f}).")
    text = "\n".join(lines)
    print(text)
    Path(args.out, "default_compare.md").write_text(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA), help="optim and phases (default: train.py's own data and steps)")
    p.add_argument("--out", default="runs/bench_optim")
    p.add_argument("--only", choices=["optim", "phases", "default"], default=None)
    p.add_argument("--default-arch", default="transformer", help="default experiment: the preset to train")
    p.add_argument("--default-eval-every", type=int, default=40, help="default experiment: steps between evals")
    p.add_argument("--layers", default="CCA", help="optim and phases: the layer pattern")
    p.add_argument("--steps", type=int, default=200, help="optim experiment: steps per run")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--phase-steps", type=int, default=150)
    p.add_argument("--phase-optim", default="adamw")
    p.add_argument("--phase-lr", type=float, default=3e-3)
    p.add_argument("--rerun", action="store_true", help="retrain runs already in --out")
    args = p.parse_args()
    if args.only != "default" and not Path(args.data).is_file():
        sys.exit(f"data not found: {args.data}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.only in (None, "optim"):
        optim_experiment(args)
    if args.only in (None, "phases"):
        phases_experiment(args)
    if args.only in (None, "default"):
        default_experiment(args)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
