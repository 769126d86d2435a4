"""Shared pieces: RMSNorm / LayerNorm, rotary embeddings (optionally Llama-3 scaled), the SwiGLU and GELU MLPs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 (as Llama/Qwen3/LFM2 do) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg, dim: int) -> nn.Module:
    """The block/final norm model.norm names: RMSNorm, or LayerNorm with a bias (GPT-2)."""
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.norm_eps)


def llama3_inv_freq(inv, scaling: dict):
    """Llama-3's frequency scaling: wavelengths longer than the original context / low_freq_factor are
    stretched by `factor`, those shorter than context / high_freq_factor kept, the band between blended."""
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > ctx / lo, inv / factor, inv)
    mid = (wavelen <= ctx / lo) & (wavelen >= ctx / hi)
    return torch.where(mid, blended, out)


class Rotary(nn.Module):
    """RoPE in the rotate-half layout (pairs (i, i + hd/2)), the layout HF checkpoints use.

    Angles are computed for the absolute positions asked for, so the same module serves
    training at any context length and decode at any offset.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        if scaling:
            inv = llama3_inv_freq(inv, scaling)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x, start: int = 0):
        """x: [B, H, T, hd] -> rotated x; positions start, ..., start + T - 1."""
        return self.at(x, torch.arange(start, start + x.shape[-2], device=x.device))

    def at(self, x, positions):
        """x: [B, H, T, hd] rotated to the absolute positions [T] (a tensor: static decode, export)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(x.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SwiGLU(nn.Module):
    """Channel mixer: w2(silu(w1 x) * w3 x). Names follow LFM2 (w1 gate, w3 up, w2 down)."""

    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=bias)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """Channel mixer: proj(gelu(fc x)), GELU's tanh approximation (GPT-2's gelu_new)."""

    def __init__(self, d_model: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, ffn_dim, bias=bias)
        self.proj = nn.Linear(ffn_dim, d_model, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))
