"""The chunked training loss (model.loss_chunk) against the plain head, in one process: full
optimizer steps interleaved round by round on the same random batch, so machine noise hits both.

    python bench/loss_chunk.py                                   # hybrid, T=256, chunks 1024
    python bench/loss_chunk.py --arch transformer --seq-len 2048 --chunks 512 1024 4096
    python bench/loss_chunk.py --size 124m --tokens 8192         # on CUDA: bf16 autocast

Prints the median step time, tokens/s and the ratio to loss_chunk=0 (bench/speed.py's interleaved
timing, one warm-up step each). Memory: bench/measure_memory.py (CPU), bench/gpu.py (CUDA).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import interleaved

from arch import build_model
from slmlab.config import load_config
from slmlab.optim import build_optimizer
from slmlab.precision import autocast
from slmlab.runtime import resolve_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="hybrid")
    p.add_argument("--size", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / seq-len)")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds after one warm-up step each")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.vocab_size=16384")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    steps = {}
    for chunk in [0, *args.chunks]:
        cfg = load_config(arch=args.arch, size=args.size, overrides=[*args.overrides, f"model.loss_chunk={chunk}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.objective).to(device)
        steps[chunk] = (model, build_optimizer(model, cfg.optim, verbose=False))
    V, B = cfg.model.vocab_size, max(1, args.tokens // args.seq_len)
    x, y = (torch.randint(0, V, (B, args.seq_len), device=device) for _ in range(2))

    def step(model, opt):
        with autocast(device):
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":  # the step's time includes its device work (the next starts synced)
            torch.cuda.synchronize()

    t = interleaved({k: (lambda mo=mo: step(*mo)) for k, mo in steps.items()}, args.rounds)
    print(f"{args.arch}{' ' + args.size if args.size else ''}  {B} x {args.seq_len}  vocab {V}  {device}  "
          f"median of {args.rounds} interleaved steps")
    for chunk, med in t.items():
        print(f"  loss_chunk={chunk:<6} {med * 1e3:8.1f} ms  {B * args.seq_len / med:9,.0f} tok/s  "
              f"{t[0] / med:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
