"""Training throughput (not a test): tokens/s and MFU of a full optimizer step (forward, backward,
clip, step) for the transformer and hybrid presets at 256, 1024 and 2048 context, 4096 tokens per
step (batch = 4096 / seq_len, as the default phases use), random tokens, on the current device.

    python bench/train_bench.py                     # default presets and sizes
    python bench/train_bench.py --optim muon --steps 5 --tokens 8192 model.d_model=512

MFU = model FLOPs/token (LM.flops_per_token, fwd + bwd) x tokens/s / peak, where peak is the
device's dense bf16 datasheet number on GPU or the measured fp32 2048^3 matmul rate on CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arch import build_model
from slmlab.config import load_config, presets
from slmlab.optim import build_optimizer
from slmlab.precision import autocast
from slmlab.runtime import peak_flops, resolve_device


def bench(arch, seq_len, args, device, peak):
    cfg = load_config(arch=arch, overrides=[f"optim.name={args.optim}", *args.overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective).to(device).train()
    opt = build_optimizer(model, cfg.optim, verbose=False)
    B = max(1, args.tokens // seq_len)
    x = torch.randint(0, cfg.model.vocab_size, (B, seq_len), device=device)
    y = torch.randint(0, cfg.model.vocab_size, (B, seq_len), device=device)

    def step():
        with autocast(device):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tps = B * seq_len / dt
    return tps, model.flops_per_token(seq_len) * tps / peak, model.num_params()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # choices: an override after the list (--archs hybrid model.d_model=512) is named as no preset, not run as one
    p.add_argument("--archs", nargs="+", default=["transformer", "hybrid"], choices=sorted(presets()),
                   help="presets to time (default: transformer hybrid); give overrides before --archs")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--optim", default="adamw")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.d_model=512")
    args = p.parse_args()
    device = resolve_device(args.device)
    peak, desc = peak_flops(device)
    print(f"device {device}  threads {torch.get_num_threads()}  peak {peak / 1e12:.3f} TFLOP/s ({desc})")
    print(f"{'arch':<12} {'seq_len':>7} {'batch':>5} {'params':>8} {'tokens/s':>10} {'MFU':>7}")
    for arch in args.archs:
        for T in args.seq_lens:
            tps, mfu, n = bench(arch, T, args, device, peak)
            print(f"{arch:<12} {T:>7} {max(1, args.tokens // T):>5} {n / 1e6:>7.2f}M {tps:>10,.0f} {mfu:>7.1%}",
                  flush=True)


if __name__ == "__main__":
    main()
