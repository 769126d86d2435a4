"""Optimizers: AdamW alone, or Muon for hidden matrices + AdamW for everything else.

Muon orthogonalises the momentum of a 2-D weight (Newton-Schulz), which only makes sense for
matrices that map one hidden space to another. Embeddings and an untied head are lookups /
classifiers over the vocabulary, norms/biases/scalars are vectors, and depthwise conv kernels are
per-channel filters: those stay on AdamW (as in Keller Jordan's and Moonshot's setups).

Routing is by parameter, printed at start, and asserted complete: every trainable parameter lands
in exactly one group. Both optimizers are stepped together behind `CombinedOptimizer`, which the
trainer and the checkpoint code treat as one optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

OPTIMIZERS = ("muon", "adamw")
MUON_ADJUST = ("original", "match_rms_adamw")


@dataclass
class Route:
    group: str  # muon | adamw_decay | adamw_no_decay
    names: list
    params: list

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def is_hidden_matrix(name: str, p: torch.Tensor, model) -> bool:
    """A 2-D weight between hidden spaces: not the token embedding and not the output head."""
    if p.dim() != 2:
        return False
    if name.startswith(("embed.", "lm_head.")) or ".embed" in name:
        return False
    head = getattr(model, "lm_head", None)
    emb = getattr(model, "embed", None)
    for m in (head, emb):
        if m is not None and getattr(m, "weight", None) is p:
            return False
    return True


def route_params(model, name: str) -> list[Route]:
    """Split trainable parameters into optimizer groups. AdamW weight decay goes to matrices and
    embeddings only (never norms, biases, scalars or depthwise kernels)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of: {', '.join(OPTIMIZERS)}; got {name!r}")
    routes = {g: Route(g, [], []) for g in ("muon", "adamw_decay", "adamw_no_decay")}
    for n, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if name == "muon" and is_hidden_matrix(n, p, model):
            g = "muon"
        elif p.dim() == 2:
            g = "adamw_decay"
        else:
            g = "adamw_no_decay"
        routes[g].names.append(n)
        routes[g].params.append(p)
    out = [r for r in routes.values() if r.params]
    # Completeness: every trainable parameter exactly once.
    ids = [id(p) for r in out for p in r.params]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)), "a parameter was routed to two optimizer groups"
    assert set(ids) == trainable, "some trainable parameters were not routed to any optimizer group"
    return out


def describe_routes(routes: list[Route]) -> str:
    lines = []
    for r in routes:
        shown = ", ".join(r.names[:4]) + (f", ... (+{len(r.names) - 4})" if len(r.names) > 4 else "")
        lines.append(f"  {r.group:<15} {len(r.params):>4} tensors {r.numel / 1e6:>8.3f}M params: {shown}")
    return "optimizer routing:\n" + "\n".join(lines)


class CombinedOptimizer:
    """Several torch optimizers stepped as one. Every param group remembers its base `lr`, and
    `set_lr_mult(m)` sets lr = base_lr * m in all of them, so one schedule drives both Muon and
    AdamW."""

    def __init__(self, optimizers: dict):
        self.optimizers = optimizers
        for opt in optimizers.values():
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_mult(self, m: float):
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * m

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_state_dict(self, sd: dict):
        if set(sd) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(sd)}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(sd[k])


def build_optimizer(model, ocfg, verbose: bool = True) -> CombinedOptimizer:
    """`ocfg` is the optim config section (name, lr, betas, eps, weight_decay, muon_*)."""
    routes = route_params(model, ocfg.name)
    if verbose:
        print(describe_routes(routes))
    by = {r.group: r for r in routes}
    opts = {}
    adam_groups = []
    if "adamw_decay" in by:
        adam_groups.append({"params": by["adamw_decay"].params, "weight_decay": ocfg.weight_decay})
    if "adamw_no_decay" in by:
        adam_groups.append({"params": by["adamw_no_decay"].params, "weight_decay": 0.0})
    if adam_groups:
        opts["adamw"] = torch.optim.AdamW(adam_groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    if "muon" in by:
        if ocfg.muon_adjust_lr_fn not in MUON_ADJUST:
            raise ConfigError(f"optim.muon_adjust_lr_fn must be one of {', '.join(MUON_ADJUST)}, "
                              f"got {ocfg.muon_adjust_lr_fn!r}")
        muon_lr = ocfg.muon_lr if ocfg.muon_lr is not None else ocfg.lr
        wd = ocfg.muon_weight_decay if ocfg.muon_weight_decay is not None else ocfg.weight_decay
        opts["muon"] = torch.optim.Muon(by["muon"].params, lr=muon_lr, weight_decay=wd,
                                        momentum=ocfg.muon_momentum, nesterov=ocfg.muon_nesterov,
                                        ns_steps=ocfg.muon_ns_steps, adjust_lr_fn=ocfg.muon_adjust_lr_fn)
    return CombinedOptimizer(opts)
