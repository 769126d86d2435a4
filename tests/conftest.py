import os

import torch

# Triton decides at decoration time whether to interpret: set this before anything imports kernels.
# Without CUDA the kernel tests run under the interpreter on CPU; with CUDA they compile the real
# kernels (TRITON_INTERPRET=1 set by hand still forces the interpreter). On CPU the "auto" backend
# never picks Triton, so this only affects tests that ask for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
