"""Int8 weight-only quantization (per output channel, symmetric) for the PyTorch export paths.

Weights are stored as int8 plus one fp scale per row and dequantized in the graph right before the
matmul/gather, so the artefact holds ~1/4 of the fp32 bytes while activations stay in float. The
reference is plain `round(w / s) * s`: `fake_quantize` gives the float model it must equal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_rows(w: torch.Tensor):
    """w [out, in] -> (int8 [out, in], scale [out, 1]) with w ~= q * scale, |q| <= 127."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear, qs=None):
        super().__init__()
        q, s = qs or quantize_rows(lin.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s.to(lin.weight.dtype))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    def __init__(self, emb: nn.Embedding, qs=None):
        super().__init__()
        q, s = qs or quantize_rows(emb.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s.to(emb.weight.dtype))

    def forward(self, idx):
        return self.qweight[idx].to(self.scale.dtype) * self.scale[idx]


def quantize_stack(w: torch.Tensor):
    """A stack of matrices w [n, out, in] -> (int8 [n, out, in], scale [n, out, 1]), each row on its own."""
    q, scale = quantize_rows(w.reshape(-1, w.shape[-1]))
    return q.reshape(w.shape), scale.reshape(*w.shape[:-1], 1)


class Dequantize(nn.Module):
    """A parametrization: the int8 stack it is given, times its row scales, in the scales' dtype."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, q):
        return q.to(self.scale.dtype) * self.scale


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear and nn.Embedding (in place) by its int8 weight-only form, and store each
    matrix stack a module names in `matrix_stacks` (MoE experts) as int8, dequantized where the module
    reads it (a parametrization). A tied embedding/head pair shares one int8 table."""
    from torch.nn.utils import parametrize

    done = {}  # id(weight) -> (q, scale)
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (nn.Linear, nn.Embedding)):
                qs = done.setdefault(id(child.weight), quantize_rows(child.weight))
                cls = Int8Linear if isinstance(child, nn.Linear) else Int8Embedding
                setattr(mod, child_name, cls(child, qs))
        for name in getattr(mod, "matrix_stacks", ()):
            w = getattr(mod, name)
            q, scale = quantize_stack(w)
            delattr(mod, name)
            mod.register_parameter(name, nn.Parameter(q, requires_grad=False))
            parametrize.register_parametrization(mod, name, Dequantize(scale.to(w.dtype)), unsafe=True)
    return model


@torch.no_grad()
def fake_quantize(model: nn.Module) -> nn.Module:
    """The float model whose weights are the dequantized int8 ones (reference for quantize_int8)."""
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            q, s = quantize_rows(mod.weight)
            mod.weight.copy_(q.float() * s)
        for name in getattr(mod, "matrix_stacks", ()):
            q, s = quantize_stack(getattr(mod, name))
            getattr(mod, name).copy_(q.float() * s)
    return model


def weight_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


def bpb_change(cfg, model: nn.Module, tok, max_tokens: int | None = 65536) -> dict:
    """Validation bits-per-byte of the run's float `model` before and after int8 weight-only
    quantization. The "after" model is fake_quantize's float one (equal to the int8 graph, and a plain
    LM that evaluate's fused loss can read the head weight of); the byte counts are quantize_int8's."""
    import copy

    from ..data import prepare_data
    from ..evaluate import evaluate, run_eval_shape, token_byte_lengths

    model = model.float().eval()
    # Keyed by the run's tokenizer: the trainer's entry for a tokenizer it trained is keyed by data.spec and
    # vocab_size instead, but looking that up could train a tokenizer for a run that never had that entry.
    bundle = prepare_data(cfg.data.spec, cfg.model.vocab_size, Path(cfg.data.cache_dir).expanduser(), cfg.data.val_frac,
                          tokenizer=tok, progress=False, quiet=True)
    lens = token_byte_lengths(tok)
    dev = torch.device("cpu")
    T, B = run_eval_shape(cfg)
    base = evaluate(model, bundle.val, cfg, dev, lens, max_tokens=max_tokens, seq_len=T, batch_size=B)
    quant = evaluate(fake_quantize(copy.deepcopy(model)), bundle.val, cfg, dev, lens, max_tokens=max_tokens,
                     seq_len=T, batch_size=B)
    if not base or not quant:  # a validation split shorter than one window of the run's eval shape
        print(f"note: no val-bpb report: the validation split is shorter than one {T}-token evaluation window",
              file=sys.stderr)
        return {}
    return {"fp32_bpb": base["val_bpb"], "int8_bpb": quant["val_bpb"],
            "delta_bpb": quant["val_bpb"] - base["val_bpb"], "fp32_weight_bytes": weight_bytes(model),
            "int8_weight_bytes": weight_bytes(quantize_int8(copy.deepcopy(model)))}
