import os

# Triton decides at decoration time whether to interpret: set this before anything imports kernels.
# On CPU the "auto" backend never picks Triton, so this only affects tests that ask for it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
