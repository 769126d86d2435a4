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

ADAPTER_MARK = ".lora_"  # in every adapter parameter's name: layers.0.mlp.w1.lora_A.default.weight
ADDED_ROWS_MARK = ".added_rows"  # the trainable rows of tokens data.added_tokens appended (AddedRows)
ALL_LINEAR = "all-linear"  # in train.lora.targets: every nn.Linear but the head, whatever the blocks name them
# In train.lora.targets: every block's weight stacks (matrix_stacks: model.mlp=moe's expert weights w13, w2),
# adapted per expert by peft's target_parameters (lora.ParamWrapper: A [E r, in], B [out, E r]).
EXPERTS = "experts"


def is_adapter_key(name: str) -> bool:
    """A weight a LoRA run saves: its adapters and its added tokens' rows (the rest is the base's)."""
    return ADAPTER_MARK in name or ADDED_ROWS_MARK in name


class AddedRows(torch.nn.Module):
    """A parametrization of the embedding (and head) weight: the base's first `n_old` rows, frozen,
    then trainable rows for the tokens data.added_tokens appended (`n_old` is the base tokenizer's
    size: in a padded vocabulary the new tokens take padding rows, which train too, as do the
    unused padding rows after them). Without it a LoRA run could not
    learn its new tokens: the embedding is frozen, so their rows would stay at the mean row they
    start from and, under a tied head, every new token would get the same logit. Only the new rows
    train and are saved, not the whole matrix (peft's modules_to_save would train all of it)."""

    def __init__(self, weight: torch.Tensor, n_old: int):
        super().__init__()
        self.n_old = n_old
        self.added_rows = torch.nn.Parameter(weight.detach()[n_old:].clone())

    def forward(self, weight):
        return torch.cat([weight[:self.n_old], self.added_rows])


def added_rows_in(sd: dict) -> int:
    """How many embedding rows a LoRA run's weight file `sd` trained as AddedRows (0: none)."""
    return next((v.shape[0] for k, v in sd.items() if ADDED_ROWS_MARK in k), 0)


def saved_part(sd: dict) -> dict:
    """What a run's weight file holds of state dict `sd`: a LoRA model's adapters and added rows only
    (its base is train.init_from's), any other model's whole state."""
    return {k: v for k, v in sd.items() if is_adapter_key(k)} if any(ADAPTER_MARK in k for k in sd) else sd


def apply_lora(model: torch.nn.Module, lora, n_old: int | None = None) -> torch.nn.Module:
    """Inject adapters of rank lora.r into the modules whose names end in one of lora.targets
    ("all-linear": every linear layer but the head) and freeze everything else. ConfigError if a
    target matches no module (a typo would otherwise train nothing) or a module that is not nn.Linear. With `n_old` below the model's
    vocabulary (data.added_tokens grew it from the base's n_old), the added rows of the embedding and
    head stay trainable (AddedRows)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("train.lora needs peft: pip install -e '.[finetune]'") from None

    modules = dict(model.named_modules())
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                      if isinstance(m, torch.nn.Linear) and n != "lm_head"})
    stacks = expert_stacks(model, lora) if EXPERTS in lora.targets else []
    targets = sorted({x for t in lora.targets if t != EXPERTS for x in (linears if t == ALL_LINEAR else [t])})
    matched = {t: [n for n in modules if n == t or n.endswith("." + t)] for t in targets}  # peft's suffix rule
    missing = [t for t, found in matched.items() if not found]
    if missing:
        raise ConfigError(f"train.lora.targets {missing} match no module of the model; its linear layers: "
                          f"{', '.join(linears)}")
    if any(n == t or n.endswith("." + t) for t in targets for n in ("lm_head", "embed")):
        raise ConfigError("train.lora.targets: the embedding and head are not adapted (tied weights)")
    # peft also wraps convolutions, but the short conv reads its weight directly (the adapter would never
    # run) and merge_lora folds linear adapters only.
    other = next((n for found in matched.values() for n in found
                  if not isinstance(modules[n], torch.nn.Linear)), None)
    if other is not None:
        raise ConfigError(f"train.lora.targets: {other} is a {type(modules[other]).__name__}, not a linear layer; "
                          f"the linear layers: {', '.join(linears)}")
    inject_adapter_in_model(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=targets, target_parameters=stacks or None), model)
    if n_old is not None and n_old < model.embed.weight.shape[0]:
        train_added_rows(model, n_old)
    return model


def stack_names(model: torch.nn.Module) -> list[str]:
    """Full names of the channel mixers' weight stacks (matrix_stacks), e.g. layers.0.mlp.w13. Token
    mixers' are left out: peft's wrapper would hide their state and decode methods from the LM."""
    return [f"layers.{i}.mlp.{p}" for i, layer in enumerate(model.layers)
            for p in getattr(layer.mlp, "matrix_stacks", ())]


def expert_stacks(model: torch.nn.Module, lora) -> list[str]:
    """The stacks train.lora.targets' `experts` adapts, or ConfigError where it cannot."""
    stacks = stack_names(model)
    if not stacks:
        raise ConfigError(f"train.lora.targets: {EXPERTS} adapts the expert weight stacks of model.mlp=moe; "
                          f"this model has none")
    if lora.dropout:
        raise ConfigError(f"train.lora.dropout={lora.dropout} with targets: {EXPERTS}: peft adapts a weight stack "
                          f"by adding B A to the weight, leaving no input to drop; set train.lora.dropout=0")
    return stacks


def train_added_rows(model: torch.nn.Module, n_old: int):
    from torch.nn.utils import parametrize

    rows = AddedRows(model.embed.weight, n_old)
    tied = model.lm_head.weight is model.embed.weight
    parametrize.register_parametrization(model.embed, "weight", rows)
    # A tied head shares the one parametrization, so a new token's input and output rows stay one row.
    head_rows = rows if tied else AddedRows(model.lm_head.weight, n_old)
    parametrize.register_parametrization(model.lm_head, "weight", head_rows)


def trainable_report(model: torch.nn.Module) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # AddedRows' trainable rows stand in for the same rows of the frozen original matrix: count them once.
    shadow = sum(m.added_rows.numel() for m in model.modules() if isinstance(m, AddedRows))
    n_all = sum(p.numel() for p in model.parameters()) - shadow
    out = f"LoRA: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)"
    from peft.tuners.lora.layer import ParamWrapper

    wrapped = {m.get_base_layer() for m in model.modules() if isinstance(m, ParamWrapper)}
    frozen = [m for layer in model.layers for m in layer.parts()[1:] if getattr(m, "matrix_stacks", ())
              and m not in wrapped]
    if frozen:
        out += f"; the expert stacks of {len(frozen)} layers stay frozen (add {EXPERTS} to train.lora.targets to adapt them)"
    if any(getattr(m, "expert_bias", None) is not None for m in model.mixers()):
        out += "; the expert bias stays the base's (not moved by bias_update_rate)"
    return out


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
            setattr(parents[parent] if parent else model, child, module.get_base_layer())
    fold_added_rows(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def fold_added_rows(model: torch.nn.Module):
    """Replace the AddedRows parametrizations by plain weights holding the trained rows."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(model.embed, "weight"):
        return
    tied = model.lm_head.parametrizations.weight[0] is model.embed.parametrizations.weight[0]
    for m in (model.embed, model.lm_head):
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    if tied:  # removing gave each module its own copy of the weight
        model.lm_head.weight = model.embed.weight
