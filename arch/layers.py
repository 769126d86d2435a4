"""Shared pieces: RMSNorm / LayerNorm, rotary embeddings (optionally Llama-3 scaled), the SwiGLU and GELU MLPs."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm_ref(x, weight, eps: float):
    """x / rms(x) * weight, normalised in fp32 (as Llama/Qwen3/LFM2 do) and cast back: the reference."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))  # (an fp64 model stays fp64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: fused reductions (vector_norm, vecdot) and 4 passes
    over the activations where autograd's graph of the reference makes ~8. 25 of these run per step of
    the default transformer (block norms and QK-norm); eager training step 1.067x at T=256 and 1.036x at
    T=2048 (interleaved, 2 threads; compiled: unchanged). Tested against rms_norm_ref (tests/test_arch.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ms = torch.linalg.vector_norm(x, 2, -1, keepdim=True).square_().div_(x.shape[-1])
        rstd = ms.add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, weight = ctx.saved_tensors
        gw = g * weight
        # d/dx of x * rstd(x): rstd * (gw - xhat * mean(gw * xhat))
        coef = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(-xhat.shape[-1])
        gx = torch.addcmul(gw, xhat, coef).mul_(rstd) if ctx.needs_input_grad[0] else None
        gweight = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gweight, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Training in fp32 takes _RMSNormFn; fp32 inference takes torch's fused
    kernel (F.rms_norm: no autograd graph to build, so none of its slow decomposed backward); export,
    compiled code and lower precision (normalised in fp32, scaled after the cast, as the HF models
    do) take rms_norm_ref. One token: 9.0 vs 12.6 us a call; static eager decode 1.01x (32-token prompt) and
    1.03-1.05x (2000) for the default hybrid and transformer, interleaved, 2 threads; eval forward
    unchanged."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32 and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        if x.dtype == torch.float32 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)


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
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat([cos, cos], dim=-1).to(x.dtype), torch.cat([-sin, sin], dim=-1).to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _RotateFn.apply(x, cos, sin)
        return rotate_half_pairs(x, cos, sin)


def rotate_half_pairs(x, cos, signed_sin, fused: bool = False):
    """x * cos + rotate_half(x) * sin, with rotate_half's minus sign carried by signed_sin = [-sin, sin]
    so its halves only swap. fused (training) takes three passes (mul, cat, addcmul) where the
    textbook form makes five (neg, cat, mul, mul, add); the unfused form uses only ops every exporter
    knows (CoreML has no addcmul)."""
    x1, x2 = x.chunk(2, dim=-1)
    if fused:
        return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), signed_sin)
    return x * cos + torch.cat([x2, x1], dim=-1) * signed_sin


def rope_ref(x, cos, sin):
    """The textbook rotate-half RoPE (cos, sin: [T, hd], both halves equal): the reference."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class _RotateFn(torch.autograd.Function):
    """RoPE with its backward written as the inverse rotation (the same three passes with sin
    negated) where autograd's graph of the forward makes ~five, and nothing saved but cos and sin.
    Eager training step of the default transformer 1.016x at T=256, ~1.0x at T=2048 (interleaved,
    2 threads). Tested against rope_ref (tests/test_arch.py)."""

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return rotate_half_pairs(x, cos, signed_sin, fused=True)

    @staticmethod
    def backward(ctx, g):
        cos, signed_sin = ctx.saved_tensors
        return rotate_half_pairs(g, cos, -signed_sin, fused=True), None, None


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
