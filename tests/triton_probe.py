"""Can this Triton's interpreter run the kernels here? One tiny kernel with a loop bound computed
from program_id, as the attention kernel's band has. Triton 3.6's interpreter (torch 2.11's pin)
cannot under numpy >= 2.4: its loop bound is a 1-element array, which numpy 2.4 no longer turns
into an int. The kernel tests skip with that reason instead of failing 160 times with a TypeError."""
import functools

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@functools.cache  # one probe kernel per session, though two test modules ask
def interpreter_problem() -> str:
    """'' when the kernels can run (compiled on CUDA, or a working interpreter), else why not."""
    from kernels import _common

    if triton is None or not _common.interpreting():
        return ""

    @triton.jit
    def _band_loop(X, n):
        hi = tl.minimum(n, tl.program_id(0) + 1)
        for i in range(0, hi, 1):
            tl.store(X + i, 1.0)

    x = torch.zeros(4)
    try:
        _band_loop[(2,)](x, 4)
    except Exception as e:  # the interpreter wraps the TypeError in its own error type
        return (f"the Triton {triton.__version__} interpreter cannot run loops with computed bounds under "
                f"numpy {np.__version__} ({str(e)[:80]}); pip install 'numpy<2.4' or a newer triton")
    return ""
