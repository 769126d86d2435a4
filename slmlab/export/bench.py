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
    d = (pre.float() - ref_pre).abs().max().item()
    if st is not None and st.numel():
        d = max(d, (st.float() - ref_st).abs().max().item())
    return d


def bench(run, steps=64, threads=1, formats=None, max_len=256):
    from ..rundir import RunDir

    torch.set_num_threads(threads)
    _, model, tok = RunDir.open(run).load()
    model = model.float().eval()
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    idx = torch.tensor([tok.encode(text)])
    ref_pre, toks, ref_st, tps = _ours(model, idx, steps)
    rows = [("PyTorch (ours, eager)", path_size(Path(run) / "model.safetensors"), 0.0, tps)]
    tmpdir = tempfile.TemporaryDirectory(prefix="slmlab-bench-")
    tmp = Path(tmpdir.name)
    want = formats or ["hf", "onnx", "executorch", "executorch-int8", "coreml", "gguf-f32", "gguf-f16", "gguf-q8_0"]

    def export(fmt, name, **kw):
        return convert(run, fmt, tmp / name, ExportOptions(max_len=max_len, **kw))["bytes"]

    for f in want:
        try:
            if f == "hf":
                import transformers

                size = export("hf", "hf")
                hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", local_files_only=True).eval()
                with torch.no_grad():
                    out = hf(idx, use_cache=True)
                    pre, past, st = out.logits, out.past_key_values, []
                    t0 = time.perf_counter()
                    for i in range(steps):
                        out = hf(toks[:, i:i + 1], past_key_values=past, use_cache=True)
                        past = out.past_key_values
                        st.append(out.logits)
                    dt = time.perf_counter() - t0
                rows.append(("HF transformers (fp32)", size, _diff(pre, torch.cat(st, 1), ref_pre, ref_st), steps / dt))
            elif f == "onnx":
                from .onnx import run_onnx

                size = export("onnx", "onnx")
                run_onnx(tmp / "onnx", idx, 2, feed=toks)  # warm up
                t0 = time.perf_counter()
                pre, _, _, st = run_onnx(tmp / "onnx", idx, steps, feed=toks)
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                run_onnx(tmp / "onnx", idx, 0)
                dt -= time.perf_counter() - t1  # session creation + prefill
                rows.append(("ONNX / onnxruntime (fp32)", size, _diff(pre, st, ref_pre, ref_st), steps / dt))
            elif f.startswith("executorch"):
                from .executorch import run_pte

                q = "int8" if f.endswith("int8") else None
                size = export("executorch", f + ".pte", quant=q)
                t0 = time.perf_counter()
                pre, _, st = run_pte(tmp / (f + ".pte"), idx, steps, feed=toks)
                dt = time.perf_counter() - t0
                t1 = time.perf_counter()
                run_pte(tmp / (f + ".pte"), idx, 0)
                dt -= time.perf_counter() - t1
                rows.append((f"ExecuTorch XNNPACK ({q or 'fp32'})", size, _diff(pre, st, ref_pre, ref_st), steps / dt))
            elif f == "coreml":
                size = export("coreml", "m.mlpackage")
                rows.append(("CoreML .mlpackage (fp32)", size, None, None))  # predicts on macOS only
            elif f.startswith("gguf"):
                kind = f.split("-")[1]
                kw = {"quant": "q8_0"} if kind == "q8_0" else {"dtype": {"f32": "fp32", "f16": "fp16"}[kind]}
                size = export("gguf", f + ".gguf", **kw)
                diff = speed = None
                try:
                    import llama_cpp

                    llm = llama_cpp.Llama(model_path=str(tmp / (f + ".gguf")), n_ctx=max_len, logits_all=True,
                                          n_threads=threads, type_k=0, type_v=0, verbose=False)
                    ids = idx[0].tolist()
                    llm.eval(ids)
                    pre = torch.tensor(llm.scores[:len(ids)].copy())[None]
                    t0 = time.perf_counter()
                    llm.eval(toks[0].tolist()[:1])
                    for t in toks[0].tolist()[1:]:
                        llm.eval([t])
                    dt = time.perf_counter() - t0
                    st = torch.tensor(llm.scores[len(ids):len(ids) + steps].copy())[None]
                    diff, speed = _diff(pre, st, ref_pre, ref_st), steps / dt
                except ImportError:
                    pass
                rows.append((f"GGUF {kind} / llama.cpp", size, diff, speed))
        except Exception as e:  # one broken runtime should not hide the other rows
            rows.append((f"{f}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})", None, None, None))
    tmpdir.cleanup()
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
