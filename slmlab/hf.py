"""Name and config mapping between our blocks and Hugging Face transformers.

hybrid/conv+attn patterns <-> Lfm2ForCausalLM; all-attention patterns <-> Qwen3ForCausalLM (QK-norm),
Qwen2ForCausalLM (q/k/v biases), LlamaForCausalLM (neither) or GPT2LMHeadModel (LayerNorm, GELU, learned
positions); all-mamba2 patterns without MLP (model.mlp=none) <-> Mamba2ForCausalLM; mamba2 with attention
and SwiGLU MLPs (no QK-norm) <-> GraniteMoeHybridForCausalLM without experts, and with experts beside a
shared MLP under model.mlp=moe; attention and model.mlp=moe <-> Qwen3MoeForCausalLM (QK-norm per head),
OlmoeForCausalLM (QK-norm over all heads at once: model.qk_norm_scope=all), Qwen2MoeForCausalLM (no
QK-norm, a gated shared expert) or MixtralForCausalLM (neither), or Lfm2MoeForCausalLM (router sigmoid,
any conv/attention pattern). The block
options (model.norm, pos, mlp, qk_norm, *_bias, rope_scaling, the Granite scales) pick the family.
Our modules were named so that this is mostly a renaming exercise (GPT-2's fused, transposed Conv1D
weights are split and transposed); the parity tests pin both directions.
"""
from __future__ import annotations

import torch

from arch import ModelConfig
from arch.moe import MoEOptions, expert_width

from .errors import CheckpointError, ConfigError

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
    "common": [("mixer_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight")]
    + [(f"mlp.{ours}.{p}", f"mlp.{theirs}.{p}") for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"),
                                                                      ("w3", "up_proj")) for p in ("weight", "bias")],
    "attn": [(f"mixer.{ours}.{p}", f"self_attn.{theirs}.{p}")
             for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                  ("out_proj", "o_proj")) for p in ("weight", "bias")]
    + [("mixer.q_norm.weight", "self_attn.q_norm.weight"), ("mixer.k_norm.weight", "self_attn.k_norm.weight")],
    "final_norm": "model.norm.weight",
}


def _mamba2_pairs(prefix: str) -> list[tuple[str, str]]:
    """Our mamba2 mixer's tensors and transformers' (Mamba2Mixer's names, under `prefix`): all but three alike."""
    same = [(f"mixer.{n}", f"{prefix}.{n}") for n in ("in_proj.weight", "dt_bias", "A_log", "D", "out_proj.weight")]
    return same + [("mixer.conv.weight", f"{prefix}.conv1d.weight"), ("mixer.conv.bias", f"{prefix}.conv1d.bias"),
                   ("mixer.norm_weight", f"{prefix}.norm.weight")]


# Mamba2ForCausalLM: mamba2 layers without MLP (model.mlp=none).
_MAMBA2 = {
    "common": [("mixer_norm.weight", "norm.weight")], "mamba2": _mamba2_pairs("mixer"),
    "final_norm": "backbone.norm_f.weight", "embed": "backbone.embeddings.weight", "layers": "backbone.layers",
}
# GraniteMoeHybridForCausalLM with no experts: mamba2 and attention layers, each with a SwiGLU MLP whose
# gate and up projections are one fused matrix ("fused": our two halves, stacked in rows).
_GRANITE = {
    "common": [("mixer_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"),
               ("mlp.w2.weight", "shared_mlp.output_linear.weight")],
    "attn": [(f"mixer.{ours}.{p}", f"self_attn.{theirs}.{p}")
             for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                                  ("out_proj", "o_proj")) for p in ("weight", "bias")],
    "mamba2": _mamba2_pairs("mamba"),
    "fused": [(("mlp.w1.weight", "mlp.w3.weight"), "shared_mlp.input_linear.weight")],
    "final_norm": "model.norm.weight",
}
# Mixture-of-experts MLPs (model.mlp=moe), as the checkpoints store them (the hub's files and transformers'
# save_pretrained; a transformers 5 model in memory renames and stacks them: _as_on_disk). Our router and
# expert stacks w13 [E, 2f, d] (gate rows, then up rows) and w2 [E, d, f].
# Qwen3MoeForCausalLM: Qwen3's attention; per-expert gate/up/down tensors ("experts"), no shared expert.
_QWEN3_MOE = {
    "common": _QWEN3["common"][:2] + [("mlp.router.weight", "mlp.gate.weight")],
    "attn": _QWEN3["attn"], "experts": "mlp.experts", "final_norm": "model.norm.weight",
}
# Qwen2MoeForCausalLM: Qwen2's attention (q/k/v biases or none), Qwen3-MoE's router and experts, and a
# shared expert whose output a per-token sigmoid gate scales (our shared and shared_gate).
_QWEN2_MOE = {
    **_QWEN3_MOE,
    "common": _QWEN3_MOE["common"] + [(f"mlp.shared.{ours}.weight", f"mlp.shared_expert.{theirs}.weight")
                                      for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))]
    + [("mlp.shared_gate.weight", "mlp.shared_expert_gate.weight")],
}
# Lfm2MoeForCausalLM: LFM2's layers; sigmoid routing with an expert bias, per-expert w1 (gate), w3 (up),
# w2 (down); its first num_dense_layers layers keep LFM2's dense feed_forward (the "common" w1/w2/w3).
_LFM2_MOE = {
    **_LFM2,
    "common": _LFM2["common"] + [("mlp.router.weight", "feed_forward.gate.weight"),
                                 ("mlp.expert_bias", "feed_forward.expert_bias")],
    "experts": "feed_forward.experts", "expert_names": ("w1", "w3", "w2"),
}
# MixtralForCausalLM: Llama's attention; per-expert w1 (gate), w3 (up), w2 (down) under block_sparse_moe,
# which a transformers 5 model names mlp in memory ("in_memory": its names -> the checkpoint's).
_MIXTRAL = {
    "common": _QWEN3["common"][:2] + [("mlp.router.weight", "block_sparse_moe.gate.weight")],
    "attn": _QWEN3["attn"], "experts": "block_sparse_moe.experts", "expert_names": ("w1", "w3", "w2"),
    "final_norm": "model.norm.weight",
    "in_memory": {"mlp.gate.weight": "block_sparse_moe.gate.weight",
                  "mlp.experts.gate_up_proj": "block_sparse_moe.experts.gate_up_proj",
                  "mlp.experts.down_proj": "block_sparse_moe.experts.down_proj"},
}
# GraniteMoeHybridForCausalLM with experts: stacked experts, and its shared_mlp is our shared expert.
_GRANITE_MOE = {
    **_GRANITE,
    "common": _GRANITE["common"][:2] + [
        ("mlp.shared.w2.weight", "shared_mlp.output_linear.weight"),
        ("mlp.router.weight", "block_sparse_moe.router.layer.weight"),
        ("mlp.w13", "block_sparse_moe.input_linear.weight"), ("mlp.w2", "block_sparse_moe.output_linear.weight")],
    "fused": [(("mlp.shared.w1.weight", "mlp.shared.w3.weight"), "shared_mlp.input_linear.weight")],
    "in_memory": {"block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight",
                  "block_sparse_moe.experts.gate_up_proj": "block_sparse_moe.input_linear.weight",
                  "block_sparse_moe.experts.down_proj": "block_sparse_moe.output_linear.weight"},
}
# Llama and Qwen2 name their layers as Qwen3 does; the biases and QK-norm present decide what maps.
TABLES = {"lfm2": _LFM2, "qwen3": _QWEN3, "llama": _QWEN3, "qwen2": _QWEN3, "mamba2": _MAMBA2,
          "granitemoehybrid": _GRANITE, "qwen3_moe": _QWEN3_MOE, "olmoe": _QWEN3_MOE, "qwen2_moe": _QWEN2_MOE,
          "lfm2_moe": _LFM2_MOE, "mixtral": _MIXTRAL}
_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")  # per-expert tensors, unless a table names its own
HF_CLASSES = {"lfm2": "Lfm2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel", "mamba2": "Mamba2ForCausalLM",
              "granitemoehybrid": "GraniteMoeHybridForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
              "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM",
              "mixtral": "MixtralForCausalLM"}
FAMILIES = tuple(HF_CLASSES)
# What each family fixes about the block options (the rest, e.g. Llama's biases, the mapping reads).
_ROPE_RMS = dict(norm="rmsnorm", pos="rope", mlp="swiglu")
FAMILY_OPTIONS = {
    "lfm2": dict(_ROPE_RMS, qk_norm=True, qk_norm_scope="head", attn_bias=False, attn_out_bias=False, mlp_bias=False,
                 rope_scaling={}),
    "qwen3": dict(_ROPE_RMS, qk_norm=True, qk_norm_scope="head", attn_bias=False, attn_out_bias=False, mlp_bias=False,
                  rope_scaling={}),
    "qwen2": dict(_ROPE_RMS, qk_norm=False, attn_bias=True, attn_out_bias=False, mlp_bias=False, rope_scaling={}),
    "llama": dict(_ROPE_RMS, qk_norm=False),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", qk_norm=False, attn_bias=True, attn_out_bias=True,
                 mlp_bias=True, rope_scaling={}),
    "mamba2": dict(norm="rmsnorm", mlp="none"),
    # pos rope or none (NoPE, IBM's own): checked in hf_family
    "granitemoehybrid": dict(norm="rmsnorm", qk_norm=False, mlp_bias=False, rope_scaling={}),  # swiglu or moe
    "qwen3_moe": dict(_ROPE_RMS, mlp="moe", qk_norm=True, qk_norm_scope="head", attn_bias=False, attn_out_bias=False,
                      rope_scaling={}),
    "olmoe": dict(_ROPE_RMS, mlp="moe", qk_norm=True, qk_norm_scope="all", rope_scaling={}),  # biases all or none
    "qwen2_moe": dict(_ROPE_RMS, mlp="moe", qk_norm=False, attn_out_bias=False, rope_scaling={}),  # qkv bias or not
    "lfm2_moe": dict(_ROPE_RMS, mlp="moe", qk_norm=True, qk_norm_scope="head", attn_bias=False, attn_out_bias=False,
                     mlp_bias=False, rope_scaling={}),
    "mixtral": dict(_ROPE_RMS, mlp="moe", qk_norm=False, attn_bias=False, attn_out_bias=False, rope_scaling={}),
}
# The families with mamba2 layers (their GGUF tensors and keys are llama.cpp's SSM ones)
SSM_FAMILIES = ("mamba2", "granitemoehybrid")
# Granite's multipliers: every other family has them at these values
_PLAIN_SCALES = dict(embed_scale=1.0, residual_scale=1.0, logit_scale=1.0, attn_scale=None)


def _pick_family(cfg: ModelConfig) -> str:
    types = set(cfg.layer_types())
    if "mamba2" in types:
        return "mamba2" if types == {"mamba2"} and cfg.mlp == "none" else "granitemoehybrid"
    if cfg.mlp == "moe":
        if cfg.block_options("moe").router == "sigmoid":
            return "lfm2_moe"
        if cfg.qk_norm:
            return "olmoe" if cfg.qk_norm_scope == "all" else "qwen3_moe"
        return "qwen2_moe" if cfg.block_options("moe").shared_ffn else "mixtral"
    if "conv" in cfg.layer_types():
        return "lfm2"
    if cfg.norm == "layernorm" or cfg.pos == "learned" or cfg.mlp == "gelu":
        return "gpt2"
    if cfg.qk_norm:
        return "qwen3"
    return "qwen2" if cfg.attn_bias and not cfg.attn_out_bias else "llama"


def hf_family(cfg: ModelConfig) -> str:
    """The transformers family with exactly our function (FAMILIES), or a ConfigError naming what has none."""
    kinds = set(cfg.layer_types())
    if not cfg.causal:
        raise ConfigError("bidirectional (diffusion) models have no transformers causal-LM class")
    if kinds - {"attn", "conv", "mamba2"}:
        raise ConfigError(f"blocks {sorted(kinds - {'attn', 'conv', 'mamba2'})} have no transformers equivalent "
                          "(attn and conv export, and mamba2 alone)")
    if {"mamba2", "conv"} <= kinds:
        raise ConfigError("mamba2 beside conv has no transformers equivalent (mamba2 exports alone without MLP, "
                          "as Mamba2ForCausalLM, or beside attention, as GraniteMoeHybridForCausalLM)")
    if kinds == {"mamba2"} and cfg.mlp != "none":
        # measured: transformers 5.24's GraniteMoeHybrid fails its cached forward without an attention
        # layer (get_seq_length), and llama.cpp's granitehybrid aborts on such a file
        raise ConfigError("mamba2 layers with an MLP and no attention layer have no working transformers class "
                          "(GraniteMoeHybridForCausalLM needs an attention layer): add one, or drop the MLP with "
                          "model.mlp=none (Mamba2ForCausalLM)")
    if cfg.mlp not in ("swiglu", "gelu", "moe") and ("mamba2" not in kinds or cfg.mlp != "none"):
        raise ConfigError(f"channel mixer {cfg.mlp!r} has no transformers equivalent")
    if cfg.mlp == "moe" and "conv" in kinds and cfg.block_options("moe").router != "sigmoid":
        raise ConfigError("conv layers with model.mlp=moe export as Lfm2MoeForCausalLM, which routes by sigmoid: "
                          "set model.mixer_opts.moe.router=sigmoid")
    family = _pick_family(cfg)
    if cfg.mlp == "moe":
        _check_moe(cfg, family)
    if family == "granitemoehybrid" and cfg.mlp not in ("swiglu", "moe"):
        raise ConfigError(f"the closest transformers family, granitemoehybrid, needs model.mlp='swiglu' or 'moe' "
                          f"(this model has {cfg.mlp!r})")
    plain = {} if family == "granitemoehybrid" else _PLAIN_SCALES
    for key, want in {**FAMILY_OPTIONS[family], **plain}.items():
        if getattr(cfg, key) != want:
            raise ConfigError(f"the closest transformers family, {family}, needs model.{key}={want!r} "
                              f"(this model has {getattr(cfg, key)!r})")
    if family in ("llama", "granitemoehybrid", "olmoe") and cfg.attn_bias != cfg.attn_out_bias:
        raise ConfigError(f"{HF_CLASSES[family]} has one attention_bias: model.attn_bias and model.attn_out_bias "
                          "must agree")
    if (family in ("granitemoehybrid", "olmoe", "lfm2", "lfm2_moe") and "attn" in cfg.layer_types()
            and cfg.hd * cfg.n_heads != cfg.d_model):  # here, so --to gguf refuses it too (llama.cpp's lfm2 alike)
        raise ConfigError(f"{HF_CLASSES[family]} fixes head_dim = d_model / n_heads")
    # (the other families' model.pos is in FAMILY_OPTIONS) NoPE is Granite's own; mamba2 has no attention
    if family in SSM_FAMILIES and cfg.pos not in ("rope", "none"):
        raise ConfigError(f"the closest transformers family, {family}, needs model.pos='rope' or 'none' "
                          f"(this model has {cfg.pos!r})")
    if family == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.hd * cfg.n_heads != cfg.d_model):
        raise ConfigError("GPT-2 has no GQA and head_dim = d_model / n_heads")
    if family != "qwen3" and any(w is not None for w in cfg.layer_windows()):
        raise ConfigError(f"{HF_CLASSES[family]} has no sliding-window attention: use window_pattern L")
    return family


def _check_moe(cfg: ModelConfig, family: str) -> None:
    """What each family's MoE fixes: only LFM2-MoE has the sigmoid router, expert bias, routed scale and
    dense leading layers; Granite renormalises the top k and always has a shared expert, Mixtral
    renormalises and has none, Qwen3-MoE has none, and only Qwen2-MoE's shared expert is gated (always)."""
    o = cfg.block_options("moe")
    if family == "lfm2_moe":
        if o.shared_ffn:
            raise ConfigError("Lfm2MoeForCausalLM has no shared expert: model.mixer_opts.moe.shared_ffn must be 0")
        return
    lfm2_only = {"router": "softmax", "expert_bias": False, "routed_scale": 1.0, "dense_layers": 0}
    for key, want in lfm2_only.items():
        if getattr(o, key) != want:
            raise ConfigError(f"{HF_CLASSES[family]} needs model.mixer_opts.moe.{key}={want!r} (this model has "
                              f"{getattr(o, key)!r}; LFM2-MoE's options export with conv layers or router=sigmoid)")
    if family == "mixtral" and (not o.norm_topk or o.shared_ffn):
        raise ConfigError("MixtralForCausalLM renormalises the top k and has no shared expert: "
                          "model.mixer_opts.moe needs norm_topk=true and shared_ffn=0")
    if family == "granitemoehybrid" and not (o.norm_topk and o.shared_ffn):
        raise ConfigError("GraniteMoeHybridForCausalLM's experts need model.mixer_opts.moe.norm_topk=true and a "
                          "shared expert (model.mixer_opts.moe.shared_ffn > 0)")
    if family in ("qwen3_moe", "olmoe") and o.shared_ffn:
        raise ConfigError(f"{HF_CLASSES[family]} has no shared expert: model.mixer_opts.moe.shared_ffn must be 0")
    if o.shared_gate != (family == "qwen2_moe"):
        raise ConfigError("Qwen2MoeForCausalLM gates its shared expert and no other family does: "
                          f"model.mixer_opts.moe.shared_gate must be {str(family == 'qwen2_moe').lower()} for "
                          f"{HF_CLASSES[family]}")


def _gpt2_pairs(cfg: ModelConfig):
    """(our key, GPT-2 key, kind) for every tensor; kind 'T' = Conv1D stores the transpose, 'qkv' = the
    fused, transposed q|k|v projection (our q_proj, k_proj, v_proj stacked)."""
    yield "embed.weight", "transformer.wte.weight", ""
    yield "pos_embed.weight", "transformer.wpe.weight", ""
    for p in ("weight", "bias"):
        yield f"norm.{p}", f"transformer.ln_f.{p}", ""
        for i in range(cfg.n_layers):
            h = f"transformer.h.{i}"
            yield f"layers.{i}.mixer_norm.{p}", f"{h}.ln_1.{p}", ""
            yield f"layers.{i}.mlp_norm.{p}", f"{h}.ln_2.{p}", ""
            yield f"layers.{i}.mixer.{{q,k,v}}_proj.{p}", f"{h}.attn.c_attn.{p}", "qkv"
            yield f"layers.{i}.mixer.out_proj.{p}", f"{h}.attn.c_proj.{p}", "T"
            yield f"layers.{i}.mlp.fc.{p}", f"{h}.mlp.c_fc.{p}", "T"
            yield f"layers.{i}.mlp.proj.{p}", f"{h}.mlp.c_proj.{p}", "T"


def _gpt2_to_hf(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for ours, theirs, kind in _gpt2_pairs(cfg):
        if kind == "qkv":
            t = torch.cat([sd[ours.replace("{q,k,v}", n)] for n in "qkv"], dim=0)
        else:
            t = sd[ours]
        out[theirs] = t.t().contiguous() if kind and t.dim() == 2 else t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _gpt2_names(hf_sd: dict) -> dict:
    # The original GPT-2 checkpoints name the GPT2Model's tensors without the "transformer." prefix.
    return {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in hf_sd.items()}


def _gpt2_from_hf(hf_sd: dict, cfg: ModelConfig) -> dict:
    hf_sd = _gpt2_names(hf_sd)
    out = {}
    for ours, theirs, kind in _gpt2_pairs(cfg):
        t = hf_sd[theirs]
        t = t.t() if kind and t.dim() == 2 else t
        if kind == "qkv":
            for n, part in zip("qkv", t.split(cfg.d_model, dim=0)):
                out[ours.replace("{q,k,v}", n)] = part.contiguous()
        else:
            out[ours] = t.contiguous()
    out["lm_head.weight"] = _head(hf_sd, out["embed.weight"], cfg.tie_embeddings)
    return out


def _head(hf_sd: dict, embed: torch.Tensor, tied: bool) -> torch.Tensor:
    if tied:
        return embed
    if "lm_head.weight" not in hf_sd:  # copying the embedding would import a different model without a word
        raise CheckpointError("tie_word_embeddings is false but the weights have no lm_head.weight")
    return hf_sd["lm_head.weight"]


def _table(family: str, cfg: ModelConfig) -> dict:
    return _GRANITE_MOE if family == "granitemoehybrid" and cfg.mlp == "moe" else TABLES[family]


def to_hf_state_dict(model) -> dict:
    """Our weights under the family's names, as its checkpoints store them on disk."""
    cfg = model.cfg
    family = hf_family(cfg)
    sd = dict(model.state_dict())
    if family == "gpt2":
        return _gpt2_to_hf(sd, cfg)
    tab = _table(family, cfg)
    out = {_embed(tab): sd["embed.weight"], tab["final_norm"]: sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, kind in enumerate(cfg.layer_types()):
        for ours, theirs in tab["common"] + tab[kind]:
            if f"layers.{i}.{ours}" in sd:
                out[f"{_layers(tab)}.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
        for parts, theirs in tab.get("fused", []):
            out[f"{_layers(tab)}.{i}.{theirs}"] = torch.cat([sd[f"layers.{i}.{p}"] for p in parts])
        if "experts" in tab and f"layers.{i}.mlp.w13" in sd:  # stacked here, one tensor per expert below
            prefix = f"{_layers(tab)}.{i}.{tab['experts']}"
            out[f"{prefix}.gate_up_proj"] = sd[f"layers.{i}.mlp.w13"]
            out[f"{prefix}.down_proj"] = sd[f"layers.{i}.mlp.w2"]
    return _split_experts(out, tab)


def _split_experts(sd: dict, tab: dict) -> dict:
    """Stacked expert tensors (keys ending in .experts.gate_up_proj and .experts.down_proj) as one gate,
    up and down tensor per expert under tab's expert names; every other tensor as it is."""
    gate, up, down = tab.get("expert_names", _EXPERT_NAMES)
    out = {}
    for k, v in sd.items():
        if k.endswith(".experts.gate_up_proj"):
            stem = k.removesuffix("gate_up_proj")
            for e, w in enumerate(v):
                out[f"{stem}{e}.{gate}.weight"], out[f"{stem}{e}.{up}.weight"] = w.chunk(2)
        elif k.endswith(".experts.down_proj"):
            stem = k.removesuffix("down_proj")
            for e, w in enumerate(v):
                out[f"{stem}{e}.{down}.weight"] = w
        else:
            out[k] = v
    return out


def _as_on_disk(hf_sd: dict, tab: dict) -> dict:
    """A transformers 5 model's state_dict() with its MoE tensors named (tab's "in_memory" renames) and,
    where the checkpoints keep a tensor per expert, split per expert, as its checkpoints store them; any
    other state dict unchanged."""
    renames = tab.get("in_memory", {})
    named = {}
    for k, v in hf_sd.items():
        head, _, tail = k.rpartition(".layers.")
        i, _, name = tail.partition(".")
        named[f"{head}.layers.{i}.{renames[name]}" if name in renames else k] = v
    return _split_experts(named, tab)


def _embed(tab: dict) -> str:
    return tab.get("embed", "model.embed_tokens.weight")


def _layers(tab: dict) -> str:
    return tab.get("layers", "model.layers")


# Tensors a checkpoint may hold that transformers itself does not load: RoPE tables of older Llama
# checkpoints, GPT-2's causal-mask buffers.
_IGNORED = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def unused_hf_weights(hf_sd: dict, model) -> list[str]:
    """A checkpoint's tensors (as its files name them) that `model`, built from its config.json, has no
    place for: a layer past num_hidden_layers, a bias attention_bias=false does not build. Importing
    without them would give another model than the folder's, without a word."""
    cfg = model.cfg
    expected = set(to_hf_state_dict(model))
    names = _gpt2_names(hf_sd) if hf_family(cfg) == "gpt2" else hf_sd
    return sorted(k for k in names if k not in expected and not k.endswith(_IGNORED)
                  and not (k == "lm_head.weight" and cfg.tie_embeddings))  # tied: transformers reads the embedding


def from_hf_state_dict(hf_sd: dict, cfg: ModelConfig) -> dict:
    """A checkpoint's weights (or a transformers model's state_dict()) under our names."""
    family = hf_family(cfg)
    if family == "gpt2":
        return _gpt2_from_hf(hf_sd, cfg)
    tab = _table(family, cfg)
    if cfg.mlp == "moe":
        hf_sd = _as_on_disk(hf_sd, tab)
    out = {"embed.weight": hf_sd[_embed(tab)], "norm.weight": hf_sd[tab["final_norm"]]}
    out["lm_head.weight"] = _head(hf_sd, out["embed.weight"], cfg.tie_embeddings)
    for i, kind in enumerate(cfg.layer_types()):
        for ours, theirs in tab["common"] + tab[kind]:
            key = f"{_layers(tab)}.{i}.{theirs}"
            if key in hf_sd:
                out[f"layers.{i}.{ours}"] = hf_sd[key]
        for parts, theirs in tab.get("fused", []):
            for p, t in zip(parts, hf_sd[f"{_layers(tab)}.{i}.{theirs}"].chunk(len(parts))):
                out[f"layers.{i}.{p}"] = t
        if "experts" in tab and cfg.mlp_at(i) == "moe":
            prefix = f"{_layers(tab)}.{i}.{tab['experts']}"
            g, u, dn = tab.get("expert_names", _EXPERT_NAMES)
            n = cfg.block_options("moe").experts
            out[f"layers.{i}.mlp.w13"] = torch.stack([torch.cat([hf_sd[f"{prefix}.{e}.{g}.weight"],
                                                                 hf_sd[f"{prefix}.{e}.{u}.weight"]])
                                                      for e in range(n)])
            out[f"layers.{i}.mlp.w2"] = torch.stack([hf_sd[f"{prefix}.{e}.{dn}.weight"] for e in range(n)])
    return out


def to_hf_config(cfg: ModelConfig, max_position_embeddings: int = 4096, **special_ids):
    """A transformers config equal in function to ours (MLP width literal, not auto-adjusted)."""
    family = hf_family(cfg)
    if family == "gpt2":
        from transformers import GPT2Config

        # No dropout: ours has none, and a fine-tune in transformers should see the same model.
        return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.d_model,
                          n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=cfg.tie_embeddings, **special_ids)
    if family == "mamba2":
        return _to_mamba2_config(cfg, **special_ids)
    types, windows = cfg.layer_types(), cfg.layer_windows()
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scale():
        rope = {**rope, "rope_type": "llama3", **cfg.rope_scale()}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope, **special_ids)
    if family == "granitemoehybrid":
        from transformers import GraniteMoeHybridConfig

        o = cfg.block_options("mamba2")
        # every multiplier 1 but attention's, which is its softmax scale (ours: 1/sqrt(head_dim))
        if cfg.mlp == "moe":  # intermediate_size is the experts' width, the shared MLP's is its own
            m = cfg.block_options("moe")
            common.update(intermediate_size=expert_width(m, cfg.ffn))
            experts = dict(num_local_experts=m.experts, num_experts_per_tok=m.top_k, shared_intermediate_size=m.shared_ffn,
                           router_aux_loss_coef=m.aux_loss_coef)
        else:
            experts = dict(num_local_experts=0, shared_intermediate_size=cfg.ffn)
        return GraniteMoeHybridConfig(
            **common, **experts, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias,
            attention_multiplier=cfg.attn_scale or cfg.hd ** -0.5, embedding_multiplier=cfg.embed_scale,
            logits_scaling=cfg.logit_scale, residual_multiplier=cfg.residual_scale,
            position_embedding_type="rope" if cfg.pos == "rope" else "nope",
            layer_types=["mamba" if t == "mamba2" else "attention" for t in types],
            mamba_n_heads=o.heads(cfg.d_model), mamba_d_head=o.headdim, mamba_d_state=o.d_state,
            mamba_n_groups=o.ngroups, mamba_d_conv=o.conv_kernel, mamba_expand=o.expand, mamba_chunk_size=o.chunk,
            mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=(0.0, float("inf")))
    if family == "lfm2_moe":
        from transformers import Lfm2MoeConfig

        m = cfg.block_options("moe")
        return Lfm2MoeConfig(**common, norm_eps=cfg.norm_eps, conv_L_cache=cfg.conv_kernel, conv_bias=cfg.conv_bias,
                             layer_types=["full_attention" if t == "attn" else "conv" for t in types],
                             num_dense_layers=m.dense_layers, num_experts=m.experts, num_experts_per_tok=m.top_k,
                             moe_intermediate_size=expert_width(m, cfg.ffn), use_expert_bias=m.expert_bias,
                             routed_scaling_factor=m.routed_scale, norm_topk_prob=m.norm_topk)
    if family == "lfm2":
        from transformers import Lfm2Config

        return Lfm2Config(**common, norm_eps=cfg.norm_eps, conv_L_cache=cfg.conv_kernel, conv_bias=cfg.conv_bias,
                          block_auto_adjust_ff_dim=False,
                          layer_types=["full_attention" if t == "attn" else "conv" for t in types])
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias,
                           mlp_bias=cfg.mlp_bias)
    if family == "mixtral":
        from transformers import MixtralConfig

        m = cfg.block_options("moe")
        common.update(intermediate_size=expert_width(m, cfg.ffn))  # Mixtral's is the experts' width
        return MixtralConfig(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, num_local_experts=m.experts,
                             num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef, sliding_window=None)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        m = cfg.block_options("moe")
        return Qwen3MoeConfig(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, attention_bias=False,
                              moe_intermediate_size=expert_width(m, cfg.ffn), num_experts=m.experts,
                              num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk,
                              router_aux_loss_coef=m.aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                              use_sliding_window=False)
    if family == "olmoe":  # intermediate_size is the experts' width; no dense MLP
        from transformers import OlmoeConfig

        m = cfg.block_options("moe")
        common.update(intermediate_size=expert_width(m, cfg.ffn))
        return OlmoeConfig(**common, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.attn_bias, clip_qkv=None,
                           num_experts=m.experts, num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk,
                           router_aux_loss_coef=m.aux_loss_coef)
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        m = cfg.block_options("moe")
        return Qwen2MoeConfig(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, qkv_bias=cfg.attn_bias,
                              moe_intermediate_size=expert_width(m, cfg.ffn),
                              shared_expert_intermediate_size=m.shared_ffn,
                              num_experts=m.experts, num_experts_per_tok=m.top_k, norm_topk_prob=m.norm_topk,
                              router_aux_loss_coef=m.aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                              use_sliding_window=False)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, use_sliding_window=False)
    from transformers import Qwen3Config

    sliding = [w for w in windows if w is not None]
    if len(set(sliding)) > 1:
        raise ConfigError("Qwen3 supports one sliding window size")
    return Qwen3Config(**common, head_dim=cfg.hd, rms_norm_eps=cfg.norm_eps, attention_bias=False,
                       use_sliding_window=bool(sliding), sliding_window=sliding[0] if sliding else None,
                       max_window_layers=0,
                       layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows])


def _to_mamba2_config(cfg: ModelConfig, **special_ids):
    from transformers import Mamba2Config

    o = cfg.block_options("mamba2")
    # time_step_limit (0, inf): dt is not clamped, in our block either
    return Mamba2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                        state_size=o.d_state, expand=o.expand, head_dim=o.headdim,
                        num_heads=o.heads(cfg.d_model), n_groups=o.ngroups, conv_kernel=o.conv_kernel,
                        chunk_size=o.chunk, use_bias=False, use_conv_bias=True, hidden_act="silu",
                        layer_norm_epsilon=cfg.norm_eps, time_step_limit=(0.0, float("inf")),
                        tie_word_embeddings=cfg.tie_embeddings, **special_ids)


def _check_values(mt: str, c, wanted) -> None:
    for key, want in wanted:
        if getattr(c, key, want) != want:
            raise ConfigError(f"{mt}: {key}={getattr(c, key)!r} is not supported ({want!r})")
    limit = tuple(float(x) for x in (getattr(c, "time_step_limit", None) or (0.0, float("inf"))))
    if limit != (0.0, float("inf")):
        raise ConfigError(f"{mt}: time_step_limit={limit} clamps dt, which our block does not: only (0.0, inf)")


def _mamba2_opts(mt: str, hidden: int, heads: int, head_dim: int, expand: int, **opts) -> dict:
    if heads * head_dim != expand * hidden:
        raise ConfigError(f"{mt}: num_heads * head_dim = {heads * head_dim} is not expand * hidden_size = "
                          f"{expand * hidden}")
    return dict(expand=expand, headdim=head_dim, **opts)


def _from_mamba2_config(c) -> ModelConfig:
    _check_values("mamba2", c, (("hidden_act", "silu"), ("use_bias", False), ("use_conv_bias", True)))
    opts = _mamba2_opts("mamba2", c.hidden_size, c.num_heads, c.head_dim, c.expand, d_state=c.state_size,
                        ngroups=c.n_groups, conv_kernel=c.conv_kernel, chunk=c.chunk_size)
    # n_heads is attention's (no attention here): 1 divides any hidden_size
    return ModelConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, layers="M",
                       mlp="none", n_heads=1, n_kv_heads=1, norm_eps=c.layer_norm_epsilon,
                       tie_embeddings=bool(c.tie_word_embeddings), mixer_opts={"mamba2": opts})


def _from_granite_config(c, common: dict) -> ModelConfig:
    mt = "granitemoehybrid"
    _check_values(mt, c, (("hidden_act", "silu"), ("mamba_proj_bias", False), ("mamba_conv_bias", True)))
    # layer_types as written ("mamba", "attention") or as the config reads them back (linear/full_attention)
    layers = ["mamba2" if t in ("mamba", "linear_attention") else "attn" for t in c.layer_types]
    if c.position_embedding_type not in ("rope", "nope", None):
        raise ConfigError(f"{mt}: position_embedding_type={c.position_embedding_type!r} is not supported (rope, nope)")
    opts = _mamba2_opts(mt, c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_expand, d_state=c.mamba_d_state,
                        ngroups=c.mamba_n_groups, conv_kernel=c.mamba_d_conv, chunk=c.mamba_chunk_size)
    bias = bool(c.attention_bias)
    mlp, mixer_opts = dict(ffn_dim=c.shared_intermediate_size), {"mamba2": opts}
    if c.num_local_experts:  # routed experts beside the shared MLP (the softmax of the top-k logits)
        mlp = dict(mlp="moe")
        mixer_opts["moe"] = dict(experts=c.num_local_experts, top_k=c.num_experts_per_tok, norm_topk=True,
                                 expert_ffn=c.intermediate_size, shared_ffn=c.shared_intermediate_size,
                                 aux_loss_coef=float(c.router_aux_loss_coef))
    return ModelConfig(**common, **mlp, layers=layers, norm_eps=c.rms_norm_eps,
                       qk_norm=False, attn_bias=bias, attn_out_bias=bias, mixer_opts=mixer_opts,
                       pos="rope" if c.position_embedding_type == "rope" else "none",
                       embed_scale=float(c.embedding_multiplier), residual_scale=float(c.residual_multiplier),
                       logit_scale=float(c.logits_scaling), attn_scale=float(c.attention_multiplier))


def _from_qwen_moe_config(mt: str, c, common: dict) -> ModelConfig:
    """Qwen3-MoE (QK-norm, no attention biases) and Qwen2-MoE (q/k/v biases or none, a gated shared expert)."""
    _check_values(mt, c, (("attention_bias", False), ("use_sliding_window", False), ("decoder_sparse_step", 1)))
    if list(c.mlp_only_layers or []):  # model.mlp is one channel mixer for every layer
        raise ConfigError(f"{mt}: mlp_only_layers={list(c.mlp_only_layers)} mixes dense and MoE layers, which "
                          "slmlab's one model.mlp cannot: only [] is supported")
    common.pop("ffn_dim")  # the dense width no layer uses
    moe = _routed_experts(c, c.moe_intermediate_size)
    if mt == "qwen3_moe":
        return ModelConfig(**common, mlp="moe", mixer_opts={"moe": moe})
    if not c.shared_expert_intermediate_size:
        raise ConfigError(f"{mt}: shared_expert_intermediate_size=0 is not supported (a shared expert > 0 wide)")
    moe.update(shared_ffn=c.shared_expert_intermediate_size, shared_gate=True)
    bias = bool(getattr(c, "qkv_bias", True))
    return ModelConfig(**common, mlp="moe", qk_norm=False, attn_bias=bias, attn_out_bias=False,
                       mixer_opts={"moe": moe})


def _routed_experts(c, expert_ffn: int) -> dict:
    """model.mixer_opts.moe from the routing keys Qwen3-MoE, Qwen2-MoE and OLMoE share."""
    return dict(experts=c.num_experts, top_k=c.num_experts_per_tok, expert_ffn=expert_ffn,
                norm_topk=bool(c.norm_topk_prob), aux_loss_coef=float(c.router_aux_loss_coef))


def _from_lfm2_moe_config(c, common: dict) -> ModelConfig:
    # its expert bias is the auxiliary-loss-free balancing's: no balance loss on top when it has one
    moe = dict(experts=c.num_experts, top_k=c.num_experts_per_tok, expert_ffn=c.moe_intermediate_size,
               router="sigmoid", expert_bias=bool(c.use_expert_bias), routed_scale=float(c.routed_scaling_factor),
               norm_topk=bool(c.norm_topk_prob), dense_layers=int(c.num_dense_layers),
               aux_loss_coef=0.0 if c.use_expert_bias else MoEOptions.aux_loss_coef)
    layers = ["attn" if t == "full_attention" else "conv" for t in c.layer_types]
    return ModelConfig(**common, ffn_dim=c.intermediate_size, layers=layers, norm_eps=c.norm_eps, mlp="moe",
                       conv_kernel=c.conv_L_cache, conv_bias=c.conv_bias, mixer_opts={"moe": moe})


def unsupported(mt) -> ConfigError:
    return ConfigError(f"unsupported transformers architecture {mt!r}: slmlab loads "
                       + ", ".join(f"{f} ({c})" for f, c in HF_CLASSES.items()))


def _rope(hf_cfg, family: str) -> tuple[float, dict]:
    """(rope_theta, our rope_scaling) from transformers' rope_parameters; other scalings are refused."""
    rp = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    if not rp:  # a transformers 4.x config (or its config.json) keeps them as rope_theta and rope_scaling
        rp = {**(getattr(hf_cfg, "rope_scaling", None) or {}), "rope_theta": getattr(hf_cfg, "rope_theta", 10000.0)}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return float(rp.get("rope_theta", 10000.0)), {}
    if kind != "llama3" or family != "llama":
        raise ConfigError(f"{family}: rope_type {kind!r} is not supported (default, and llama3 for llama)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(rp["rope_theta"]), {"type": "llama3", **{k: rp[k] for k in keys if k in rp}}


def _from_gpt2_config(c) -> ModelConfig:
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"gpt2: activation_function {c.activation_function!r} is not supported (gelu_new)")
    if c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
        raise ConfigError("gpt2: only the standard attention scaling (1/sqrt(head_dim)) is supported")
    return ModelConfig(vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                       n_kv_heads=c.n_head, ffn_dim=c.n_inner or 4 * c.n_embd, layers="A", norm="layernorm",
                       pos="learned", max_positions=c.n_positions, mlp="gelu", qk_norm=False, attn_bias=True,
                       attn_out_bias=True, mlp_bias=True, norm_eps=c.layer_norm_epsilon,
                       tie_embeddings=bool(c.tie_word_embeddings))


def from_hf_config(hf_cfg) -> ModelConfig:
    mt = getattr(hf_cfg, "model_type", None)
    if mt not in FAMILIES:
        raise unsupported(mt)
    if mt == "gpt2":
        return _from_gpt2_config(hf_cfg)
    if mt == "mamba2":
        return _from_mamba2_config(hf_cfg)
    theta, scaling = _rope(hf_cfg, mt)
    common = dict(vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
                  n_heads=hf_cfg.num_attention_heads, n_kv_heads=hf_cfg.num_key_value_heads,
                  rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(hf_cfg.tie_word_embeddings),
                  context_length=getattr(hf_cfg, "max_position_embeddings", None))
    if mt == "granitemoehybrid":
        return _from_granite_config(hf_cfg, common)
    if mt == "lfm2_moe":
        return _from_lfm2_moe_config(hf_cfg, common)
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
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"{mt}: hidden_act {hf_cfg.hidden_act!r} is not supported (silu)")
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    common.update(ffn_dim=hf_cfg.intermediate_size, head_dim=head_dim, layers="A", norm_eps=hf_cfg.rms_norm_eps)
    if mt == "llama":
        bias = bool(getattr(hf_cfg, "attention_bias", False))
        return ModelConfig(**common, qk_norm=False, attn_bias=bias, attn_out_bias=bias,
                           mlp_bias=bool(getattr(hf_cfg, "mlp_bias", False)))
    if mt in ("qwen3_moe", "qwen2_moe"):
        return _from_qwen_moe_config(mt, hf_cfg, common)
    if mt == "olmoe":
        _check_values(mt, hf_cfg, (("clip_qkv", None),))
        bias = bool(hf_cfg.attention_bias)
        moe = _routed_experts(hf_cfg, common.pop("ffn_dim"))  # OLMoE's intermediate_size is the experts' width
        return ModelConfig(**common, qk_norm=True, qk_norm_scope="all", attn_bias=bias, attn_out_bias=bias,
                           mlp="moe", mixer_opts={"moe": moe})
    if mt == "mixtral":
        _check_values(mt, hf_cfg, (("sliding_window", None),))
        moe = dict(experts=hf_cfg.num_local_experts, top_k=hf_cfg.num_experts_per_tok, norm_topk=True,
                   expert_ffn=common.pop("ffn_dim"), aux_loss_coef=float(hf_cfg.router_aux_loss_coef))
        return ModelConfig(**common, qk_norm=False, mlp="moe", mixer_opts={"moe": moe})
    if mt == "qwen2":
        if getattr(hf_cfg, "use_sliding_window", False):
            raise ConfigError("qwen2 with use_sliding_window=true is not supported")
        return ModelConfig(**common, qk_norm=False, attn_bias=True)
    if getattr(hf_cfg, "attention_bias", False):
        raise ConfigError("Qwen3 with attention_bias=true is not supported")
    types = hf_cfg.layer_types or ["full_attention"] * hf_cfg.num_hidden_layers
    wp = "".join("S" if t == "sliding_attention" else "L" for t in types)
    return ModelConfig(**common, window=hf_cfg.sliding_window or 4096, window_pattern=wp)
