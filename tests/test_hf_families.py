"""Llama, Qwen2 and GPT-2 through the block stack, against transformers' own implementations.

Tiny random transformers models are built here (no downloads); every parameter is perturbed so
that zero-initialised biases and unit norms cannot hide a wrong mapping."""
import re

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
    if family == "mamba2":  # 2 groups, several chunks of 8 at T = 23, untied
        return t.Mamba2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, head_dim=16,
                              num_heads=8, n_groups=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "granitemoehybrid":  # mamba2 + attention + SwiGLU MLPs, no experts, multipliers 1
        return t.GraniteMoeHybridConfig(
            vocab_size=V, hidden_size=64, intermediate_size=96, shared_intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=0, position_embedding_type="rope",
            attention_multiplier=0.25, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16,
            mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=8, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
    if family == "granitemoehybrid-ibm":  # as IBM's Granite-4.0-H: NoPE and every multiplier away from 1
        c = hf_config("granitemoehybrid")
        c.position_embedding_type, c.embedding_multiplier, c.residual_multiplier = "nope", 12.0, 0.25
        c.attention_multiplier, c.logits_scaling = 0.05, 4.0
        return c
    if family == "qwen3_moe":  # 6 experts, 2 a token, renormalised; untied
        return t.Qwen3MoeConfig(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                                bos_token_id=1, eos_token_id=2)
    if family == "qwen3_moe-raw":  # top-k weights as the softmax gives them (Qwen3-MoE's own default), tied
        c = hf_config("qwen3_moe")
        c.norm_topk_prob, c.num_experts_per_tok, c.tie_word_embeddings = False, 3, True
        return c
    if family == "qwen2_moe":  # Qwen1.5-MoE's layout: q/k/v biases, raw top-k weights, a gated shared expert
        return t.Qwen2MoeConfig(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                                shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "qwen2_moe-plain":  # no q/k/v biases, renormalised top k, tied
        c = hf_config("qwen2_moe")
        c.qkv_bias, c.norm_topk_prob, c.tie_word_embeddings = False, True, True
        return c
    if family == "olmoe":  # QK-norm over all heads' channels at once, raw top-k weights, untied
        return t.OlmoeConfig(vocab_size=V, hidden_size=64, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                             norm_topk_prob=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
    if family == "olmoe-bias":  # attention_bias (all four projections), renormalised top k, tied
        c = hf_config("olmoe")
        c.attention_bias, c.norm_topk_prob, c.tie_word_embeddings = True, True, True
        return c
    if family == "mixtral":  # Llama attention (no QK-norm), 5 experts, top 2, its own head_dim, untied
        return t.MixtralConfig(vocab_size=V, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=5,
                               num_experts_per_tok=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if family == "lfm2_moe":  # LFM2-8B-A1B's layout: a dense first layer, sigmoid routing with an expert bias
        return t.Lfm2MoeConfig(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_dense_layers=1,
                               num_experts=6, num_experts_per_tok=2, use_expert_bias=True, routed_scaling_factor=1.5,
                               norm_topk_prob=True, layer_types=["conv", "full_attention", "conv"],
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "lfm2_moe-plain":  # no dense layer, no bias, raw sigmoid weights, tied
        c = hf_config("lfm2_moe")
        c.num_dense_layers, c.use_expert_bias, c.norm_topk_prob, c.routed_scaling_factor = 0, False, False, 1.0
        c.tie_word_embeddings = True
        return c
    if family == "granitemoehybrid-moe":  # as IBM's Granite-4.0-H MoE models: routed experts + a shared MLP
        c = hf_config("granitemoehybrid-ibm")
        c.num_local_experts, c.num_experts_per_tok, c.intermediate_size = 5, 2, 24
        return c
    return t.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                        bos_token_id=1, eos_token_id=2)


FAMILIES = ["llama", "llama-bias", "qwen2", "gpt2", "mamba2", "granitemoehybrid", "granitemoehybrid-ibm",
            "granitemoehybrid-moe", "qwen3_moe", "qwen3_moe-raw", "lfm2_moe", "lfm2_moe-plain", "mixtral",
            "qwen2_moe", "qwen2_moe-plain", "olmoe", "olmoe-bias"]
CLASS = {"llama": "LlamaForCausalLM", "llama-bias": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "gpt2": "GPT2LMHeadModel", "mamba2": "Mamba2ForCausalLM", "granitemoehybrid": "GraniteMoeHybridForCausalLM",
         "granitemoehybrid-ibm": "GraniteMoeHybridForCausalLM", "granitemoehybrid-moe": "GraniteMoeHybridForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM", "qwen3_moe-raw": "Qwen3MoeForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM",
         "lfm2_moe-plain": "Lfm2MoeForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen2_moe": "Qwen2MoeForCausalLM", "qwen2_moe-plain": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
         "olmoe-bias": "OlmoeForCausalLM"}


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("expert_bias"):  # a zero bias would not show a bias left out
                b.add_(0.1 * torch.randn_like(b))
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
    hf.generation_config.eos_token_id = None  # min_new_tokens would mask eos, which ours may pick (granite's did)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        static = ours.generate(prompt, 12, temperature=0)
        dynamic = ours.generate(prompt, 12, temperature=0, static=False)
    assert static.tolist() == theirs.tolist()
    assert dynamic.tolist() == theirs.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_back_to_the_same_class(family, tmp_path):
    """Our weights under the family's names as its checkpoints store them (a MoE's experts as the hub has
    them, not as a transformers 5 model holds them in memory), read back by from_pretrained."""
    from safetensors.torch import save_file

    hf = hf_model(family)
    ours = ours_from(hf)
    to_hf_config(ours.cfg).save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in to_hf_state_dict(ours).items()}
    assert sd.keys() <= set(hf.state_dict()) or ours.cfg.mlp == "moe"
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                                    output_loading_info=True)
    back.eval()
    assert type(back).__name__ == CLASS[family]
    assert not info["unexpected_keys"] and all("lm_head" in k for k in info["missing_keys"]), info
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


@pytest.mark.parametrize("family, key", [("llama", "rope_type"), ("llama", "type"), ("qwen2", "rope_type")])
def test_a_transformers_4_config_keeps_its_rope_theta_and_scaling(family, key):
    """transformers 4.x configs have rope_theta and rope_scaling (keyed "type" in older files), no
    rope_parameters: theta 1e6 once imported as the default 10000."""
    from types import SimpleNamespace

    new = hf_config(family)
    fields = new.to_dict()
    rope = dict(fields.pop("rope_parameters"))
    theta, kind = rope.pop("rope_theta"), rope.pop("rope_type")
    old = SimpleNamespace(**fields, rope_theta=theta, rope_scaling=None if kind == "default" else {key: kind, **rope})
    assert from_hf_config(old) == from_hf_config(new)
    assert from_hf_config(old).rope_theta == theta and theta != 10000.0


def test_an_untied_head_missing_from_the_weights_is_refused():
    """tie_word_embeddings false without lm_head.weight: the embedding once stood in for the head silently."""
    from slmlab.errors import CheckpointError

    hf = hf_model("llama-bias")
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="^tie_word_embeddings is false but the weights have no lm_head.weight$"):
        from_hf_state_dict(sd, from_hf_config(hf.config))


@pytest.mark.parametrize("bad, msg", [
    (dict(norm="batchnorm"), "model.norm must be one of rmsnorm, layernorm"),
    (dict(pos="alibi"), "model.pos must be one of rope, learned"),
    (dict(mlp="relu"), "unknown model.mlp 'relu'"),
    (dict(rope_scaling={"type": "yarn"}), "model.rope_scaling.type must be llama3"),
    (dict(rope_scaling={"type": "llama3", "factr": 2}), "unknown keys ['factr']"),
    (dict(rope_scaling={"type": "llama3", "factor": -1}), "model.rope_scaling.factor must be a positive number"),
    (dict(max_positions=0), "model.max_positions"),
    (dict(qk_norm_scope="heads"), "model.qk_norm_scope must be one of head, all, got 'heads'"),
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
    with pytest.raises(ConfigError, match="qwen3, needs model.qk_norm_scope='head'"):  # OLMo-2's has post-norms
        hf_family(ModelConfig(layers="A", qk_norm_scope="all"))
    with pytest.raises(ConfigError, match="OlmoeForCausalLM fixes head_dim = d_model / n_heads"):
        hf_family(ModelConfig(layers="A", qk_norm_scope="all", head_dim=16, mlp="moe"))


def test_learned_positions_past_the_table_are_an_error():
    from arch import ModelConfig

    m = LM(ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, pos="learned",
                       max_positions=8))
    with pytest.raises(ValueError, match="max_positions=8"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ---------------------------------------------------------------- an imported folder with its own tokenizer
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing near old river banks".split()
TEXT = "".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(9)) + " .\n" for i in range(600))


def save_tokenizer(folder):
    """A word-level tokenizer whose specials have names no guess would find, at ids past the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", ".", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|start|>", eos_token="<|stop|>",
                                                pad_token="<|blank|>", unk_token="[UNK]")
    fast.save_pretrained(str(folder))
    return fast


def hf_folder(folder, family: str, vocab_size=None):
    fast = save_tokenizer(folder)
    hf_cfg = hf_config(family)
    hf_cfg.vocab_size = vocab_size or V
    hf_cfg.bos_token_id, hf_cfg.eos_token_id = fast.bos_token_id, fast.eos_token_id
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(str(folder))
    return hf, fast


def convert(*argv):
    import convert as cli
    from slmlab.cli import run_cli

    return run_cli(cli.main, [str(a) for a in argv])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_import_export_round_trip_through_folders(family, tmp_path):
    from slmlab.rundir import RunDir

    hf, fast = hf_folder(tmp_path / "hf", family)
    assert convert("--from-hf", tmp_path / "hf", "--out", tmp_path / "run") == 0
    _, ours, tok = RunDir.open(tmp_path / "run").load()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id)
    assert tok.encode("the lazy dog") == fast.encode("the lazy dog", add_special_tokens=False)
    assert convert("--run", tmp_path / "run", "--to", "hf", "--out", tmp_path / "back") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert type(back).__name__ == CLASS[family]
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back")).eos_token == "<|stop|>"
    idx = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(back(idx).logits, ref, atol=1e-4, rtol=0)


def test_an_imported_context_length_is_stated_again_by_hf_and_gguf(tmp_path):
    """The import dropped max_position_embeddings, so exporting an imported 40960-context model stated 4096."""
    import json

    pytest.importorskip("gguf")
    from slmlab.export.gguf import read_gguf
    from slmlab.rundir import RunDir
    from slmlab.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT], 300)  # byte-level BPE: gguf exports no other kind
    hf_cfg = hf_config("llama")
    hf_cfg.vocab_size, hf_cfg.max_position_embeddings = tok.vocab_size, 40960
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(str(tmp_path / "hf"))
    tok.save(tmp_path / "hf" / "tokenizer.json")
    assert convert("--from-hf", tmp_path / "hf", "--out", tmp_path / "run") == 0
    assert RunDir.open(tmp_path / "run").config().model.context_length == 40960
    for argv, want in (((), 40960), (("--max-len", 1000), 1000)):  # an explicit --max-len still wins
        out = tmp_path / f"back{want}"
        assert convert("--run", tmp_path / "run", "--to", "hf", "--out", out, *argv) == 0
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == want
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == want
    assert convert("--run", tmp_path / "run", "--to", "gguf", "--out", tmp_path / "m.gguf") == 0
    assert read_gguf(tmp_path / "m.gguf")[0]["llama.context_length"] == 40960


def test_unsupported_family_is_one_line_exit_2(tmp_path, capsys):
    transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(str(tmp_path / "bert"))
    assert convert("--from-hf", tmp_path / "bert", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'bert'" in err
    assert all(f in err for f in ("llama", "qwen2", "gpt2", "lfm2", "qwen3")), err
    assert not (tmp_path / "run").exists()


def _damaged(folder, damage: str):
    """A llama folder whose config.json and weights no longer describe one model."""
    import json

    from safetensors.torch import load_file, save_file

    hf_folder(folder, "llama", vocab_size=len(save_tokenizer(folder / "probe")) - 2 if damage == "vocab" else None)
    cfg, sd = json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    if damage == "layers":  # the second layer's weights stay in the file
        cfg["num_hidden_layers"] = 1
    elif damage == "bias":  # attention_bias is false
        sd[f"{q}.bias"] = torch.zeros(sd[f"{q}.weight"].shape[0])
    elif damage == "fp8":  # FP8 weights without their scales (a hub *-FP8 folder holds weight_scale_inv)
        sd[f"{q}.weight"] = sd[f"{q}.weight"].to(torch.float8_e4m3fn)
    elif damage == "quantized":
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, needle", [
    ("layers", r"9 weight\(s\) have no place in the model its config.json describes, e.g. model.layers.1.input_layernorm"),
    ("bias", r"1 weight\(s\) have no place .* e.g. model.layers.0.self_attn.q_proj.bias"),
    ("fp8", r"weight layers.0.mixer.q_proj.weight is stored as torch.float8_e4m3fn: slmlab imports float weights"),
    ("quantized", r"a quantized checkpoint \(fp8\): slmlab imports float weights"),
    ("vocab", r"the tokenizer has \d+ ids but the model \d+ embedding rows"),
])
def test_a_folder_whose_weights_are_not_its_configs_model_is_refused(damage, needle, tmp_path, capsys):
    """Each of these imported before as another model without a word (a dropped layer, weights read
    without their FP8 scales, token ids past the embedding) or as a KeyError traceback (the bias)."""
    _damaged(tmp_path / "hf", damage)
    capsys.readouterr()
    assert convert("--from-hf", tmp_path / "hf", "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert re.search(needle, err) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
    """An imported llama whose embedding has exactly the tokenizer's rows (so added tokens must grow it)."""
    base = tmp_path_factory.mktemp("imported")
    vocab = len(save_tokenizer(base / "probe"))
    hf_folder(base / "hf", "llama", vocab_size=vocab)
    assert convert("--from-hf", base / "hf", "--out", base / "run") == 0
    (base / "corpus.txt").write_text(TEXT)
    return base


ADDED = ["<think>", "</think>", "TOOL_USE["]


def test_train_py_fine_tunes_an_imported_run_with_its_tokenizer_and_added_tokens(imported_llama, tmp_path):
    import json

    import train
    from slmlab.cli import run_cli
    from slmlab.rundir import RunDir

    run = imported_llama / "run"
    argv = ["--config", run / "config.yaml", "--data", imported_llama / "corpus.txt", "--out", tmp_path / "ft",
            "--steps", "3", "--device", "cpu", f"data.cache_dir={tmp_path / 'cache'}", f"data.tokenizer={run}",
            f"train.init_from={run}", f"data.added_tokens={json.dumps(ADDED)}", "train.phases=[]",
            "train.batch_size=2", "train.seq_len=16", "train.eval_every=2", "train.eval_tokens=256",
            "train.warmup_steps=1", "train.sample_tokens=4", "train.sample_prompt=the", "logging.progress=false",
            "train.ckpt_every=0"]
    assert run_cli(train.main, [str(a) for a in argv]) == 0
    cfg, model, tok = RunDir.open(tmp_path / "ft").load()
    base = RunDir.open(run).tokenizer()
    assert tok.vocab_size == cfg.model.vocab_size == base.vocab_size + 3
    assert tok.eos_id == base.eos_id and tok.bos_id == base.bos_id  # the family's own specials survive
    ids = tok.encode("<think> the fox </think> TOOL_USE[")
    assert ids[0] == base.vocab_size and ids[-1] == base.vocab_size + 2 and len(ids) == 5
    assert tok.decode(tok.encode("<think>")) == "<think>"


def test_added_tokens_get_the_mean_embedding(imported_llama):
    import json

    from slmlab.config import load_config
    from slmlab.init_from import init_model
    from slmlab.rundir import RunDir, model_from_config
    from slmlab.tokenizer import Tokenizer

    run = imported_llama / "run"
    tok = Tokenizer.load(run).with_added(ADDED)
    cfg = load_config(run / "config.yaml", overrides=[f"data.tokenizer={run}", f"train.init_from={run}",
                                                      f"data.added_tokens={json.dumps(ADDED)}",
                                                      f"model.vocab_size={tok.vocab_size}"])
    model = init_model(model_from_config(cfg), cfg, tok)
    _, src, _ = RunDir.open(run).load()
    n = src.cfg.vocab_size
    with torch.no_grad():
        assert torch.equal(model.embed.weight[:n], src.embed.weight)
        for i in range(n, tok.vocab_size):
            torch.testing.assert_close(model.embed.weight[i], src.embed.weight.mean(0))
        idx = torch.randint(0, n, (1, 6))  # the old tokens' logits are unchanged
        torch.testing.assert_close(model(idx)[..., :n], src(idx), atol=1e-5, rtol=0)


def test_added_tokens_without_a_tokenizer_is_a_config_error():
    from slmlab.config import load_config
    from slmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="set data.tokenizer"):
        load_config(overrides=['data.added_tokens=["<think>"]'])


# ---------------------------------------------------------------- gguf (llama.cpp's llama and qwen2)
GGUF_CASES = {
    "llama": dict(qk_norm=False, rope_theta=500000.0,
                  rope_scaling={"type": "llama3", "original_max_position_embeddings": 16}),
    "qwen2": dict(qk_norm=False, attn_bias=True, tie_embeddings=False),
}


def bpe_run(path, family):
    """A run directory with our byte-level BPE and a tiny random model of `family`'s block options."""
    from slmlab.checkpoint import save_model
    from slmlab.config import build
    from slmlab.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT], 300)
    cfg = build("transformer", {"model": dict(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                                              n_kv_heads=2, ffn_dim=96, init_std=0.08, kernels="torch",
                                              **GGUF_CASES[family])})
    torch.manual_seed(0)
    model = LM(cfg.model)
    with torch.no_grad():  # biases and norms away from their zero / one init
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    path.mkdir(parents=True)
    cfg.save(path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_model(model, path / "model.safetensors")
    return model, tok


@pytest.mark.parametrize("family", list(GGUF_CASES))
def test_gguf_metadata_and_tensors(family, tmp_path):
    pytest.importorskip("gguf")
    from slmlab.export.gguf import interleave_rope_rows, read_gguf

    model, tok = bpe_run(tmp_path / "run", family)
    assert convert("--run", tmp_path / "run", "--to", "gguf", "--out", tmp_path / "m.gguf") == 0
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.architecture"] == family
    assert meta[f"{family}.block_count"] == 2 and meta[f"{family}.attention.head_count_kv"] == 2
    assert len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size
    q = model.layers[1].mixer.q_proj.weight.detach()
    if family == "llama":  # interleaved-rope rows, and the llama3 factors llama.cpp divides by
        assert (tensors["blk.1.attn_q.weight"] == interleave_rope_rows(q, 4).numpy()).all()
        assert not (tensors["blk.1.attn_q.weight"] == q.numpy()).all()
        freqs = tensors["rope_freqs.weight"]
        assert 1.0 < freqs[0] < 8.0  # wavelength 2*pi: in the blended band
        assert freqs[-1] == pytest.approx(8.0)
        assert "output.weight" not in tensors  # tied
    else:
        assert (tensors["blk.1.attn_q.weight"] == q.numpy()).all()
        assert (tensors["blk.1.attn_k.bias"] == model.layers[1].mixer.k_proj.bias.detach().numpy()).all()
        assert "blk.1.attn_output.bias" not in tensors and "output.weight" in tensors


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe", "olmoe"])
def test_gguf_refuses_families_llama_cpp_was_not_checked_on(family, tmp_path, capsys):
    pytest.importorskip("gguf")
    hf_folder(tmp_path / "hf", family)
    assert convert("--from-hf", tmp_path / "hf", "--out", tmp_path / "run") == 0
    assert convert("--run", tmp_path / "run", "--to", "gguf", "--out", tmp_path / "m.gguf") == 2
    err = capsys.readouterr().err
    assert "gguf export covers lfm2, qwen3, llama, qwen2" in err and err.strip().endswith(f"this one is {family}")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(GGUF_CASES))
def test_llama_cpp_logits_match(family, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = bpe_run(tmp_path / "run", family)
    assert convert("--run", tmp_path / "run", "--to", "gguf", "--out", tmp_path / "m.gguf") == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True, n_threads=2,
                          n_batch=256, type_k=0, type_v=0, verbose=False)  # f32 KV cache
    ids = tok.encode(TEXT[:200])
    assert llm.tokenize(TEXT[:200].encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[:len(ids)].copy())
    with torch.no_grad():
        want = model.eval()(torch.tensor([ids]))[0]
    assert (got - want).abs().max().item() < 1e-3


def test_training_past_learned_positions_is_a_one_line_error(tmp_path, capsys):
    import train
    from slmlab.cli import run_cli

    hf_folder(tmp_path / "hf", "gpt2")  # n_positions=64; the imported run keeps the default phases (to 2048)
    assert convert("--from-hf", tmp_path / "hf", "--out", tmp_path / "run") == 0
    (tmp_path / "c.txt").write_text(TEXT)
    capsys.readouterr()  # transformers' save progress bar
    argv = ["--config", tmp_path / "run" / "config.yaml", "--data", tmp_path / "c.txt", "--out", tmp_path / "ft",
            f"data.tokenizer={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_cli(train.main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.max_positions=64" in err[0], err


@pytest.mark.parametrize("key,value,needle", [
    ("time_step_limit", (0.0, 0.1), "clamps dt, which our block does not"),
    ("use_bias", True, "use_bias=True is not supported"),
    ("num_heads", 4, "num_heads * head_dim = 64 is not expand * hidden_size = 128")])
def test_a_mamba2_config_our_block_cannot_be_is_refused(key, value, needle):
    from slmlab.errors import ConfigError

    c = hf_config("mamba2")
    setattr(c, key, value)
    with pytest.raises(ConfigError, match=needle.replace("*", r"\*")):
        from_hf_config(c)


@pytest.mark.parametrize("layers,overrides,needle", [
    ("MMA", {}, "the closest transformers family, granitemoehybrid, needs model.qk_norm=False"),
    ("MCM", {}, "mamba2 beside conv has no transformers equivalent"),
    ("M", {}, "mamba2 layers with an MLP and no attention layer have no working transformers class"),
    ("MAM", {"mlp": "none"}, "granitemoehybrid, needs model.mlp=.swiglu."),
    ("MAM", {"qk_norm": False, "attn_bias": True}, "GraniteMoeHybridForCausalLM has one attention_bias")])
def test_mamba2_models_without_a_transformers_class_are_named(layers, overrides, needle):
    from arch import ModelConfig
    from slmlab.errors import ConfigError

    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, layers=layers, **overrides)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        hf_family(cfg)


@pytest.mark.parametrize("layers,moe,needle", [
    ("CA", {}, "conv layers with model.mlp=moe export as Lfm2MoeForCausalLM, which routes by sigmoid"),
    ("CA", {"router": "sigmoid", "shared_ffn": 32}, "Lfm2MoeForCausalLM has no shared expert"),
    ("A", {"expert_bias": True}, "Qwen3MoeForCausalLM needs model.mixer_opts.moe.expert_bias=False"),
    ("A", {"dense_layers": 1}, "Qwen3MoeForCausalLM needs model.mixer_opts.moe.dense_layers=0"),
    ("A", {"norm_topk": False, "qk_norm": False}, "MixtralForCausalLM renormalises the top k and has no shared expert"),
    ("A", {"shared_ffn": 32}, "Qwen3MoeForCausalLM has no shared expert"),
    ("MA", {}, "GraniteMoeHybridForCausalLM's experts need model.mixer_opts.moe.norm_topk=true and a shared expert"),
    ("MA", {"shared_ffn": 32, "norm_topk": False}, "norm_topk=true and a shared expert")])
def test_moe_models_without_a_transformers_class_are_named(layers, moe, needle):
    from arch import ModelConfig
    from slmlab.errors import ConfigError

    qk_norm = moe.pop("qk_norm", "M" not in layers)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, layers=layers, mlp="moe",
                      qk_norm=qk_norm, mixer_opts={"moe": moe})
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        hf_family(cfg)


@pytest.mark.parametrize("key,value,needle", [
    ("mlp_only_layers", [1], "mlp_only_layers=[1] mixes dense and MoE layers"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2 is not supported"),
    ("use_sliding_window", True, "use_sliding_window=True is not supported")])
def test_a_qwen3_moe_config_our_model_cannot_be_is_refused(key, value, needle):
    from slmlab.errors import ConfigError

    c = hf_config("qwen3_moe")
    setattr(c, key, value)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        from_hf_config(c)


def test_import_report_names_each_layer_by_its_letter(tmp_path):
    """The --from-hf report printed every layer that was not attention as C (a Mamba-2 import read CC)."""
    from slmlab.export.hf import import_hf

    hf_folder(tmp_path / "hf", "mamba2")
    assert import_hf(tmp_path / "hf", tmp_path / "run")["layers"] == "MM"
