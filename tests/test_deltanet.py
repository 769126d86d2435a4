"""Gated DeltaNet (arch/deltanet.py): the chunked core against the token-by-token reference (forward
and gradients), the block against transformers' Qwen3NextGatedDeltaNet, decode against the full
forward, training, bf16, options and the export refusal."""
import pytest
import torch
from mixer_checks import (
    assert_bf16_keeps_the_state_fp32,
    assert_decode_equals_forward,
    assert_learns,
    assert_static_generate_equals_dynamic,
)

from arch import ModelConfig, build_model
from arch.deltanet import GatedDeltaNet, gated_delta_chunked, gated_delta_ref, unit_norm
from slmlab.errors import ConfigError


def core_inputs(B, T, H, dk, dv, seed=0, decay=0.5, same_key=False):
    g = torch.Generator().manual_seed(seed)
    k = unit_norm(torch.randn(B, 1 if same_key else T, H, dk, generator=g)).expand(B, T, H, dk).contiguous()
    ins = [unit_norm(torch.randn(B, T, H, dk, generator=g)) * dk ** -0.5, k, torch.randn(B, T, H, dv, generator=g),
           -torch.rand(B, T, H, generator=g) * decay, torch.rand(B, T, H, generator=g),
           torch.randn(B, H, dk, dv, generator=g)]
    return [t.requires_grad_() for t in ins]


def run_core(fn, ins, seed=1):
    o, S = fn(*ins)
    g = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=g)).sum() + (S * torch.randn(S.shape, generator=g)).sum()
    return (o, S), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize("T", [1, 7, 63, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_core_equals_the_reference_forward_and_gradients(T, chunk):
    ins = core_inputs(2, T, 3, 8, 5)
    (o, S), grads = run_core(lambda *a: gated_delta_chunked(*a, chunk=chunk), ins)
    (o_ref, S_ref), grads_ref = run_core(gated_delta_ref, ins)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "S0"), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("case", ["one key repeated, beta near 1, no decay", "strong decay"])
def test_chunked_core_holds_on_hard_inputs(case):
    """A key written 64 times in a row makes the chunk's triangular system the worst conditioned it
    gets (a series expansion of its inverse would cancel binomials of ~1e18); strong decay
    underflows exp(gam) inside a chunk."""
    hard = case.startswith("one key")
    ins = core_inputs(1, 64, 2, 8, 4, decay=0.0 if hard else 30.0, same_key=hard)
    if hard:
        ins[4] = torch.full_like(ins[4], 0.999).requires_grad_()
    (o, S), grads = run_core(lambda *a: gated_delta_chunked(*a, chunk=64), ins)
    (o_ref, S_ref), grads_ref = run_core(gated_delta_ref, ins)
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S, S_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def deltanet_config(**opts):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, layers="DA", n_heads=2, n_kv_heads=1, ffn_dim=64,
                       kernels="torch", mixer_opts={"deltanet": {"chunk": 8, **opts}})


def test_block_equals_transformers_qwen3_next_gated_deltanet():
    """Qwen3-Next's linear layer with its weights moved into ours (its in_proj rows are grouped per
    key head; ours are q | k | v | z | b | a) gives the same output, with grouped value heads."""
    pytest.importorskip("transformers")
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    d, hk, r, dk, dv, K = 32, 2, 2, 8, 6, 4
    hcfg = Qwen3NextConfig(hidden_size=d, linear_num_key_heads=hk, linear_num_value_heads=hk * r,
                           linear_key_head_dim=dk, linear_value_head_dim=dv, linear_conv_kernel_dim=K,
                           rms_norm_eps=1e-6, num_hidden_layers=1, layer_types=["linear_attention"],
                           num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    theirs = Qwen3NextGatedDeltaNet(hcfg, 0).eval()
    with torch.no_grad():
        theirs.norm.weight.uniform_(0.5, 1.5)
        theirs.dt_bias.normal_()
    cfg = ModelConfig(vocab_size=64, d_model=d, n_layers=1, layers="D", n_heads=hk, n_kv_heads=1, norm_eps=1e-6,
                      mixer_opts={"deltanet": dict(v_heads=hk * r, head_dim=dk, v_head_dim=dv, conv_kernel=K, chunk=16)})
    ours = GatedDeltaNet(cfg, 0).eval()
    qkvz = theirs.in_proj_qkvz.weight.reshape(hk, 2 * dk + 2 * r * dv, d).split([dk, dk, r * dv, r * dv], dim=1)
    ba = theirs.in_proj_ba.weight.reshape(hk, 2 * r, d).split([r, r], dim=1)
    with torch.no_grad():
        ours.in_proj.weight.copy_(torch.cat([w.reshape(-1, d) for w in (*qkvz, *ba)]))
        ours.conv.weight.copy_(theirs.conv1d.weight)
        ours.norm_weight.copy_(theirs.norm.weight)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        for name in ("A_log", "dt_bias"):
            getattr(ours, name).copy_(getattr(theirs, name))
    x = torch.randn(2, 37, d)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", ["DA", "DC"])
def test_cached_decode_equals_the_full_forward(layers):
    torch.manual_seed(0)
    assert_decode_equals_forward(build_model(ModelConfig(**{**deltanet_config().to_dict(), "layers": layers})).eval())


def test_static_and_dynamic_generate_give_the_same_tokens():
    torch.manual_seed(0)
    assert_static_generate_equals_dynamic(build_model(deltanet_config()).eval())


def test_a_deltanet_model_learns():
    torch.manual_seed(0)
    assert_learns(build_model(deltanet_config()))


def test_bf16_autocast_keeps_the_core_and_its_state_in_fp32():
    torch.manual_seed(0)
    assert_bf16_keeps_the_state_fp32(GatedDeltaNet(deltanet_config(), 0), "S")


@pytest.mark.parametrize("opts,message", [
    ({"v_heads": 3}, "v_heads=3 is not a multiple of the query/key heads (2)"),
    ({"core": "fast"}, "core must be chunked or reference, got 'fast'"),
    ({"chunk": 0}, "chunk must be an integer >= 1, got 0"),
    ({"heads": -1}, "heads must be an integer > 0 or null, got -1"),
])
def test_bad_options_are_one_line_errors(opts, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(deltanet_config(**opts))


def test_reference_core_option_gives_the_same_model():
    torch.manual_seed(0)
    chunked = build_model(deltanet_config()).eval()
    reference = build_model(deltanet_config(core="reference")).eval()
    reference.load_state_dict(chunked.state_dict())
    idx = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(chunked(idx), reference(idx), atol=1e-5, rtol=1e-5)


def test_export_takes_one_token_a_call_and_says_why():
    from slmlab.export.step import check_supported, one_token_blocks

    check_supported(deltanet_config())  # exported, not refused: tests/test_convert.py runs it
    assert one_token_blocks(deltanet_config()) == ["deltanet"]


@pytest.mark.parametrize("heads,v_heads,head_dim,chunk,T,rel", [
    (4, 4, 16, 16, 48, 0.06), (2, 4, 8, 32, 64, 0.06), (3, 3, 32, 8, 40, 0.06), (2, 2, 32, 64, 64, 0.12)])
def test_activation_bytes_fit_what_autograd_saves(heads, v_heads, head_dim, chunk, T, rel):
    from test_sizes import _saved_bytes

    cfg = ModelConfig(vocab_size=64, d_model=96, n_layers=1, layers="D", n_heads=heads, n_kv_heads=1,
                      mixer_opts={"deltanet": dict(v_heads=v_heads, head_dim=head_dim, chunk=chunk)})
    block = GatedDeltaNet(cfg, 0)
    x = torch.randn(3, T, 96, requires_grad=True)
    got = _saved_bytes(lambda: block(x)[0], list(block.parameters()) + [x])
    assert block.activation_bytes(3, T, 4) == pytest.approx(got, rel=rel)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dk,dv,chunk", [(8, 8, 8), (16, 8, 4)])
def test_flops_per_token_counts_the_core_matmuls(causal, dk, dv, chunk):
    """flops_per_token's core term (fwd + bwd = 3x the forward) equals FlopCounterMode's count of the
    core's matmuls plus the triangular solve it does not count (C^2/2 (dk + dv) multiply-adds a chunk).
    It missed the scores times W and the chunk hand-over, and counted a bidirectional model's one core."""
    from torch.utils.flop_counter import FlopCounterMode

    H, T = 2, 3 * chunk
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, layers="D", n_heads=H, n_kv_heads=1, causal=causal,
                      mixer_opts={"deltanet": dict(head_dim=dk, v_head_dim=dv, chunk=chunk)})
    mixer = GatedDeltaNet(cfg, 0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gated_delta_chunked(*core_inputs(1, T, H, dk, dv), chunk=chunk)
    solve = 2 * (T // chunk) * H * chunk ** 2 / 2 * (dk + dv)
    core = (mixer.flops_per_token(T) - 6 * mixer.conv_dim * mixer.K) / 3 * T / (1 if causal else 2)
    assert core == counter.get_total_flops() + solve
