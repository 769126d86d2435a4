"""Model level: the same hybrid through the Triton kernels (compiled on CUDA, the interpreter on
CPU) and the references."""
import pytest
import torch

from arch import LM, ModelConfig
from kernels import HAVE_TRITON_KERNELS
from tests.test_kernels import DEV
from tests.triton_probe import interpreter_problem

_PROBLEM = "triton not installed" if not HAVE_TRITON_KERNELS else interpreter_problem()
pytestmark = pytest.mark.skipif(bool(_PROBLEM), reason=_PROBLEM)


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_forward_backward_triton_equals_torch(causal):
    idx = torch.randint(0, 53, (2, 19), device=DEV)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=3, layers="CCA" if causal else "CAA",
                          n_heads=2, n_kv_heads=1, window=5, window_pattern="SL", kernels=backend, causal=causal)
        m = LM(cfg).to(DEV)
        loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
