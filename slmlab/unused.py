"""Settings that a resolved config never reads, and why.

`optim.muon_momentum` does nothing under `optim.name: adamw`, `train.seq_len` nothing while
`train.phases` gives every stage its own, `objective.mask_id` nothing under `ar`. Such a setting is
accepted (one config may serve both cases, and an ablation's common overrides meet every variant)
but never silently: train.py prints a `note:` line for each one its command line changed, and
ablate.py refuses a variant whose every difference from the baseline is one (it would train the
baseline again and report a null result).

Block-specific keys (conv_kernel, n_heads, ...) count as unused only when every block in the model
is a built-in one: a researcher's own block (model.imports) may read any model key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import yaml

from arch.registry import CHANNEL_MIXERS, MIXERS, NO_MLP, is_builtin

from .config import RunConfig
from .phases import lr_mult


def _builtin_blocks(cfg: RunConfig) -> bool:
    m = cfg.model
    return all(is_builtin(MIXERS[t]) for t in m.layer_types()) and (m.mlp == NO_MLP or is_builtin(CHANNEL_MIXERS[m.mlp]))


def _without(block: str, what: str) -> Callable[[RunConfig], Optional[str]]:
    def why(cfg: RunConfig) -> Optional[str]:
        if block in cfg.model.layer_types() or not _builtin_blocks(cfg):
            return None
        return f"no layer is {what} (model.layers {cfg.model.layer_letters()})"
    return why


def _unless(key: str, *used: Any) -> Callable[[RunConfig], Optional[str]]:
    """Unused unless config key `key` (section.name) has one of the values `used`."""
    section, name = key.split(".")

    def why(cfg: RunConfig) -> Optional[str]:
        value = getattr(getattr(cfg, section), name)
        return None if value in used else f"{key} is {show(value)}"
    return why


def _window(cfg: RunConfig) -> Optional[str]:
    if any(w is not None for w in cfg.model.layer_windows()):
        return None
    return _no_window_layer(cfg) or (f"no layer slides a window (model.window_pattern is {cfg.model.window_pattern}: "
                                     "S marks sliding layers)")


def _no_window_layer(cfg: RunConfig) -> Optional[str]:
    if any(MIXERS[t].takes_window for t in cfg.model.layer_types()):
        return None
    return "no layer takes a window (attention does)"


def _phases_set_every_batch(cfg: RunConfig) -> bool:
    """Phases are set and each gives tokens_per_step: otherwise a phase takes batch_size x train.seq_len x
    grad_accum tokens a step, and both train.batch_size and train.seq_len are read."""
    return bool(cfg.train.phases) and all(p.tokens_per_step is not None for p in cfg.train.phases)


def _seq_len(cfg: RunConfig) -> Optional[str]:
    if not _phases_set_every_batch(cfg):
        return None
    lens = ", ".join(str(p.seq_len) for p in cfg.train.phases)
    return f"train.phases gives each stage its seq_len ({lens}); train.phases=[] trains one stage at train.seq_len"


def _batch_size(cfg: RunConfig) -> Optional[str]:
    if not _phases_set_every_batch(cfg):
        return None
    return "every train.phases entry gives its tokens_per_step, which sets the batch"


def _quality_score(cfg: RunConfig) -> Optional[str]:
    return None if any(p.order == "quality" for p in cfg.train.phases) else "no train.phases entry has order: quality"


def _mixer_opts(cfg: RunConfig, name: str, option: Optional[str] = None) -> Optional[str]:
    """Why block `name`'s options (or its one `option`) are not read: no layer uses the block, or
    OPTION_RULES says the option is not read under the block's other options."""
    if name not in cfg.model.layer_types() and cfg.model.mlp != name:
        return f"no layer uses the {name} block (model.layers, model.mlp)"
    rule = OPTION_RULES.get((name, option))
    block = MIXERS.get(name) or CHANNEL_MIXERS.get(name)
    return rule(cfg.model.block_options(name)) if rule and is_builtin(block) else None


# (block, option) -> why the built-in block does not read the option under its other options.
OPTION_RULES: dict[tuple[str, str], Callable[[Any], Optional[str]]] = {
    ("moe", "bias_update_rate"): lambda o: None if o.expert_bias else "model.mixer_opts.moe.expert_bias is false "
                                                                    "(no expert bias to update)",
}


def _sft_eval_examples(cfg: RunConfig) -> Optional[str]:
    from .errors import SlmlabError
    from .sft import detect_format

    try:
        sft = detect_format(cfg.data.spec, cfg.data.format)
    except (SlmlabError, OSError):  # the data's own check says what is wrong with it
        return None
    return None if sft else "data.spec is no SFT data (a chat or prompt/completion .jsonl)"


def _mlp_bias(cfg: RunConfig) -> Optional[str]:
    # the built-in LIF channel mixer has no biases; a researcher's own channel mixer may read the key
    if cfg.model.mlp == "lif" and is_builtin(CHANNEL_MIXERS["lif"]):
        return "model.mlp is lif (it has no biases)"
    return _no_mlp(cfg)


def _ffn_dim(cfg: RunConfig) -> Optional[str]:
    # the built-in moe derives its experts' width from model.ffn_dim unless its expert_ffn is set; its
    # dense leading layers (dense_layers) are model.ffn_dim wide
    moe = cfg.model.block_options("moe")
    if cfg.model.mlp == "moe" and is_builtin(CHANNEL_MIXERS["moe"]) and _builtin_blocks(cfg) \
            and moe.expert_ffn and not moe.dense_layers:
        return "model.mixer_opts.moe.expert_ffn sets the experts' width"
    return _no_mlp(cfg)


def _no_mlp(cfg: RunConfig) -> Optional[str]:
    # a researcher's own token mixer may read model.ffn_dim
    if cfg.model.mlp == NO_MLP and _builtin_blocks(cfg):
        return f"model.mlp is {NO_MLP} (no channel mixer)"
    return None


def _min_lr_frac(cfg: RunConfig) -> Optional[str]:
    # The floor shapes the decay only past its first step (which runs at full lr), and the last step is
    # the deepest into it: if the floor does not change the last step's lr, it changes none.
    t = cfg.train
    last = t.steps - 1
    if lr_mult(last, dataclasses.replace(t, min_lr_frac=0.0)) != lr_mult(last, dataclasses.replace(t, min_lr_frac=1.0)):
        return None
    if t.schedule == "wsd" and t.decay_frac == 0:
        return "train.decay_frac is 0: the wsd schedule never decays"
    return f"no step of the {t.steps} decays below the full lr (train.schedule {t.schedule})"


def _heads(key: str) -> Callable[[RunConfig], Optional[str]]:
    """model.n_heads / model.head_dim: attention reads them, and so does deltanet for the head count and
    size its own options leave null (the head size defaults to d_model // n_heads)."""
    def why(cfg: RunConfig) -> Optional[str]:
        reason = NO_ATTN(cfg)
        if reason is None or "deltanet" not in cfg.model.layer_types():
            return reason
        o = cfg.model.block_options("deltanet")
        size_unset = o.head_dim is None
        if key == "head_dim" and size_unset or key == "n_heads" and (o.heads is None or size_unset and not cfg.model.head_dim):
            return None
        return f"{reason}, and model.mixer_opts.deltanet sets its own {'head_dim' if key == 'head_dim' else 'heads'}"
    return why


MDLM = _unless("objective.name", "mdlm")
MUON = _unless("optim.name", "muon")
NO_ATTN = _without("attn", "attention")
# Dotted key -> why it is unused in a config, or None when it is read.
RULES: dict[str, Callable[[RunConfig], Optional[str]]] = {
    "objective.mask_id": MDLM, "objective.eval_t_samples": MDLM, "objective.block_length": MDLM,
    **{f"optim.{k}": MUON for k in ("muon_lr", "muon_momentum", "muon_nesterov", "muon_ns_steps",
                                    "muon_adjust_lr_fn", "muon_weight_decay", "muon_ns_dtype")},
    "train.seq_len": _seq_len, "train.batch_size": _batch_size, "train.quality_score": _quality_score,
    "train.decay_frac": _unless("train.schedule", "wsd"), "train.min_lr_frac": _min_lr_frac,
    "train.avg_last": lambda c: ("averaging one checkpoint is that checkpoint (K > 1 averages)"
                                 if c.train.avg_last == 1 else None),
    "train.distill_alpha": lambda c: None if c.train.teacher else "train.teacher is not set",
    "train.distill_temperature": lambda c: None if c.train.teacher else "train.teacher is not set",
    **{f"train.lora.{k}": (lambda c: None if c.train.lora.r else "train.lora.r is 0 (no adapters)")
       for k in ("alpha", "dropout", "targets")},
    "train.keep_checkpoints": lambda c: None if c.train.ckpt_every else "train.ckpt_every is 0 (no checkpoints)",
    "train.sample_prompt": lambda c: None if c.train.sample_tokens else "train.sample_tokens is 0",
    "train.eval_tasks_limit": lambda c: None if c.train.eval_tasks else "train.eval_tasks is empty (no tasks)",
    "train.sft_eval_examples": _sft_eval_examples,
    "logging.wandb_project": _unless("logging.wandb", True), "logging.wandb_mode": _unless("logging.wandb", True),
    "model.window": _window, "model.window_pattern": _no_window_layer,
    "model.max_positions": _unless("model.pos", "learned"),
    "model.rope_theta": lambda c: _unless("model.pos", "rope")(c) or NO_ATTN(c),
    "model.rope_scaling": lambda c: _unless("model.pos", "rope")(c) or NO_ATTN(c),
    **{f"model.{k}": NO_ATTN for k in ("n_kv_heads", "qk_norm", "attn_bias", "attn_out_bias", "attn_scale")},
    "model.qk_norm_scope": lambda c: NO_ATTN(c) or _unless("model.qk_norm", True)(c),
    "model.n_heads": _heads("n_heads"), "model.head_dim": _heads("head_dim"),
    "model.conv_kernel": _without("conv", "a short conv"), "model.conv_bias": _without("conv", "a short conv"),
    "model.mlp_bias": _mlp_bias, "model.ffn_dim": _ffn_dim,
}


def why_unused(cfg: RunConfig, key: str) -> Optional[str]:
    """Why `cfg` never reads dotted key `key` (as `settings` names it), or None when it does."""
    if key.startswith("model.mixer_opts."):
        parts = key.split(".")
        return _mixer_opts(cfg, parts[2], parts[3] if len(parts) > 3 else None)
    rule = RULES.get(key)
    return rule(cfg) if rule else None


def setting_key(key: str) -> Optional[str]:
    """An override's dotted key as `settings` names it (one block option, "model.mixer_opts.lif.beta",
    is a setting; "model.mixer_opts.lif" names the block's); None for a key that sets several blocks or
    adapter options at once (model.mixer_opts, train.lora)."""
    parts = key.split(".")
    if parts[:2] == ["model", "mixer_opts"]:
        return ".".join(parts[:4]) if len(parts) >= 3 else None
    if parts[:2] == ["train", "lora"]:
        return ".".join(parts[:3]) if len(parts) >= 3 else None
    return key


def settings(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of `cfg` by dotted key, mixer_opts and lora one level down (each block's options
    and each adapter option is a setting), the layer pattern as the tiled block list (so "CCA" and
    "conv,conv,attn,conv,conv,attn" are one setting) and phases as plain data."""
    out: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if section == "arch":
            continue
        for k, v in values.items():
            if (section, k) == ("model", "mixer_opts"):  # each block option a setting, as OPTION_RULES reads them
                out.update({f"model.mixer_opts.{name}.{o}": x for name, opts in v.items() for o, x in (opts or {}).items()})
            elif (section, k) == ("train", "lora"):
                out.update({f"train.lora.{name}": opt for name, opt in v.items()})
            else:
                out[f"{section}.{k}"] = v
    out["model.layers"] = cfg.model.layer_types()
    return out


def changed(cfg: RunConfig, base: RunConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from `base`."""
    a, b = settings(cfg), settings(base)
    return [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]


def unused_changes(cfg: RunConfig, base: RunConfig) -> list[str]:
    """'KEY=VALUE has no effect: WHY' for each setting `cfg` changes from `base` that it never reads."""
    now = settings(cfg)
    lines = []
    for key in sorted(changed(cfg, base)):
        why = why_unused(cfg, key)
        if why:
            lines.append(f"{key}={show(now.get(key))} has no effect: {why}")
    return lines


def show(value) -> str:
    """A setting's value as an override would spell it (YAML flow for lists and mappings)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return str(value).lower() if isinstance(value, bool) else str(value)
