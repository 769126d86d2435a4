"""Export-friendly decode graph: states in and out as plain tensors, KV cache of fixed length.

`StepLM(model, max_len)(idx [B,T], pos [1] int64, *states) -> (logits [B,T,V], *new_states)` runs
T tokens at absolute positions pos..pos+T-1. It is the model's own static-state step
(`LM.forward_static`, the one model.generate decodes with) with inplace=False, so the graph has no
scatter and no data-dependent control flow. Per layer the states are, in layer order (each
mixer's `static_state_names`):
  attn: k, v  [B, n_kv_heads, max_len, head_dim]  (slot p holds position p; sliding layers mask
        by window instead of evicting, so every layer has the same static shape)
  conv: conv  [B, d_model, K-1]                    (the last K-1 gated inputs, as ConvState.buf)
  mamba2: conv [B, conv channels, K-1], h [B, nheads, headdim, d_state]   (as Mamba2State)
The same graph serves prefill (pos=0, T=prompt length, zero states) and decode (T=1); tests
compare it with LM's KVCache decode. A model with a block whose step cannot be traced with a symbolic
T (Mixer.no_export: deltanet) exports it with T fixed at 1 (one_token_blocks), prompts fed token by token.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError


def check_supported(mcfg):
    if not mcfg.causal:
        raise ConfigError("bidirectional (diffusion) models have no incremental decode graph to export")
    from arch.registry import MIXERS

    kinds = sorted({k for k in mcfg.layer_types() if not MIXERS[k].static_state_names})
    if kinds:
        raise ConfigError(f"blocks {kinds} have no static-state step, so no export decode graph "
                          "(a block exports when it has the static-state step: static_state_names, static_state, "
                          "forward_static; docs/blocks.md)")


def one_token_blocks(mcfg) -> list[str]:
    """The blocks whose step cannot be traced with a symbolic token count (Mixer.no_export): a model
    holding one exports graphs of one token a call (T static 1), and a prompt is fed token by token."""
    from arch.registry import MIXERS

    return sorted({k for k in mcfg.layer_types() if MIXERS[k].no_export})


class StepLM(nn.Module):
    def __init__(self, model, max_len: int = 1024):
        super().__init__()
        check_supported(model.cfg)
        self.model = model
        self.max_len = max_len

    # ---- state layout ----
    def state_names(self) -> list[str]:
        return [f"{n}_{i}" for i, layer in enumerate(self.model.layers) for n in layer.mixer.static_state_names]

    def init_states(self, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
        return [t for st in self.model.static_state(batch, self.max_len, torch.device("cpu"), dtype) for t in st]

    def state_shapes(self, batch: int) -> list[tuple]:
        meta = self.model.static_state(batch, self.max_len, torch.device("meta"))  # shapes, no memory
        return [tuple(t.shape) for st in meta for t in st]

    def float_dtype(self) -> torch.dtype:
        """The states' dtype: the model's float parameters' (after quantize_int8 the embedding and
        linears hold int8 buffers and have no .weight to ask)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    # ---- graph ----
    def forward(self, idx, pos, *states):
        grouped, i = [], 0
        for layer in self.model.layers:
            n = len(layer.mixer.static_state_names)
            grouped.append(list(states[i:i + n]))
            i += n
        logits, new = self.model.forward_static(idx, pos, grouped, inplace=False)
        return (logits, *[t for st in new for t in st])

    def prefill(self, idx):
        """Full-sequence logits from zero states sized to the prompt (keys are its own)."""
        zero = [t for st in self.model.static_state(idx.shape[0], idx.shape[1], idx.device, self.float_dtype())
                for t in st]
        return self.forward(idx, torch.zeros(1, dtype=torch.long, device=idx.device), *zero)[0]


def seq_axis(max_len: int, example: int, one_token: bool = False):
    """(example length, {1: torch.export Dim} or {}) for the token axis (dim 1) of a graph taking up to
    max_len tokens. An example longer than the Dim's max fails to export, and torch.export specializes a
    length-1 example to a constant; so the example is cut to max_len, and max_len == 1 is static, as is
    a one_token graph (one_token_blocks)."""
    if max_len == 1 or one_token:
        return 1, {}
    return min(example, max_len), {1: torch.export.Dim("seq", min=1, max=max_len)}


class Prefill(nn.Module):
    """idx [B, T] -> logits [B, T, V] with no states (StepLM.prefill as a module to export)."""

    def __init__(self, model, max_len: int = 1024):
        super().__init__()
        self.step = StepLM(model, max_len)

    def forward(self, idx):
        return self.step.prefill(idx)


def reference_decode(model, idx, n_steps: int, extra_tokens=None):
    """Our model's prefill logits and the logits of n decode steps (feeding `extra_tokens` or the
    greedy choice), via LM's own KVCache/ConvState path: the ground truth exports are checked against."""
    with torch.no_grad():
        states = model.init_state(idx.shape[0])
        logits, states = model(idx, states=states)
        pre = logits
        toks, steps = [], []
        nxt = logits[:, -1:].argmax(-1)
        for i in range(n_steps):
            if extra_tokens is not None:
                nxt = extra_tokens[:, i:i + 1]
            toks.append(nxt)
            logits, states = model(nxt, states=states)
            steps.append(logits)
            nxt = logits[:, -1:].argmax(-1)
    return pre, torch.cat(toks, 1), torch.cat(steps, 1)
