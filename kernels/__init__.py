"""Kernels and their references.

`conv1d_op` and `attention_op` are the single entry points the blocks call; `backend` picks
the implementation: "triton", "torch" (the references), "flex" (flex_attention for sliding-window
attention, the references elsewhere: the library alternative to our band kernel), or "auto": on
CUDA the Triton conv and, for attention, the Triton kernel where a sliding window is narrower than
the sequence, SDPA's own causal kernel (FlashAttention) for full context; the references elsewhere.
`causal_conv1d` and `attention` are the Triton implementations themselves; `lif_scan` is the LIF
neuron's scan over time (arch/lif.py picks it through `use_triton`; its reference is there).
"""
import torch

from . import _common
from .reference import attention_ref, band_mask, causal_conv1d_ref  # noqa: F401  (re-exported)

BACKENDS = ("auto", "triton", "torch", "flex")  # flex: flex_attention for bands, the references elsewhere

try:  # Triton kernels are optional: CPU-only installs run the references.
    from .attention import attention
    from .conv import causal_conv1d
    from .lif import lif_scan
    HAVE_TRITON_KERNELS = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON_KERNELS = False

    def _missing(*args, **kwargs):
        raise RuntimeError("Triton kernels are unavailable: install triton (pip install -e '.[triton]')")

    causal_conv1d = attention = lif_scan = _missing


def unavailable(backend: str, device_type: str):
    """Why `backend` should not run on this device type, or None when it can."""
    if backend == "triton" and not HAVE_TRITON_KERNELS:
        return "model.kernels=triton needs triton installed (pip install -e '.[triton]')"
    if device_type == "cuda":
        return None
    if backend == "triton" and not _common.interpreting():
        return f"model.kernels=triton needs a CUDA GPU (or TRITON_INTERPRET=1, the slow interpreter), not {device_type}"
    if backend == "flex":  # eager flex off CUDA is forward only and unfused: a check, not a path to run
        return f"model.kernels=flex runs on CUDA (flex_attention has no backward on {device_type} and is unfused there)"
    return None


def use_triton(backend, t):
    """Whether `backend` ("auto" | "triton" | "torch" | "flex") runs the Triton kernel for t, a
    tensor or a device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "flex"):  # flex: flex_attention for bands (attention_uses_flex), references elsewhere
        return False
    if backend == "triton":
        return True
    on_cuda = t.is_cuda if isinstance(t, torch.Tensor) else torch.device(t).type == "cuda"
    return HAVE_TRITON_KERNELS and on_cuda


def conv1d_op(x, weight, bias=None, initial_state=None, return_final_state=False, backend="auto"):
    fn = causal_conv1d if use_triton(backend, x) else causal_conv1d_ref
    return fn(x, weight, bias, initial_state=initial_state, return_final_state=return_final_state)


def attention_uses_triton(backend, t, window, Tq: int, Tk: int) -> bool:
    """Whether attention_op runs our kernel. Decode against a cache (Tq < Tk) is tiny and
    memory-bound: the reference serves it. "auto" leaves full context to SDPA's FlashAttention, the
    well-kept library kernel, until a GPU measurement shows ours faster (kernels.bench's "attention
    vs sdpa_causal" row); a band has no library kernel that skips the masked blocks without a
    compile (SDPA would take a dense mask)."""
    band = window is not None and window < Tk
    return use_triton(backend, t) and Tq == Tk and (band or backend == "triton")


def attention_uses_flex(backend, window, Tq: int, Tk: int) -> bool:
    """Whether attention_op runs flex_attention: model.kernels=flex, a band, no cache."""
    return backend == "flex" and window is not None and window < Tk and Tq == Tk


def attention_op(q, k, v, causal=True, window=None, scale=None, backend="auto"):
    if attention_uses_triton(backend, q, window, q.shape[2], k.shape[2]):
        # Under autocast QK-norm and RoPE leave q and k in fp32 beside a bf16 v; SDPA and flex cast
        # them to the autocast dtype themselves, our kernel takes one dtype: cast as they do.
        if torch.is_autocast_enabled(q.device.type):
            dt = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        return attention(q, k, v, causal=causal, window=window, scale=scale)
    if attention_uses_flex(backend, window, q.shape[2], k.shape[2]):
        from .flex import flex_band_attention

        return flex_band_attention(q, k, v, causal=causal, window=window, scale=scale)
    return attention_ref(q, k, v, causal=causal, window=window, scale=scale)


def describe_routing(backend: str, device, layer_types: list, windows: list, seq_len: int, mlp: str,
                     scan: str = "fused") -> str:
    """One line naming the kernel each block kind runs in training at seq_len on `device` (the run's
    header; --dry-run's for the device it estimates)."""
    t = torch.device(device)
    tri = use_triton(backend, t)
    parts = []
    if "conv" in layer_types:
        parts.append("conv " + ("Triton" if tri else "PyTorch conv1d"))
    for w in sorted({w for kind, w in zip(layer_types, windows) if kind == "attn"}, key=lambda w: w or 0):
        full = w is None or w >= seq_len
        lib = "SDPA" if full else "SDPA with a band mask"
        if attention_uses_triton(backend, t, w, seq_len, seq_len):
            lib = "Triton"
        elif attention_uses_flex(backend, w, seq_len, seq_len):
            lib = "flex_attention" + ("" if t.type == "cuda" else " (unfused off CUDA)")
        parts.append(f"attention ({'full context' if full else f'window {w}'}) {lib}")
    if "deltanet" in layer_types:
        parts.append("deltanet conv " + ("Triton" if tri else "PyTorch conv1d") + ", chunked delta rule in PyTorch")
    if "mamba2" in layer_types:
        parts.append("mamba2 conv " + ("Triton" if tri else "PyTorch conv1d") + ", chunked SSD scan in PyTorch")
    if "lif" in layer_types or mlp == "lif":
        parts.append("LIF scan " + ("reference loop" if scan == "reference" else "Triton" if tri
                                    else "fused eager loop"))
    return f"kernels (model.kernels={backend}, {t.type}): " + ", ".join(parts or ["none"])
