"""The chunked training loss (model.loss_chunk) against the plain head, in one process: full
optimizer steps interleaved round by round on the same random batch, so machine noise hits both.

    python bench/loss_chunk.py                                   # hybrid, T=256, chunks 1024
    python bench/loss_chunk.py --arch transformer --seq-len 2048 --chunks 512 1024 4096
    python bench/loss_chunk.py --size 124m --tokens 8192         # on CUDA: bf16 autocast

Prints the median step time, tokens/s and the ratio to loss_chunk=0, and on CUDA the peak
allocated memory of a step (on CPU, bench/measure_memory.py measures memory).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arch import build_model
from slmlab.config import load_config
from slmlab.optim import build_optimizer
from slmlab.runtime import autocast, resolve_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="hybrid")
    p.add_argument("--size", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / seq-len)")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds after 2 warm-up rounds")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.vocab_size=16384")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    runs = {}
    for chunk in [0, *args.chunks]:
        cfg = load_config(arch=args.arch, size=args.size, overrides=[*args.overrides, f"model.loss_chunk={chunk}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.objective).to(device)
        runs[chunk] = (model, build_optimizer(model, cfg.optim, verbose=False), [], [])
    V, B = cfg.model.vocab_size, max(1, args.tokens // args.seq_len)
    x, y = (torch.randint(0, V, (B, args.seq_len), device=device) for _ in range(2))
    cuda = device.type == "cuda"
    for r in range(args.rounds + 2):
        for model, opt, times, peaks in runs.values():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with autocast(device):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated())
            if r >= 2:
                times.append(time.perf_counter() - t0)
    print(f"{args.arch}{' ' + args.size if args.size else ''}  {B} x {args.seq_len}  vocab {V}  {device}  "
          f"median of {args.rounds} interleaved steps")
    base = sorted(runs[0][2])[len(runs[0][2]) // 2]
    for chunk, (_, _, times, peaks) in runs.items():
        med = sorted(times)[len(times) // 2]
        mem = f"  peak {max(peaks) / 2**20:,.0f} MiB" if peaks else ""
        print(f"  loss_chunk={chunk:<6} {med * 1e3:8.1f} ms  {B * args.seq_len / med:9,.0f} tok/s  "
              f"{base / med:5.2f}x{mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
