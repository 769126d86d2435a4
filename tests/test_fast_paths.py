"""Fast path == its reference, for the pairs the other test files left partly unchecked (the audit of
"every fast path has a slow reference next to it and a test comparing them"):

- the eager fused LIF scan's hand-written backward against lif_scan_ref with the final spike's
  gradient, odd lengths including 1 and the spiking MLP's broadcast (time stride 0) input;
- the compiled decode step's `_RowLinearAsMV` rewrite (F.linear on one row -> torch.mv) run eagerly,
  on layers with biases;
- the short conv's one-token static step (K multiply-adds instead of conv1d) with a conv bias;
- BatchedMuon against torch.optim.Muon without Nesterov, with momentum and match_rms_adamw;
- the int8 weight-only modules against fake_quantize on Linear biases, an untied head and a
  learned position table.

All CPU, fp32 (or fp64 where noted), a few hundred ms each.
"""
import copy

import pytest
import torch

import arch.model
from arch import LM, ModelConfig
from arch.lif import lif_scan, lif_scan_ref


def tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------- LIF: fused eager scan

def _lif_case(B, T, D, seed):
    """Currents around the threshold (fires and resets), beta partly outside [0, 1] (the clamp),
    a non-zero initial membrane and spike, and upstream gradients for all three outputs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, D, generator=g) * 0.8 + 0.4
    beta = torch.rand(D, generator=g) * 1.2 - 0.1
    thr = torch.rand(D, generator=g) + 0.5
    mem0 = torch.randn(B, D, generator=g)
    spk0 = (torch.rand(B, D, generator=g) > 0.5).float()
    gs, gm, gk = torch.randn(B, T, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    return u, beta, thr, mem0, spk0, gs, gm, gk


def _lif_grads(fn, u, beta, thr, mem0, spk0, gs, gm, gk, surrogate, broadcast=False):
    ins = [t.clone().requires_grad_() for t in (u, beta, thr, mem0)]
    cur = ins[0][:, :1].expand(-1, u.shape[1], -1) if broadcast else ins[0]
    s, m, k = fn(cur, ins[1], ins[2], ins[3], spk0, surrogate, 2.0 if surrogate == "atan" else 25.0)
    loss = (s * gs).sum() + (m * gm).sum() + (k * gk).sum()  # the final spike carries a gradient too
    return (s, m, k), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("surrogate", ["atan", "fast_sigmoid"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["mixer", "mlp-broadcast"])
def test_fused_lif_scan_equals_reference_with_final_spike_gradient(T, surrogate, broadcast):
    """arch.lif.lif_scan (hand-written BPTT) against lif_scan_ref (autograd through the loop):
    spikes and the final spike bit-equal (the same fp32 ops in the same order), final membrane to 1e-6,
    and the gradients of u, beta, threshold and the initial membrane with every output (spikes,
    final membrane and final spike) in the loss. Gradient tolerance 1e-5 relative to the largest
    reference entry: both are fp32 sums over <= 63 steps in different orders (measured ~1e-7)."""
    case = _lif_case(3, T, 20, seed=T)
    (s, m, k), grads = _lif_grads(lif_scan, *case, surrogate, broadcast)
    (rs, rm, rk), rgrads = _lif_grads(lif_scan_ref, *case, surrogate, broadcast)
    assert 0 < rs.mean() < 1  # both spikes and silence
    assert torch.equal(s, rs) and torch.equal(k, rk)
    torch.testing.assert_close(m, rm, atol=1e-6, rtol=0)
    for name, got, ref in zip(("u", "beta", "threshold", "mem0"), grads, rgrads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0,
                                   msg=lambda msg, n=name: f"d{n}: {msg}")


# ---------------------------------------------------------------------------- compiled decode's mv mode

def _biased(**kw):
    """Every Linear with a bias (attention q/k/v and out, the MLP) and a conv bias: the bias branch
    of each fast path below."""
    return tiny(layers="CA", conv_bias=True, attn_bias=True, attn_out_bias=True, mlp_bias=True,
                qk_norm=False, tie_embeddings=False, **kw)


def test_row_linear_as_mv_mode_equals_plain_linear(monkeypatch):
    """_RowLinearAsMV (what the compiled CPU decode step runs under) turns a one-row F.linear into
    torch.mv + bias. Run eagerly on the static decode step of a model whose Linears all have
    biases: prefill (many rows: untouched) and one-token steps (rewritten) equal the plain step.
    Tolerance 1e-5: mv and addmm sum the same fp32 products in different orders (~1e-7 apart)."""
    torch.manual_seed(0)
    m = LM(_biased()).eval()
    with torch.no_grad():
        for p in m.parameters():  # biases start at zero: make them count
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
    idx = torch.randint(0, 61, (1, 7))
    outs = []
    for mode in (False, True):
        states = m.static_state(1, 12)
        step = arch.model._decode_in_mv_mode(m.forward_static) if mode else m.forward_static
        logits = []
        with torch.no_grad():
            logits.append(step(idx[:, :3], torch.tensor([0]), states)[0])
            for t in range(3, 7):
                logits.append(step(idx[:, t:t + 1], torch.tensor([t]), states)[0])
        outs.append(torch.cat(logits, 1))
    assert calls, "the mv rewrite never ran"
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- short conv one-token step

@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("K", [2, 4])
def test_static_one_token_conv_step_with_bias_equals_full_forward(T, K):
    """ShortConv.forward_static's one-token path (window * taps summed by hand, bias added after)
    against the full forward (causal_conv1d_ref over the whole sequence), with model.conv_bias: no
    preset has a conv bias, so tests/test_arch.py's decode tests never reach that branch. 1e-5:
    fp32, the same products summed in another order (the decode tests use 1e-4 over 6 layers)."""
    torch.manual_seed(K)
    m = LM(_biased(conv_kernel=K)).eval()
    with torch.no_grad():
        for layer in m.layers:
            if layer.kind == "conv":
                layer.mixer.conv.bias.uniform_(-1, 1)
    idx = torch.randint(0, 61, (2, T))
    with torch.no_grad():
        full = m(idx)
        states = m.static_state(2, T)
        steps = [m.forward_static(idx[:, t:t + 1], torch.tensor([t]), states)[0] for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- BatchedMuon

@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_batched_muon_equals_torch_muon_momentum_variants(nesterov, adjust):
    """BatchedMuon (NS stacked by shape, tall matrices transposed) against torch.optim.Muon over 3
    steps with momentum 0.9, weight decay, both Nesterov settings and both lr adjustments, on
    repeated, tall, wide and square shapes. Both run NS in bf16 on the same matrices, so the
    parameters come out equal (0 tolerance, as in tests/test_optim.py's default-setting test)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 24), (24, 48), (48, 24), (32, 32)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    from slmlab.optim import BatchedMuon

    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opts = (BatchedMuon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(ref, **kw))
    for step in grads:
        for params, opt in zip((ours, ref), opts):
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
    for a, b, t in zip(ours, ref, init):
        assert not torch.equal(a, t)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------- int8 weight-only modules

@pytest.mark.parametrize("T", [1, 7])
def test_int8_modules_equal_fake_quant_with_biases_and_learned_positions(T):
    """quantize_int8 (int8 weights dequantized in the forward: Int8Linear, Int8Embedding) against
    fake_quantize (the float model with the dequantized weights), on a GPT-2-like model: biases on
    every Linear, an untied head and a learned position table (the trained-run test in
    tests/test_convert.py has neither biases nor a second table). 1e-5: the same fp32 weights up to
    the order of the scale multiply (q * s computed per call vs stored once)."""
    from slmlab.export.quant import fake_quantize, quantize_int8

    torch.manual_seed(0)
    m = LM(tiny(layers="A", n_kv_heads=4, norm="layernorm", mlp="gelu", pos="learned", max_positions=16,
                qk_norm=False, attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=False)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    q, ref = quantize_int8(copy.deepcopy(m)), fake_quantize(copy.deepcopy(m))
    idx = torch.randint(0, 61, (2, T))
    with torch.no_grad():
        got, want = q(idx), ref(idx)
        assert (want - m(idx)).abs().max() > 1e-4  # it did quantize
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
