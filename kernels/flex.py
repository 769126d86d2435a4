"""Sliding-window (band) attention through PyTorch's flex_attention: the library alternative to our
Triton band kernel (`model.kernels: flex`), so a GPU measurement can pick between the two at model
level (bench/gpu.py) as well as per kernel (kernels.bench).

flex_attention skips the key blocks its block mask marks empty, as our kernel does; it is fast
only compiled. On CUDA it runs through torch.compile (compiled once per shape; inside a compiled
model it is traced into the model's graph, the cached block mask a graph break); elsewhere eager and forward only (flex has no CPU
backward), its unfused reference implementation, which materialises the scores: for checking and
inference, not for speed.
"""
from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def band_block_mask(T: int, window: int, causal: bool, device: str):
    """The BlockMask of a [T, T] band: key j visible to query i when i - W < j <= i (causal), or
    |i - j| < W. Cached per shape: building it scans every block pair."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):
        near = (q_idx - kv_idx < window) & (kv_idx - q_idx < window)
        return near & (kv_idx <= q_idx) if causal else near

    return create_block_mask(visible, None, None, T, T, device=device)


def flex_band_attention(q, k, v, causal: bool, window: int, scale=None):
    """attention_ref(q, k, v, causal, window, scale) for Tq == Tk through flex_attention."""
    from torch.nn.attention.flex_attention import flex_attention

    T = q.shape[2]
    if k.shape[2] != T:
        raise ValueError(f"flex_band_attention: needs Tq == Tk, got {T} and {k.shape[2]}")
    mask = band_block_mask(T, int(window), bool(causal), str(q.device))
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:  # inside a compiled model flex is traced into its graph; eager, it gets its own compile
        fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("model.kernels=flex trains on CUDA only (flex_attention has no CPU backward): "
                           "use model.kernels=auto or torch here")
    with warnings.catch_warnings():  # "called without torch.compile": the unfused path is the point here
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
