"""The LIF neuron's scan over time (arch/lif.py) in Triton, forward and backward (BPTT).

Recurrence per channel, t = 0 .. T-1 from the initial state (v_{-1}, s_{-1}), reset by subtraction
with the previous spike (snntorch Leaky):
    v_t = b * v_{t-1} + u_t - s_{t-1} * thr,      s_t = H(v_t - thr)
Backward, with sg the surrogate derivative of H and gm_t the whole gradient reaching v_t:
    gm_t = g_s[t] * sg(v_t - thr) + b * gm_{t+1}     (at t = T-1 the final membrane's gradient in place of b * gm_T)
    du_t = gm_t,   db = sum_t gm_t * v_{t-1},   dthr = -sum_t (g_s[t] * sg(v_t - thr) + gm_t * s_{t-1}),
    d v_{-1} = b * gm_0; the spikes feeding the reset carry no gradient (detached, as in the reference).

The eager paths (`arch.lif.lif_scan` and `lif_scan_ref`) step through time in Python: a handful of
kernel launches per time step each way, thousands per layer at T = 2048 on a GPU. Here one program
owns BLOCK_D channels of one batch row and walks the whole sequence in registers: one launch
forward, one backward. The state is fp32 whatever the input dtype; membranes and spikes are saved
in the input's dtype (as the eager path saves them). db / dthr are reduced over the batch with one
fp32 partial per row, summed in torch (deterministic). `arch.lif.lif_scan_ref` is the reference;
tests/test_kernels.py holds this to it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common

SURROGATE_IDS = {"atan": 0, "fast_sigmoid": 1}


@triton.jit
def _surrogate(x, scale, SURROGATE: tl.constexpr):
    if SURROGATE == 0:  # atan: scale / 2 / (1 + (pi / 2 * scale * x)^2)
        y = 1.5707963267948966 * scale * x
        return scale * 0.5 / (1.0 + y * y)
    z = scale * tl.abs(x) + 1.0  # fast_sigmoid: 1 / (scale * |x| + 1)^2
    return 1.0 / (z * z)


@triton.jit
def _lif_fwd_kernel(u_ptr, b_ptr, thr_ptr, mem0_ptr, spk0_ptr, mems_ptr, spikes_ptr, T, D, su_b, su_t,
                    BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # int64 so B*T*D offsets cannot overflow
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs < D
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    thr = tl.load(thr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mem = tl.load(mem0_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    spk = tl.load(spk0_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    base = row * T * D + offs
    u_base = u_ptr + row * su_b + offs  # u by its strides: the spiking MLP's is a broadcast (su_t = 0)
    for t in range(T):
        u = tl.load(u_base + t * su_t, mask=ok, other=0.0).to(tl.float32)
        mem = b * mem + u - spk * thr
        spk = (mem > thr).to(tl.float32)
        tl.store(mems_ptr + base + t * D, mem.to(mems_ptr.dtype.element_ty), mask=ok)
        tl.store(spikes_ptr + base + t * D, spk.to(spikes_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_step(gm, gb, gthr, v, gs, prev_v, prev_s, thr, scale, SURROGATE: tl.constexpr):
    """One time step back: the gradient reaching v_t (gm, returned as du_t) and the db / dthr sums."""
    g_direct = gs * _surrogate(v - thr, scale, SURROGATE)
    gm = gm + g_direct
    gb += gm * prev_v
    gthr -= g_direct + gm * prev_s
    return gm, gb, gthr


@triton.jit
def _lif_bwd_kernel(gs_ptr, mems_ptr, spikes_ptr, b_ptr, thr_ptr, mem0_ptr, spk0_ptr, gmem_ptr, gspk_ptr,
                    gu_ptr, gmem0_ptr, gb_ptr, gthr_ptr, T, D, scale,
                    SURROGATE: tl.constexpr, HAS_GMEM: tl.constexpr, HAS_GSPK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = offs < D
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    thr = tl.load(thr_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    base = row * T * D + offs
    gm = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gthr = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_GMEM:
        gm += tl.load(gmem_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_GSPK:  # the final spike's gradient: a direct term at t = T-1, taken before the loop
        v_last = tl.load(mems_ptr + base + (T - 1) * D, mask=ok, other=0.0).to(tl.float32)
        extra = tl.load(gspk_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
        extra = extra * _surrogate(v_last - thr, scale, SURROGATE)
        gm += extra
        gthr -= extra
    for i in range(T - 1):  # t = T-1 .. 1, the previous step read from the saved ones
        t = T - 1 - i
        v = tl.load(mems_ptr + base + t * D, mask=ok, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr + base + t * D, mask=ok, other=0.0).to(tl.float32)
        prev_v = tl.load(mems_ptr + base + (t - 1) * D, mask=ok, other=0.0).to(tl.float32)
        prev_s = tl.load(spikes_ptr + base + (t - 1) * D, mask=ok, other=0.0).to(tl.float32)
        gm, gb, gthr = _bwd_step(gm, gb, gthr, v, gs, prev_v, prev_s, thr, scale, SURROGATE)
        tl.store(gu_ptr + base + t * D, gm.to(gu_ptr.dtype.element_ty), mask=ok)
        gm = gm * b
    # t = 0: the previous step is the initial state
    v = tl.load(mems_ptr + base, mask=ok, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr + base, mask=ok, other=0.0).to(tl.float32)
    mem0 = tl.load(mem0_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    spk0 = tl.load(spk0_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
    gm, gb, gthr = _bwd_step(gm, gb, gthr, v, gs, mem0, spk0, thr, scale, SURROGATE)
    tl.store(gu_ptr + base, gm.to(gu_ptr.dtype.element_ty), mask=ok)
    tl.store(gmem0_ptr + row * D + offs, (gm * b).to(gmem0_ptr.dtype.element_ty), mask=ok)
    tl.store(gb_ptr + row * D + offs, gb, mask=ok)
    tl.store(gthr_ptr + row * D + offs, gthr, mask=ok)


def _block_d(D: int) -> int:
    # 128 channels a program: 256 contiguous bytes per step in bf16; fewer for tiny D (interpreter).
    return min(128, _common.next_pow2(D))


class _LIFScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, b, thr, mem0, spk0, surrogate: str, scale: float):
        B, T, D = u.shape
        mems = _common.empty(B, T, D, dtype=u.dtype, device=u.device)
        spikes = _common.empty(B, T, D, dtype=u.dtype, device=u.device)
        BLOCK_D = _block_d(D)
        _lif_fwd_kernel[(triton.cdiv(D, BLOCK_D), B)](u, b, thr, mem0, spk0, mems, spikes, T, D, u.stride(0),
                                                      u.stride(1), BLOCK_D=BLOCK_D)
        ctx.save_for_backward(mems, spikes, b, thr, mem0, spk0)
        ctx.surrogate, ctx.scale = surrogate, scale
        # the final state as its own tensors (not views of saved ones)
        return spikes, mems[:, -1].clone(), spikes[:, -1].clone()

    @staticmethod
    def backward(ctx, g_spikes, g_mem_T, g_spk_T):
        _common.refuse_double_backward("lif_scan")
        mems, spikes, b, thr, mem0, spk0 = ctx.saved_tensors
        B, T, D = mems.shape
        g_spikes = torch.zeros_like(mems) if g_spikes is None else g_spikes.contiguous()
        gu = _common.empty(B, T, D, dtype=mems.dtype, device=mems.device)
        gmem0 = _common.empty(B, D, dtype=mem0.dtype, device=mems.device)
        gb_part = _common.empty(B, D, dtype=torch.float32, device=mems.device)
        gthr_part = _common.empty(B, D, dtype=torch.float32, device=mems.device)
        BLOCK_D = _block_d(D)
        _lif_bwd_kernel[(triton.cdiv(D, BLOCK_D), B)](
            g_spikes, mems, spikes, b, thr, mem0, spk0,
            mems if g_mem_T is None else g_mem_T.contiguous(), mems if g_spk_T is None else g_spk_T.contiguous(),
            gu, gmem0, gb_part, gthr_part, T, D, float(ctx.scale),
            SURROGATE=SURROGATE_IDS[ctx.surrogate], HAS_GMEM=g_mem_T is not None, HAS_GSPK=g_spk_T is not None,
            BLOCK_D=BLOCK_D)
        return gu, gb_part.sum(0).to(b.dtype), gthr_part.sum(0).to(thr.dtype), gmem0, None, None, None


def lif_scan(u, beta, threshold, mem, spk, surrogate="atan", scale=2.0):
    """Triton version of `arch.lif.lif_scan_ref` (same signature and results): u [B, T, D] input
    currents, beta / threshold [D], mem / spk [B, D] (or broadcastable) initial state. Returns
    (spikes [B, T, D], final membrane [B, D], final spike [B, D])."""
    if u.dim() != 3:
        raise ValueError(f"lif_scan: u must be [B, T, D], got shape {tuple(u.shape)}")
    B, T, D = u.shape
    for name, p in (("beta", beta), ("threshold", threshold)):
        if tuple(p.shape) != (D,):
            raise ValueError(f"lif_scan: {name} must be [{D}], got shape {tuple(p.shape)}")
    if surrogate not in SURROGATE_IDS:
        raise ValueError(f"lif_scan: surrogate must be one of {', '.join(SURROGATE_IDS)}, got {surrogate!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"lif_scan: scale must be a finite number > 0, got {scale}")
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"lif_scan: unsupported dtype {u.dtype}")
    _common.check_device("lif_scan", u, beta, threshold, mem, spk)
    # beta and threshold stay in their own dtype (fp32 parameters under bf16 autocast): the kernel
    # computes in fp32 and returns their gradients in it.
    b = beta.clamp(0, 1)
    mem = mem.to(u.dtype).expand(B, D)
    spk = spk.to(u.dtype).expand(B, D).detach()
    if T == 0:  # nothing to scan: the state passes through
        return u.new_empty(B, 0, D) + 0 * b.sum(), mem, spk
    u = u if u.stride(-1) == 1 else u.contiguous()  # time and batch may stride freely, channels not
    return _LIFScanFn.apply(u, b.contiguous(), threshold.contiguous(), mem.contiguous(),
                            spk.contiguous(), surrogate, float(scale))
