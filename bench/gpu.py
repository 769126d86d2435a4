"""GPU timings for the README's GPU section (not a test; CUDA only): one process, variants
interleaved round by round so drift hits each alike, every time taken after a device sync.

    python bench/gpu.py                          # env, train, decode (not yet timed on a GPU)
    python bench/gpu.py --only env --only train  # sections, repeatable
    python bench/gpu.py --only train --size 124m --seq-len 2048 --tokens 32768

Sections:
  env     device, driver, torch/triton/transformers versions; the two ceilings measured here
          (bf16 8192^3 matmul on random data, device-to-device copy), against which MFU is read
  train   the --size transformer and hybrid (default 124m), bf16 autocast, AdamW: tokens/s and MFU
          (datasheet bf16 peak) eager (model.kernels auto, triton and torch: which kernel auto should
          pick), torch.compile'd, compiled with model.loss_chunk (transformer),
          and transformers' Qwen3ForCausalLM / Lfm2ForCausalLM at the same shape; peak memory
          (torch.cuda.max_memory_allocated, the step's own share) against the --dry-run estimate.
          --band W: every attention layer a W-window band, flex_attention added eager and compiled
          (python bench/gpu.py --only train --archs transformer --band 256)
  decode  batch 1 and 8 greedy decode tokens/s after a 128-token prompt, bf16 weights: our static
          step eager, compiled, compiled + CUDA graph (generate(compile=True) on CUDA), against
          transformers' generate on the same weights; the share of tokens equal to transformers'
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

from speed import decode_rates, hf_twin, interleaved

from arch import build_model
from slmlab.config import load_config, presets
from slmlab.estimate import meta_model, static_memory, train_peak
from slmlab.optim import build_optimizer
from slmlab.precision import autocast
from slmlab.runtime import peak_flops, resolve_device

DEV = torch.device("cuda")  # main() sets it; --device cpu runs the Python on tiny shapes (the smoke test)


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


class Table:
    """A markdown table printed whole at the end of its section, each row also printed as it is
    measured (prefixed "row:") so a section cut off by its time limit keeps what it measured."""

    def __init__(self, *columns):
        self.lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]

    def row(self, *cells):
        self.lines.append("| " + " | ".join(cells) + " |")
        print("row: " + self.lines[-1], flush=True)

    def show(self):
        print("\n".join(self.lines), flush=True)


def warm_printer(what: str):
    """interleaved's on_warm: each warm-up call's time, printed as it ends. On a GPU the first call
    is the compile or the capture, and a step cut off by its time limit should leave in its log
    where the time went."""
    def say(name, seconds):
        print(f"  warm-up {what} {name}: {seconds:.1f} s", flush=True)
    return say


# ----------------------------------------------------------------------------- env

def section_env(args):
    import transformers
    import triton

    p = torch.cuda.get_device_properties(DEV)
    print(f"\n## env\n{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, capability "
          f"{p.major}.{p.minor}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
          f"transformers {transformers.__version__}")
    n = 8192
    a, b = (torch.randn(n, n, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    t = statistics.median(sync_time(lambda: a @ b) for _ in range(10))
    src = torch.randn(2**29 // 2, device=DEV, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    tc = statistics.median(sync_time(lambda: dst.copy_(src)) for _ in range(10))
    print(f"measured ceilings: bf16 matmul {2 * n**3 / t / 1e12:.0f} TFLOP/s (random data, {n}^3); "
          f"copy {2 * src.numel() * 2 / tc / 1e12:.2f} TB/s (read + write)")
    print(f"datasheet peak used for MFU: {peak_flops(DEV)[0] / 1e12:.0f} TFLOP/s ({peak_flops(DEV)[1]})")


# ----------------------------------------------------------------------------- train

def _own_bytes(model, opt) -> int:
    """Weights and optimizer state of one variant (what its step's peak sits on)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def _estimate(cfg, B, T) -> int:
    m = meta_model(cfg)
    st = static_memory(m, cfg, cuda=True, world=1)
    return train_peak(m, st, cfg, B, T, cfg.model.grad_checkpoint, cuda=True)["peak"] - st.runtime


class TrainVariant:
    """One model + optimizer + batch; step() is a full training step; memory() the step's peak
    share of the allocator (everything else resident subtracted)."""

    def __init__(self, arch, args, overrides=(), compile=False, hf=False):
        band = ["model.window_pattern=S", f"model.window={args.band}"] if args.band else []
        self.cfg = load_config(arch=arch, size=args.size or None, overrides=[*args.overrides, *band, *overrides])
        torch.manual_seed(0)
        ours = build_model(self.cfg.model, self.cfg.objective)
        self.hf = hf
        self.model = (hf_twin(self.cfg, ours) if hf else ours).to(DEV).train()
        self.opt = (torch.optim.AdamW(self.model.parameters(), 1e-4, fused=DEV.type == "cuda") if hf
                    else build_optimizer(self.model, self.cfg.optim, verbose=False))
        self.fwd = torch.compile(self.model) if compile else self.model
        self.B, self.T = max(1, args.tokens // args.seq_len), args.seq_len
        self.x = torch.randint(0, self.cfg.model.vocab_size, (self.B, self.T), device=DEV)
        self.flops = ours.flops_per_token(self.T)

    def step(self):
        with autocast(DEV):
            loss = self.fwd(input_ids=self.x, labels=self.x).loss if self.hf else self.fwd(self.x, self.x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def memory(self):
        if DEV.type != "cuda":
            return None
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - _own_bytes(self.model, self.opt)
        torch.cuda.reset_peak_memory_stats()
        self.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - others


def train_variants(arch, args) -> dict:
    """name -> TrainVariant. auto (Triton conv and band attention, SDPA for full context) against
    all-Triton and all-PyTorch (SDPA with a band mask for windows, PyTorch's conv): whether auto
    picks right. With --band W every attention layer is a W-window band, and flex_attention (eager
    and compiled) joins: our band kernel against the library's at model level."""
    v = {"eager": TrainVariant(arch, args),
         "eager, kernels=triton": TrainVariant(arch, args, ["model.kernels=triton"]),
         "eager, kernels=torch": TrainVariant(arch, args, ["model.kernels=torch"])}
    if args.band:
        v["eager, kernels=flex"] = TrainVariant(arch, args, ["model.kernels=flex"])
    v["compiled"] = TrainVariant(arch, args, compile=True)
    if args.band:
        v["compiled, kernels=flex"] = TrainVariant(arch, args, ["model.kernels=flex"], compile=True)
    elif arch == "transformer":
        v["compiled, loss_chunk 4096"] = TrainVariant(arch, args, ["model.loss_chunk=4096"], compile=True)
    v["transformers"] = TrainVariant(arch, args, hf=True)
    return v


def section_train(args):
    peak, desc = peak_flops(DEV)
    print(f"\n## training, --size {args.size}, {args.tokens} tokens per step at T={args.seq_len}, bf16 autocast, "
          f"AdamW; median of {args.rounds} interleaved steps; MFU against {peak / 1e12:.0f} TFLOP/s ({desc})")
    table = Table("model", "variant", "tokens/s", "MFU", "vs transformers", "peak memory", "--dry-run estimate",
                  "est / measured")
    for arch in args.archs:
        variants = train_variants(arch, args)
        t = interleaved({k: v.step for k, v in variants.items()}, args.rounds, sync_time, warm_printer(arch))
        for name, v in variants.items():
            tps = v.B * v.T / t[name]
            mem = v.memory()
            est = None if v.hf or mem is None else _estimate(v.cfg, v.B, v.T)
            table.row(arch, name, f"{tps:,.0f}", f"{v.flops * tps / peak:.1%}", f"{t['transformers'] / t[name]:.2f}x",
                      f"{mem / 2**30:.2f} GiB" if mem else "-", f"{est / 2**30:.2f} GiB" if est else "-",
                      f"{est / mem:.2f}" if est else "-")
        del variants
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    table.show()


# ----------------------------------------------------------------------------- decode

def section_decode(args):
    n, P = args.new_tokens, 128
    print(f"\n## greedy decode tokens/s after a {P}-token prompt (--size {args.size}, bf16 weights, {n} new "
          f"tokens; rate = (n - 1) / (t_n - t_1), median of {args.rounds})")
    table = Table("model", "batch", "eager static", "compiled", "compiled + CUDA graph", "transformers",
                  "graph / transformers", "tokens equal to transformers")
    for arch in args.archs:
        cfg = load_config(arch=arch, size=args.size or None, overrides=args.overrides)
        torch.manual_seed(0)
        m = build_model(cfg.model, cfg.objective)
        dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
        hf = hf_twin(cfg, m).to(DEV, dtype).eval()
        m = m.to(DEV, dtype).eval()
        for B in (1, 8):
            idx = torch.randint(0, cfg.model.vocab_size, (B, P), device=DEV)

            def ours(k, compile, graph, idx=idx, m=m):
                return m.generate(idx, k, temperature=0, compile=compile, cuda_graph=graph)

            v = {"eager": lambda k: ours(k, False, False), "compiled": lambda k: ours(k, True, False),
                 "graph": lambda k: ours(k, True, True),
                 "hf": lambda k, idx=idx, hf=hf: hf.generate(idx, max_new_tokens=k, min_new_tokens=k,
                                                              do_sample=False, pad_token_id=0)}
            with torch.no_grad():
                rates = decode_rates(v, n, args.rounds, sync_time, warm_printer(f"{arch} batch {B}"))
                tps = {k: B * rate for k, rate in rates.items()}
                same = (v["graph"](n) == v["hf"](n))[:, P:].float().mean().item()
            table.row(arch, str(B), *(f"{tps[k]:,.0f}" for k in ("eager", "compiled", "graph", "hf")),
                      f"{tps['graph'] / tps['hf']:.2f}x", f"{same:.0%}")
    table.show()


SECTIONS = {"env": section_env, "train": section_train, "decode": section_decode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=list(SECTIONS), help="run only these sections (repeatable)")
    p.add_argument("--size", default="124m", help="a --size preset of train.py (default 124m; \"\" = the preset's own size)")
    # choices: an override after the list (--archs hybrid model.d_model=512) is named as no preset, not run as one
    p.add_argument("--archs", nargs="+", default=["transformer", "hybrid"], choices=sorted(presets()),
                   help="presets to time (default: transformer hybrid); give overrides before --archs")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=16384, help="train: tokens per step")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per variant, interleaved (median)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated per call")
    p.add_argument("--band", type=int, default=0, help="train: every attention layer a sliding window of this "
                   "many tokens, and flex_attention variants added (our band kernel against the library's)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the smoke test's tiny run
    p.add_argument("overrides", nargs="*", help="config overrides for every model, e.g. model.d_model=512")
    args = p.parse_args(argv)
    global DEV
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time (bench/speed.py is the CPU benchmark)")
        return 0
    DEV = resolve_device(args.device)  # on CUDA also turns on TF32 for fp32 leftovers, as the trainer runs
    for name in args.only or SECTIONS:
        SECTIONS[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
