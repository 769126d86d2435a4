"""Depthwise causal conv1d (the LFM2 short conv) in Triton, forward and backward.

Math, with xpad = [initial_state, x] along time (K-1 + T steps) and channels independent:
    out[b, t, d]     = bias[d] + sum_k w[d, k] * xpad[b, t + k, d]
    dxpad[b, i, d]   = sum_k w[d, k] * dout[b, i - k, d]          (0 <= i - k < T)
                       -> dx = dxpad[:, K-1:], d initial_state = dxpad[:, :K-1]
    dw[d, k]         = sum_{b,t} dout[b, t, d] * xpad[b, t + k, d]
    dbias[d]         = sum_{b,t} dout[b, t, d]

Tiling: one program per (BLOCK_T time steps, BLOCK_D channels, batch row). x is channels-last, so
a tile row of BLOCK_D channels is one contiguous load; the K taps are a static loop of shifted
loads of the same tile (K is tiny, 2-4), which hit L1/L2. Accumulation is fp32 whatever the input
dtype. The weight/bias gradients are reduced over (batch, time-block) by writing one fp32 partial
per program and summing them with torch: deterministic, and the partial buffer is small
(B * T/BLOCK_T * K * D floats). The final state is a slice of xpad, taken with differentiable torch
ops outside the kernel so autograd routes its gradient back into x / initial_state for free.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _load_xpad(x_base, s_base, offs_t, offs_d, t_ok, d_ok, shift, D,
               K: tl.constexpr, HAS_STATE: tl.constexpr):
    """xpad[t + shift + K - 1] for a tile, as fp32: x where that is >= 0, else the carried state."""
    src = offs_t + shift  # index into x; negative means "before x[:, 0]"
    val = tl.load(x_base + src[:, None] * D + offs_d[None, :],
                  mask=((src >= 0) & t_ok)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        # state is [B, D, K-1]: position src + K - 1 along its last axis.
        sval = tl.load(s_base + offs_d[None, :] * (K - 1) + (src + K - 1)[:, None],
                       mask=((src < 0) & t_ok)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        val += sval
    return val


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, state_ptr, out_ptr, T, D,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # int64 so B*T*D offsets cannot overflow
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    x_base = x_ptr + pid_b * T * D
    s_base = state_ptr + pid_b * D * (K - 1)

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + offs_d * K + k, mask=d_ok, other=0.0).to(tl.float32)
        acc += _load_xpad(x_base, s_base, offs_t, offs_d, t_ok, d_ok, k - (K - 1), D,
                          K, HAS_STATE) * w_k[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pid_b * T * D + offs_t[:, None] * D + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, state_ptr, dout_ptr, dx_ptr, dstate_ptr, dw_part_ptr, db_part_ptr,
                     T, D, n_t_blocks,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    x_base = x_ptr + pid_b * T * D
    g_base = dout_ptr + pid_b * T * D
    s_base = state_ptr + pid_b * D * (K - 1)

    # dx[t] = dxpad[t + K - 1]: the outputs t + K - 1 - k that tap k connects to x[t].
    dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        w_k = tl.load(w_ptr + offs_d * K + k, mask=d_ok, other=0.0).to(tl.float32)
        dst = offs_t + (K - 1 - k)
        g = tl.load(g_base + dst[:, None] * D + offs_d[None, :],
                    mask=((dst < T) & t_ok)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dx += g * w_k[None, :]
    tl.store(dx_ptr + pid_b * T * D + offs_t[:, None] * D + offs_d[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])

    # This program's share of dw / dbias: sums over its BLOCK_T outputs only. Rows are
    # (batch, time-block); the host sums them in a fixed order.
    part = pid_b * n_t_blocks + pid_t
    g0 = tl.load(g_base + offs_t[:, None] * D + offs_d[None, :],
                 mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        tl.store(db_part_ptr + part * D + offs_d, tl.sum(g0, axis=0), mask=d_ok)
    for k in tl.static_range(K):
        xv = _load_xpad(x_base, s_base, offs_t, offs_d, t_ok, d_ok, k - (K - 1), D, K, HAS_STATE)
        tl.store(dw_part_ptr + (part * K + k) * D + offs_d, tl.sum(g0 * xv, axis=0), mask=d_ok)

    # The K-1 state slots only feed outputs 0..K-2, so just the first time block owns them.
    if HAS_STATE:
        if pid_t == 0:
            offs_j = tl.arange(0, BLOCK_S)
            j_ok = offs_j < K - 1
            ds = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
            for k in tl.static_range(K):
                w_k = tl.load(w_ptr + offs_d * K + k, mask=d_ok, other=0.0).to(tl.float32)
                dst = offs_j - k
                g = tl.load(g_base + dst[:, None] * D + offs_d[None, :],
                            mask=(j_ok & (dst >= 0) & (dst < T))[:, None] & d_ok[None, :],
                            other=0.0).to(tl.float32)
                ds += g * w_k[None, :]
            tl.store(dstate_ptr + pid_b * D * (K - 1) + offs_d[None, :] * (K - 1) + offs_j[:, None],
                     ds.to(dstate_ptr.dtype.element_ty), mask=j_ok[:, None] & d_ok[None, :])


def _blocks(T, D):
    # 32x64 tiles keep each program's loads at a few KB; D blocks of 64 channels = 128 contiguous
    # bytes in bf16. Shrink for tiny shapes so the interpreter does not chew on padding.
    return min(32, _common.next_pow2(T)), min(64, _common.next_pow2(D))


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state):
        B, T, D = x.shape
        K = weight.shape[1]
        has_state = initial_state is not None and K > 1
        out = _common.empty(B, T, D, dtype=x.dtype, device=x.device)
        BLOCK_T, BLOCK_D = _blocks(T, D)
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D), B)
        _conv_fwd_kernel[grid](
            x, weight, bias if bias is not None else x, initial_state if has_state else x, out, T, D,
            K=K, HAS_BIAS=bias is not None, HAS_STATE=has_state, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(x, weight, bias, initial_state)
        return out

    @staticmethod
    def backward(ctx, dout):
        _common.refuse_double_backward("causal_conv1d")
        x, weight, bias, initial_state = ctx.saved_tensors
        B, T, D = x.shape
        K = weight.shape[1]
        has_state = initial_state is not None and K > 1
        dout = dout.contiguous()
        BLOCK_T, BLOCK_D = _blocks(T, D)
        n_t = triton.cdiv(T, BLOCK_T)
        dx = _common.empty(B, T, D, dtype=x.dtype, device=x.device)
        dw_part = _common.empty(B * n_t, K, D, dtype=torch.float32, device=x.device)
        db_part = _common.empty(B * n_t, D, dtype=torch.float32, device=x.device) if bias is not None else None
        dstate = None
        if initial_state is not None:
            dstate = _common.empty(B, D, K - 1, dtype=initial_state.dtype, device=x.device)
        _conv_bwd_kernel[(n_t, triton.cdiv(D, BLOCK_D), B)](
            x, weight, initial_state if has_state else x, dout, dx, dstate if has_state else x,
            dw_part, db_part if db_part is not None else dw_part, T, D, n_t,
            K=K, HAS_BIAS=bias is not None, HAS_STATE=has_state, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
            BLOCK_S=_common.next_pow2(max(K - 1, 1)))
        dw = dw_part.sum(0).t().to(weight.dtype)
        db = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw, db, dstate


def causal_conv1d(x, weight, bias=None, initial_state=None, return_final_state=False):
    """Triton depthwise causal conv; same contract as `reference.causal_conv1d_ref`.

    x: [B, T, D], weight: [D, K], bias: [D] or None, initial_state: [B, D, K-1] or None.
    Returns out [B, T, D] in x's dtype, or (out, final_state [B, D, K-1]).
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, D], got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be [D={D}, K>=1], got shape {tuple(weight.shape)}")
    K = weight.shape[1]
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"causal_conv1d: bias must be [{D}], got shape {tuple(bias.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, D, K - 1):
        raise ValueError(f"causal_conv1d: initial_state must be [{B}, {D}, {K - 1}], "
                         f"got shape {tuple(initial_state.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"causal_conv1d: unsupported dtype {x.dtype}")
    _common.check_device("causal_conv1d", x, weight, bias, initial_state)

    if T == 0:  # nothing to launch; keep shapes and autograd connectivity consistent
        out = x.new_empty(B, 0, D) + 0 * weight.sum()
    else:
        out = _CausalConv1dFn.apply(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            None if initial_state is None else initial_state.contiguous())
    if not return_final_state:
        return out
    # The last K-1 steps of xpad = [state, x]: plain torch slicing keeps it differentiable.
    tail = x[:, max(0, T - (K - 1)):].transpose(1, 2)
    if T < K - 1:
        prev = initial_state if initial_state is not None else x.new_zeros(B, D, K - 1)
        tail = torch.cat([prev[:, :, T:].to(x.dtype), tail], dim=-1)
    return out, tail.contiguous()
