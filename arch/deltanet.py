"""Gated DeltaNet: linear attention with the gated delta rule (Yang, Kautz & Hatamizadeh 2024), the
token mixer of Qwen3-Next's linear layers and fla's `GatedDeltaNet`. Letter D.

Per value head h, a matrix state S [dk, dv] replaces the KV cache, so decode costs the same at any
context length:
    S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)    (the delta rule:
    o_t = S_t^T q_t                                         write only what S does not already predict)
with k, q unit-norm per head (q also scaled by dk^-1/2), beta_t = sigmoid(b_t) in (0, 1) and the decay
g_t = -exp(A_log) * softplus(a_t + dt_bias) <= 0 (Mamba2's parameterisation).

Layer: in_proj: d -> (q, k, v, z, b, a); q, k, v pass a depthwise causal conv of conv_kernel taps and
SiLU (as LFM2/Mamba do); the core above; o is RMS-normalised per head, gated by SiLU(z) and sent
through out_proj. The layout of the weights is Qwen3-Next's, up to the order of in_proj's rows
(tests/test_deltanet.py loads a `Qwen3NextGatedDeltaNet` into this block and compares outputs).

Two implementations of the core: `gated_delta_ref` (one token at a time, obviously correct; it is
also the decode step) and `gated_delta_chunked` (the training path: within chunks of `chunk` tokens
the recurrence is one triangular solve and a few matmuls, between chunks a loop over T / chunk
steps of small state products). tests/test_deltanet.py checks them against each other, forward and gradients.

Bidirectional models (model.causal=false, masked diffusion) run a centred conv and the core over the
sequence in both directions, summing the two outputs (the same parameters, so AR checkpoints load).
The core runs in fp32 under bf16 autocast: the state accumulates over thousands of tokens.

Options: model.mixer_opts.deltanet (DeltaNetOptions below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import conv1d_op
from slmlab.errors import ConfigError

from .block import Mixer
from .conv import bidirectional_conv
from .registry import register


@dataclass
class DeltaNetOptions:
    """model.mixer_opts.deltanet."""

    heads: Optional[int] = None  # query/key heads; null = model.n_heads
    v_heads: Optional[int] = None  # value heads, a multiple of heads (each q/k head serves v_heads/heads); null = heads
    head_dim: Optional[int] = None  # query/key head size; null = the model's head size
    v_head_dim: Optional[int] = None  # value head size; null = head_dim
    conv_kernel: int = 4  # taps of the short causal conv on q, k and v (Qwen3-Next and fla use 4)
    chunk: int = 64  # tokens per chunk of the training path
    core: str = "chunked"  # chunked | reference (the token-by-token loop)

    def check(self, where: str):
        for key in ("heads", "v_heads", "head_dim", "v_head_dim"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{key} must be an integer > 0 or null, got {value}")
        if self.conv_kernel < 1:
            raise ConfigError(f"{where}.conv_kernel must be an integer >= 1, got {self.conv_kernel}")
        if self.chunk < 1:
            raise ConfigError(f"{where}.chunk must be an integer >= 1, got {self.chunk}")
        if self.core not in ("chunked", "reference"):
            raise ConfigError(f"{where}.core must be chunked or reference, got {self.core!r}")


@dataclass
class DeltaState:
    conv: torch.Tensor  # [B, conv channels, K-1]: the last K-1 inputs of the conv (q, k, v before it)
    S: torch.Tensor  # [B, v_heads, head_dim, v_head_dim] fp32: the delta-rule state


# ---- the core: gated delta rule --------------------------------------------------------------------
# q, k [B, T, H, dk] (unit-norm; q scaled), v [B, T, H, dv], g, beta [B, T, H], S [B, H, dk, dv], all fp32.
# Both return (o [B, T, H, dv], final S).

def gated_delta_ref(q, k, v, g, beta, S):
    """Reference: the recurrence one token at a time."""
    out = []
    for t in range(q.shape[1]):
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def gated_delta_chunked(q, k, v, g, beta, S, chunk: int = 64):
    """The same recurrence in chunks of C tokens. With gam = cumsum(g) inside a chunk and S0 the state
    at its start, unrolling the recurrence gives
        (I + A) U = beta V - beta exp(gam) K S0,  A_ij = beta_i exp(gam_i - gam_j) k_i.k_j  (j < i)
        O = exp(gam) Q S0 + ((Q K^T) * exp(gam_i - gam_j) [j <= i]) U
        S_C = exp(gam_C) S0 + (K exp(gam_C - gam))^T U
    so U = U0 - W S0, with U0 and W from one unit-triangular system per chunk that does not involve
    S0: every chunk solves at once, and only [C, dk] x [dk, dv] products run chunk after chunk."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T  # padded tokens: k = v = q = 0, beta = 0, g = 0 leave S as it is

    def split(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, g, beta = (split(x) for x in (q, k, v, g, beta))
    gam = g.cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # masked before exp: gam_i - gam_j > 0 above the diagonal and could overflow
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    system = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1) + torch.eye(C, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gam.exp())[..., None] * k], dim=-1)
    U0, W = torch.linalg.solve_triangular(system, rhs, upper=False).split([dv, dk], dim=-1)
    scores = (q @ k.transpose(-1, -2)) * decay
    # S_C = (exp(gam_C) I - K_out^T W) S0 + K_out^T U0 = M S0 + R: one matmul-add a chunk in the loop.
    # Each op of the loop is a parallel region (a barrier per op); fewer of them is what keeps a busy
    # machine from stalling it (the loop body had 7 ops; 2 threads beside another process took ~3x).
    k_out = (k * (gam[..., -1:] - gam).exp()[..., None]).transpose(-1, -2)
    M = torch.diag_embed(gam[..., -1:].exp().expand(*gam.shape[:-1], dk)) - k_out @ W
    R = k_out @ U0
    starts = []
    for m, r in zip(M.unbind(2), R.unbind(2)):  # unbind once: indexing [:, :, n] makes full-size zero grads
        starts.append(S)
        S = torch.baddbmm(r.flatten(0, 1), m.flatten(0, 1), S.flatten(0, 1)).view_as(S)
    S0 = torch.stack(starts, 2)  # [B, H, N, dk, dv]: the state at each chunk's start
    # O = (exp(gam) Q - scores W) S0 + scores U0
    o = (q * gam.exp()[..., None] - scores @ W) @ S0 + scores @ U0
    return o.reshape(B, H, N * C, dv)[:, :, :T].transpose(1, 2), S


def unit_norm(x, eps: float = 1e-6):
    """x / sqrt(|x|^2 + eps) over the last dim: fla's and Qwen3-Next's l2norm, eps inside the root."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


# ---- the block -------------------------------------------------------------------------------------
@register("deltanet", "D", options=DeltaNetOptions)
class GatedDeltaNet(Mixer):
    residual_out = ("out_proj",)

    def __init__(self, cfg, layer_idx: int, window: Optional[int] = None):
        super().__init__()
        o = cfg.block_options("deltanet")
        self.opts, self.causal, self.backend, self.eps = o, cfg.causal, cfg.kernels, cfg.norm_eps
        self.heads = o.heads or cfg.n_heads
        self.v_heads = o.v_heads or self.heads
        if self.v_heads % self.heads:
            raise ConfigError(f"model.mixer_opts.deltanet.v_heads={self.v_heads} is not a multiple of the "
                              f"query/key heads ({self.heads})")
        self.dk = o.head_dim or cfg.hd
        self.dv = o.v_head_dim or self.dk
        self.K = o.conv_kernel
        self.key_dim, self.value_dim = self.heads * self.dk, self.v_heads * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        d = cfg.d_model
        # one matmul for q, k, v, z, b, a (Qwen3-Next splits it in two: in_proj_qkvz, in_proj_ba)
        self.in_proj = nn.Linear(d, self.conv_dim + self.value_dim + 2 * self.v_heads, bias=False)
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, self.K, groups=self.conv_dim, bias=False)
        # fla's init: A ~ U(0, 16), dt = softplus(dt_bias) log-uniform in [1e-3, 0.1]
        self.A_log = nn.Parameter(torch.empty(self.v_heads).uniform_(1e-4, 16).log())
        dt = torch.exp(torch.empty(self.v_heads).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.norm_weight = nn.Parameter(torch.ones(self.dv))
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)

    # ---- forward ----
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> DeltaState:
        return DeltaState(torch.zeros(batch_size, self.conv_dim, self.K - 1, device=device, dtype=dtype),
                          torch.zeros(batch_size, self.v_heads, self.dk, self.dv, device=device,
                                      dtype=torch.promote_types(dtype, torch.float32)))  # the core's dtype

    def forward(self, x, state: Optional[DeltaState] = None):
        B, T, _ = x.shape
        qkv, z, ba = self.in_proj(x).split([self.conv_dim, self.value_dim, 2 * self.v_heads], dim=-1)
        w = self.conv.weight.squeeze(1)
        if not self.causal:
            if state is not None:
                raise RuntimeError("incremental decode needs a causal model")
            qkv = bidirectional_conv(qkv, w)
        elif state is None:
            qkv = conv1d_op(qkv, w, backend=self.backend)
        else:
            qkv, buf = conv1d_op(qkv, w, initial_state=state.conv.to(qkv.dtype), return_final_state=True,
                                 backend=self.backend)
        cd = torch.promote_types(x.dtype, torch.float32)  # the recurrence runs in fp32 (fp64 for an fp64 model)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v, g, beta = self._inputs(F.silu(qkv).to(cd), ba.to(cd))
            S = torch.zeros(B, self.v_heads, self.dk, self.dv, device=x.device, dtype=cd) if state is None \
                else state.S.to(cd)
            o, S = self._core(q, k, v, g, beta, S)
            if not self.causal:
                o = o + self._core(*(t.flip(1) for t in (q, k, v, g, beta)), torch.zeros_like(S))[0].flip(1)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
            o = (o.reshape(B, T, self.value_dim) * F.silu(z.to(cd))).to(x.dtype)
        return self.out_proj(o), (None if state is None else DeltaState(buf, S))

    def _inputs(self, qkv, ba):
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        r = self.v_heads // self.heads
        q, k = (unit_norm(t.reshape(B, T, self.heads, self.dk)) for t in (q, k))
        if r > 1:  # each query/key head serves r consecutive value heads
            q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)
        b, a = ba.chunk(2, dim=-1)
        g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias)
        return q * self.dk ** -0.5, k, v.reshape(B, T, self.v_heads, self.dv), g, b.sigmoid()

    def _core(self, q, k, v, g, beta, S):
        # One token (decode) is the reference's single step: the chunked form would solve a 1x1 system.
        if self.opts.core == "reference" or q.shape[1] == 1:
            return gated_delta_ref(q, k, v, g, beta, S)
        return gated_delta_chunked(q, k, v, g, beta, S, self.opts.chunk)

    # ---- static state: the same tensors as DeltaState, updated in place for decode ----
    static_state_names = ("conv", "S")
    # mamba2's export core is its chunked form as one chunk; here that chunk would need a T x T
    # triangular solve, which ONNX has no operator for (torch.onnx fails on linalg_solve_triangular).
    # So the graphs take one token a call: the recurrence's step, no solve and no loop.
    no_export = ("its chunked delta rule loops over chunks of the sequence and solves a triangular system "
                 "(ONNX has no operator for it)")

    def static_state(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        st = self.init_state(batch_size, device, dtype)
        return [st.conv, st.S]

    def forward_static(self, x, positions, state: list, inplace: bool):
        y, new = self.forward(x, DeltaState(*state))
        if not inplace:
            return y, [new.conv, new.S]
        for buf, t in zip(state, (new.conv, new.S)):
            buf.copy_(t)
        return y, state

    # ---- sizing ----
    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """A fit, not a derivation: what autograd saves depends on which batched matmuls copy their
        operands, so tests check it against autograd's saved tensors over shapes (heads, head sizes,
        chunk lengths and counts): within 12% at one chunk, 6% at several. The conv path (in_proj's output, conv input and output, SiLU) is in the matmul
        dtype; the core runs in fp32: per value head and token ~6 chunk-length rows (decays, the
        system, scores) and ~9 vectors; per chunk its transition M [dk, dk] and, after the first,
        ~3 states; the gated norm ~9 per value channel. A bidirectional model's second core (over the
        flipped sequence) saves ~0.7 more."""
        tokens, C = batch * seq_len, min(self.opts.chunk, seq_len)
        n = -(-seq_len // C)
        core = tokens * (9 * self.value_dim + self.v_heads * (6 * C + 9 * self.dk + 12) + 16 * self.heads)
        core += batch * self.v_heads * self.dk * (n * self.dk + 3 * (n - 1) * self.dv)
        return int(3.5 * tokens * self.conv_dim * act + (1 if self.causal else 1.7) * core * 4)

    def flops_per_token(self, seq_len: int) -> float:
        """Work beyond the parameter matmuls, fwd + bwd (x3 the forward's multiply-adds x2): per value
        head and token (chunked_delta_rule's products, per chunk of C divided by C): the chunk's K K^T
        and Q K^T rows and the scores times W (C dk each) and times U0 (C dv), the triangular solve
        (C/2 (dk + dv)), K_out W (dk^2), K_out U0 and the start state read out (dk dv each) and the
        hand-over M S (dk^2 dv / C); a bidirectional model runs the core twice; plus the conv's taps.
        FlopCounterMode agrees on the matmuls (tests/test_deltanet.py)."""
        C, dk, dv = min(self.opts.chunk, seq_len), self.dk, self.dv
        per_head = C * (3 * dk + dv) + C * (dk + dv) / 2 + dk * dk + 2 * dk * dv + dk * dk * dv / C
        return 6 * (self.v_heads * per_head * (1 if self.causal else 2) + self.conv_dim * self.K)
