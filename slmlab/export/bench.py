"""Export one run to every format, then measure file size, parity with our PyTorch model and decode
speed in each format's own runtime. Prints a markdown table (docs/export.md quotes it).

    python -m slmlab.export.bench --run runs/hybrid [--steps 64] [--threads 1]

Parity = max |logit - ours| over a prefill of the prompt and `steps` decode steps fed the same
tokens (fp32 unless the row says otherwise; int8/q8_0 rows are compared with the fp32 model, so
they show the quantization error). Decode tok/s = steps / wall time of the decode loop, batch 1.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ExportOptions, convert, path_size


def _ours(model, idx, steps):
    from .step import reference_decode

    pre, toks, st = reference_decode(model, idx, steps)
    with torch.no_grad():  # time the decode loop alone
        states = model.init_state(1)
        _, states = model(idx, states=states)
        t0 = time.perf_counter()
        for i in range(steps):
            _, states = model(toks[:, i:i + 1], states=states)
        dt = time.perf_counter() - t0
    return pre, toks, st, steps / dt


def _diff(pre, st, ref_pre, ref_st):
    """The largest |difference| over the prefill and step logits; inf where a runtime gave a non-finite
    value (Python's max(d, nan) is d: all-NaN step logits read as a perfect match)."""
    d = [(pre.float() - ref_pre).abs().flatten()]
    if st is not None and st.numel():
        d.append((st.float() - ref_st).abs().flatten())
    d = torch.cat(d)
    return d.max().item() if bool(torch.isfinite(d).all()) else float("inf")


@dataclass
class Case:
    """What every runtime's row is measured on: the run, a scratch folder, the prompt, the decode
    tokens our model produced and its logits for them."""
    run: Path
    tmp: Path
    idx: torch.Tensor
    toks: torch.Tensor
    ref_pre: torch.Tensor
    ref_st: torch.Tensor
    steps: int
    threads: int
    max_len: int

    def export(self, fmt, name, **kw) -> int:
        return convert(self.run, fmt, self.tmp / name, ExportOptions(max_len=self.max_len, **kw))["bytes"]

    def diff(self, pre, st) -> float:
        return _diff(pre, st, self.ref_pre, self.ref_st)


def _hf(c: Case, f: str):
    import transformers

    size = c.export("hf", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(c.tmp / "hf", local_files_only=True).eval()
    with torch.no_grad():
        out = hf(c.idx, use_cache=True)
        pre, past, st = out.logits, out.past_key_values, []
        t0 = time.perf_counter()
        for i in range(c.steps):
            out = hf(c.toks[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            st.append(out.logits)
        dt = time.perf_counter() - t0
    return "HF transformers (fp32)", size, c.diff(pre, torch.cat(st, 1)), c.steps / dt


def _rate(steps: int, dt: float):
    """Decode tokens/s from a run's time less a setup-and-prefill run's; None (printed n/a) when
    the noise of a busy machine leaves no time, rather than a negative rate. Give more --steps."""
    return steps / dt if dt > 0 else None


def _onnx(c: Case, f: str):
    from .onnx import run_onnx

    size = c.export("onnx", "onnx")
    run_onnx(c.tmp / "onnx", c.idx, 2, feed=c.toks, threads=c.threads)  # warm up
    t0 = time.perf_counter()
    pre, _, _, st = run_onnx(c.tmp / "onnx", c.idx, c.steps, feed=c.toks, threads=c.threads)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_onnx(c.tmp / "onnx", c.idx, 0, threads=c.threads)
    dt -= time.perf_counter() - t1  # session creation + prefill
    return "ONNX / onnxruntime (fp32)", size, c.diff(pre, st), _rate(c.steps, dt)


def _executorch(c: Case, f: str):
    from .executorch import run_pte

    q = "int8" if f.endswith("int8") else None
    size = c.export("executorch", f + ".pte", quant=q)
    t0 = time.perf_counter()
    pre, _, st = run_pte(c.tmp / (f + ".pte"), c.idx, c.steps, feed=c.toks)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_pte(c.tmp / (f + ".pte"), c.idx, 0)
    dt -= time.perf_counter() - t1
    return f"ExecuTorch XNNPACK ({q or 'fp32'})", size, c.diff(pre, st), _rate(c.steps, dt)


def _coreml(c: Case, f: str):
    return "CoreML .mlpackage (fp32)", c.export("coreml", "m.mlpackage"), None, None  # predicts on macOS only


def _gguf(c: Case, f: str):
    kind = f.split("-")[1]
    kw = {"quant": "q8_0"} if kind == "q8_0" else {"dtype": {"f32": "fp32", "f16": "fp16"}[kind]}
    size = c.export("gguf", f + ".gguf", **kw)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"GGUF {kind} / llama.cpp", size, None, None
    from .gguf import open_llama

    # quantized files run without weight repacking: with it llama.cpp segfaults on AMX CPUs (open_llama)
    quantized = kind == "q8_0"
    llm = open_llama(c.tmp / (f + ".gguf"), repack=not quantized, n_ctx=c.max_len, logits_all=True,
                     n_threads=c.threads, type_k=0, type_v=0, verbose=False)
    kind += " (no repack)" if quantized else ""
    ids = c.idx[0].tolist()
    llm.eval(ids)
    pre = torch.tensor(llm.scores[:len(ids)].copy())[None]
    t0 = time.perf_counter()
    llm.eval(c.toks[0].tolist()[:1])
    for t in c.toks[0].tolist()[1:]:
        llm.eval([t])
    dt = time.perf_counter() - t0
    st = torch.tensor(llm.scores[len(ids):len(ids) + c.steps].copy())[None]
    return f"GGUF {kind} / llama.cpp", size, c.diff(pre, st), c.steps / dt


def _runner(f: str):
    if f.startswith("executorch"):
        return _executorch
    if f.startswith("gguf"):
        return _gguf
    return {"hf": _hf, "onnx": _onnx, "coreml": _coreml}[f]


def bench(run, steps=64, threads=1, formats=None, max_len=None):
    """Rows of table(); the exports hold max_len positions (default: the prompt and steps, at least 256)."""
    from ..rundir import RunDir

    torch.set_num_threads(threads)
    _, model, tok = RunDir.open(run).load()
    model = model.float().eval()
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    idx = torch.tensor([tok.encode(text)])
    max_len = max_len or max(256, idx.shape[1] + steps)
    ref_pre, toks, ref_st, tps = _ours(model, idx, steps)
    rows = [("PyTorch (ours, eager)", path_size(Path(run) / "model.safetensors"), 0.0, tps)]
    want = formats or ["hf", "onnx", "executorch", "executorch-int8", "coreml", "gguf-f32", "gguf-f16", "gguf-q8_0"]
    with tempfile.TemporaryDirectory(prefix="slmlab-bench-") as tmp:
        case = Case(Path(run), Path(tmp), idx, toks, ref_pre, ref_st, steps, threads, max_len)
        for f in want:
            try:
                rows.append(_runner(f)(case, f))
            except Exception as e:  # one broken runtime should not hide the other rows
                rows.append((f"{f}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})", None, None, None))
    return rows


def table(rows) -> str:
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    lines = ["| format | file size | max abs logit diff vs ours | decode tok/s |", "|---|---:|---:|---:|"]
    for name, size, diff, tps in rows:
        lines.append(f"| {name} | {fmt(size and size / 1024, '{:,.0f} KiB')} | {fmt(diff, '{:.1e}')} | "
                     f"{fmt(tps, '{:,.0f}')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="threads for every runtime (1 default: spinning thread pools collapse on a busy machine)")
    p.add_argument("--formats", default=None, help="comma list (default: all)")
    args = p.parse_args(argv)
    rows = bench(args.run, args.steps, args.threads, args.formats.split(",") if args.formats else None)
    print(table(rows))


if __name__ == "__main__":
    main()
