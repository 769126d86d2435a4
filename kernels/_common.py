"""Small helpers shared by the Triton kernel files (device check, output allocation)."""
from __future__ import annotations

import os

import torch

# Triton picks interpreter vs compiled mode when a kernel is decorated, i.e. when conv.py and
# attention.py are imported. Record it here (imported first) so the check below matches the mode
# the kernels were actually built in, not whatever the environment says later.
try:
    from triton import knobs as _knobs

    _INTERPRET_AT_IMPORT = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # older Triton: same parsing by hand
    _INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Tests set this so every buffer a kernel is supposed to fill starts as NaN: an element the
# kernel forgets to write then shows up as NaN instead of as plausible uninitialised memory.
# A module switch, not a parameter: it reaches every output buffer of every kernel (attention,
# conv, LIF, forward and backward) through empty() below, and tests/test_kernels.py flips it for
# all of them with one autouse fixture; as parameters it would thread through each public kernel.
FILL_NAN_FOR_TESTS = False


def interpreting() -> bool:
    return _INTERPRET_AT_IMPORT


def refuse_double_backward(name: str) -> None:
    """Called first in each kernel's backward: with create_graph=True (grad mode on inside backward)
    its gradients would carry no graph, so a second-order gradient came out as zeros, silently.
    Eager only: a compiled graph's traced backward is left exactly as it was (unmeasured on a GPU)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: the Triton backward is not differentiable (double backward, "
                           "create_graph=True); use model.kernels=torch for higher-order gradients")


def check_device(name: str, *tensors) -> None:
    """Triton kernels run on CUDA, or anywhere under the interpreter; fail clearly otherwise."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    for t in tensors:
        if t is not None and not t.is_cuda and not interpreting():
            raise RuntimeError(
                f"{name}: Triton kernels need CUDA or TRITON_INTERPRET=1 (set before `kernels` is "
                f"imported); got a tensor on {t.device}. Use the torch reference (backend='torch') "
                f"on CPU")


def empty(*shape, dtype, device) -> torch.Tensor:
    if FILL_NAN_FOR_TESTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
