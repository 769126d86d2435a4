"""GQA attention with RoPE, QK-norm and optional sliding window (Qwen3/LFM2 style).

Window W: the query at position i sees keys j with i - W < j <= i (W keys including itself,
the HF convention). The decode state is a KV cache that evicts keys no future query can see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kernels import attention_op

from .block import Mixer
from .layers import RMSNorm, Rotary
from .registry import register


@dataclass
class KVCache:
    k: torch.Tensor  # [B, Hkv, L, hd], L <= window - 1 for sliding layers
    v: torch.Tensor
    seen: int = 0  # absolute position of the next token


@register("attn", "A")
class Attention(Mixer):
    residual_out = ("out_proj",)
    takes_window = True

    def __init__(self, cfg, layer_idx: int, window: Optional[int] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.set_window(window)
        self.causal = cfg.causal
        self.backend = cfg.kernels
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.hd, bias=cfg.attn_bias)
        self.out_proj = nn.Linear(self.n_heads * self.hd, d, bias=cfg.attn_out_bias)
        self.qk_norm = cfg.qk_norm
        self.qk_norm_all = cfg.qk_norm and cfg.qk_norm_scope == "all"  # one norm over the heads' channels
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.n_heads * self.hd if self.qk_norm_all else self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv_heads * self.hd if self.qk_norm_all else self.hd, cfg.norm_eps)
        # pos=learned: positions enter with the embeddings (arch/model.py), so no rotation here; none: NoPE.
        self.rotary = Rotary(self.hd, cfg.rope_theta, cfg.rope_scale()) if cfg.pos == "rope" else None
        # model.attn_scale: the softmax scale as a factor on q, so every kernel keeps its 1/sqrt(hd)
        self.q_scale = None if cfg.attn_scale is None else cfg.attn_scale * self.hd ** 0.5

    def set_window(self, window: Optional[int]):
        if window is not None and window <= 0:
            raise ValueError(f"attention window must be > 0, got {window}")
        self.window = window

    def flops_per_token(self, seq_len: int) -> float:
        """Scores (q.k) and values (p.v): 2 * H * hd multiply-adds per visible key each, x3 for
        fwd + bwd. Keys seen on average, as a continuous count (the T/2 of full causal attention, not
        (T + 1) / 2): causal T/2, with a window W < T the band's W - W^2/(2T) (the first W queries
        see fewer); bidirectional T, with W < T twice that band, 2W - W^2/T. (min(W, T/2) counted
        the default window 128 at T = 256 as 128 keys: they are 96.)"""
        T, w = seq_len, self.window
        ctx = T / 2 if w is None or w >= T else w - w * w / (2 * T)
        return 12 * self.n_heads * self.hd * ctx * (1 if self.causal else 2)

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """Per token: q_proj and k_proj outputs with their QK-norm internals (fp32: normalised,
        rsqrt per head, or per token under qk_norm_scope all); the rotated q, k and v, the output and the per-head
        logsumexp kept by the fused attention (it never stores the T x T scores). Per sequence
        position: RoPE's cos/sin for q and k. A sliding window narrower than T on the PyTorch path
        adds its [T, T] mask (a wider one covers every key: attention_ref builds none)."""
        hq, hkv = self.n_heads * self.hd, self.n_kv_heads * self.hd
        rsqrts = 2 if self.qk_norm_all else self.n_heads + self.n_kv_heads
        norms = (hq + hkv + rsqrts) * 4 if self.qk_norm else 0
        per_token = norms + (2 * hq + 2 * hkv) * act + self.n_heads * 4
        mask = seq_len * seq_len * 4 if self.window is not None and self.window < seq_len else 0
        return batch * seq_len * per_token + 4 * seq_len * self.hd * 4 + mask

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> KVCache:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.hd, device=device, dtype=dtype)
        return KVCache(empty, empty.clone(), 0)

    def _qkv(self, x, positions):
        """Projections, QK-norm and RoPE at the absolute positions [T]: q [B, H, T, hd], k, v [B, Hkv, T, hd]."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.n_heads, self.hd), k.view(B, T, self.n_kv_heads, self.hd)
        if self.qk_norm and not self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.hd).transpose(1, 2)
        if self.q_scale is not None:
            q = q * self.q_scale
        if self.rotary is None:
            return q, k, v
        return self.rotary.at(q, positions), self.rotary.at(k, positions), v

    def forward(self, x, state: Optional[KVCache] = None):
        B, T, _ = x.shape
        start = 0 if state is None else state.seen
        q, k, v = self._qkv(x, torch.arange(start, start + T, device=x.device))
        if state is not None:
            if not self.causal:
                raise RuntimeError("incremental decode needs a causal model")
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        y = attention_op(q, k, v, causal=self.causal, window=self.window, backend=self.backend)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
        if state is not None:
            # Keys older than window-1 positions are invisible to every future query: evict them.
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            state = KVCache(k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:], state.seen + T)
        return y, state

    # ---- static state: slot p of a [B, Hkv, max_len, hd] cache holds position p ----
    static_state_names = ("k", "v")

    def static_state(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        shape = (batch_size, self.n_kv_heads, max_len, self.hd)
        return [torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)]

    def forward_static(self, x, positions, state: list, inplace: bool):
        if not self.causal:
            raise RuntimeError("incremental decode needs a causal model")
        B, T, _ = x.shape
        q, k, v = self._qkv(x, positions)
        kc, vc = state
        if inplace:  # O(T) writes: what makes a decode step independent of the context length
            kc.index_copy_(2, positions, k.to(kc.dtype))
            vc.index_copy_(2, positions, v.to(vc.dtype))
        else:  # no scatter in the graph: a one-hot [T, L] matmul + where writes the T new rows
            onehot = (torch.arange(kc.shape[2], device=x.device)[None, :] == positions[:, None]).to(k.dtype)
            hit = (onehot.sum(0) > 0)[:, None]
            kc = torch.where(hit, onehot.t() @ k, kc.to(k.dtype))
            vc = torch.where(hit, onehot.t() @ v, vc.to(v.dtype))
        if inplace and T > 1:  # prefill or a chunk (eager only): the fast kernels over the written prefix
            end = int(positions[-1]) + 1
            y = attention_op(q, kc[:, :, :end].to(q.dtype), vc[:, :, :end].to(q.dtype), causal=True,
                             window=self.window, backend=self.backend)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)), [kc, vc]
        lo, ks, vs = 0, kc, vc  # the slots the step reads
        if inplace and positions.device.type == "cpu" and not torch.compiler.is_compiling():
            # Eager one-token step on the CPU: only the slots it can see (the written prefix, the last
            # `window` of it), so a step costs O(position), O(window) for a sliding layer, not O(max_len).
            # A compiled step keeps the static shapes its graph was built for; on a GPU reading the
            # position back would sync every layer of every token (and break a CUDA graph's capture).
            end = int(positions[-1]) + 1
            lo = 0 if self.window is None else max(0, end - self.window)
            ks, vs = kc[:, :, lo:end], vc[:, :, lo:end]
        slots = torch.arange(lo, lo + ks.shape[2], device=x.device)
        visible = slots[None, :] <= positions[:, None]  # [T, L]; unwritten slots lie in the future
        if self.window is not None:
            visible = torch.logical_and(visible, slots[None, :] > positions[:, None] - self.window)
        rep, scale = self.n_heads // self.n_kv_heads, self.hd ** -0.5
        if inplace:  # one token (chunks returned above): a kv head's rep query heads as rows against its cache.
            # A broadcast [B, Hkv, 1, L, hd] cache operand (below) made the compiled step copy the whole
            # cache per token: 3.4 vs 5.8 ms a token, transformer at 2,100 slots, interleaved, 1 thread.
            att = (q.reshape(B, self.n_kv_heads, rep, self.hd) @ ks.to(q.dtype).transpose(-1, -2)) * scale
            att = att.masked_fill(~visible, float("-inf")).softmax(-1)
            y = (att @ vs.to(q.dtype)).reshape(B, self.n_heads, T, self.hd)
        else:  # any T with a symbolic length (export): query heads grouped by kv head, [B, Hkv, rep, T, hd]
            qg = q.view(B, self.n_kv_heads, rep, T, self.hd)
            att = (qg @ kc.to(q.dtype).unsqueeze(2).transpose(-1, -2)) * scale
            att = att.masked_fill(~visible, float("-inf")).softmax(-1)
            # To [B, T, H*hd] in one permute, not via [B, H, T, hd] + transpose (same values): that
            # reshape made torch 2.11's torch.export fail with T symbolic (executorch, T in 1..max_len),
            # on a guard Min(hd*T, rep*hd*T) == hd*T it could not prove; 2.13 proves it.
            y = (att @ vc.to(q.dtype).unsqueeze(2)).permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * self.hd)
            return self.out_proj(y), [kc, vc]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)), [kc, vc]
