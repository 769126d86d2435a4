"""Pure-PyTorch references for every kernel in this package.

These are the functions the blocks run on CPU and the ground truth the Triton kernels are tested
against. They favour obvious correctness over speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x, weight, bias=None, initial_state=None, return_final_state=False):
    """Depthwise causal convolution over the sequence.

    x: [B, T, D] (channels-last), weight: [D, K], bias: [D] or None,
    initial_state: [B, D, K-1] holding the K-1 inputs before x[:, 0] (zeros if None).
    out[:, t, d] = bias[d] + sum_k weight[d, k] * xpad[:, t + k, d], with xpad = [state, x].
    Returns out [B, T, D], or (out, final_state [B, D, K-1]) when return_final_state.
    """
    B, T, D = x.shape
    K = weight.shape[1]
    xt = x.transpose(1, 2)  # [B, D, T]
    if initial_state is None:
        initial_state = xt.new_zeros(B, D, K - 1)
    xcat = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)  # [B, D, K-1+T]
    out = F.conv1d(xcat, weight.unsqueeze(1).to(xt.dtype), None if bias is None else bias.to(xt.dtype), groups=D)
    out = out.transpose(1, 2)
    if return_final_state:
        return out, xcat[:, :, xcat.shape[-1] - (K - 1):]
    return out


def band_mask(Tq, Tk, causal=True, window=None, device=None):
    """Boolean [Tq, Tk] mask, True = attend. Queries are aligned to the end of the keys
    (query i sits at absolute position Tk - Tq + i), so the same mask serves prefill (Tq == Tk)
    and decode against a cache. Window W: query at p sees keys j with p - W < j <= p."""
    qpos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
        if not causal:
            mask &= kpos < qpos + window
    return mask


def attention_ref(q, k, v, causal=True, window=None, scale=None):
    """Grouped-query attention. q: [B, Hq, Tq, hd], k/v: [B, Hkv, Tk, hd] with Hq % Hkv == 0, Tq <= Tk.

    Window W (causal): query i sees keys j with i - W < j <= i. Non-causal with a window is a
    symmetric band |i - j| < W. Returns [B, Hq, Tq, hd].
    """
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if window is not None and window >= Tk:  # the band covers every key: no mask, SDPA's fused kernels
        window = None
    if window is None and (not causal or Tq == Tk):
        # is_causal=causal, not `causal and Tq > 1` (a 1 x 1 causal mask is no mask): under dynamic shapes
        # (a recompile at a new seq_len) Tq > 1 is a SymBool, which SDPA refuses, and a fullgraph compile
        # after another length's failed.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    mask = band_mask(Tq, Tk, causal, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
