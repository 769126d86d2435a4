"""Name and config mapping between our blocks and Hugging Face transformers.

hybrid/conv+attn patterns <-> Lfm2ForCausalLM, all-attention patterns <-> Qwen3ForCausalLM.
Our modules were named so that this is a renaming exercise; the parity tests pin both directions.
"""
from __future__ import annotations

from arch import ModelConfig

from .errors import ConfigError

# (our suffix, HF suffix) inside layer i, per family and mixer kind.
_LFM2 = {
    "common": [("mixer_norm.weight", "operator_norm.weight"), ("mlp_norm.weight", "ffn_norm.weight"),
               ("mlp.w1.weight", "feed_forward.w1.weight"), ("mlp.w2.weight", "feed_forward.w2.weight"),
               ("mlp.w3.weight", "feed_forward.w3.weight")],
    "attn": [("mixer.q_proj.weight", "self_attn.q_proj.weight"), ("mixer.k_proj.weight", "self_attn.k_proj.weight"),
             ("mixer.v_proj.weight", "self_attn.v_proj.weight"), ("mixer.out_proj.weight", "self_attn.out_proj.weight"),
             ("mixer.q_norm.weight", "self_attn.q_layernorm.weight"),
             ("mixer.k_norm.weight", "self_attn.k_layernorm.weight")],
    "conv": [("mixer.in_proj.weight", "conv.in_proj.weight"), ("mixer.in_proj.bias", "conv.in_proj.bias"),
             ("mixer.conv.weight", "conv.conv.weight"), ("mixer.conv.bias", "conv.conv.bias"),
             ("mixer.out_proj.weight", "conv.out_proj.weight"), ("mixer.out_proj.bias", "conv.out_proj.bias")],
    "final_norm": "model.embedding_norm.weight",
}
_QWEN3 = {
    "common": [("mixer_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"),
               ("mlp.w1.weight", "mlp.gate_proj.weight"), ("mlp.w2.weight", "mlp.down_proj.weight"),
               ("mlp.w3.weight", "mlp.up_proj.weight")],
    "attn": [("mixer.q_proj.weight", "self_attn.q_proj.weight"), ("mixer.k_proj.weight", "self_attn.k_proj.weight"),
             ("mixer.v_proj.weight", "self_attn.v_proj.weight"), ("mixer.out_proj.weight", "self_attn.o_proj.weight"),
             ("mixer.q_norm.weight", "self_attn.q_norm.weight"), ("mixer.k_norm.weight", "self_attn.k_norm.weight")],
    "final_norm": "model.norm.weight",
}


def hf_family(cfg: ModelConfig) -> str:
    """'lfm2' or 'qwen3', or a ConfigError naming what has no exact transformers class."""
    kinds = set(cfg.layer_types())
    if not cfg.causal:
        raise ConfigError("bidirectional (diffusion) models have no transformers causal-LM class")
    if cfg.mlp != "swiglu":
        raise ConfigError(f"channel mixer {cfg.mlp!r} has no transformers equivalent")
    if kinds - {"attn", "conv"}:
        raise ConfigError(f"blocks {sorted(kinds - {'attn', 'conv'})} have no transformers equivalent "
                          "(only attn and conv export)")
    if "conv" in kinds:
        if any(w is not None for w in cfg.layer_windows()):
            raise ConfigError("Lfm2 has no sliding-window attention: use window_pattern L for conv hybrids")
        return "lfm2"
    return "qwen3"


def _table(family):
    return _LFM2 if family == "lfm2" else _QWEN3


def to_hf_state_dict(model) -> dict:
    cfg = model.cfg
    family = hf_family(cfg)
    tab = _table(family)
    sd = {k: v for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], tab["final_norm"]: sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, kind in enumerate(cfg.layer_types()):
        for ours, theirs in tab["common"] + tab[kind]:
            if f"layers.{i}.{ours}" in sd:
                out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    return out


def from_hf_state_dict(hf_sd: dict, cfg: ModelConfig) -> dict:
    family = hf_family(cfg)
    tab = _table(family)
    out = {"embed.weight": hf_sd["model.embed_tokens.weight"], "norm.weight": hf_sd[tab["final_norm"]]}
    out["lm_head.weight"] = hf_sd.get("lm_head.weight", out["embed.weight"]) if not cfg.tie_embeddings \
        else out["embed.weight"]
    for i, kind in enumerate(cfg.layer_types()):
        for ours, theirs in tab["common"] + tab[kind]:
            key = f"model.layers.{i}.{theirs}"
            if key in hf_sd:
                out[f"layers.{i}.{ours}"] = hf_sd[key]
    return out


def to_hf_config(cfg: ModelConfig, max_position_embeddings: int = 4096, **special_ids):
    """A transformers config equal in function to ours (MLP width literal, not auto-adjusted)."""
    family = hf_family(cfg)
    types = cfg.layer_types()
    windows = cfg.layer_windows()
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=cfg.tie_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **special_ids)
    if family == "lfm2":
        from transformers import Lfm2Config

        if cfg.hd != cfg.d_model // cfg.n_heads:
            raise ConfigError("Lfm2 fixes head_dim = d_model / n_heads")
        return Lfm2Config(**common, norm_eps=cfg.norm_eps, conv_L_cache=cfg.conv_kernel, conv_bias=cfg.conv_bias,
                          block_auto_adjust_ff_dim=False,
                          layer_types=["full_attention" if t == "attn" else "conv" for t in types])
    from transformers import Qwen3Config

    sliding = [w for w in windows if w is not None]
    if len(set(sliding)) > 1:
        raise ConfigError("Qwen3 supports one sliding window size")
    return Qwen3Config(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, attention_bias=False,
                       use_sliding_window=bool(sliding), sliding_window=sliding[0] if sliding else None,
                       max_window_layers=0,
                       layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows])


def from_hf_config(hf_cfg) -> ModelConfig:
    mt = getattr(hf_cfg, "model_type", None)
    rope = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    common = dict(vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
                  n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads,
                  rope_theta=float(rope), tie_embeddings=bool(hf_cfg.tie_word_embeddings))
    if mt == "lfm2":
        ffn = hf_cfg.intermediate_size
        if hf_cfg.block_auto_adjust_ff_dim:
            ffn = int(2 * ffn / 3)
            if hf_cfg.block_ffn_dim_multiplier is not None:
                ffn = int(hf_cfg.block_ffn_dim_multiplier * ffn)
                m = hf_cfg.block_multiple_of
                ffn = m * ((ffn + m - 1) // m)
        layers = ["attn" if t == "full_attention" else "conv" for t in hf_cfg.layer_types]
        return ModelConfig(**common, ffn_dim=ffn, layers=layers, norm_eps=hf_cfg.norm_eps,
                           conv_kernel=hf_cfg.conv_L_cache, conv_bias=hf_cfg.conv_bias)
    if mt == "qwen3":
        if getattr(hf_cfg, "attention_bias", False):
            raise ConfigError("Qwen3 with attention_bias=true is not supported")
        types = hf_cfg.layer_types or ["full_attention"] * hf_cfg.num_hidden_layers
        wp = "".join("S" if t == "sliding_attention" else "L" for t in types)
        return ModelConfig(**common, ffn_dim=hf_cfg.intermediate_size, head_dim=hf_cfg.head_dim, layers="A",
                           norm_eps=hf_cfg.rms_norm_eps, window=hf_cfg.sliding_window or 4096, window_pattern=wp)
    raise ConfigError(f"unsupported transformers architecture {mt!r}: only lfm2 and qwen3 load into slmlab")
