"""LIF blocks: parity with snntorch.Leaky, fused scan == reference, decode == full forward,
spike metrics, bad options."""
import pytest
import torch

from arch import build_model
from arch.config import ModelConfig
from arch.lif import LIFMixer, LIFState, lif_scan, lif_scan_ref, spike_metrics
from slmlab.config import load_config
from slmlab.errors import ConfigError

SURR = [("atan", 2.0), ("fast_sigmoid", 25.0)]


def tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, layers="LLA",
                mlp="lif", mixer_opts={"lif": {"T_sim": 3}})
    base.update(kw)
    return ModelConfig(**base)


def _inputs(B=3, T=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(B, T, D, generator=g) * 0.7 + 0.35).requires_grad_()
    beta = torch.rand(D, generator=g).requires_grad_()
    thr = (torch.rand(D, generator=g) + 0.5).requires_grad_()
    w = torch.randn(B, T, D, generator=g)
    return u, beta, thr, w


def _grads(out_spk, out_mem, w, params):
    loss = (out_spk * w).sum() + 0.3 * out_mem.sum()
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name,scale", SURR)
@pytest.mark.parametrize("impl", [lif_scan_ref, lif_scan], ids=["reference", "fused"])
def test_lif_matches_snntorch_leaky(name, scale, impl):
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate

    u, beta, thr, w = _inputs()
    sg = surrogate.atan(scale) if name == "atan" else surrogate.fast_sigmoid(scale)
    leaky = snn.Leaky(beta=beta.detach().clone(), threshold=thr.detach().clone(), spike_grad=sg,
                      learn_beta=True, learn_threshold=True, reset_mechanism="subtract")
    mem = torch.zeros(u.shape[0], u.shape[2])
    spikes = []
    for t in range(u.shape[1]):  # snntorch steps over time one call at a time
        s, mem = leaky(u[:, t], mem)
        spikes.append(s)
    ref_s = torch.stack(spikes, 1)
    ref_g = _grads(ref_s, mem, w, [u, leaky.beta, leaky.threshold])

    z = torch.zeros_like(mem)
    s, m, last = impl(u, beta, thr, z, z, name, scale)
    assert 0.05 < ref_s.mean() < 0.95  # the case exercises both spikes and silence
    assert torch.equal(s, ref_s)
    assert torch.equal(last, ref_s[:, -1])
    torch.testing.assert_close(m, mem, atol=1e-6, rtol=0)
    for a, b in zip(_grads(s, m, w, [u, beta, thr]), ref_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,scale", SURR)
def test_fused_scan_equals_reference_with_initial_state(name, scale):
    u, beta, thr, w = _inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    mem0 = torch.randn(3, 8, generator=g).requires_grad_()
    spk0 = (torch.rand(3, 8, generator=g) > 0.5).float()
    outs = []
    for fn in (lif_scan_ref, lif_scan):
        s, m, last = fn(u, beta, thr, mem0, spk0, name, scale)
        outs.append((s, m, last, _grads(s, m, w, [u, beta, thr, mem0])))
    (s1, m1, l1, g1), (s2, m2, l2, g2) = outs
    assert torch.equal(s1, s2) and torch.equal(l1, l2)
    torch.testing.assert_close(m1, m2, atol=1e-6, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fused_scan_keeps_an_fp32_membrane_for_bf16_input_as_the_reference_does():
    """bf16 currents with fp32 parameters (autocast's case): the fused scan rounded its membrane to bf16,
    and 8% of the spikes differed from the reference's."""
    u, beta, thr, w = _inputs(seed=3)
    u = (u.detach() * 4).bfloat16().requires_grad_()
    zero = torch.zeros(3, 8)
    (s1, m1, _), (s2, m2, _) = (fn(u, beta, thr, zero, zero) for fn in (lif_scan_ref, lif_scan))
    assert m2.dtype == m1.dtype == torch.float32 and torch.equal(s1, s2)
    torch.testing.assert_close(m1, m2, atol=1e-6, rtol=0)
    for a, b in zip(_grads(s1, m1, w, [u, beta]), _grads(s2, m2, w, [u, beta])):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_lif_state_chunks_equal_one_pass():
    torch.manual_seed(0)
    cfg = tiny()
    mixer = LIFMixer(cfg, 0).eval()
    with torch.no_grad():
        mixer.in_proj.weight.mul_(20)  # make it spike
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        full, _ = mixer(x)
        st, outs = mixer.init_state(2), []
        for a, b in ((0, 11), (11, 12), (12, 30)):
            y, st = mixer(x[:, a:b], st)
            outs.append(y)
    assert isinstance(st, LIFState) and st.mem.shape == (2, 32) and st.spk.shape == (2, 32)
    assert 0 < st.spk.mean() < 1
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_spiking_preset_decode_equals_full_forward():
    cfg = load_config(arch="spiking", overrides=["model.vocab_size=61", "model.d_model=32", "model.n_heads=4",
                                                 "model.n_kv_heads=2"]).model
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    assert [l.kind for l in m.layers][:3] == ["lif", "lif", "attn"]
    idx = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full = m(idx)
        st, outs = m.init_state(2), []
        for t in range(24):
            logits, st = m(idx[:, t:t + 1], states=st)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)


def test_bidirectional_lif_sees_the_future_and_causal_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 32) * 3
    x2 = x.clone()
    x2[:, 15:] += 5
    for causal in (True, False):
        torch.manual_seed(1)
        mixer = LIFMixer(tiny(causal=causal), 0)
        with torch.no_grad():
            mixer.in_proj.weight.mul_(20)
            same = torch.allclose(mixer(x)[0][:, :10], mixer(x2)[0][:, :10])
        assert same == causal


@pytest.mark.parametrize("causal", [True, False])
def test_a_neuron_that_spikes_every_step_has_rate_one(causal):
    """Rates are spikes per neuron per step: a bidirectional mixer has two neurons per channel (one per
    scan); its rate was their spike sum over one neuron, 2 here."""
    mixer = LIFMixer(tiny(causal=causal), 0).eval()
    with torch.no_grad():
        mixer.in_proj.weight.fill_(1.0)  # a current of d_model = 32 per step: far above the threshold
        mixer(torch.ones(2, 9, 32))
    assert float(mixer._stat["spikes"]) / float(mixer._stat["slots"]) == 1.0


def test_spiking_model_trains_and_logs_spike_metrics():
    torch.manual_seed(0)
    m = build_model(tiny())
    idx = torch.randint(0, 61, (2, 16))
    loss = m(idx, idx)
    loss.backward()
    lif_mixer, lif_mlp = m.layers[0].mixer, m.layers[0].mlp
    for p in (lif_mixer.beta, lif_mixer.threshold, lif_mlp.beta, lif_mlp.threshold, lif_mixer.in_proj.weight,
              lif_mlp.w1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0  # surrogate gradients reach every LIF parameter
    assert m.extra_metrics() == {} or "spike_rate_mean" not in m.extra_metrics()  # training records nothing
    m.eval()
    with torch.no_grad():
        m.token_nll(idx, idx)
    mets = m.extra_metrics()
    for key in ("spike_rate.layer0.mixer", "spike_rate.layer1.mixer", "spike_rate.layer0.mlp", "spike_rate.layer2.mlp"):
        assert 0 <= mets[key] <= 1
    assert "spike_rate.layer2.mixer" not in mets  # layer 2 is attention
    assert 0 < mets["energy_vs_dense"] < 1 and mets["energy_proxy_pj_per_token"] > 0
    assert m.extra_metrics() == {}  # read once per eval: the accumulators reset


@pytest.mark.parametrize("opts,needle", [
    ({"lif": {"T_sim": 0}}, "model.mixer_opts.lif.T_sim must be an integer > 0"),
    ({"lif": {"T_sim": -2}}, "T_sim must be an integer > 0"),
    ({"lif": {"T_sim": 2.5}}, "model.mixer_opts.lif.T_sim expects an integer"),
    ({"lif": {"surrogate": "sigmoid"}}, "surrogate must be one of"),
    ({"lif": {"beta": 1.5}}, "model.mixer_opts.lif.beta must be in [0, 1]"),
    ({"lif": {"threshold": 0}}, "threshold must be > 0"),
    ({"lif": {"threshold": float("nan")}}, "threshold must be > 0, got nan"),
    ({"lif": {"surrogate_scale": float("nan")}}, "surrogate_scale must be > 0, got nan"),
    ({"lif": {"scan": "triton"}}, "scan must be fused or reference"),
    ({"lif": {"bta": 0.5}}, "model.mixer_opts.lif: unknown key 'bta'"),
    ({"lfi": {"beta": 0.5}}, "no block 'lfi' takes options"),
    ({"T_sim": 4}, "namespaced by block now: model.mixer_opts.lif.T_sim"),
])
def test_bad_lif_options_are_one_line_errors(opts, needle):
    with pytest.raises(ConfigError) as e:
        build_model(tiny(mixer_opts=opts))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_tsim_zero_exits_2_from_the_cli(capsys, tmp_path):
    import train
    from slmlab.cli import run_cli

    rc = run_cli(train.main, ["--arch", "spiking", "--out", str(tmp_path / "run"), "model.mixer_opts.lif.T_sim=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "T_sim must be an integer > 0" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # rejected before anything is written


@pytest.mark.parametrize("public", [True, False], ids=["is_exporting", "export_flag"])
def test_spike_stats_trace_without_graph_breaks_and_count_as_eager(monkeypatch, public):
    """A compiled eval (train.compile) or `sample.py --compile` of a LIF model: recording spike counts
    must not break the graph (float() of a tensor did, once per layer per call). Both ways of asking
    "exporting?" run on any torch: before 2.12 torch.compile folded torch.compiler.is_exporting() to True
    and nothing was counted, so arch/block.py exporting() reads the export flag there."""
    import arch.block

    if public and not arch.block._IS_EXPORTING_TRACES:
        pytest.skip(f"torch {torch.__version__}: dynamo folds torch.compiler.is_exporting() to True")
    monkeypatch.setattr(arch.block, "_IS_EXPORTING_TRACES", public)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, layers="LA", mlp="lif")
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        m.token_nll(x, y)
        eager = spike_metrics(m)
        explained = torch._dynamo.explain(m.token_nll)(x, y)
        traced = spike_metrics(m)
    assert explained.graph_break_count == 0, explained.break_reasons[:1]
    assert eager and traced == pytest.approx(eager, rel=1e-9)
