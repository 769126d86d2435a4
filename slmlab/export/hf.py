"""Hugging Face transformers folders: export (Lfm2 / Qwen3 / Qwen2 / Llama ForCausalLM, GPT2LMHeadModel) and import.

The name/config mapping lives in slmlab/hf.py; this module only writes and reads folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..hf import (
    FAMILIES,
    HF_CLASSES,
    from_hf_config,
    from_hf_state_dict,
    hf_family,
    to_hf_config,
    to_hf_state_dict,
    unsupported,
    unused_hf_weights,
)
from . import DTYPES, require

HF_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_supported(mcfg):
    hf_family(mcfg)  # ConfigError naming the block/option without an exact transformers class


def special_ids(tok) -> dict:
    """config.json's and generation_config.json's token ids. bos_token_id is the token the model saw
    start every document (Tokenizer.start_id): with slmlab's own tokenizer that is eos, whose row
    trained, not <|bos|>, whose row never did (a transformers scorer starting with it scored a run's
    export worse than the run)."""
    return {k: v for k, v in (("bos_token_id", tok.start_id), ("eos_token_id", tok.eos_id),
                              ("pad_token_id", tok.pad_id)) if v is not None}


def tokenizer_roles(tok) -> dict:
    """The exported tokenizer's special-token names. slmlab's own tokenizer declares no bos_token, as
    Qwen2.5's does not, so what starts a sequence by the tokenizer's word (lm-evaluation-harness's
    prefix token, HFScorer) is eos, the token its documents start after."""
    return {f"{role}_token": name for role, name in tok.specials.items() if not (tok.is_own and role == "bos")}


def export(model, tok, cfg, out: Path, opts):
    require("transformers", "hf", "export")
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True)
    ids = special_ids(tok)
    hf_cfg = to_hf_config(cfg.model, max_position_embeddings=opts.max_len, **ids)
    hf_cfg.architectures = [HF_CLASSES[hf_family(cfg.model)]]
    hf_cfg.dtype = HF_DTYPE_NAMES[opts.dtype]
    hf_cfg.to_json_file(str(out / "config.json"))
    sd = {k: v.detach().to(DTYPES[opts.dtype]).contiguous() for k, v in to_hf_state_dict(model).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(**ids, do_sample=False).save_pretrained(str(out))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, **tokenizer_roles(tok), clean_up_tokenization_spaces=False)
    # transformers truncates and warns by this (a learned position table, gpt2, ends at max_positions)
    fast.model_max_length = opts.max_len
    fast.save_pretrained(str(out))
    return {"family": hf_family(cfg.model)}


def hf_config_file(path: Path, label: str = "") -> Path:
    """`path`'s config.json, or a one-line error: checked before transformers reads it, whose own
    error for a missing file is a paragraph. `label` prefixes the messages (the flag that named it)."""
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{label}{path} is not a transformers model folder (no config.json)")
    return config


def hf_folder_files(path: Path, label: str = "") -> tuple[Path, list[Path], Path]:
    """(config.json, safetensors weight files, tokenizer.json) of a transformers folder, each checked
    to exist, weights not loaded: what convert.py --from-hf and sample.py --hf require of it."""
    config = hf_config_file(path, label)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        weights = [single]
    elif index.is_file():
        try:
            weights = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
    else:  # a .bin is a pickle: loading it could run code
        raise ConfigError(f"{label}{path} has no model.safetensors (only safetensors checkpoints are loaded)")
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise ConfigError(f"{label}{path} has no tokenizer.json")
    return config, weights, tokenizer


def load_hf(path):
    """An HF causal-LM folder of one of FAMILIES -> (ModelConfig, our LM with its weights, Tokenizer)."""
    require("transformers", "from-hf", "hf")
    from transformers import AutoConfig

    from arch import LM

    from ..checkpoint import load_tensors

    path = Path(path)
    hf_config_file(path)  # the family is named before missing weights or tokenizer are
    try:
        hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # config.json is untrusted: transformers' own validation errors vary by version
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path / 'config.json'} is not a config slmlab can load: {msg}") from None
    if getattr(hf_cfg, "model_type", None) not in FAMILIES:
        raise ConfigError(f"{path}: {unsupported(getattr(hf_cfg, 'model_type', None))}")
    quant = getattr(hf_cfg, "quantization_config", None)
    if quant:  # FP8 / GPTQ / AWQ weights need their scales: read as plain floats they are another model
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise ConfigError(f"{path}: a quantized checkpoint ({method or 'quantization_config'}): slmlab imports "
                          "float weights; use the unquantized model's folder")
    try:  # config.json is untrusted: any value may be of the wrong type or out of range
        mcfg = from_hf_config(hf_cfg)
    except (ConfigError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path / 'config.json'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if mcfg.layer_types().count("attn") and hf_cfg.model_type == "lfm2" and mcfg.hd * mcfg.n_heads != mcfg.d_model:
        raise ConfigError("Lfm2 head_dim must equal hidden_size / num_attention_heads")
    _, weights, _ = hf_folder_files(path)
    hf_sd = {}
    for f in weights:
        hf_sd.update(load_tensors(f))
    try:
        sd = from_hf_state_dict(hf_sd, mcfg)
    except KeyError as e:
        raise CheckpointError(f"{path}: weight {e.args[0]} is missing for a {hf_cfg.model_type} model") from None
    model = LM(mcfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{path}: no weight for {missing[0]} ({len(missing)} missing)")
    unused = unused_hf_weights(hf_sd, model)
    if unused:
        raise CheckpointError(f"{path}: {len(unused)} weight(s) have no place in the model its config.json "
                              f"describes, e.g. {unused[0]} (num_hidden_layers, a bias or tie_word_embeddings "
                              "that does not match the weights?)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)}, "
                                  f"config implies {tuple(own[k].shape)}")
        if v.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise CheckpointError(f"{path}: weight {k} is stored as {v.dtype}: slmlab imports float weights "
                                  "(a quantized checkpoint needs its scales)")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    tok = _load_tokenizer(path, hf_cfg)
    if tok.vocab_size > mcfg.vocab_size:  # its last ids would index past the embedding
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model "
                              f"{mcfg.vocab_size} embedding rows (vocab_size)")
    return mcfg, model.eval(), tok


def _load_tokenizer(path: Path, hf_cfg):
    """The folder's tokenizer.json with its special tokens: named by its tokenizer_config.json, else by
    the ids config.json gives (bos/eos/pad names differ per family; an eos list means its first)."""
    from ..tokenizer import SIDECAR, Tokenizer, sidecar_specials

    tok = Tokenizer.load(path / "tokenizer.json")  # reads tokenizer_config.json beside it
    specials, named = dict(tok.specials), sidecar_specials(path / SIDECAR)
    for role in ("bos", "eos", "pad"):
        tid = getattr(hf_cfg, f"{role}_token_id", None)
        tid = tid[0] if isinstance(tid, (list, tuple)) and tid else tid
        if role not in named and isinstance(tid, int):
            name = tok.hf.id_to_token(tid)
            specials[role] = name if name is not None else specials.get(role)
    return Tokenizer(tok.hf, specials)


def import_hf(path, out: Path, force: bool = False) -> dict:
    """Write a run directory (config.yaml, model.safetensors, tokenizer.json and, for a tokenizer
    with its own special-token names, tokenizer_config.json) from an HF folder, so the trainer,
    sample.py and every exporter can use it."""
    from ..checkpoint import publish, weights_for_save
    from ..config import build
    from ..rundir import CHAT_TEMPLATE, RunDir
    from ..sft import find_template
    from . import check_out, path_size

    check_out(out, force, source=path)
    mcfg, model, tok = load_hf(path)
    with publish(out) as staged:
        run = RunDir.create(staged)
        family = "hybrid" if "conv" in mcfg.layer_types() else "transformer"
        run.write_config(build(family, {"model": mcfg.to_dict()}))
        run.write_tokenizer(tok)
        template = find_template(Path(path))
        if template is not None:  # SFT and sample.py render conversations with the family's own template
            run.write_text(CHAT_TEMPLATE, template)
        run.write_weights(weights_for_save(model), metadata={"source": f"hf:{Path(path).name}"})
    return {"format": "run", "path": str(out), "bytes": path_size(out), "params": model.num_params(),
            "layers": mcfg.layer_letters()}
