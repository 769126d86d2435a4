"""Banded grouped-query attention in Triton (FlashAttention-2 style), forward and backward.

Math, per (batch, query head h, kv head h // (Hq / Hkv)), with s = scale * q k^T and M the band:
    M[i, j]   causal: i - W < j <= i  (W = inf when window is None);  non-causal: |i - j| < W
    P         = softmax(s masked to M) row-wise,   O = P V,   lse_i = log sum_j exp(s_ij)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta_i = sum_d dO_id O_id
    dQ = scale * dS K,   dK = scale * dS^T Q

Tiling: the forward keeps a BLOCK_M x head_dim query tile in registers and streams BLOCK_N key
tiles through an online softmax (running max m, running sum l, rescaled accumulator), storing O and
the logsumexp (base 2, since exp2 is the cheap instruction). The key loop starts and stops at the
first/last key block the band can reach from this query tile, so cost is O(T * W), not O(T^2).
Backward is three kernels: delta = rowsum(dO * O); dK/dV with one program per key tile looping over
every query head of its group and over the query tiles the band reaches (summing the group in
registers means no atomics and no repeated K/V); dQ with one program per query tile looping over
key tiles like the forward. P is recomputed from the saved lse instead of being stored.
head_dim is padded to a power of two (BLOCK_D >= 16) and masked; T need not divide the tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

_LOG2E = 1.4426950408889634

@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is only set under the Triton interpreter with bf16 inputs: it keeps bf16 as raw uint16
    # and tl.dot would multiply bit patterns (triton-lang/triton#11584). On GPU it is always False.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _visible(qi, kj, T, W, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Band mask for broadcastable query positions qi and key positions kj (True = attend)."""
    ok = (qi < T) & (kj < T)
    if CAUSAL:
        ok = ok & (kj <= qi)
    if HAS_WINDOW:
        ok = ok & (kj > qi - W)
        if not CAUSAL:
            ok = ok & (kj < qi + W)
    return ok


@triton.jit
def _key_range(start_m, T, W, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key positions that queries start_m .. start_m + BLOCK_M - 1 can see."""
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    elif HAS_WINDOW:
        hi = tl.minimum(T, start_m + BLOCK_M + W - 1)
    if HAS_WINDOW:
        # Round down so key tiles stay aligned to BLOCK_N (coalesced, same tiles every program).
        lo = tl.maximum(0, start_m - W + 1) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, T, W, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the query positions that can see keys start_n .. start_n + BLOCK_N - 1."""
    lo = 0
    hi = T
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    elif HAS_WINDOW:
        lo = tl.maximum(0, start_n - W + 1) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(T, start_n + BLOCK_N + W - 1)
    return lo, hi


@triton.jit
def _key_tile_scores(q, k_base, v_base, skt, svt, start_n, offs_m, offs_d, d_ok, T, W, qk_scale,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Load the key/value tile at start_n and return (k, v, band-masked scores in log2 units):
    the step the forward and the dQ kernels share."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < T)[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
    s = tl.where(_visible(offs_m[:, None], offs_n[None, :], T, W, CAUSAL, HAS_WINDOW), s, float("-inf"))
    return k, v, s


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                     H, T, HD, W, qk_scale,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP  # GQA: the kv head is shared by GROUP consecutive query heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HD

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(start_m, T, W, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_tile_scores(q, k_base, v_base, skt, svt, start_n, offs_m, offs_d, d_ok, T, W, qk_scale,
                                   CAUSAL, HAS_WINDOW, BLOCK_N, DOT_PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row can have seen no visible key yet (the tile's band starts later for it): keep its
        # max at 0 so exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new

    # Every real query sees at least itself, so l > 0 there; the guard only covers padding rows.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, T, HD, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # O and dO share one contiguous [B*H, T, HD] layout.
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HD)[None, :]
    ptr = bh * T * HD + offs_m[:, None] * HD + offs_d[None, :]
    o = tl.load(O + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                          H, HKV, T, HD, W, qk_scale, scale,
                          GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < HD
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lo, hi = _query_range(start_n, T, W, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        bh = b * H + h
        do_base = DO + bh * T * HD  # dO is contiguous [B, H, T, HD]
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * HD + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
            # Work transposed ([keys, queries]) so dK and dV come out as plain row-major dots.
            s_t = _dot(k, tl.trans(q), DOT_PRECISION, UPCAST) * qk_scale
            # Mask before exp2: out-of-band scores can exceed lse by a lot and would overflow.
            s_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], T, W, CAUSAL, HAS_WINDOW), s_t, float("-inf"))
            p_t = tl.exp2(s_t - lse[None, :])
            dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST)
            dp_t = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST)

    out_off = bhk.to(tl.int64) * T * HD + offs_n[:, None] * HD + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                        H, T, HD, W, qk_scale, scale,
                        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HD
    q_mask = m_ok[:, None] & d_ok[None, :]
    row_off = bh.to(tl.int64) * T * HD + offs_m[:, None] * HD + offs_d[None, :]  # dO / dQ layout
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + row_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(start_m, T, W, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_tile_scores(q, k_base, v_base, skt, svt, start_n, offs_m, offs_d, d_ok, T, W, qk_scale,
                                   CAUSAL, HAS_WINDOW, BLOCK_N, DOT_PRECISION, UPCAST)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST)
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _config(T, hd, backward, tiles=None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps); tiles: (BLOCK_M, BLOCK_N) instead of the default.
    Unmeasured: no GPU has run these kernels yet (README "On a GPU"), so the block sizes and warp
    counts are first guesses to tune there (python -m kernels.bench)."""
    BLOCK_D = max(16, _common.next_pow2(hd))  # tl.dot needs every dim >= 16
    BLOCK_M, BLOCK_N = tiles or (max(16, min(64, _common.next_pow2(T))),) * 2
    # The backward holds two fp32 [BLOCK_N, BLOCK_D] accumulators: more warps keep it out of spills.
    num_warps = 8 if (backward and BLOCK_D > 64) else 4
    return BLOCK_M, BLOCK_N, BLOCK_D, num_warps


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, tiles):
        B, H, T, hd = q.shape
        HKV = k.shape[1]
        BLOCK_M, BLOCK_N, BLOCK_D, num_warps = _config(T, hd, backward=False, tiles=tiles)
        o = _common.empty(B, H, T, hd, dtype=q.dtype, device=q.device)
        lse = _common.empty(B, H, T, dtype=torch.float32, device=q.device)
        # fp32 inputs get true fp32 dots (no TF32) so they can serve as a reference-grade path.
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        upcast = _common.interpreting() and q.dtype == torch.bfloat16
        _attn_fwd_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
            q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, T, hd, window or 0, scale * _LOG2E,
            GROUP=H // HKV, CAUSAL=causal, HAS_WINDOW=window is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, DOT_PRECISION=precision, UPCAST=upcast,
            num_warps=num_warps, num_stages=2)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.window, ctx.scale, ctx.tiles = causal, window, scale, tiles
        ctx.precision, ctx.upcast = precision, upcast
        return o

    @staticmethod
    def backward(ctx, do):
        _common.refuse_double_backward("attention")
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, hd = q.shape
        HKV = k.shape[1]
        do = do.contiguous()  # same layout as o; the kernels index both with one offset
        BLOCK_M, BLOCK_N, BLOCK_D, num_warps = _config(T, hd, backward=True, tiles=ctx.tiles)
        common = dict(GROUP=H // HKV, CAUSAL=ctx.causal, HAS_WINDOW=ctx.window is not None,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                      DOT_PRECISION=ctx.precision, UPCAST=ctx.upcast, num_warps=num_warps, num_stages=2)
        W = ctx.window or 0
        qk_scale = ctx.scale * _LOG2E

        delta = _common.empty(B, H, T, dtype=torch.float32, device=q.device)
        _attn_bwd_delta_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
            o, do, delta, T, hd, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)

        dk = _common.empty(B, HKV, T, hd, dtype=k.dtype, device=q.device)
        dv = _common.empty(B, HKV, T, hd, dtype=v.dtype, device=q.device)
        _attn_bwd_dkdv_kernel[(triton.cdiv(T, BLOCK_N), B * HKV)](
            q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v),
            H, HKV, T, hd, W, qk_scale, ctx.scale, **common)

        dq = _common.empty(B, H, T, hd, dtype=q.dtype, device=q.device)
        _attn_bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * H)](
            q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v),
            H, T, hd, W, qk_scale, ctx.scale, **common)
        return dq, dk, dv, None, None, None, None


def _head_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, causal=True, window=None, scale=None, tiles=None):
    """Triton banded GQA attention; same contract as `reference.attention_ref` with Tq == Tk.

    q: [B, Hq, T, hd], k/v: [B, Hkv, T, hd], Hq % Hkv == 0. window W: causal keys i-W < j <= i,
    non-causal |i - j| < W; None = no band. scale defaults to hd ** -0.5. Returns [B, Hq, T, hd].
    Inputs may be strided (e.g. a transposed [B, T, H, hd] projection) as long as hd is contiguous.
    tiles: (BLOCK_M, BLOCK_N), powers of two >= 16, instead of the default (tests force many small
    tiles on short sequences; tuning on a GPU tries others).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D [B, H, T, hd], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, hd = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    Bk, Hkv, Tk, hdk = k.shape
    if Bk != B or hdk != hd:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or head_dim")
    if Tk != T:
        raise ValueError(f"attention: the Triton kernel needs Tq == Tk (got {T} and {Tk}); "
                         f"decode against a cache goes through attention_ref")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"attention: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if window is not None and (isinstance(window, bool) or int(window) != window or window <= 0):
        raise ValueError(f"attention: window must be a positive integer or None, got {window!r}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if hd > 256:
        raise ValueError(f"attention: head_dim {hd} > 256 is not supported by these tiles")
    if tiles is not None and not (len(tiles) == 2 and all(t >= 16 and t & (t - 1) == 0 for t in tiles)):
        raise ValueError(f"attention: tiles must be two powers of two >= 16 (tl.dot's minimum), got {tiles!r}")
    _common.check_device("attention", q, k, v)

    if window is not None and window >= T:
        window = None  # the band covers every pair anyway: skip the mask arithmetic
    elif window is not None:
        window = int(window)
    if scale is None:
        scale = hd ** -0.5
    if T == 0 or B == 0 or Hq == 0:
        return q.new_empty(q.shape) + 0 * (k.sum() + v.sum())
    return _AttentionFn.apply(_head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v),
                              bool(causal), window, float(scale), None if tiles is None else tuple(tiles))
