"""Triton kernels vs the pure-PyTorch references: compiled on a CUDA GPU when there is one (conftest
leaves TRITON_INTERPRET unset there), else under the Triton interpreter on CPU.

The interpreter is ~1000x slower than a GPU, so shapes are tiny; tile sizes are shrunk where a test
needs several blocks (band skipping, state hand-off between time blocks). References run in float64
so the tolerance measures the kernel's own fp32 rounding, not the reference's.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

import kernels
from kernels import _common
from kernels import conv as conv_mod
from kernels.attention import attention
from kernels.conv import causal_conv1d
from kernels.reference import attention_ref, causal_conv1d_ref
from tests.triton_probe import interpreter_problem

_PROBLEM = interpreter_problem()
pytestmark = pytest.mark.skipif(bool(_PROBLEM), reason=_PROBLEM)
DEV = "cuda" if torch.cuda.is_available() and not _common.interpreting() else "cpu"


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    # Every kernel-written buffer starts as NaN, so an element a kernel forgot to write fails loudly.
    monkeypatch.setattr(_common, "FILL_NAN_FOR_TESTS", True)


def _max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- conv

def _conv_case(B, T, D, K, with_bias, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    w = torch.randn(D, K, generator=g)
    b = torch.randn(D, generator=g) if with_bias else None
    s = torch.randn(B, D, K - 1, generator=g) if with_state else None
    return tuple(None if t is None else t.to(DEV) for t in (x, w, b, s))


def _conv_run(fn, x, w, b, s, dout, dstate_out, dtype):
    ins = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b, s)]
    out, final = fn(*ins, return_final_state=True)
    live = [t for t in ins if t is not None]
    loss = (out * dout.to(dtype)).sum() + (final * dstate_out.to(dtype)).sum()
    grads = torch.autograd.grad(loss, live)
    return out, final, grads


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_matches_reference_fp32(T, K, with_bias, with_state):
    B, D = 2, 20  # D not a power of two: exercises the channel mask
    x, w, b, s = _conv_case(B, T, D, K, with_bias, with_state)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(B, T, D, generator=g).to(DEV)
    dfinal = torch.randn(B, D, K - 1, generator=g).to(DEV)

    out, final, grads = _conv_run(causal_conv1d, x, w, b, s, dout, dfinal, torch.float32)
    r_out, r_final, r_grads = _conv_run(causal_conv1d_ref, x, w, b, s, dout, dfinal, torch.float64)

    assert out.dtype == torch.float32 and out.shape == (B, T, D)
    assert final.shape == (B, D, K - 1)
    assert _max_err(out, r_out) <= 1e-5
    assert _max_err(final, r_final) <= 1e-5
    names = [n for n, t in zip(("x", "weight", "bias", "initial_state"), (x, w, b, s)) if t is not None]
    for name, got, ref in zip(names, grads, r_grads):
        assert not torch.isnan(got).any(), f"d{name} has unwritten (NaN) elements"
        assert _max_err(got, ref) <= 1e-5, f"d{name}: max err {_max_err(got, ref):.2e}"


def test_conv_many_time_and_channel_blocks(monkeypatch):
    # Small tiles: taps and the state must cross time-block boundaries; partial dw sums over blocks.
    monkeypatch.setattr(conv_mod, "_blocks", lambda T, D: (8, 16))
    B, T, D, K = 2, 29, 40, 4
    x, w, b, s = _conv_case(B, T, D, K, True, True, seed=3)
    dout = torch.randn(B, T, D, device=DEV)
    dfinal = torch.randn(B, D, K - 1, device=DEV)
    out, final, grads = _conv_run(causal_conv1d, x, w, b, s, dout, dfinal, torch.float32)
    r_out, r_final, r_grads = _conv_run(causal_conv1d_ref, x, w, b, s, dout, dfinal, torch.float64)
    assert _max_err(out, r_out) <= 1e-5
    for got, ref in zip(grads, r_grads):
        assert _max_err(got, ref) <= 1e-5


@pytest.mark.parametrize("split", [1, 2, 9])
def test_conv_state_chaining(split):
    # Running [0, split) then [split, T) through final_state must equal one call over [0, T).
    B, T, D, K = 2, 12, 8, 4
    x, w, b, s = _conv_case(B, T, D, K, True, True, seed=5)
    full, full_state = causal_conv1d(x, w, b, s, return_final_state=True)
    first, mid_state = causal_conv1d(x[:, :split], w, b, s, return_final_state=True)
    second, end_state = causal_conv1d(x[:, split:], w, b, mid_state, return_final_state=True)
    assert _max_err(torch.cat([first, second], 1), full) <= 1e-6
    assert _max_err(end_state, full_state) == 0.0


def test_conv_return_final_state_off_and_k1():
    x, w, b, _ = _conv_case(1, 5, 4, 1, True, False)
    out = causal_conv1d(x, w, b)
    assert torch.is_tensor(out)
    assert _max_err(out, causal_conv1d_ref(x, w, b)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_half_precision(dtype):
    B, T, D, K = 2, 17, 24, 4
    x, w, b, s = _conv_case(B, T, D, K, True, True, seed=7)
    dout = torch.randn(B, T, D, device=DEV)
    dfinal = torch.randn(B, D, K - 1, device=DEV)
    out, final, grads = _conv_run(causal_conv1d, x, w, b, s, dout, dfinal, dtype)
    r_out, r_final, r_grads = _conv_run(causal_conv1d_ref, x, w, b, s, dout, dfinal, torch.float64)
    assert out.dtype == dtype and final.dtype == dtype
    scale = r_out.abs().max().item()
    assert _max_err(out, r_out) <= 2e-2 * scale
    for got, ref in zip(grads, r_grads):
        assert got.dtype == dtype
        assert _max_err(got, ref) <= 3e-2 * ref.abs().max().item()


def test_conv_bad_inputs():
    x, w, b, s = _conv_case(2, 5, 4, 3, True, True)
    with pytest.raises(ValueError):
        causal_conv1d(x, w[:3], b)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, b, s[:, :, :1])
    with pytest.raises(ValueError):
        causal_conv1d(x[0], w, b)


def test_conv_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    x, w, b, s = (None if t is None else t.cpu() for t in _conv_case(1, 3, 4, 2, True, False))
    with pytest.raises(RuntimeError, match="CUDA or TRITON_INTERPRET=1"):
        causal_conv1d(x, w, b)


def test_conv_dispatch_backends():
    x, w, b, s = _conv_case(1, 6, 4, 3, True, True)
    ref = kernels.conv1d_op(x, w, b, s, backend="torch")
    got = kernels.conv1d_op(x, w, b, s, backend="triton")
    assert _max_err(got, ref) <= 1e-5


# ----------------------------------------------------------------------------- attention

def _attn_case(B, Hq, Hkv, T, hd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, hd, generator=g)
    k = torch.randn(B, Hkv, T, hd, generator=g)
    v = torch.randn(B, Hkv, T, hd, generator=g)
    do = torch.randn(B, Hq, T, hd, generator=g)
    return q.to(DEV), k.to(DEV), v.to(DEV), do.to(DEV)


def _attn_run(fn, q, k, v, do, dtype, **kw):
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*ins, **kw)
    grads = torch.autograd.grad((out * do.to(dtype)).sum(), ins)
    return out, grads


def _check_attn(q, k, v, do, tol=1e-4, tiles=None, **kw):
    out, grads = _attn_run(attention, q, k, v, do, torch.float32, tiles=tiles, **kw)
    r_out, r_grads = _attn_run(attention_ref, q, k, v, do, torch.float64, **kw)
    assert out.shape == r_out.shape and out.dtype == torch.float32
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        assert not torch.isnan(got).any(), f"{name} has unwritten (NaN) elements"
        assert _max_err(got, ref) <= tol, f"{name}: max err {_max_err(got, ref):.2e}"


def _attention_cases():
    """Every (T, window, causal, hd), with the GQA group rotating through 1, 2, 4 so that every triple of
    the group with two of the others occurs too: 48 cases. The full product was 144 at ~0.5 s each under
    the interpreter, a tenth of the suite's 15-minute budget; the group only maps query heads to key heads,
    independent of the masks and ragged tiles the other four exercise."""
    for (i, T), (j, window), (k, causal), (m, hd) in itertools.product(
            *map(enumerate, ([1, 7, 63], [None, 1, 3, 64], [True, False], [16, 12]))):
        yield T, window, (1, 2, 4)[(i + j + k + m) % 3], causal, hd


@pytest.mark.parametrize("T, window, group, causal, hd", list(_attention_cases()))
def test_attention_matches_reference_fp32(T, window, group, causal, hd):
    Hkv = 2 if group < 4 else 1
    q, k, v, do = _attn_case(2, Hkv * group, Hkv, T, hd)
    _check_attn(q, k, v, do, causal=causal, window=window)


@pytest.mark.parametrize("window", [None, 1, 3, 20])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_many_tiles(window, causal):
    # 16-wide tiles on T=63: several key/query tiles per program, ragged last tile, band skipping.
    q, k, v, do = _attn_case(1, 4, 2, 63, 12, seed=2)
    _check_attn(q, k, v, do, causal=causal, window=window, tiles=(16, 16))


def test_attention_skips_key_tiles_outside_band():
    # Poison V in key tile 0. Queries >= 32 with window 3 can only reach keys >= 30, so unless the
    # kernel loads tile 0 anyway (it would: NaN * 0 = NaN in the P V dot) their output stays clean.
    q, k, v, _ = _attn_case(1, 2, 1, 64, 16, seed=4)
    v_bad = v.clone()
    v_bad[:, :, :16] = float("nan")
    out = attention(q, k, v_bad, causal=True, window=3, tiles=(16, 16))
    ref = attention_ref(q.double(), k.double(), v.double(), causal=True, window=3)
    assert _max_err(out[:, :, 32:], ref[:, :, 32:]) <= 1e-5


def test_attention_custom_scale_and_strided_inputs():
    # q/k/v as a model makes them: [B, T, H, hd] projections viewed as [B, H, T, hd].
    B, T, Hq, Hkv, hd = 2, 9, 4, 2, 16
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, T, Hq, hd, generator=g).to(DEV).transpose(1, 2)
    kv = torch.randn(B, T, 2, Hkv, hd, generator=g).to(DEV)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    do = torch.randn(B, Hq, T, hd, generator=g).to(DEV)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = attention(q, k, v, window=4, scale=0.3)
    ref = attention_ref(q.double(), k.double(), v.double(), window=4, scale=0.3)
    assert _max_err(out, ref) <= 1e-5
    _check_attn(q, k, v, do, window=4, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_precision(dtype):
    q, k, v, do = _attn_case(1, 4, 2, 40, 16, seed=8)
    out, grads = _attn_run(attention, q, k, v, do, dtype, window=8)
    r_out, r_grads = _attn_run(attention_ref, q, k, v, do, torch.float64, window=8)
    assert out.dtype == dtype
    for got, ref in zip((out, *grads), (r_out, *r_grads)):
        assert got.dtype == dtype
        assert _max_err(got, ref) <= 3e-2 * ref.abs().max().item()


def test_attention_bad_inputs():
    q, k, v, _ = _attn_case(1, 3, 2, 5, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v)
    q, k, v, _ = _attn_case(1, 4, 2, 5, 16)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=-2)
    with pytest.raises(ValueError, match="tiles must be two powers of two >= 16"):
        attention(q, k, v, tiles=(8, 16))
    with pytest.raises(ValueError):
        attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError):
        attention(q, k, v[:, :1])
    with pytest.raises(ValueError, match="Tq == Tk"):
        attention(q[:, :, :2], k, v)


def test_attention_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    q, k, v, _ = (t.cpu() for t in _attn_case(1, 2, 1, 4, 16))
    with pytest.raises(RuntimeError, match="CUDA or TRITON_INTERPRET=1"):
        attention(q, k, v)


def test_attention_dispatch_backends():
    q, k, v, _ = _attn_case(1, 4, 2, 6, 16)
    ref = kernels.attention_op(q, k, v, window=2, backend="torch")
    got = kernels.attention_op(q, k, v, window=2, backend="triton")
    assert _max_err(got, ref) <= 1e-5
    # decode (Tq < Tk) is always served by the reference, even when Triton is asked for
    dec = kernels.attention_op(q[:, :, -1:], k, v, window=2, backend="triton")
    assert _max_err(dec, ref[:, :, -1:]) <= 1e-5


def test_auto_attention_takes_our_kernel_only_for_a_band(monkeypatch):
    """On CUDA "auto" runs our kernel where a window is narrower than the sequence and leaves full
    context (no window, or one covering every key) to SDPA; "triton" forces ours everywhere."""
    calls = []
    monkeypatch.setattr(kernels, "use_triton", lambda backend, t: backend not in ("torch", "flex"))  # as on CUDA
    monkeypatch.setattr(kernels, "attention", lambda q, k, v, **kw: calls.append(kw["window"]) or q)
    q, k, v, _ = (t.cpu() for t in _attn_case(1, 4, 2, 6, 16))
    for window in (None, 6, 9, 2):
        kernels.attention_op(q, k, v, window=window)
    kernels.attention_op(q, k, v, window=None, backend="triton")
    assert calls == [2, None]


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("window", [1, 3, 20])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_band_attention_matches_reference(T, window, causal):
    """model.kernels=flex: flex_attention with a band block mask, GQA; gradients on CUDA (flex has
    no CPU backward, and says so in one line)."""
    from kernels.flex import flex_band_attention

    q, k, v, do = _attn_case(2, 4, 2, T, 16)
    if DEV == "cuda":
        if T != 63:
            pytest.skip("on CUDA every shape is a flex compile: the compiled path is checked at T=63")
        got, g_got = _attn_run(flex_band_attention, q, k, v, do, torch.float32, causal=causal, window=window)
        ref, g_ref = _attn_run(attention_ref, q, k, v, do, torch.float64, causal=causal, window=window)
        assert all(_max_err(a, b) <= 1e-4 for a, b in zip((got, *g_got), (ref, *g_ref)))
        return
    q, k, v = (t.cpu() for t in (q, k, v))
    with torch.no_grad():
        got = flex_band_attention(q, k, v, causal=causal, window=window)
    assert _max_err(got, attention_ref(q.double(), k.double(), v.double(), causal=causal, window=window)) <= 1e-5
    with pytest.raises(RuntimeError, match="model.kernels=flex trains on CUDA only"):
        flex_band_attention(q.requires_grad_(), k, v, causal=causal, window=window)


def test_flex_backend_routes_only_bands_to_flex(monkeypatch):
    import kernels.flex as flex_mod

    calls = []
    monkeypatch.setattr(flex_mod, "flex_band_attention", lambda q, k, v, **kw: calls.append(kw["window"]) or q)
    q, k, v, _ = (t.cpu() for t in _attn_case(1, 4, 2, 6, 16))
    for window in (None, 6, 2):
        kernels.attention_op(q, k, v, window=window, backend="flex")
    kernels.attention_op(q[:, :, -1:], k, v, window=2, backend="flex")  # decode: the reference
    assert calls == [2]
    line = kernels.describe_routing("flex", "cpu", ["conv", "attn", "attn"], [None, 256, None], 2048, "swiglu")
    assert line.endswith("conv PyTorch conv1d, attention (full context) SDPA, "
                         "attention (window 256) flex_attention (unfused off CUDA)")


@pytest.mark.skipif(not kernels.HAVE_TRITON_KERNELS, reason="needs triton")
def test_flex_backend_on_cuda_runs_flex_for_bands_and_references_elsewhere():
    """use_triton was True for flex on CUDA, so bands went to our kernel (checked first) and the conv
    and LIF scan ran Triton: flex never ran where it is meant to."""
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert not kernels.use_triton("flex", cuda) and kernels.use_triton("auto", cuda)
    assert not kernels.attention_uses_triton("flex", cuda, 2, 6, 6) and kernels.attention_uses_flex("flex", 2, 6, 6)
    line = kernels.describe_routing("flex", "cuda", ["conv", "attn"], [None, 256], 2048, "swiglu")
    assert line == "kernels (model.kernels=flex, cuda): conv PyTorch conv1d, attention (window 256) flex_attention"


def test_triton_attention_under_autocast_takes_the_mixed_dtypes_qk_norm_leaves():
    """bf16 autocast: QK-norm and RoPE give fp32 q, k beside a bf16 v; the kernel refused the mix, so
    every bf16 training step through it failed. attention_op casts them as SDPA does."""
    from arch import LM, ModelConfig

    if not (DEV == "cuda" or _common.interpreting()):
        pytest.skip("the Triton kernel runs on CUDA or under TRITON_INTERPRET=1")
    idx = torch.randint(0, 29, (2, 9), device=DEV)
    losses, grads = [], []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        m = LM(ModelConfig(vocab_size=29, d_model=16, n_layers=1, layers="A", n_heads=2, n_kv_heads=1, window=3,
                           window_pattern="S", kernels=backend)).to(DEV)
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = m(idx, idx)
        loss.backward()
        losses.append(loss.item())
        grads.append(m.layers[0].mixer.q_proj.weight.grad)
    assert abs(losses[0] - losses[1]) <= 2e-2 and _max_err(grads[1], grads[0]) <= 5e-2 * grads[0].abs().max()


def test_a_double_backward_through_a_kernel_is_an_error_not_zeros():
    """create_graph=True: the kernels' backward builds no graph, so a second-order gradient through
    them was silently 1 where the reference gives the real one."""
    from kernels.lif import lif_scan

    x, w = torch.randn(1, 5, 3, device=DEV, requires_grad=True), torch.randn(3, 2, device=DEV)
    q = torch.randn(1, 2, 5, 16, device=DEV, requires_grad=True)
    zeros = torch.zeros(1, 3, device=DEV)
    cases = {"causal_conv1d": lambda: causal_conv1d(x, w), "attention": lambda: attention(q, q, q),
             "lif_scan": lambda: lif_scan(x, torch.full((3,), 0.9, device=DEV), torch.ones(3, device=DEV), zeros,
                                          zeros)[0]}
    for name, run in cases.items():
        leaf = q if name == "attention" else x
        torch.autograd.grad(run().pow(2).sum(), leaf)  # first order: fine
        with pytest.raises(RuntimeError, match=f"{name}: the Triton backward is not differentiable"):
            torch.autograd.grad(run().pow(2).sum(), leaf, create_graph=True)


def test_flex_backend_model_forward_equals_torch():
    from arch import LM, ModelConfig

    idx = torch.randint(0, 41, (2, 19), device=DEV)
    outs = []
    for backend in ("torch", "flex"):
        torch.manual_seed(0)
        m = LM(ModelConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, layers="CA", window=5,
                           window_pattern="S", kernels=backend)).to(DEV).eval()
        with torch.no_grad():
            outs.append(m(idx))
    assert _max_err(outs[1], outs[0]) <= 1e-4


def test_routing_line_names_what_each_block_runs(monkeypatch):
    """The run header's kernel line follows the same decisions as the dispatch (attention_uses_triton)."""
    kinds, windows = ["conv", "attn", "attn", "lif"], [None, 256, None, None]
    cpu = kernels.describe_routing("auto", "cpu", kinds, windows, 2048, "swiglu")
    assert cpu == ("kernels (model.kernels=auto, cpu): conv PyTorch conv1d, attention (full context) SDPA, "
                   "attention (window 256) SDPA with a band mask, LIF scan fused eager loop")
    monkeypatch.setattr(kernels, "use_triton", lambda backend, t: backend not in ("torch", "flex"))  # as on CUDA
    gpu = kernels.describe_routing("auto", "cpu", kinds, windows, 2048, "swiglu")
    assert gpu.endswith("conv Triton, attention (full context) SDPA, attention (window 256) Triton, LIF scan Triton")
    assert "attention (full context) Triton" in kernels.describe_routing("triton", "cpu", kinds, windows, 2048, "swiglu")
    # a window as long as the context is full context; the reference scan is named when asked for
    assert "attention (full context) SDPA" in kernels.describe_routing("auto", "cpu", ["attn"], [2048], 2048, "lif",
                                                                         "reference")
    assert kernels.describe_routing("auto", "cpu", ["attn"], [None], 64, "lif", "reference").endswith(
        "LIF scan reference loop")


def test_reference_window_covering_every_key_equals_full_context():
    q, k, v, _ = (t.cpu().float() for t in _attn_case(2, 4, 2, 7, 16))
    full = attention_ref(q, k, v, causal=True)
    for causal in (True, False):
        want = attention_ref(q, k, v, causal=causal)
        for w in (7, 8, 100):
            assert _max_err(attention_ref(q, k, v, causal=causal, window=w), want) <= 1e-6
    assert _max_err(attention_ref(q, k, v, causal=True, window=6), full) > 1e-3  # a real band differs


# ----------------------------------------------------------------------------- LIF scan

def _lif_case(B, T, D, seed=0):
    """Currents around the threshold (so neurons fire and reset), per-channel beta including the
    clamp's edges, and a non-zero initial state."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, D, generator=g) * 0.8 + 0.4
    beta = torch.rand(D, generator=g) * 1.2 - 0.1  # some outside [0, 1]: the clamp's gradient
    thr = torch.rand(D, generator=g) + 0.5
    mem, spk = torch.randn(B, D, generator=g), (torch.rand(B, D, generator=g) > 0.5).float()
    g_s, g_m, g_k = (torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g),
                     torch.randn(B, D, generator=g))
    return [t.to(DEV) for t in (u, beta, thr, mem, spk, g_s, g_m, g_k)]


def _lif_run(fn, u, beta, thr, mem, spk, g_s, g_m, g_k, surrogate):
    ins = [t.clone().requires_grad_() for t in (u, beta, thr, mem)]
    s, m, k = fn(*ins, spk, surrogate, 2.0 if surrogate == "atan" else 25.0)
    loss = (s * g_s).sum() + (m * g_m).sum() + (k * g_k).sum()
    return (s, m, k), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("D", [5, 130])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
def test_lif_scan_matches_reference(T, D, surrogate):
    """Forward (spikes, final membrane and spike) and every gradient (u, beta, threshold, initial
    membrane) against arch.lif.lif_scan_ref in fp32; D = 130 spans two channel blocks."""
    from arch.lif import lif_scan_ref

    case = _lif_case(2, T, D)
    (s, m, k), grads = _lif_run(kernels.lif_scan, *case, surrogate)
    (rs, rm, rk), rgrads = _lif_run(lif_scan_ref, *case, surrogate)
    assert torch.equal(s, rs) and torch.equal(k, rk) and 0 < s.mean() < 1
    assert _max_err(m, rm) <= 1e-5
    for name, got, ref in zip(("u", "beta", "threshold", "mem"), grads, rgrads):
        assert not torch.isnan(got).any(), f"d{name} has unwritten (NaN) elements"
        assert _max_err(got, ref) <= 1e-4 * max(1.0, ref.abs().max().item()), f"d{name}: {_max_err(got, ref):.2e}"


def test_lif_scan_bf16_input_keeps_an_fp32_state():
    """Under bf16 autocast u arrives in bf16: the kernel's state is fp32, so its spikes are the fp32
    reference's on the same (bf16-valued) currents; the gradients differ only by the bf16 rounding
    of the saved membranes. beta and threshold keep their fp32 gradients."""
    from arch.lif import lif_scan_ref

    u, beta, thr, mem, spk, g_s, g_m, g_k = _lif_case(2, 33, 20)
    u16, mem = u.bfloat16(), mem.bfloat16().float()  # the state is handed over in u's dtype
    (s, m, k), grads = _lif_run(kernels.lif_scan, u16, beta, thr, mem, spk, g_s, g_m, g_k, "atan")
    (rs, rm, rk), rgrads = _lif_run(lif_scan_ref, u16.float(), beta, thr, mem, spk, g_s, g_m, g_k, "atan")
    assert s.dtype == torch.bfloat16 and torch.equal(s.float(), rs) and torch.equal(k.float(), rk)
    assert grads[1].dtype == grads[2].dtype == torch.float32
    for name, got, ref in zip(("u", "beta", "threshold", "mem"), grads, rgrads):
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel:.2e}"


def test_lif_scan_unused_outputs_and_empty_sequence():
    from arch.lif import lif_scan_ref

    u, beta, thr, mem, spk, *_ = _lif_case(3, 9, 4)
    ins = [t.clone().requires_grad_() for t in (u, beta, thr, mem)]
    got = torch.autograd.grad(kernels.lif_scan(*ins, spk)[0].sum(), ins)  # final state unused: no gradient in
    ref = torch.autograd.grad(lif_scan_ref(*ins, spk)[0].sum(), ins)
    assert all(_max_err(a, b) <= 1e-4 for a, b in zip(got, ref))
    # the spiking MLP's input: one current per token broadcast over T_sim steps (time stride 0), read in place
    c = u[:, :1].clone().requires_grad_()
    got = torch.autograd.grad(kernels.lif_scan(c.expand(-1, 9, -1), beta, thr, mem, spk)[0].sum(), c)[0]
    ref = torch.autograd.grad(lif_scan_ref(c.expand(-1, 9, -1), beta, thr, mem, spk)[0].sum(), c)[0]
    assert _max_err(got, ref) <= 1e-4
    s, m, k = kernels.lif_scan(u[:, :0], beta, thr, mem, spk)
    assert s.shape == (3, 0, 4) and torch.equal(m, mem) and torch.equal(k, spk)
    with pytest.raises(ValueError, match="beta must be"):
        kernels.lif_scan(u, beta[:2], thr, mem, spk)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        kernels.lif_scan(u, beta, thr, mem, spk, surrogate="relu")


@pytest.mark.parametrize("causal,mlp", [(True, "swiglu"), (False, "swiglu"), (True, "lif")])
def test_spiking_blocks_through_the_kernel_equal_the_eager_scan(causal, mlp):
    """model.kernels=triton routes both LIF blocks (token mixer, bidirectional too, and the spiking
    MLP) to the kernel: same loss and gradients as model.kernels=torch."""
    from arch import LM, ModelConfig

    idx = torch.randint(0, 41, (2, 11), device=DEV)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        m = LM(ModelConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, layers="LA",
                           mlp=mlp, causal=causal, kernels=backend)).to(DEV)
        loss = m(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters()]))
    (l0, g0), (l1, g1) = results
    assert abs(l1.item() - l0.item()) <= 1e-5
    for a, b in zip(g1, g0):
        assert _max_err(a, b) <= 1e-4


# ----------------------------------------------------------------------------- bench

def test_bench_without_gpu_exits_cleanly(capsys, monkeypatch):
    from kernels import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    assert "no CUDA GPU: nothing to benchmark" in capsys.readouterr().out


def test_bench_gpu_branch_smoke_on_cpu(capsys, monkeypatch):
    # Runs the CUDA code path's Python (parity checks, tables) on CPU with a wall-clock timer.
    import time
    import types

    from kernels import bench

    def wall_ms(fn, warmup, iters):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(bench, "_DEVICE", DEV)
    monkeypatch.setattr(bench, "_time_ms", wall_ms)
    monkeypatch.setattr(bench, "ATTN_SEQS_QUICK", [40])
    monkeypatch.setattr(bench, "ATTN_WINDOWS_QUICK", [8, None])
    monkeypatch.setattr(bench, "ATTN_HEAD_DIMS_QUICK", [16])
    monkeypatch.setattr(bench, "CONV_SHAPES_QUICK", [(24, 16)])
    monkeypatch.setattr(bench, "LIF_SHAPES_QUICK", [(2, 9, 20)])
    args = types.SimpleNamespace(quick=True, batch=1, warmup=0, iters=1, no_flex=True, only=None)
    speedups = {**bench.bench_attention(args), **bench.bench_conv(args), **bench.bench_lif(args)}
    out = capsys.readouterr().out
    assert "PARITY FAILED" not in out and "vs ref" in out and "100.0000%" in out  # LIF: every spike equal
    assert len(speedups["attention vs sdpa_band"]) == 2 and len(speedups["conv vs ref"]) == 1
    assert len(speedups["lif vs fused eager"]) == 1
    assert len(speedups["attention vs sdpa_causal"]) == 1  # the full-context row only
    assert all(v > 0 for v in speedups["conv vs ref"])
    assert bench.target_line("conv vs ref", [3.5, None]).startswith("conv vs ref >= 3.00x: NOT met (1/2 rows")
    assert "met (2/2" in bench.target_line("attention vs flex", [0.9, 1.4])
