"""Export a run directory to other runtimes, and import Hugging Face checkpoints.

One module per format; each has `export(model, tok, cfg, out, opts)` writing into `out` (a fresh
temporary path that `convert()` publishes only after the whole export succeeded), and a
`verify`-style helper the tests use to run the artefact in its real runtime.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import publish
from ..errors import ConfigError
from ..rundir import RunDir

# format -> (module, pip extra that provides its runtime)
FORMATS = {
    "hf": ("hf", "export"),
    "onnx": ("onnx", "onnx"),
    "executorch": ("executorch", "executorch"),
    "coreml": ("coreml", "coreml"),
    "gguf": ("gguf", "gguf"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DECODE_GRAPHS = ("onnx", "executorch", "coreml")  # the formats whose graphs are sized by max_len
DEFAULT_MAX_LEN = 1024
DEFAULT_CONTEXT = 4096  # hf/gguf context length of a RoPE run without --max-len or model.context_length


@dataclass
class ExportOptions:
    dtype: str = "fp32"
    quant: str | None = None  # int8 (weight-only, torch/executorch/onnx) | q8_0 (gguf)
    # KV-cache slots in the decode graphs (onnx, executorch, coreml), the stated context length for hf
    # and gguf; None: see resolve_max_len
    max_len: int | None = None
    eval_bpb: bool = False  # with --quant int8: report val bpb before/after on the run's data


def require(module: str, fmt: str, extra: str):
    """Import an optional dependency, or a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"--to {fmt} needs the '{module}' package ({e.name or e}): "
                          f"pip install -e '.[{extra}]'") from None


FILE_FORMATS = ("executorch", "gguf")  # a single file at --out; the other formats (and run dirs) are folders


def check_out(out, force: bool, source=None, is_dir: bool = True):
    """Refuse an existing output without --force, and even with it an output that holds the source
    or lies inside it (replacing it would delete what is converted) or is of the other kind (a folder
    where a file goes, or the reverse: --force replaces a mistyped path's whole tree, nothing merges)."""
    dst = Path(out).resolve()
    if source is not None:
        src = Path(source).resolve()
        if dst == src or src in dst.parents:
            raise ConfigError(f"output {out} is inside the source {source}; write the export elsewhere")
        if dst in src.parents:
            raise ConfigError(f"output {out} contains the source {source}; replacing it would delete the source: "
                              "write the export elsewhere")
    if not Path(out).exists():
        return
    if dst.is_dir() != is_dir:
        have, want = ("a folder", "a file") if dst.is_dir() else ("a file", "a folder")
        raise ConfigError(f"output {out} is {have} but this writes {want}; remove it or choose another --out")
    if not force:
        raise ConfigError(f"output {out} exists (pass --force to replace it)")


def check_options(fmt: str, opts: ExportOptions):
    """One line for an option the format has no use for: nothing is silently ignored."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    if opts.quant not in (None, "int8", "q8_0"):
        raise ConfigError(f"unknown quantization {opts.quant!r}; choose int8 or q8_0")
    if opts.quant == "q8_0" and fmt != "gguf":
        raise ConfigError("--quant q8_0 is a GGUF type; use --quant int8 for other formats")
    if opts.quant == "int8" and fmt not in ("executorch", "onnx"):
        raise ConfigError(f"--quant int8 applies to executorch and onnx, not {fmt}"
                          + (" (use --quant q8_0)" if fmt == "gguf" else ""))
    if opts.dtype == "bf16" and fmt in ("onnx", "coreml"):  # onnxruntime's CPU kernels / Core ML have no bf16
        raise ConfigError(f"--dtype bf16 is not supported for {fmt} (its runtime has no bf16 kernels); use --dtype fp16")


def convert(run_dir, fmt: str, out, opts: ExportOptions | None = None, force: bool = False) -> dict:
    """Export the run in `run_dir` to `fmt` at `out`; returns a small report dict."""
    opts = opts or ExportOptions()
    check_options(fmt, opts)
    if fmt == "coreml" and Path(out).suffix != ".mlpackage":  # coremltools would save at out + ".mlpackage"
        raise ConfigError(f"--to coreml writes an .mlpackage: name --out {Path(out).name}.mlpackage")
    check_out(out, force, source=run_dir, is_dir=fmt not in FILE_FORMATS)  # before the (slow) load
    mod_name, _ = FORMATS[fmt]
    mod = importlib.import_module(f"{__name__}.{mod_name}")
    run = RunDir.open(run_dir)
    if run.config().train.lora.r:  # a LoRA run reads its base's weights: replacing the base breaks the run
        check_out(out, force, source=run.lora_base().path, is_dir=fmt not in FILE_FORMATS)
    cfg, model, tok = run.load("cpu")
    model = model.float()
    mod.check_supported(cfg.model)
    opts = replace(opts, max_len=resolve_max_len(fmt, cfg.model, opts.max_len))
    note_one_token(fmt, cfg.model)
    if opts.quant == "int8" and opts.eval_bpb:
        check_eval_data(cfg)
    with publish(out) as staged:  # an existing --out (with --force) is replaced only after success
        report = mod.export(model, tok, cfg, staged, opts) or {}
        template = run.chat_template()
        if fmt == "hf" and template is not None:  # where transformers' apply_chat_template finds it
            (staged / "chat_template.jinja").write_text(template, encoding="utf-8")
        if opts.quant == "int8" and opts.eval_bpb:  # inside: a failing eval publishes nothing
            from .quant import bpb_change

            report.update(bpb_change(cfg, model, tok))
    report.setdefault("format", fmt)
    report["path"] = str(out)
    report["bytes"] = path_size(out)
    return report


def check_eval_data(cfg):
    """The int8 val-bpb report reads the run's data: a path that does not resolve from here (data.spec
    is kept as typed, relative to where train.py ran) is refused before the export, not after it."""
    from ..data import resolve_spec
    from ..errors import DataError

    try:
        resolve_spec(cfg.data.spec)
    except DataError as e:
        raise ConfigError(f"--quant int8 reports the val bpb on the run's data, and {e} (from {Path.cwd()}): "
                          f"run from where the run was trained, or pass --no-eval") from None


def resolve_max_len(fmt: str, mcfg, max_len: int | None) -> int:
    """The decode graphs' length (KV slots), or for hf and gguf the context length their config
    states. Under model.pos=learned the position table ends at model.max_positions: an explicit
    --max-len above it is refused, hf/gguf state it, and the decode graphs' default shrinks to it when
    smaller (a note on stderr, where it leaves the JSON report on stdout whole). RoPE positions have
    no such limit: hf/gguf state model.context_length (an import's own), else DEFAULT_CONTEXT; the
    decode graphs' KV slots are memory, so that length does not size them."""
    limit = mcfg.max_positions if mcfg.pos == "learned" else None
    if max_len is not None:
        if limit is not None and max_len > limit:
            raise ConfigError(f"--max-len {max_len} exceeds this run's model.max_positions={limit} (model.pos=learned: "
                              f"no position past it): use --max-len {limit} or less")
        return max_len
    if fmt not in DECODE_GRAPHS:
        return limit or mcfg.context_length or DEFAULT_CONTEXT
    if limit is not None and limit < DEFAULT_MAX_LEN:
        print(f"note: --max-len {limit}, not {DEFAULT_MAX_LEN}: this run has model.max_positions={limit} "
              f"(model.pos=learned)", file=sys.stderr)
        return limit
    return DEFAULT_MAX_LEN


def note_one_token(fmt: str, mcfg):
    """Say on stderr when the decode graphs take one token a call because of a block (coreml's always do)."""
    from .step import one_token_blocks

    blocks = one_token_blocks(mcfg) if fmt in ("onnx", "executorch") else []
    if blocks:
        from arch.registry import MIXERS

        print(f"note: the {fmt} graph takes one token a call (a prompt is fed token by token): block "
              f"{blocks[0]!r}: {MIXERS[blocks[0]].no_export}", file=sys.stderr)


def path_size(p) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
