"""Export-friendly decode graph: states in and out as plain tensors, KV cache of fixed length.

`StepLM(model, max_len)(idx [B,T], pos [1] int64, *states) -> (logits [B,T,V], *new_states)` runs
T tokens at absolute positions pos..pos+T-1. Per layer the states are, in layer order:
  attn: k, v  [B, n_kv_heads, max_len, head_dim]  (slot p holds position p; sliding layers mask
        by window instead of evicting, so every layer has the same static shape)
  conv: conv  [B, d_model, K-1]                    (the last K-1 gated inputs, as ConvState.buf)
Static shapes suit every edge runtime (ONNX, ExecuTorch, CoreML) and the graph has no data-
dependent control flow: cache writes are a one-hot matmul + where, not a scatter. The same graph
serves prefill (pos=0, T=prompt length, zero states) and decode (T=1). It reuses the model's own
modules; only the cache bookkeeping is new, and tests compare it with LM's KVCache decode.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kernels.reference import causal_conv1d_ref

from ..errors import ConfigError


def check_supported(mcfg):
    kinds = set(mcfg.layer_types())
    if not mcfg.causal:
        raise ConfigError("bidirectional (diffusion) models have no incremental decode graph to export")
    if kinds - {"attn", "conv"}:
        raise ConfigError(f"blocks {sorted(kinds - {'attn', 'conv'})} have no export decode graph "
                          "(only attn and conv layers export)")


def _rope(x, positions, inv_freq):
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class StepLM(nn.Module):
    def __init__(self, model, max_len: int = 1024):
        super().__init__()
        check_supported(model.cfg)
        self.model = model
        self.max_len = max_len
        self.kinds = model.cfg.layer_types()
        self.register_buffer("slots", torch.arange(max_len), persistent=False)

    # ---- state layout ----
    def state_names(self) -> list[str]:
        names = []
        for i, kind in enumerate(self.kinds):
            names += [f"k_{i}", f"v_{i}"] if kind == "attn" else [f"conv_{i}"]
        return names

    def state_shapes(self, batch: int) -> list[tuple]:
        cfg = self.model.cfg
        shapes = []
        for kind in self.kinds:
            if kind == "attn":
                shapes += [(batch, cfg.n_kv_heads, self.max_len, cfg.hd)] * 2
            else:
                shapes.append((batch, cfg.d_model, cfg.conv_kernel - 1))
        return shapes

    def init_states(self, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=dtype) for s in self.state_shapes(batch)]

    # ---- graph ----
    def forward(self, idx, pos, *states):
        return self._run(idx, pos, states)

    def prefill(self, idx):
        """Full-sequence logits without states (keys are just the prompt's own)."""
        return self._run(idx, None, None)[0]

    def _run(self, idx, pos, states):
        m = self.model
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device)
        if pos is not None:
            positions = pos.reshape(1) + positions  # [T]
        x = m.embed(idx)
        new, si = [], 0
        for layer in m.layers:
            h = layer.mixer_norm(x)
            if layer.kind == "attn":
                kc, vc = (None, None) if states is None else (states[si], states[si + 1])
                y, k, v = self._attn(layer.mixer, h, positions, kc, vc)
                new += [k, v]
                si += 2
            else:
                y, buf = self._conv(layer.mixer, h, None if states is None else states[si])
                new.append(buf)
                si += 1
            x = x + y
            x = x + layer.mlp(layer.mlp_norm(x))
        return (m.lm_head(m.norm(x)), *new)

    def _attn(self, a, h, positions, kc, vc):
        B, T, _ = h.shape
        q = a.q_norm(a.q_proj(h).view(B, T, a.n_heads, a.hd)).transpose(1, 2)
        k = a.k_norm(a.k_proj(h).view(B, T, a.n_kv_heads, a.hd)).transpose(1, 2)
        v = a.v_proj(h).view(B, T, a.n_kv_heads, a.hd).transpose(1, 2)
        q, k = _rope(q, positions, a.rotary.inv_freq), _rope(k, positions, a.rotary.inv_freq)
        if kc is None:  # prefill without a cache: the keys are the prompt's own
            slots, kc, vc = positions, k, v
        else:  # write the T new keys at their slots: onehot [T, L]; the matmul sums one nonzero term
            slots = self.slots
            onehot = (slots[None, :] == positions[:, None]).to(k.dtype)
            hit = (onehot.sum(0) > 0)[:, None]  # [L, 1]
            kc = torch.where(hit, onehot.t() @ k, kc.to(k.dtype))
            vc = torch.where(hit, onehot.t() @ v, vc.to(v.dtype))
        visible = slots[None, :] <= positions[:, None]  # [T, L]
        if a.window is not None:
            visible = visible & (slots[None, :] > positions[:, None] - a.window)
        rep = a.n_heads // a.n_kv_heads
        kk = kc.repeat_interleave(rep, dim=1) if rep > 1 else kc
        vv = vc.repeat_interleave(rep, dim=1) if rep > 1 else vc
        att = (q @ kk.transpose(-1, -2)) * (a.hd ** -0.5)
        att = att.masked_fill(~visible, float("-inf")).softmax(-1)
        y = (att @ vv).transpose(1, 2).reshape(B, T, a.n_heads * a.hd)
        return a.out_proj(y), kc, vc

    def _conv(self, c, h, buf):
        b, g, xx = c.in_proj(h).chunk(3, dim=-1)
        y, buf = causal_conv1d_ref(b * xx, c.conv.weight.squeeze(1), c.conv.bias, initial_state=buf,
                                   return_final_state=True)  # buf None: zeros, as at the sequence start
        return c.out_proj(g * y), buf


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
