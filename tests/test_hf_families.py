"""Llama, Qwen2 and GPT-2 through the block stack, against transformers' own implementations.

Tiny random transformers models are built here (no downloads); every parameter is perturbed so
that zero-initialised biases and unit norms cannot hide a wrong mapping."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from arch import LM  # noqa: E402
from slmlab.hf import from_hf_config, from_hf_state_dict, hf_family, to_hf_config, to_hf_state_dict  # noqa: E402

V = 97
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_config(family: str):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if family == "llama-bias":  # attention_bias and mlp_bias, a head_dim of its own, untied
        return t.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=8, attention_bias=True,
                             mlp_bias=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        return t.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             bos_token_id=1, eos_token_id=2)
    return t.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                        bos_token_id=1, eos_token_id=2)


FAMILIES = ["llama", "llama-bias", "qwen2", "gpt2"]
CLASS = {"llama": "LlamaForCausalLM", "llama-bias": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "gpt2": "GPT2LMHeadModel"}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def ours_from(hf):
    cfg = from_hf_config(hf.config)
    model = LM(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", [1, 7, 23])
def test_logits_match_transformers(family, T):
    hf = hf_model(family)
    assert type(hf).__name__ == CLASS[family]
    ours = ours_from(hf)
    assert hf_family(ours.cfg) == family.split("-")[0]
    idx = torch.randint(0, V, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family):
    hf = hf_model(family)
    ours = ours_from(hf)
    prompt = torch.randint(3, V, (1, 5))
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        static = ours.generate(prompt, 12, temperature=0)
        dynamic = ours.generate(prompt, 12, temperature=0, static=False)
    assert static.tolist() == theirs.tolist()
    assert dynamic.tolist() == theirs.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_back_to_the_same_class(family):
    hf = hf_model(family)
    ours = ours_from(hf)
    back = transformers.AutoModelForCausalLM.from_config(to_hf_config(ours.cfg), attn_implementation="eager").eval()
    assert type(back).__name__ == CLASS[family]
    missing, unexpected = back.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if ours.cfg.tie_embeddings:
        back.tie_weights()
    idx = torch.randint(0, V, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_graph_matches_decode(family):
    """The export step graph (learned positions come from its pos input) against LM's own decode."""
    from slmlab.export.step import StepLM, reference_decode

    ours = ours_from(hf_model(family))
    idx = torch.randint(0, V, (2, 6))
    pre, toks, steps = reference_decode(ours, idx, 5)
    step = StepLM(ours, 16)
    with torch.no_grad():
        logits, *st = step(idx, torch.tensor([0]), *step.init_states(2))
        torch.testing.assert_close(logits, pre, atol=1e-5, rtol=0)
        for i in range(5):
            logits, *st = step(toks[:, i:i + 1], torch.tensor([idx.shape[1] + i]), *st)
            torch.testing.assert_close(logits, steps[:, i:i + 1], atol=1e-5, rtol=0)


def test_llama3_scaling_changes_the_frequencies():
    cfg = from_hf_config(hf_config("llama"))
    assert cfg.rope_scale()["factor"] == 8.0
    rot = LM(cfg).layers[0].mixer.rotary
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    # wavelength 2*pi sits in the blended band (between 16/4 and 16/1); the longest ones are divided by 8
    assert plain[0] / 8 < rot.inv_freq[0] < plain[0]
    assert rot.inv_freq[-1] == pytest.approx(plain[-1] / 8)


@pytest.mark.parametrize("bad, msg", [
    (dict(norm="batchnorm"), "model.norm must be one of rmsnorm, layernorm"),
    (dict(pos="alibi"), "model.pos must be one of rope, learned"),
    (dict(mlp="relu"), "unknown model.mlp 'relu'"),
    (dict(rope_scaling={"type": "yarn"}), "model.rope_scaling.type must be llama3"),
    (dict(rope_scaling={"type": "llama3", "factr": 2}), "unknown keys ['factr']"),
    (dict(rope_scaling={"type": "llama3", "factor": -1}), "model.rope_scaling.factor must be a positive number"),
    (dict(max_positions=0), "model.max_positions"),
])
def test_bad_family_options_are_one_line_errors(bad, msg):
    from arch import ModelConfig
    from slmlab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        ModelConfig(**bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_options_without_a_transformers_family_name_the_mismatch():
    from arch import ModelConfig
    from slmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="gpt2, needs model.pos='learned'"):
        hf_family(ModelConfig(norm="layernorm", mlp="gelu"))
    with pytest.raises(ConfigError, match="qwen3, needs model.attn_bias=False"):
        hf_family(ModelConfig(attn_bias=True))


def test_learned_positions_past_the_table_are_an_error():
    from arch import ModelConfig

    m = LM(ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, pos="learned",
                       max_positions=8))
    with pytest.raises(ValueError, match="max_positions=8"):
        m(torch.zeros(1, 9, dtype=torch.long))
