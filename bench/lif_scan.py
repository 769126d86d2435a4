"""Does the LIF recurrence over time dominate a training step? (Decides whether a Triton scan
kernel is worth adding.) CPU time of one thread, so a busy shared machine skews it less.

    python bench/lif_scan.py

Prints the scan's forward+backward time (reference autograd loop vs fused hand-written backward)
for the token mixer's and the spiking MLP's shapes, and the share of a full spiking-preset step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arch import build_model
from arch.config import ModelConfig
from arch.lif import lif_scan, lif_scan_ref


def cpu_time(fn, n=5):
    best = float("inf")
    for _ in range(n):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def scan_time(fn, shape):
    u = torch.randn(*shape, requires_grad=True)
    beta = torch.full((shape[-1],), 0.9, requires_grad=True)
    thr = torch.ones(shape[-1], requires_grad=True)
    z = torch.zeros(shape[0], shape[-1])

    def step():
        s, _, _ = fn(u, beta, thr, z, z)
        s.sum().backward()

    return cpu_time(step)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    B, T, d = 16, 256, 128
    cfg = dict(vocab_size=1024, d_model=d, n_layers=6, n_heads=4, n_kv_heads=2)
    x = torch.randint(0, 1024, (B, T))
    step = {}
    for name, kw in [("hybrid CCA", dict(layers="CCA")), ("LLA, SwiGLU", dict(layers="LLA")),
                     ("LLA, LIF MLP (spiking preset)", dict(layers="LLA", mlp="lif", mixer_opts={"lif": {"T_sim": 4}}))]:
        m = build_model(ModelConfig(**cfg, **kw))
        step[name] = cpu_time(lambda m=m: m(x, x).backward(), 3)
    ffn = ModelConfig(**cfg).ffn
    tok_ref, tok_fused = scan_time(lif_scan_ref, (B, T, d)), scan_time(lif_scan, (B, T, d))
    mlp_ref, mlp_fused = scan_time(lif_scan_ref, (B * T, 4, ffn)), scan_time(lif_scan, (B * T, 4, ffn))
    print(f"B={B} T={T} d={d}, 6 layers, 1 thread CPU time (s), fwd+bwd")
    for k, v in step.items():
        print(f"  full step {k:32s} {v:.3f}")
    print(f"  LIF token-mixer scan [B,T,d]        reference {tok_ref:.4f}  fused {tok_fused:.4f}  "
          f"(x{tok_ref / tok_fused:.1f})")
    print(f"  LIF MLP scan [B*T,T_sim=4,ffn]      reference {mlp_ref:.4f}  fused {mlp_fused:.4f}")
    share = 4 * tok_fused / step["LLA, SwiGLU"]
    print(f"  4 token-mixer scans / LLA step: {share:.0%}; "
          f"6 MLP scans / spiking step: {6 * mlp_fused / step['LLA, LIF MLP (spiking preset)']:.0%}")


if __name__ == "__main__":
    main()
