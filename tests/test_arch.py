"""Block interface: decode == full forward, pattern parsing, bad configs, registry extension."""
import pytest
import torch
import torch.nn as nn

import arch
from arch import LM, ModelConfig
from slmlab.config import load_config, presets
from slmlab.errors import ConfigError

# The decode == forward tests run on every device here: on a CUDA machine the full forward goes
# through the Triton conv and band attention ("auto"), the decode through the references.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, window=4)
    base.update(kw)
    return ModelConfig(**base)


def preset_cfgs():
    out = []
    for name in presets():
        cfg = load_config(arch=name, overrides=["model.vocab_size=61", "model.d_model=32", "model.n_heads=4",
                                                "model.n_kv_heads=2"]).model
        out.append(pytest.param(cfg, id=name))
    out.append(pytest.param(tiny(layers="CCA", window_pattern="SL"), id="hybrid-sliding"))
    out.append(pytest.param(tiny(layers="A", window_pattern="SSL", conv_kernel=4), id="transformer-sliding"))
    out.append(pytest.param(tiny(layers="CA", conv_kernel=2, tie_embeddings=False), id="k2-untied"))
    # The imported families' block options (tests/test_hf_families.py pins them against transformers).
    out.append(pytest.param(tiny(qk_norm=False, rope_scaling={"type": "llama3", "original_max_position_embeddings": 16}),
                            id="llama-ish"))
    out.append(pytest.param(tiny(qk_norm=False, attn_bias=True, tie_embeddings=False), id="qwen2-ish"))
    out.append(pytest.param(tiny(n_kv_heads=4, norm="layernorm", mlp="gelu", pos="learned", max_positions=64,
                                 qk_norm=False, attn_bias=True, attn_out_bias=True, mlp_bias=True), id="gpt2-ish"))
    return out


def _full_and_decoded(cfg, T, chunks, device="cpu"):
    torch.manual_seed(0)
    m = LM(cfg).eval().to(device)
    idx = torch.randint(0, cfg.vocab_size, (2, T)).to(device)
    with torch.no_grad():
        full = m(idx)
        states, outs, pos = m.init_state(2, device), [], 0
        for c in chunks:
            logits, states = m(idx[:, pos:pos + c], states=states)
            outs.append(logits)
            pos += c
    assert pos == T
    return full, torch.cat(outs, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", preset_cfgs())
@pytest.mark.parametrize("T", [1, 7, 63])
def test_token_by_token_decode_equals_full_forward(cfg, T, device):
    if not cfg.causal:
        pytest.skip("bidirectional presets do not decode incrementally")
    full, dec = _full_and_decoded(cfg, T, [1] * T, device)
    torch.testing.assert_close(dec, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", preset_cfgs())
def test_chunked_prefill_then_decode_equals_full_forward(cfg, device):
    if not cfg.causal:
        pytest.skip("bidirectional presets do not decode incrementally")
    full, dec = _full_and_decoded(cfg, 40, [13, 1, 9, 1, 1, 15], device)
    torch.testing.assert_close(dec, full, atol=1e-4, rtol=0)


def _full_and_static(cfg, T, chunks, inplace, device="cpu"):
    torch.manual_seed(0)
    m = LM(cfg).eval().to(device)
    idx = torch.randint(0, cfg.vocab_size, (2, T)).to(device)
    with torch.no_grad():
        full = m(idx)
        states, outs, pos = m.static_state(2, T, device), [], 0
        for c in chunks:
            logits, new = m.forward_static(idx[:, pos:pos + c], torch.tensor([pos], device=device), states,
                                           inplace=inplace)
            states = states if inplace else new
            outs.append(logits)
            pos += c
    return full, torch.cat(outs, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", preset_cfgs())
@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "functional"])
def test_static_state_decode_equals_full_forward(cfg, T, inplace, device):
    """The static-state step (generate's decode and the export graphs) token by token and chunked."""
    if not LM(cfg).supports_static():
        pytest.skip("no static-state step (bidirectional, or a mixer without one): decodes via forward()")
    full, dec = _full_and_static(cfg, T, [1] * T, inplace, device)
    torch.testing.assert_close(dec, full, atol=1e-4, rtol=0)
    if T == 63:
        full, dec = _full_and_static(cfg, T, [13, 1, 9, 1, 1, 15, 23], inplace, device)
        torch.testing.assert_close(dec, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layers", ["CA", "D", "M", "L"])
def test_a_float64_model_runs_and_decodes_in_float64(layers):
    """model.double() (a float64 gradcheck's set-up): the DeltaNet / Mamba-2 recurrences upcast to
    fp32 only (they mixed fp32 activations with fp64 parameters and failed); every path stays fp64 and
    agrees with the fp32 model."""
    torch.manual_seed(0)
    m = LM(tiny(layers=layers, n_layers=2, mixer_opts={"mamba2": {"headdim": 16, "chunk": 4}})).eval()
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        ref = m(idx)
        m = m.double()
        full = m(idx)
        assert full.dtype == torch.float64
        torch.testing.assert_close(full, ref.double(), atol=1e-4, rtol=0)
        states, outs = m.init_state(2, dtype=torch.float64), []
        for t in range(9):
            logits, states = m(idx[:, t:t + 1], states=states)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)
        if m.supports_static():
            st = m.static_state(2, 9, dtype=torch.float64)
            dec = torch.cat([m.forward_static(idx[:, t:t + 1], torch.tensor([t]), st)[0] for t in range(9)], 1)
            torch.testing.assert_close(dec, full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layers", ["CCA", "A", "LLA"])
def test_generate_static_and_dynamic_paths_agree(layers):
    m = LM(tiny(layers=layers, window_pattern="SL")).eval()
    p = torch.randint(0, 61, (2, 5))
    static = m.generate(p, 12, temperature=0)
    dynamic = m.generate(p, 12, temperature=0, static=False)
    assert torch.equal(static, dynamic) and static.shape == (2, 17)
    assert m.supports_static() == (layers != "LLA")


def test_generate_refuses_an_empty_prompt_up_front():
    m = LM(tiny(layers="CA")).eval()  # the conv's kernel failed on a zero-length input, deep inside
    for idx in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(ValueError, match="generate needs prompts \\[batch, >= 1 token\\], got shape"):
            m.generate(idx, 4)


def test_generate_refuses_more_positions_than_a_learned_table_has():
    """pos=learned: prompt + new tokens up to max_positions decode on every path; one more is a
    ConfigError up front (it was an IndexError from the position table mid-generation)."""
    m = LM(tiny(layers="A", n_layers=2, pos="learned", max_positions=16)).eval()
    p = torch.randint(0, 61, (1, 5))
    fits = m.generate(p, 11, temperature=0)
    assert fits.shape == (1, 16) and torch.equal(fits, m.generate(p, 11, temperature=0, static=False))
    for static in (None, False):
        with pytest.raises(ConfigError, match="a 5-token prompt \\+ 12 new tokens exceed model.max_positions=16 "
                                              "\\(model.pos=learned\\): generate at most 11 new tokens"):
            m.generate(p, 12, temperature=0, static=static)
    with pytest.raises(ConfigError, match="shorten the prompt below 16 tokens"):
        m.generate(torch.randint(0, 61, (1, 16)), 1)
    assert m.room(5) == 11 and LM(tiny(layers="A", n_layers=2)).room(10 ** 6) is None  # rope: unbounded


def _compiled_for_real(capsys):
    """A compile failure falls back to eager with a warning line: the test would compare eager with eager."""
    captured = capsys.readouterr()
    assert "torch.compile failed" not in captured.out + captured.err, captured.out + captured.err


def test_compiled_decode_step_equals_eager(capsys):
    """generate(compile=True): the compiled one-token step (cpp_wrapper on CPU) against the eager
    one, on a model with conv, full and sliding attention; logits at 1e-5 and tokens equal."""
    torch.manual_seed(0)
    m = LM(tiny(layers="CAA", n_layers=3, window_pattern="SL")).eval()
    p = torch.randint(0, 61, (1, 6))
    eager = arch.model.StaticDecoder(m, p, 9, compile=False)
    compiled = arch.model.StaticDecoder(m, p, 9, compile=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled.prefill(p), eager.prefill(p), atol=1e-5, rtol=0)
        for t in torch.randint(0, 61, (8, 1, 1)):
            torch.testing.assert_close(compiled.step(t), eager.step(t), atol=1e-5, rtol=0)
    assert torch.equal(m.generate(p, 9, temperature=0, compile=True), m.generate(p, 9, temperature=0))
    _compiled_for_real(capsys)


def test_compiled_greedy_chunks_stop_where_eager_stops(capsys):
    """generate(compile=True, temperature=0) decodes GREEDY_CHUNK tokens a call: a length that is
    not a multiple of the chunk, an eos in the middle of a chunk and the streamed tokens all come
    out as the eager loop's."""
    torch.manual_seed(1)
    m = LM(tiny(layers="CA", n_layers=2)).eval()
    p = torch.randint(0, 61, (1, 5))
    n = 2 * arch.model.GREEDY_CHUNK + 3
    eager = m.generate(p, n, temperature=0)
    assert torch.equal(m.generate(p, n, temperature=0, compile=True), eager)
    eos = int(eager[0, p.shape[1] + arch.model.GREEDY_CHUNK + 1])
    want = eager[0, p.shape[1]:].tolist()
    want = want[:want.index(eos) + 1]
    seen = {}
    for compile in (False, True):
        streamed = []
        out = m.generate(p, n, temperature=0, eos_id=eos, compile=compile, on_token=streamed.append)
        seen[compile] = (out[0, p.shape[1]:].tolist(), streamed)
    assert seen[True] == seen[False] == (want, want)
    _compiled_for_real(capsys)


@pytest.mark.parametrize("static", [True, False])
def test_a_batch_row_that_emits_eos_is_padded_while_the_others_go_on(static):
    """generate(eos_id=...) on a batch: it used to stop only when every row emitted eos at the same
    step, while a row that had finished kept generating after its eos."""
    torch.manual_seed(3)
    m = LM(tiny(layers="CA", n_layers=2)).eval()
    p = torch.randint(0, 61, (2, 5))
    free = m.generate(p, 10, temperature=0, static=static)
    j = next(j for j in range(1, 9) if int(free[0, 5 + j]) not in free[1, 5:].tolist())
    eos = int(free[0, 5 + j])  # row 0 emits it as its (j+1)-th new token; row 1 never does
    out = m.generate(p, 10, temperature=0, eos_id=eos, static=static)
    assert torch.equal(out[1], free[1])
    assert torch.equal(out[0, :5 + j + 1], free[0, :5 + j + 1]) and (out[0, 5 + j:] == eos).all()


@pytest.mark.parametrize("T", [1, 7, 63])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_rmsnorm_training_path_equals_reference(T, frozen_weight):
    """RMSNorm's hand-written backward (fp32 training) against autograd through rms_norm_ref:
    output, input and weight gradients at 1e-5; a frozen weight (LoRA) gets no gradient."""
    from arch.layers import RMSNorm, rms_norm_ref

    torch.manual_seed(T)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(not frozen_weight)
    x = (torch.randn(3, T, 48) * 3).requires_grad_()
    g = torch.randn(3, T, 48)
    wants = [x] if frozen_weight else [x, norm.weight]
    y = norm(x)
    got = torch.autograd.grad(y, wants, g)
    y_ref = rms_norm_ref(x, norm.weight, norm.eps)
    ref = torch.autograd.grad(y_ref, wants, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if frozen_weight:
        norm(x).backward(g)
        assert norm.weight.grad is None




@pytest.mark.parametrize("T", [1, 7, 63])
def test_rmsnorm_inference_path_equals_reference(T):
    """No grad, fp32: torch's fused F.rms_norm against rms_norm_ref at 1e-6; bf16 keeps the
    reference's fp32-normalise-then-cast order exactly."""
    from arch.layers import RMSNorm, rms_norm_ref

    torch.manual_seed(T)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(3, T, 48) * 3
        torch.testing.assert_close(norm(x), rms_norm_ref(x, norm.weight, norm.eps), atol=1e-6, rtol=1e-6)
        xb, nb = x.bfloat16(), RMSNorm(48).bfloat16()
        assert torch.equal(nb(xb), rms_norm_ref(xb, nb.weight, nb.eps))

@pytest.mark.parametrize("T", [1, 7, 63])
def test_rope_training_path_equals_reference(T):
    """RoPE's hand-written backward (the inverse rotation) against autograd through rope_ref, on
    the transposed (non-contiguous) [B, H, T, hd] view attention hands it, at absolute positions
    starting at 5: output and input gradient at 1e-5; no_grad takes the same formula."""
    from arch.layers import Rotary, rope_ref

    torch.manual_seed(T)
    rot = Rotary(16)
    x = torch.randn(2, T, 3, 16).transpose(1, 2).requires_grad_()
    g = torch.randn(2, 3, T, 16)
    positions = torch.arange(5, 5 + T)
    y = rot.at(x, positions)
    (gx,) = torch.autograd.grad(y, x, g)
    freqs = positions.float()[:, None] * rot.inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    y_ref = rope_ref(x, emb.cos(), emb.sin())
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(rot.at(x, positions), y_ref, atol=1e-5, rtol=0)

def test_sliding_cache_is_evicted():
    cfg = tiny(layers="A", window_pattern="S", window=4)
    m = LM(cfg).eval()
    states = m.init_state(1)
    with torch.no_grad():
        _, states = m(torch.randint(0, 61, (1, 20)), states=states)
    assert all(s.k.shape[2] == 3 for s in states)  # window - 1 keys are all a future query needs
    assert all(s.seen == 20 for s in states)


def test_window_changes_output_and_full_window_does_not():
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (1, 30))
    outs = {}
    for w in (3, 30, 1000):
        torch.manual_seed(1)
        outs[w] = LM(tiny(layers="A", window_pattern="S", window=w)).eval()(idx)
    torch.manual_seed(1)
    full = LM(tiny(layers="A", window_pattern="L")).eval()(idx)
    torch.testing.assert_close(outs[30], full)
    torch.testing.assert_close(outs[1000], full)
    assert not torch.allclose(outs[3], full)


def test_causality():
    m = LM(tiny(layers="CCA")).eval()
    a = torch.randint(0, 61, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % 61
    with torch.no_grad():
        torch.testing.assert_close(m(a)[:, :12], m(b)[:, :12])


def test_loss_and_logits_shapes_and_ignore_index():
    m = LM(tiny(layers="CCA"))
    idx = torch.randint(0, 61, (3, 9))
    assert m(idx).shape == (3, 9, 61)
    tgt = idx.clone()
    tgt[:, :4] = -1
    loss = m(idx, tgt)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits = m(idx)
    ref = nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 61), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    idx = torch.randint(0, 61, (2, 16))
    grads = []
    for gc in (False, True):
        torch.manual_seed(3)
        m = LM(tiny(layers="CCA", grad_checkpoint=gc))
        m(idx, idx).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tied_embeddings():
    m = LM(tiny())
    assert m.lm_head.weight is m.embed.weight
    m2 = LM(tiny(tie_embeddings=False))
    assert m2.lm_head.weight is not m2.embed.weight
    assert m2.num_params() == m.num_params() + 61 * 32


@pytest.mark.parametrize("pattern,expect", [
    ("CCA", ["conv", "conv", "attn"] * 2),
    ("ccaccA", ["conv", "conv", "attn"] * 2),
    ("conv,attn", ["conv", "attn"] * 3),
    (["conv", "conv", "attn", "conv", "conv", "attn"], ["conv", "conv", "attn"] * 2),
    (["C", "A"], ["conv", "attn"] * 3),
    ("attn", ["attn"] * 6),
])
def test_pattern_forms(pattern, expect):
    assert tiny(layers=pattern).layer_types() == expect


def test_window_pattern_tiles_over_attention_layers():
    cfg = tiny(layers="ACA", window_pattern="SL", window=9)
    # attention layers are 0, 2, 3, 5 -> S, L, S, L
    assert cfg.layer_windows() == [9, None, None, 9, None, None]


@pytest.mark.parametrize("kw,needle", [
    (dict(layers="CCX"), "unknown block 'X'"),
    (dict(layers="CCAA"), "does not tile"),
    (dict(layers="foo,attn"), "unknown block 'foo'"),
    # the whole word, not its first letter 't', and the close names (before: "unknown block 't'")
    (dict(layers="attention"), "unknown block 'attention' in layer pattern 'attention' (did you mean 'attn'?)"),
    (dict(layers="conv,atn"), "unknown block 'atn' in layer pattern 'conv,atn' (did you mean 'attn'?)"),
    (dict(layers="CCX"), "known blocks: attn (A), conv (C), deltanet (D), lif (L), mamba2 (M)"),
    (dict(d_model=30, n_heads=4), "not divisible by model.n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not divisible by model.n_kv_heads"),
    (dict(window=0), "window must be > 0"),
    (dict(window=-3), "window must be > 0"),
    (dict(window_pattern="SX"), "window_pattern"),
    (dict(kernels="cuda"), "model.kernels"),
])
def test_bad_model_config_is_one_line_error(kw, needle):
    with pytest.raises(ConfigError) as e:
        tiny(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_adding_a_mixer_is_one_module_and_one_registry_line():
    @arch.register("identity_test", "I")
    class Identity(arch.Mixer):
        def __init__(self, cfg, layer_idx, window=None):
            super().__init__()

        def init_state(self, batch_size, device=None, dtype=torch.float32):
            return None

        def forward(self, x, state=None):
            return torch.zeros_like(x), state

    try:
        cfg = tiny(layers="ICA")
        assert cfg.layer_types()[0] == "identity_test"
        full, dec = _full_and_decoded(cfg, 9, [4, 1, 4])
        torch.testing.assert_close(dec, full, atol=1e-4, rtol=0)
    finally:
        arch.MIXERS.pop("identity_test")
        arch.LETTERS.pop("I")


def test_flops_and_params_are_sane():
    m = LM(tiny(layers="CCA"))
    n = m.num_params()
    assert 6 * (n - 0) <= m.flops_per_token(64) < 6 * n * 2
    assert m.flops_per_token(1024) > m.flops_per_token(64)


def test_generate_greedy_is_deterministic_and_extends():
    m = LM(tiny(layers="CCA")).eval()
    p = torch.randint(0, 61, (1, 5))
    a = m.generate(p, 10, temperature=0)
    b = m.generate(p, 10, temperature=0)
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :5], p)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999, 1.0])
def test_nucleus_keeps_what_a_per_row_loop_keeps(top_p):
    """The vectorised nucleus against the definition, one row at a time: the likeliest tokens, in order,
    until their probabilities sum to top_p (that token included)."""
    from arch.model import nucleus

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    got = nucleus(logits, top_p)
    for row, kept in zip(logits, got):
        probs, want, total = row.softmax(-1), torch.zeros(50, dtype=torch.bool), 0.0
        for i in probs.argsort(descending=True).tolist():
            want[i], total = True, total + probs[i].item()
            if total >= top_p:
                break
        assert torch.equal(kept.isfinite(), want) and torch.equal(kept[want], row[want])


def test_top_p_samples_only_the_nucleus_and_generate_refuses_a_bad_one():
    from arch.model import sample_next
    from slmlab.errors import ConfigError

    logits = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(2000, 3)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, 1.0, None, g, top_p=0.7).flatten().bincount(minlength=3)
    assert drawn[2] == 0 and drawn[0] > 0 and drawn[1] > 0  # 0.6 < 0.7: the second token joins
    assert sample_next(logits, 1.0, None, g, top_p=0.6).eq(0).all()  # 0.6 reaches 0.6 alone
    assert sample_next(logits, 1.0, 2, g, top_p=1.0).lt(2).all()  # top-k first
    m = LM(tiny(layers="CA")).eval()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="top_p must be in"):
            m.generate(torch.zeros(1, 2, dtype=torch.long), 3, top_p=bad)


def test_mlp_none_is_a_mixer_only_stack():
    """model.mlp=none: no channel mixer and no second norm, a layer is x + mixer(norm(x)) (Mamba's own
    layout). Its forward is exactly that, decode equals it, it learns, and the name cannot be registered."""
    from mixer_checks import assert_decode_equals_forward, assert_learns

    from arch.registry import register_channel_mixer

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, layers="MA", mlp="none", n_heads=2, n_kv_heads=1,
                      kernels="torch", mixer_opts={"mamba2": {"d_state": 8, "headdim": 16, "chunk": 8}})
    torch.manual_seed(0)
    model = arch.build_model(cfg).eval()
    assert not [n for n, _ in model.named_parameters() if "mlp" in n]
    idx = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        h = model.embed(idx)
        for layer in model.layers:
            h = h + layer.mixer(layer.mixer_norm(h))[0]
        torch.testing.assert_close(model(idx), model.lm_head(model.norm(h)), atol=1e-6, rtol=0)
    assert_decode_equals_forward(model)
    torch.manual_seed(0)
    assert_learns(arch.build_model(cfg))
    with pytest.raises(ConfigError, match="model.mlp=none means no channel mixer"):
        register_channel_mixer("none")(type("Nothing", (arch.ChannelMixer,), {"forward": lambda self, x: x}))
    with pytest.raises(ConfigError, match="unknown model.mlp 'nope'; known: .*, or none"):
        ModelConfig(mlp="nope")
