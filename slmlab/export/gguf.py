"""GGUF for llama.cpp: architecture `lfm2` (conv+attn hybrids), `qwen3` (attention with QK-norm), `qwen2`
(q/k/v biases) or `llama` (neither; Llama-3 rope scaling as llama.cpp's rope_freqs tensor); `mamba2`
(mamba2 layers without MLP) and `granitehybrid` (mamba2 + attention without QK-norm + SwiGLU or routed
experts beside a shared one), the two slmlab/hf.py maps to Mamba2ForCausalLM and
GraniteMoeHybridForCausalLM; `qwen3moe` (attention with QK-norm + model.mlp=moe, Qwen3MoeForCausalLM) and
`lfm2moe` (conv+attn hybrids with model.mlp=moe and sigmoid routing, Lfm2MoeForCausalLM), and `llama`
with experts (attention without QK-norm + model.mlp=moe, MixtralForCausalLM).

Tensor names come from slmlab/hf.py's HF mapping followed by gguf's own TensorNameMap (the table
llama.cpp's converter uses), so no name table lives here. Tokenizer metadata: our byte-level BPE is
GPT-2's scheme, so tokenizer.ggml.model = "gpt2" with pre-tokenizer "gpt-2" (the GPT-2 regex that
tokenizers' ByteLevel(use_regex=True) applies), tokens, token types (specials = control), merges.
llama.cpp's llama rotates interleaved pairs (2i, 2i+1) where HF's checkpoints rotate halves (i, i + hd/2),
so llama's q/k rows are permuted as llama.cpp's own converter does; qwen2/qwen3 rotate halves as we do.
Weight types: f32 | f16 | bf16 for matrices (--dtype), q8_0 with --quant q8_0; norms and the tiny
conv kernels stay f32 (llama.cpp reads norms as f32), and under q8_0 a matrix whose rows are not a
multiple of 32 gets the --dtype type (the report counts tensors and weights per type).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from arch.moe import MoE, expert_width

from ..errors import ConfigError
from ..hf import SSM_FAMILIES, hf_family, to_hf_state_dict
from . import require

GGUF_FAMILIES = ("lfm2", "qwen3", "llama", "qwen2", "qwen3_moe", "lfm2_moe", "mixtral", *SSM_FAMILIES)
# families whose q/k rows llama.cpp rotates as interleaved pairs (its converter undoes HF's permutation)
_INTERLEAVED_ROPE = ("llama", "mixtral", "granitemoehybrid")


def check_supported(mcfg):
    family = hf_family(mcfg)
    if family not in GGUF_FAMILIES:
        raise ConfigError(f"gguf export covers {', '.join(GGUF_FAMILIES)} models; this one is {family}")
    if mcfg.mlp_bias:
        raise ConfigError("llama.cpp's llama has no MLP biases: export mlp_bias=false models to gguf")
    if family == "qwen3" and any(w is not None for w in mcfg.layer_windows()):
        raise ConfigError("llama.cpp's qwen3 has no sliding-window attention: export window_pattern L models to gguf")
    if mcfg.mlp == "moe" and not mcfg.block_options("moe").norm_topk:
        # every llama.cpp MoE graph (build_moe_ffn with norm_w: qwen3moe, lfm2moe, llama, granitehybrid)
        # renormalises
        raise ConfigError("llama.cpp renormalises the top-k expert weights: export "
                          "model.mixer_opts.moe.norm_topk=true models to gguf")
    if family == "lfm2_moe" and mcfg.block_options("moe").routed_scale != 1.0:
        # its lfm2moe reads no expert_weights_scale (llama-cpp-python 0.3.36): the scale would be dropped
        raise ConfigError("llama.cpp's lfm2moe has no routed scale: export model.mixer_opts.moe.routed_scale=1 "
                          "models to gguf")
    if family in ("lfm2", "lfm2_moe") and mcfg.conv_bias:
        raise ConfigError("llama.cpp's lfm2 has no conv biases: export conv_bias=false models to gguf")


# The Split regexes of the byte-level BPE tokenizers llama.cpp pre-tokenizes by name (tokenizer.ggml.pre):
# Llama 3's (digits in runs of up to three) and Qwen2's (one digit at a time; Qwen 2.5/3).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1): "qwen2"}


def gguf_pre(tok) -> str:
    """llama.cpp's name for how `tok` cuts text before BPE: ByteLevel's own regex (slmlab's tokenizer,
    GPT-2's) is gpt-2, single digits first (SmolLM's and SmolLM2's) smollm; a Split by Llama 3's or
    Qwen2's regex then ByteLevel without one is llama-bpe or qwen2. Any other is refused: llama.cpp
    would cut text differently and give other tokens."""
    from ..tokenizer import _pipeline_steps

    spec = json.loads(tok.to_json())
    norm = [n.get("type") for n in _pipeline_steps(spec.get("normalizer"))]
    pre = _pipeline_steps(spec.get("pre_tokenizer"))
    kinds = [step.get("type") for step in pre]
    gpt2_regex = bool(pre) and pre[-1].get("use_regex", True) and not pre[-1].get("add_prefix_space") and not norm
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre[0].get("individual_digits") and gpt2_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not pre[1].get("use_regex", True) and norm in ([], ["NFC"]):
        name = _PRE_BY_SPLIT.get((pre[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ConfigError(f"gguf export writes tokenizers llama.cpp pre-tokenizes alike (ByteLevel with GPT-2's regex, "
                      f"after single digits or not, or a Split by Llama 3's or Qwen2's); this one has normalizer "
                      f"{norm or None} and pre-tokenizer "
                      f"{kinds or None}: llama.cpp would cut text differently")


def _tokenizer_metadata(w, tok, rows: int):
    """The token list, types, merges and special ids. A vocabulary padded past the tokenizer (an import's
    embedding of `rows` > its tokens, e.g. Qwen2.5's) gets [PAD{i}] tokens of type UNUSED up to `rows`, as
    llama.cpp's own converter writes them: llama.cpp refuses a token list shorter than token_embd."""
    import gguf

    vocab = tok.hf.get_vocab(with_added_tokens=True)
    tokens = [None] * (max(vocab.values()) + 1)
    for s, i in vocab.items():
        tokens[i] = s
    if any(t is None for t in tokens):
        raise ConfigError("tokenizer ids are not contiguous; GGUF needs a dense token list")
    if len(tokens) > rows:
        raise ConfigError(f"the tokenizer has {len(tokens)} tokens, more than the model's {rows} embedding rows")
    n_real = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_real, rows)]
    model = json.loads(tok.to_json())["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"only byte-level BPE tokenizers export to gguf (got {model.get('type')})")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = tok.special_tokens
    # An added token that is not special (data.added_tokens' <think>) has no merges that build it: llama.cpp
    # matches it whole, before BPE, only as USER_DEFINED, or as CONTROL when it looks like a control token
    # (<|...|>: Qwen2.5's <|fim_prefix|>), the types llama.cpp's own converter gives them.
    added = {t.content for t in tok.hf.get_added_tokens_decoder().values() if not t.special}
    control = special | {t for t in added if t.startswith("<|") and t.endswith("|>")}
    types = [gguf.TokenType.CONTROL if t in control else gguf.TokenType.USER_DEFINED if t in added
             else gguf.TokenType.NORMAL for t in tokens[:n_real]]
    types += [gguf.TokenType.UNUSED] * (rows - n_real)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # bos: the token documents start with (Tokenizer.start_id; eos for slmlab's own tokenizer, as --to hf)
    for add, tid in ((w.add_bos_token_id, tok.start_id), (w.add_eos_token_id, tok.eos_id),
                     (w.add_pad_token_id, tok.pad_id)):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export(model, tok, cfg, out: Path, opts):
    gguf = require("gguf", "gguf", "gguf")
    mcfg = cfg.model
    family = hf_family(mcfg)
    arch = {"lfm2": gguf.MODEL_ARCH.LFM2, "qwen3": gguf.MODEL_ARCH.QWEN3, "llama": gguf.MODEL_ARCH.LLAMA,
            "qwen2": gguf.MODEL_ARCH.QWEN2, "mamba2": gguf.MODEL_ARCH.MAMBA2, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
            "lfm2_moe": gguf.MODEL_ARCH.LFM2MOE, "mixtral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp's llama with experts
            "granitemoehybrid": gguf.MODEL_ARCH.GRANITE_HYBRID}[family]
    plain = {"fp32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
             "fp16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}[opts.dtype]
    wtype, ftype = (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0) if opts.quant == "q8_0" else plain

    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(f"slmlab-{cfg.arch}")
    w.add_context_length(opts.max_len)
    w.add_embedding_length(mcfg.d_model)
    w.add_block_count(mcfg.n_layers)
    w.add_layer_norm_rms_eps(mcfg.norm_eps)
    w.add_file_type(ftype)
    if family in SSM_FAMILIES:
        _ssm_metadata(w, mcfg, family)
    else:
        _attention_metadata(w, mcfg, family)
    if mcfg.mlp == "moe":
        _moe_metadata(w, mcfg, gguf)
    _tokenizer_metadata(w, tok, mcfg.vocab_size)

    types, fell_back = _add_tensors(w, gguf, arch, model, family, wtype, plain[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if fell_back[0]:
        print(f"note: --quant q8_0: {fell_back[0]} matrices ({fell_back[1] / sum(m for _, m in types.values()):.0%} of "
              f"the weights) have rows that are not a multiple of Q8_0's 32-weight blocks and are stored as "
              f"{plain[0].name} (--dtype {opts.dtype}); the report's tensor_types counts each type", file=sys.stderr)
    return {"arch": gguf.MODEL_ARCH_NAMES[arch], "weights": wtype.name,
            "tensor_types": {k: {"tensors": n, "weights": m} for k, (n, m) in types.items()}}


def _feed_forward_length(mcfg, family: str) -> int:
    """llama.cpp's llama (Mixtral) and granitehybrid size their experts by feed_forward_length; every other
    arch reads it as the dense MLP's width (qwen3moe and lfm2moe size experts by their own key)."""
    if mcfg.mlp == "moe" and family in ("mixtral", "granitemoehybrid"):
        return expert_width(mcfg.block_options("moe"), mcfg.ffn)
    return mcfg.ffn


def _attention_metadata(w, mcfg, family: str):
    w.add_feed_forward_length(_feed_forward_length(mcfg, family))
    w.add_head_count(mcfg.n_heads)
    if family in ("lfm2", "lfm2_moe"):
        w.add_head_count_kv([mcfg.n_kv_heads if t == "attn" else 0 for t in mcfg.layer_types()])
        w.add_vocab_size(mcfg.vocab_size)
        w.add_shortconv_l_cache(mcfg.conv_kernel)
    else:
        w.add_head_count_kv(mcfg.n_kv_heads)
        w.add_key_length(mcfg.hd)
        w.add_value_length(mcfg.hd)
    if family in ("llama", "mixtral"):
        w.add_vocab_size(mcfg.vocab_size)
        w.add_rope_dimension_count(mcfg.hd)
    w.add_rope_freq_base(mcfg.rope_theta)


def _moe_metadata(w, mcfg, gguf):
    """Expert counts and widths: qwen3moe reads expert_feed_forward_length, granitehybrid sizes its
    experts by feed_forward_length and its shared expert by expert_shared_feed_forward_length."""
    o = mcfg.block_options("moe")
    f = expert_width(o, mcfg.ffn)
    w.add_expert_count(o.experts)
    w.add_expert_used_count(o.top_k)
    w.add_expert_feed_forward_length(f)
    w.add_expert_weights_scale(o.routed_scale)
    if o.shared_ffn:
        w.add_expert_shared_feed_forward_length(o.shared_ffn)
    if o.router == "sigmoid":  # lfm2moe: its leading dense layers and sigmoid gating
        w.add_leading_dense_block_count(o.dense_layers)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _ssm_metadata(w, mcfg, family: str):
    """llama.cpp's mamba2 and granitehybrid keys, as its converter writes them for transformers'
    Mamba2ForCausalLM and GraniteMoeHybridForCausalLM (time_step_rank = the number of SSM heads)."""
    o = mcfg.block_options("mamba2")
    d_inner = o.d_inner(mcfg.d_model)
    w.add_ssm_conv_kernel(o.conv_kernel)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(o.d_state)
    w.add_ssm_time_step_rank(o.heads(mcfg.d_model))
    w.add_ssm_group_count(o.ngroups)
    if family == "mamba2":  # no attention, no MLP: llama.cpp still reads the two counts
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        return
    w.add_feed_forward_length(_feed_forward_length(mcfg, family))
    w.add_head_count(mcfg.n_heads)
    w.add_head_count_kv([mcfg.n_kv_heads if t == "attn" else 0 for t in mcfg.layer_types()])
    w.add_vocab_size(mcfg.vocab_size)
    w.add_rope_dimension_count(mcfg.hd)
    w.add_rope_freq_base(mcfg.rope_theta)
    # granitehybrid applies RoPE only under this flag (IBM's hybrids use none: model.pos=none; its
    # converter sets it for Bamba)
    w.add_rope_scaling_finetuned(mcfg.pos == "rope")
    if mcfg.mlp != "moe":  # _moe_metadata writes the MoE's
        w.add_expert_count(0)
    w.add_attention_scale(mcfg.attn_scale or mcfg.hd ** -0.5)
    w.add_embedding_scale(mcfg.embed_scale)
    w.add_residual_scale(mcfg.residual_scale)
    w.add_logit_scale(mcfg.logit_scale)


def _add_tensors(w, gguf, arch, model, family: str, wtype, fallback):
    """Add every tensor under its GGUF name; returns ({type name: [tensors, weights]}, [tensors,
    weights] of the Q8_0 matrices stored as `fallback`)."""
    names = gguf.TensorNameMap(arch, model.cfg.n_layers)
    types, fell_back = {}, [0, 0]
    for hf_name, t in gguf_tensors(model, family).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"no GGUF name for tensor {hf_name}")
        data = t.detach().float().cpu().numpy()
        if data.ndim == 3 and any(k in hf_name for k in _CONV):
            data = data.squeeze(1)  # the conv kernels: llama.cpp's shortconv and ssm_conv1d are [D, K]
        qtype, fell = _tensor_type(gguf, hf_name, data, wtype, fallback)
        _add_tensor(w, gguf, name, np.ascontiguousarray(data), qtype)
        for n in [types.setdefault(qtype.name, [0, 0])] + [fell_back] * fell:
            n[0], n[1] = n[0] + 1, n[1] + data.size
    return types, fell_back


# 2-dim tensors llama.cpp reads as f32: the conv kernels, mamba2's A and D (as [heads, 1]) and its
# grouped norm (as [groups, d_inner / groups])
_CONV = (".conv.conv.", ".conv1d.")
_F32_2D = (*_CONV, ".A_log", ".D", "mixer.norm.", "mamba.norm.")


def _tensor_type(gguf, hf_name, data, wanted, fallback):
    """(GGML type a tensor is stored in, whether it fell back): `wanted`, except norms, biases and the
    short-conv kernels (llama.cpp reads them as f32) and, for Q8_0, matrices whose rows are not a
    multiple of its 32-weight blocks (then `fallback`, the --dtype type)."""
    T = gguf.GGMLQuantizationType
    if data.ndim not in (2, 3) or any(k in hf_name for k in _F32_2D):  # 3-D: MoE expert stacks
        return T.F32, False
    if wanted == T.Q8_0 and data.shape[-1] % 32:
        return fallback, True
    return wanted, False


def _add_tensor(w, gguf, name, data, qtype):
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        w.add_tensor(name, data)
    elif qtype == T.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def interleave_rope_rows(t, n_heads: int):
    """q/k projection rows (weight or bias) from rotate-half order to llama.cpp llama's interleaved order:
    within each head, rows (i, i + hd/2) become (2i, 2i + 1)."""
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_tensors(model, family: str) -> dict:
    """HF-named tensors as llama.cpp reads them for `family`."""
    sd, cfg = to_hf_state_dict(model), model.cfg
    if cfg.mlp == "moe":
        sd = _moe_tensors(sd, model)
    if family in SSM_FAMILIES:
        sd = _ssm_tensors(sd, cfg)
    if family in _INTERLEAVED_ROPE:
        for name in list(sd):
            for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
                if f".self_attn.{proj}." in name:
                    sd[name] = interleave_rope_rows(sd[name], heads)
    if family != "llama":
        return sd
    scaled = model.layers[0].mixer.rotary.inv_freq
    if cfg.rope_scale():  # llama.cpp divides each base frequency by its rope_freqs factor
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.hd, 2, dtype=torch.float32) / cfg.hd))
        sd["rope_freqs.weight"] = base / scaled.float().cpu()
    return sd


def _moe_tensors(sd: dict, model) -> dict:
    """llama.cpp's MoE tensors from our MoE layers, in place of the family's: the router as ffn_gate_inp,
    the experts as gate, up and down stacks [E, f, d] / [E, d, f] (*_exps), a shared expert as *_shexp."""
    family_names = (".mlp.experts.", ".mlp.gate.", ".block_sparse_moe.", ".shared_mlp.", ".feed_forward.experts.",
                    ".feed_forward.gate.", ".feed_forward.expert_bias")
    out = {k: v for k, v in sd.items() if not any(n in k for n in family_names)}
    for i, layer in enumerate(model.layers):
        m, p = layer.mlp, f"model.layers.{i}.mlp"
        if not isinstance(m, MoE):  # a dense leading layer (mixer_opts.moe.dense_layers) keeps its names
            continue
        gate, up = m.w13.chunk(2, dim=1)
        out.update({f"{p}.gate.weight": m.router.weight, f"{p}.experts.gate_proj.weight": gate,
                    f"{p}.experts.up_proj.weight": up, f"{p}.experts.down_proj.weight": m.w2})
        if m.shared is not None:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{p}.shared_expert.{theirs}.weight"] = getattr(m.shared, ours).weight
        if m.opts.router == "sigmoid":  # llama.cpp's lfm2moe always reads a bias (exp_probs_b): zeros without one
            out[f"model.layers.{i}.feed_forward.expert_bias.bias"] = getattr(m, "expert_bias", torch.zeros(m.E))
    return out


def _ssm_tensors(sd: dict, cfg) -> dict:
    """What llama.cpp's converter makes of Mamba2ForCausalLM / GraniteMoeHybridForCausalLM tensors: dt_bias
    named as dt_proj's bias, A = -exp(A_log) and D as [heads, 1], the gated norm as [groups, d_inner /
    groups]; Granite's fused gate|up MLP split into gate and up, its down as a plain FFN's."""
    o = cfg.block_options("mamba2")
    groups, d_inner = o.ngroups, o.d_inner(cfg.d_model)
    out = {}
    for name, t in sd.items():
        if name.endswith(".dt_bias"):
            out[name.removesuffix(".dt_bias") + ".dt_proj.bias"] = t
        elif name.endswith(".A_log"):
            out[name] = -t.float().exp()[:, None]
        elif name.endswith(".D"):
            out[name] = t[:, None]
        elif name.endswith(("mixer.norm.weight", "mamba.norm.weight")):
            out[name] = t.reshape(groups, d_inner // groups)
        elif name.endswith("shared_mlp.input_linear.weight"):
            gate, up = t.chunk(2)
            stem = name.removesuffix("shared_mlp.input_linear.weight")
            out[stem + "mlp.gate_proj.weight"], out[stem + "mlp.up_proj.weight"] = gate, up
        elif name.endswith("shared_mlp.output_linear.weight"):
            out[name.removesuffix("shared_mlp.output_linear.weight") + "mlp.down_proj.weight"] = t
        else:
            out[name] = t
    return out


def open_llama(path, repack: bool = True, **kw):
    """llama_cpp.Llama(model_path=path, **kw); repack=False turns off llama.cpp's extra weight buffers (the
    AMX / repacked layouts, `llama-cli --no-repack`), which Llama() does not expose. Measured 2026-12-02:
    llama-cpp-python 0.3.36 segfaults evaluating any quantized file (Q8_0, Q4_0, llama.cpp's own
    quantizer's too) on this project's AMX CPUs with them on, and runs it with them off."""
    from unittest.mock import patch

    import llama_cpp
    import llama_cpp.llama

    api = llama_cpp.llama.llama_cpp  # the C API module Llama() reads its defaults from
    defaults = api.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with patch.object(api, "llama_model_default_params", defaults if repack else no_repack):
        return llama_cpp.Llama(model_path=str(path), **kw)


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata {key: value}, tensors {name: float32 array in our orientation}) via gguf.GGUFReader."""
    gguf = require("gguf", "gguf", "gguf")
    r = gguf.GGUFReader(str(path))
    meta = {}
    for f in r.fields.values():
        try:
            meta[f.name] = f.contents()
        except Exception:  # pragma: no cover - exotic field types
            pass
    tensors = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return meta, tensors
