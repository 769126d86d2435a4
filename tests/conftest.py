import os

import pytest
import torch

# Triton decides at decoration time whether to interpret: set this before anything imports kernels.
# Without CUDA the kernel tests run under the interpreter on CPU; with CUDA they compile the real
# kernels (TRITON_INTERPRET=1 set by hand still forces the interpreter). On CPU the "auto" backend
# never picks Triton, so this only affects tests that ask for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (-n N) the workers share the cores: each takes its share, at most 2 threads. On
# CI's 2 cores, 2 one-thread workers ran the suite in 495 s against 846 s for one two-thread process.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    """On CUDA, fp32 matmuls and convolutions in true fp32 for every test, whatever an earlier test
    in the process left set (the trainer's resolve_device turns TF32 on, and cuDNN's convolution
    flag defaults to it): the suite's fp32 tolerances assume fp32 rounding."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def sft_base(tmp_path_factory):
    """The tiny pretrained base run (sft_helpers.make_base) that test_sft and test_lora fine-tune: trained
    once per session. Tests read it or copy it, never write into it."""
    from sft_helpers import make_base

    return make_base(tmp_path_factory.mktemp("sftbase"))
