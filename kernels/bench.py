"""Benchmark the Triton kernels against the references and the usual PyTorch alternatives.

    python -m kernels.bench            # full sweep (CUDA only): T 2048/8192, W 256/1024/full, hd 64/128
    python -m kernels.bench --quick    # a few shapes
    python -m kernels.bench --only attention --seqs 4096 --windows 512 --head-dims 64

bf16 throughout. Attention: our kernel, `attention_ref`, SDPA with a dense band mask,
flex_attention with a block mask and, on full-context rows, SDPA's own causal kernel, forward and
forward+backward. Conv: ours, `causal_conv1d_ref`, and
the `causal_conv1d` package when importable. LIF scan (fp32): ours, arch/lif.py's fused eager loop
and its autograd reference. Every row checks parity against the reference first;
a row that fails prints PARITY FAILED instead of speedups (a fast wrong kernel is not a speedup).
Times are CUDA-event milliseconds per call after warmup. The last lines check the targets the
default `model.kernels: auto` rests on (TARGETS): conv forward+backward >= 3x the reference;
attention forward+backward faster than SDPA with a dense band mask (and than SDPA's causal kernel on
full-context rows) and within 1.2x of flex_attention.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import _common
from .reference import attention_ref, band_mask, causal_conv1d_ref

# bf16 parity: max |ours - ref| relative to max |ref|. bf16 has 8 mantissa bits (~4e-3); the
# kernels round P and dS to bf16 before the dots, so allow a few ulps of the largest value.
PARITY_RTOL = 2e-2

# Sweeps (full, quick). Module-level so a smoke test can shrink them.
ATTN_SEQS, ATTN_SEQS_QUICK = [2048, 8192], [256, 1024]
ATTN_WINDOWS, ATTN_WINDOWS_QUICK = [256, 1024, None], [128, None]  # None = full causal
ATTN_HEAD_DIMS, ATTN_HEAD_DIMS_QUICK = [64, 128], [64]
CONV_SHAPES, CONV_SHAPES_QUICK = [(2048, 1024), (8192, 1024), (2048, 4096), (8192, 4096)], [(1024, 1024)]
# sdpa_causal: SDPA's own causal kernel (FlashAttention on CUDA), full-context rows only. model.kernels=auto
# routes full context to it; rows where ours beats it would argue for routing them back.
TARGETS = {"conv vs ref": 3.0, "attention vs sdpa_band": 1.0, "attention vs flex": 1 / 1.2,
           "attention vs sdpa_causal": 1.0, "lif vs fused eager": 1.0}
_DEVICE = "cuda"


def _time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _measure(fn, warmup, iters):
    """ms per call, or a short reason string when the candidate cannot run this shape."""
    try:
        return _time_ms(fn, warmup, iters)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as e:  # a baseline that does not support a shape must not kill the sweep
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})", flush=True)
        return "error"


def _rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def _fmt(x):
    return f"{x:9.3f}" if isinstance(x, float) else f"{x:>9}"


def _ratio(base, ours):
    return f"{base / ours:11.2f}x" if isinstance(base, float) and isinstance(ours, float) else f"{'-':>12}"


def _fwd_bwd(fn, inputs, dout):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, dout)
    return run


# ----------------------------------------------------------------------------- attention

def _have_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _attention_candidates(T, W, flex: bool):
    from .attention import attention

    dense = band_mask(T, T, causal=True, window=W, device=_DEVICE)
    cands = {
        "triton": lambda q, k, v: attention(q, k, v, causal=True, window=W),
        "ref": lambda q, k, v: attention_ref(q, k, v, causal=True, window=W),
        "sdpa_band": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, enable_gqa=True),
    }
    if W is None:
        cands["sdpa_causal"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)
    if flex:  # model.kernels=flex's own path: a compiled flex_attention over a cached band block mask
        from .flex import flex_band_attention

        cands["flex"] = lambda q, k, v: flex_band_attention(q, k, v, causal=True, window=W or T)
    return cands


def bench_attention(args):
    B, Hq, Hkv = args.batch, 8, 2
    seqs = getattr(args, "seqs", None) or (ATTN_SEQS_QUICK if args.quick else ATTN_SEQS)
    windows = getattr(args, "windows", None) or (ATTN_WINDOWS_QUICK if args.quick else ATTN_WINDOWS)
    windows = [None if w == 0 else w for w in windows]  # --windows 0 = full causal
    head_dims = getattr(args, "head_dims", None) or (ATTN_HEAD_DIMS_QUICK if args.quick else ATTN_HEAD_DIMS)
    ratios = []
    flex = not args.no_flex and _have_flex()
    names = ["triton", "ref", "sdpa_band"] + (["flex"] if flex else [])
    names += ["sdpa_causal"] if None in windows else []

    print(f"\nattention, bf16, causal, B={B} Hq={Hq} Hkv={Hkv}; ms per call (speedup = baseline / triton)")
    header = f"{'T':>5} {'W':>5} {'hd':>4} {'pass':>8} " + " ".join(f"{n:>9}" for n in names)
    header += " " + " ".join(f"{'vs ' + n:>12}" for n in names[1:])
    print(header)
    g = torch.Generator(device=_DEVICE).manual_seed(0)
    for hd in head_dims:
        for T in seqs:
            for W in windows:
                q = torch.randn(B, Hq, T, hd, device=_DEVICE, dtype=torch.bfloat16, generator=g)
                k = torch.randn(B, Hkv, T, hd, device=_DEVICE, dtype=torch.bfloat16, generator=g)
                v = torch.randn(B, Hkv, T, hd, device=_DEVICE, dtype=torch.bfloat16, generator=g)
                do = torch.randn_like(q)
                cands = _attention_candidates(T, W, flex)

                ratios.append(_parity_then_time(f"{T:5d} {W if W else 'full':>5} {hd:4d}", cands, names,
                                                (q, k, v), do, "out/dq/dk/dv", args))
                del q, k, v, do, cands
                torch.cuda.empty_cache()
    out = {"attention vs sdpa_band": [r.get("sdpa_band") for r in ratios],
           "attention vs flex": [r.get("flex") for r in ratios]}
    if None in windows:
        out["attention vs sdpa_causal"] = [r.get("sdpa_causal") for r in ratios if "sdpa_causal" in r]
    return out


# ----------------------------------------------------------------------------- conv

def _conv_package():
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None

    def fn(x, w, b):
        # The package takes [B, D, T]; a transposed channels-last tensor is its fast layout.
        return causal_conv1d_fn(x.transpose(1, 2), w, b, activation=None).transpose(1, 2)
    return fn


def bench_conv(args):
    from .conv import causal_conv1d

    B, K = args.batch, 3
    shapes = CONV_SHAPES_QUICK if args.quick else CONV_SHAPES
    ratios = []
    cands = {"triton": causal_conv1d, "ref": causal_conv1d_ref}
    pkg = _conv_package()
    if pkg is not None:
        cands["pkg"] = pkg
    names = list(cands)
    print(f"\ncausal depthwise conv1d, bf16, B={B} K={K}; ms per call (speedup = baseline / triton)"
          + ("" if pkg else "  [causal_conv1d package not installed]"))
    print(f"{'T':>5} {'D':>5} {'pass':>8} " + " ".join(f"{n:>9}" for n in names) + " "
          + " ".join(f"{'vs ' + n:>12}" for n in names[1:]))
    g = torch.Generator(device=_DEVICE).manual_seed(0)
    for T, D in shapes:
        x = torch.randn(B, T, D, device=_DEVICE, dtype=torch.bfloat16, generator=g)
        w = torch.randn(D, K, device=_DEVICE, dtype=torch.bfloat16, generator=g) * 0.5
        b = torch.randn(D, device=_DEVICE, dtype=torch.bfloat16, generator=g)
        do = torch.randn_like(x)
        # dw / db sum over B*T terms: compared relative to their own scale like the rest.
        ratios.append(_parity_then_time(f"{T:5d} {D:5d}", cands, names, (x, w, b), do, "out/dx/dw/db", args))
    return {"conv vs ref": [r.get("ref") for r in ratios]}


# ----------------------------------------------------------------------------- LIF scan

# (B, T, D): the token mixer at a 124m-like width, and the spiking MLP's shape (every token a row,
# T_sim = 4 steps, the ffn width).
LIF_SHAPES, LIF_SHAPES_QUICK = [(8, 2048, 768), (8 * 1024, 4, 2048)], [(4, 256, 256)]


def bench_lif(args):
    """fp32 (a spike is a threshold test: bf16 rounding flips some, so bf16 parity means nothing):
    the kernel against the eager fused loop and the autograd reference, fwd and fwd+bwd. Parity is
    the share of equal spikes (>= 99.9%: a contracted multiply-add on the GPU may flip a spike that
    sits on the threshold, and the flip then carries through that neuron's later steps)."""
    from arch.lif import lif_scan as fused
    from arch.lif import lif_scan_ref

    from .lif import lif_scan

    shapes = LIF_SHAPES_QUICK if args.quick else LIF_SHAPES
    cands = {"triton": lif_scan, "fused": fused, "ref": lif_scan_ref}
    names = list(cands)
    print("\nLIF scan, fp32, atan surrogate; ms per call (speedup = baseline / triton)")
    print(f"{'B':>5} {'T':>5} {'D':>5} {'pass':>8} " + " ".join(f"{n:>9}" for n in names) + " "
          + " ".join(f"{'vs ' + n:>12}" for n in names[1:]) + "  equal spikes")
    ratios = []
    g = torch.Generator(device=_DEVICE).manual_seed(0)
    for B, T, D in shapes:
        u = (torch.randn(B, T, D, device=_DEVICE, generator=g) * 0.8 + 0.4).requires_grad_()
        beta = torch.full((D,), 0.9, device=_DEVICE, requires_grad=True)
        thr = torch.ones(D, device=_DEVICE, requires_grad=True)
        z = torch.zeros(B, D, device=_DEVICE)
        ins = (u, beta, thr, z, z)
        with torch.no_grad():
            agree = (lif_scan(*ins)[0] == fused(*ins)[0]).float().mean().item()
        ok = agree >= 0.999
        ds = torch.randn(B, T, D, device=_DEVICE, generator=g)
        for mode in ("fwd", "fwd+bwd"):
            times = {n: _measure(_lif_call(fn, ins, ds if mode == "fwd+bwd" else None), args.warmup, args.iters)
                     for n, fn in cands.items()}
            row = f"{B:5d} {T:5d} {D:5d} {mode:>8} " + " ".join(_fmt(times[n]) for n in names)
            row += " " + " ".join(_ratio(times[n], times["triton"]) for n in names[1:]) if ok else "  PARITY FAILED"
            print(row + f"  {agree:.4%}", flush=True)
        timed = all(isinstance(times[n], float) for n in names)
        ratios.append(times["fused"] / times["triton"] if ok and timed else None)  # None: not met
        del u, ds, ins
        torch.cuda.empty_cache()
    return {"lif vs fused eager": ratios}


def _lif_call(fn, ins, ds):
    """One scan, forward only (ds None) or with the backward of the spikes against ds."""
    def run():
        if ds is None:
            with torch.no_grad():
                fn(*ins)
        else:
            torch.autograd.grad(fn(*ins)[0], ins[:3], ds)
    return run


def _parity_then_time(prefix, cands, names, inputs, do, grad_label, args):
    """Check the forward and every gradient of cands["triton"] against cands["ref"]; then time
    every candidate forward and forward+backward, one row per pass. A failed parity prints no ratio."""
    ins = [t.clone().requires_grad_() for t in inputs]
    ref_out = cands["ref"](*ins)
    ref_grads = torch.autograd.grad(ref_out, ins, do)
    out = cands["triton"](*ins)
    grads = torch.autograd.grad(out, ins, do)
    errs = [_rel_err(out, ref_out)] + [_rel_err(a, r) for a, r in zip(grads, ref_grads)]
    ok = max(errs) <= PARITY_RTOL
    for mode in ("fwd", "fwd+bwd"):
        times = {}
        for name, fn in cands.items():
            if mode == "fwd":
                with torch.no_grad():
                    times[name] = _measure(lambda fn=fn: fn(*inputs), args.warmup, args.iters)
            else:
                times[name] = _measure(_fwd_bwd(fn, ins, do), args.warmup, args.iters)
        row = f"{prefix} {mode:>8} " + " ".join(_fmt(times.get(n, "n/a")) for n in names)
        if ok:
            row += " " + " ".join(_ratio(times.get(n), times["triton"]) for n in names[1:])
        else:
            row += f"  PARITY FAILED (max rel err {grad_label} = {', '.join(f'{e:.2e}' for e in errs)})"
        print(row, flush=True)
    # fwd+bwd speedups (baseline time / ours) for the target check; none when parity failed
    return {n: times[n] / times["triton"] for n in names[1:]
            if ok and isinstance(times.get(n), float) and isinstance(times["triton"], float)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few shapes instead of the full sweep")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compile is slow)")
    p.add_argument("--only", choices=("attention", "conv", "lif"), default=None)
    p.add_argument("--seqs", type=int, nargs="+", help="attention sequence lengths (default: the sweep's)")
    p.add_argument("--windows", type=int, nargs="+", help="attention windows, 0 = full causal")
    p.add_argument("--head-dims", type=int, nargs="+", help="attention head dims")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0
    if _common.interpreting():
        print("TRITON_INTERPRET=1 is set: timings would measure the interpreter; unset it and rerun")
        return 1
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    speedups = {}
    if args.only in (None, "attention"):
        speedups.update(bench_attention(args))
    if args.only in (None, "conv"):
        speedups.update(bench_conv(args))
    if args.only in (None, "lif"):
        speedups.update(bench_lif(args))
    print("\ntargets (fwd+bwd, every row):")
    for name, vals in speedups.items():
        print("  " + target_line(name, vals))
    return 0


def target_line(name: str, speedups: list) -> str:
    """'met' when every row's speedup reaches TARGETS[name]; rows without a number (parity failed,
    baseline missing) count as not met."""
    want = TARGETS[name]
    got = [v for v in speedups if v is not None]
    if not got:
        return f"{name} >= {want:.2f}x: no rows (baseline unavailable or parity failed)"
    met = sum(v >= want for v in got)
    return (f"{name} >= {want:.2f}x: {'met' if met == len(speedups) else 'NOT met'} "
            f"({met}/{len(speedups)} rows; min {min(got):.2f}x, max {max(got):.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
