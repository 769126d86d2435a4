"""Speed where users train and sample (not a test): one interleaved run, printed as ratios.

    python bench/speed.py                       # everything, 2 threads, default shapes
    python bench/speed.py --only decode --rounds 5
    python bench/speed.py --only train --seq-lens 256

Every section runs its variants round-robin (--rounds times, one call each per round) and reports
the median per variant, so the shared machine's drift hits every variant alike; ratios are taken
between variants of the same round set. Sections:
  optim   full training step (forward, backward, clip, optimizer) with AdamW vs Muon, default transformer
  train   tokens/s of our transformer and hybrid, eager and torch.compile'd, against transformers'
          Qwen3ForCausalLM / Lfm2ForCausalLM training step at the same shape (4096 tokens per step)
  decode  batch-1 greedy decode tokens/s after a 32- and a 2000-token prompt: ours (static state,
          eager and compiled; the dynamic KV-cache path) against transformers' generate on the same
          weights; greedy tokens are checked equal
  plain   training tokens/s of our eager transformer against a plain GPT of about the same size
          (bench/plain_gpt.py: learned positions, LayerNorm, GELU MLP, no QK-norm), and of our stack
          configured the same plain way, to separate the architecture's cost from the code's
  prefill one 2048-token forward, ours vs transformers

The allocator is set up as the trainer sets it on CPU (slmlab.runtime.keep_freed_memory: glibc keeps
freed memory), for every variant alike; --glibc-default leaves glibc's defaults.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arch import build_model
from slmlab.config import load_config
from slmlab.hf import to_hf_config, to_hf_state_dict
from slmlab.optim import build_optimizer
from slmlab.runtime import keep_freed_memory


def wall_time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(variants: dict, rounds: int, timed=wall_time, on_warm=None) -> dict:
    """name -> median seconds of one call, the variants called round-robin; timed(fn) -> seconds
    (bench/gpu.py passes one that synchronizes the device). on_warm(name, seconds) hears how long
    each warm-up call (the compile, the capture) took."""
    times = {k: [] for k in variants}
    for k, fn in variants.items():  # warm-up (and compilation) outside the timing
        s = timed(fn)
        if on_warm is not None:
            on_warm(k, s)
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def ours(arch: str, overrides=()):
    cfg = load_config(arch=arch, overrides=list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, cfg.objective)


def hf_twin(cfg, model):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_config(to_hf_config(cfg.model), attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all("rotary" in k or "lm_head" in k for k in missing), (missing, unexpected)
    return hf


def train_step_fn(model, opt, x, y, hf=False):
    def step():
        loss = model(input_ids=x, labels=y).loss if hf else model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def section_optim(args):
    rows = {}
    for name in ("adamw", "muon"):
        cfg, m = ours("transformer", [f"optim.name={name}"])
        opt = build_optimizer(m, cfg.optim, verbose=False)
        B, T = 4096 // 256, 256
        x = torch.randint(0, cfg.model.vocab_size, (B, T))
        rows[name] = train_step_fn(m, opt, x, x)
    t = interleaved(rows, args.rounds)
    print("\n## optimizer: full training step, default transformer, 4096 tokens at T=256")
    print("| optimizer | step s | vs AdamW |\n| --- | --- | --- |")
    for k, v in t.items():
        print(f"| {k} | {v:.3f} | {v / t['adamw']:.2f}x |")


def section_train(args):
    print("\n## training step tokens/s (4096 tokens per step, fp32, AdamW)")
    print("| model | T | ours eager | ours compiled | transformers | eager / transformers | compiled / transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in ("transformer", "hybrid"):
        for T in args.seq_lens:
            B = max(1, 4096 // T)
            cfg, m = ours(arch)
            hf = hf_twin(cfg, m)
            mc = ours(arch)[1]
            x = torch.randint(0, cfg.model.vocab_size, (B, T))
            compiled = torch.compile(mc)
            v = {"eager": train_step_fn(m, torch.optim.AdamW(m.parameters(), 1e-3), x, x),
                 "compiled": train_step_fn(compiled, torch.optim.AdamW(mc.parameters(), 1e-3), x, x),
                 "hf": train_step_fn(hf, torch.optim.AdamW(hf.parameters(), 1e-3), x, x, hf=True)}
            t = interleaved(v, args.rounds)
            tps = {k: B * T / s for k, s in t.items()}
            print(f"| {arch} | {T} | {tps['eager']:,.0f} | {tps['compiled']:,.0f} | {tps['hf']:,.0f} | "
                  f"{tps['eager'] / tps['hf']:.2f}x | {tps['compiled'] / tps['hf']:.2f}x |", flush=True)


def decode_rates(variants: dict, n: int, rounds: int, timed=wall_time, on_warm=None) -> dict:
    """Decode tokens/s without the prefill: each variant generates n and 1 tokens, interleaved;
    rate = (n - 1) / (t_n - t_1), nan where noise made t_n <= t_1 (the old clamp printed 3,000,000,000
    tokens/s). on_warm as in interleaved, named (variant, tokens)."""
    calls = {}
    for k, fn in variants.items():
        calls[(k, n)] = lambda fn=fn: fn(n)
        calls[(k, 1)] = lambda fn=fn: fn(1)
    t = interleaved(calls, rounds, timed, on_warm)
    gap = {k: t[(k, n)] - t[(k, 1)] for k in variants}
    return {k: (n - 1) / gap[k] if gap[k] > 0 else float("nan") for k in variants}


def section_decode(args):
    print("\n## batch-1 greedy decode tokens/s after the prompt (default shapes, random weights)")
    print("| model | prompt | ours static | ours static compiled | ours dynamic cache | transformers | "
          "static / transformers | compiled / transformers | tokens equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    n = args.new_tokens
    for arch in ("hybrid", "transformer"):
        cfg, m = ours(arch)
        m.eval()
        hf = hf_twin(cfg, m).eval()
        for P in (32, 2000):
            idx = torch.randint(0, cfg.model.vocab_size, (1, P))
            v = {"static": lambda k, idx=idx, m=m: m.generate(idx, k, temperature=0),
                 "compiled": lambda k, idx=idx, m=m: m.generate(idx, k, temperature=0, compile=True),
                 "dynamic": lambda k, idx=idx, m=m: m.generate(idx, k, temperature=0, static=False),
                 "hf": lambda k, idx=idx, hf=hf: hf.generate(idx, max_new_tokens=k, min_new_tokens=k,
                                                              do_sample=False, pad_token_id=0)}
            with torch.no_grad():
                tps = decode_rates(v, n, args.rounds)
                same = all(torch.equal(v[k](n), v["hf"](n)) for k in ("static", "compiled", "dynamic"))
            print(f"| {arch} | {P} | {tps['static']:,.0f} | {tps['compiled']:,.0f} | {tps['dynamic']:,.0f} | "
                  f"{tps['hf']:,.0f} | {tps['static'] / tps['hf']:.2f}x | {tps['compiled'] / tps['hf']:.2f}x | "
                  f"{same} |", flush=True)


def section_plain(args):
    from plain_gpt import PlainGPT

    print("\n## training step tokens/s against a plain GPT (4096 tokens per step, fp32, AdamW, eager)")
    print("| T | ours transformer | ours, plain options | plain GPT | ours / plain | ours plain options / plain | "
          "ours compiled / plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    plain_opts = ["model.norm=layernorm", "model.mlp=gelu", "model.pos=learned", "model.qk_norm=false",
                  "model.n_kv_heads=4"]
    for T in args.seq_lens:
        B = max(1, 4096 // T)
        cfg, m = ours("transformer")
        _, mp = ours("transformer", plain_opts + [f"model.max_positions={T}", f"model.ffn_dim={4 * cfg.model.d_model}"])
        torch.manual_seed(0)
        g = PlainGPT(cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, T)
        x = torch.randint(0, cfg.model.vocab_size, (B, T))
        mc = ours("transformer")[1]
        v = {k: train_step_fn(mod, torch.optim.AdamW(opt_params.parameters(), 1e-3), x, x)
             for k, mod, opt_params in (("ours", m, m), ("ours_plain", mp, mp), ("plain", g, g),
                                        ("compiled", torch.compile(mc), mc))}
        t = interleaved(v, args.rounds)
        tps = {k: B * T / s for k, s in t.items()}
        print(f"| {T} | {tps['ours']:,.0f} ({m.num_params() / 1e6:.2f}M) | {tps['ours_plain']:,.0f} "
              f"({mp.num_params() / 1e6:.2f}M) | {tps['plain']:,.0f} ({sum(p.numel() for p in g.parameters()) / 1e6:.2f}M) | "
              f"{tps['ours'] / tps['plain']:.2f}x | {tps['ours_plain'] / tps['plain']:.2f}x | "
              f"{tps['compiled'] / tps['plain']:.2f}x |", flush=True)


def section_prefill(args):
    print("\n## prefill: one 2048-token forward, batch 1")
    print("| model | ours s | transformers s | ours / transformers speed |\n| --- | --- | --- | --- |")
    for arch in ("hybrid", "transformer"):
        cfg, m = ours(arch)
        hf = hf_twin(cfg, m).eval()
        idx = torch.randint(0, cfg.model.vocab_size, (1, 2048))
        with torch.no_grad():
            t = interleaved({"ours": lambda m=m, idx=idx: m.eval()(idx), "hf": lambda hf=hf, idx=idx: hf(idx)},
                            args.rounds)
        print(f"| {arch} | {t['ours']:.3f} | {t['hf']:.3f} | {t['hf'] / t['ours']:.2f}x |", flush=True)


SECTIONS = {"optim": section_optim, "train": section_train, "plain": section_plain, "decode": section_decode,
            "prefill": section_prefill}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", choices=list(SECTIONS), help="run only these sections (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the CI machine)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per variant, interleaved (median reported)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 2048],
                   help="train and plain sections: context lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="decode section: tokens generated per call")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's malloc thresholds alone (default: as the trainer sets them on CPU)")
    args = p.parse_args()
    if args.rounds < 1 or args.new_tokens < 2:
        p.error("--rounds must be >= 1 and --new-tokens >= 2 (a decode rate is (n - 1) / (t_n - t_1))")
    torch.set_num_threads(args.threads)
    kept = not args.glibc_default and keep_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"glibc keeps freed memory: {kept}")
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
