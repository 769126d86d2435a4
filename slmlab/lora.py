"""LoRA adapters through peft (train.lora): inject, report, merge.

Adapters are injected into the LM in place (peft's inject_adapter_in_model), not wrapped in a
PeftModel, so the trainer, generate and the exporters keep seeing an LM. peft freezes every base
weight; the optimizer routing skips frozen parameters. A LoRA run's weight files hold the adapter
tensors only (checkpoint.weights_for_save keeps the names with ADAPTER_MARK); its base is the run
named by train.init_from, and RunDir.load_weights rebuilds base + adapters and merges them.
"""
from __future__ import annotations

import torch

from .errors import ConfigError

ADAPTER_MARK = ".lora_"
ALL_LINEAR = "all-linear"  # in train.lora.targets: every nn.Linear but the head, whatever the blocks name them  # in every adapter parameter's name: layers.0.mlp.w1.lora_A.default.weight


def has_adapters(model: torch.nn.Module) -> bool:
    return any(ADAPTER_MARK in n for n, _ in model.named_parameters())


def apply_lora(model: torch.nn.Module, lora) -> torch.nn.Module:
    """Inject adapters of rank lora.r into the modules whose names end in one of lora.targets
    ("all-linear": every linear layer but the head) and freeze everything else. ConfigError if a target matches no module (a typo would otherwise
    train nothing)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("train.lora needs peft: pip install -e '.[finetune]'") from None

    names = [n for n, _ in model.named_modules()]
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head"})
    targets = sorted({x for t in lora.targets for x in (linears if t == ALL_LINEAR else [t])})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(f"train.lora.targets {missing} match no module of the model; its linear layers: "
                          f"{', '.join(linears)}")
    if any(n == t or n.endswith("." + t) for t in targets for n in ("lm_head", "embed")):
        raise ConfigError("train.lora.targets: the embedding and head are not adapted (tied weights)")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        inject_adapter_in_model(cfg, model)
    except ValueError as e:  # e.g. a target that names a non-linear module (a norm, the depthwise conv)
        raise ConfigError(f"train.lora.targets: {str(e).splitlines()[0]}") from None
    return model


def trainable_report(model: torch.nn.Module) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return f"LoRA: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)"


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (W += B A * alpha / r) and put the plain base
    layer back, so the model is an ordinary LM again (same parameter names as without LoRA)."""
    from peft.tuners.lora import LoraLayer

    parents = dict(model.named_modules())
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            base = module.get_base_layer()
            base.weight.requires_grad_(True)
            setattr(parents[parent] if parent else model, child, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
