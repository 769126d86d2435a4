"""Training phases (a context-length curriculum as data) and the global learning-rate schedule.

`train.phases` is a list of stages; each stage says how long the sequences are, which share of
the run's optimizer steps it gets, how many tokens one optimizer step sees (the batch shrinks as
sequences grow), a learning-rate multiplier, and optionally its own data, attention window and
document ordering. The trainer only ever asks "which phase is step s in?": no branching code per
stage. An empty list means one stage built from train.seq_len / train.batch_size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .coerce import AT_LEAST_1, NON_NEGATIVE, UNIT, Range, check_ranges
from .errors import ConfigError

ORDERS = ("random", "quality")


@dataclass
class PhaseConfig:
    """One entry of train.phases as the user writes it (typed and range-checked at config load)."""

    seq_len: int
    share: Optional[float] = None  # required when there is more than one phase
    tokens_per_step: Optional[int] = None  # null = train.batch_size * train.seq_len * train.grad_accum
    lr_mul: float = 1.0
    data: Optional[str] = None  # a data spec; null = the run's data.spec
    window: Optional[int] = None  # sliding-window size for S layers in this phase
    order: str = "random"  # random windows | quality: documents low -> high score, in order
    top_frac: float = 1.0  # with order=quality: train only on the top fraction (repeated as needed)

    def check(self, where: str):
        # Range refuses NaN and inf too: a NaN share crashed the step split, a NaN lr_mul trained NaN steps.
        check_ranges(self, where, {"seq_len": AT_LEAST_1, "tokens_per_step": AT_LEAST_1, "share": UNIT,
                                   "lr_mul": NON_NEGATIVE, "window": AT_LEAST_1,
                                   "top_frac": Range(0, 1, lo_open=True)})
        if self.order not in ORDERS:
            raise ConfigError(f"{where}: order must be one of {', '.join(ORDERS)}, got {self.order!r}")



@dataclass
class Phase:
    """A PhaseConfig placed on the run's step axis, with its tokens per step resolved."""

    index: int
    seq_len: int
    share: float
    tokens_per_step: int
    lr_mul: float = 1.0
    data: Optional[str] = None
    window: Optional[int] = None
    order: str = "random"
    top_frac: float = 1.0
    steps: int = 0
    start: int = 0  # first global step (0-based) of this phase

    def batch_size(self, grad_accum: int, world: int = 1) -> int:
        """Sequences per micro-batch per rank."""
        return self.tokens_per_step // (self.seq_len * grad_accum * world)

    def describe(self) -> str:
        extra = "".join(f" {k}={getattr(self, k)}" for k in ("data", "window") if getattr(self, k) is not None)
        if self.order != "random":
            extra += f" order={self.order} top_frac={self.top_frac}"
        steps = (f"steps {self.start + 1}-{self.start + self.steps}" if self.steps
                 else "no steps (share 0)" if self.share == 0 else "no steps (train.steps too few)")
        return (f"phase {self.index + 1}: {steps} seq_len {self.seq_len} tokens/step {self.tokens_per_step} "
                f"lr_mul {self.lr_mul}{extra}")


def resolve_phases(cfg, world: int = 1) -> list[Phase]:
    """train.phases (typed PhaseConfigs) -> Phases with steps assigned (shares of train.steps,
    rounded so they sum exactly). Raises a one-line ConfigError on any cross-field inconsistency."""
    t = cfg.train
    default_tps = t.batch_size * t.seq_len * t.grad_accum
    raw = t.phases or [PhaseConfig(seq_len=t.seq_len, share=1.0, tokens_per_step=default_tps)]
    phases = []
    for i, p in enumerate(raw):
        where = f"train.phases[{i}]"
        if p.share is None and len(raw) > 1:
            raise ConfigError(f"{where}: share is required when there is more than one phase")
        if p.order == "quality" and not t.quality_score:
            raise ConfigError(f"{where}: order=quality needs train.quality_score (a jsonl field or fn:NAME)")
        if p.top_frac != 1.0 and p.order != "quality":
            raise ConfigError(f"{where}: top_frac={p.top_frac} keeps the best-scored documents, so it needs "
                              f"order: quality (this phase's order is {p.order}); add order: quality or drop top_frac")
        if p.window is not None and all(w is None for w in cfg.model.layer_windows()):
            raise ConfigError(f"{where}: window={p.window} resizes sliding-window (S) attention layers and this model "
                              f"has none (model.layers={cfg.model.layers!r}, model.window_pattern="
                              f"{cfg.model.window_pattern!r}); drop the phase's window or put S in model.window_pattern")
        ph = Phase(index=i, seq_len=p.seq_len, share=1.0 if p.share is None else p.share,
                   tokens_per_step=p.tokens_per_step or default_tps, lr_mul=p.lr_mul, data=p.data,
                   window=p.window, order=p.order, top_frac=p.top_frac)
        unit = ph.seq_len * t.grad_accum * world
        if ph.tokens_per_step % unit:
            raise ConfigError(
                f"{where}: tokens_per_step {ph.tokens_per_step} is not divisible by seq_len {ph.seq_len}"
                f" x grad_accum {t.grad_accum}" + (f" x {world} ranks" if world > 1 else "")
                + f" (= {unit}): the batch must be a whole number of sequences per rank; e.g. tokens_per_step "
                f"{-(-ph.tokens_per_step // unit) * unit} (set it per phase in train.phases)")
        phases.append(ph)
    total_share = sum(p.share for p in phases)
    if abs(total_share - 1.0) > 1e-6:
        raise ConfigError(f"train.phases shares sum to {total_share:g}, not 1: "
                          f"[{', '.join(f'{p.share:g}' for p in phases)}]")
    # Cumulative rounding: phase ends land on round(steps * cumulative share), so --steps N scales
    # every phase proportionally and the steps add up to N exactly.
    acc, prev = 0.0, 0
    for p in phases:
        acc += p.share
        end = min(t.steps, round(t.steps * acc)) if p is not phases[-1] else t.steps
        p.start, p.steps = prev, end - prev
        prev = end
    return phases


def phase_windows(base_windows: list, window: Optional[int]) -> list:
    """Per-layer attention windows in a phase: only layers built with a window (S layers) take the
    phase's `window`; full-attention and non-attention layers keep theirs."""
    return [window if w is not None and window else w for w in base_windows]


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that global step `step` (0-based) belongs to."""
    for p in phases:
        if p.start <= step < p.start + p.steps:
            return p
    return phases[-1]


def lr_mult(step: int, t) -> float:
    """Global schedule multiplier in (min_lr_frac, 1] at optimizer step `step` (0-based): linear
    warmup, then WSD (flat, then linear decay over the last decay_frac of the steps) or cosine.
    Both decays start at 1 and would reach min_lr_frac at step t.steps, one past the last: a step
    at the floor (0 by default) would change nothing. One schedule spans all phases; the phase's
    lr_mul multiplies it."""
    lo, warmup = t.min_lr_frac, effective_warmup(t)
    if step < warmup:
        return (step + 1) / warmup
    if t.schedule == "cosine":
        p = (step - warmup) / max(1, t.steps - warmup)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    decay_start = wsd_decay_start(t)
    if step < decay_start:
        return 1.0
    p = (step - decay_start) / max(1, t.steps - decay_start)
    return lo + (1 - lo) * max(0.0, 1 - p)


def wsd_decay_start(t) -> int:
    return math.floor(t.steps * (1 - t.decay_frac) + 1e-9)  # 10 * (1 - 0.8) is 1.9999999999999996


def effective_warmup(t) -> int:
    """train.warmup_steps, capped where it would overrun the decay (a short --steps run under the default
    30): at the decay's start under wsd (a warmup past it made the lr jump down when it ended), at half the
    steps under cosine (a warmup past the last step left the lr rising to the end). warmup_note says so."""
    cap = wsd_decay_start(t) if t.schedule == "wsd" else t.steps // 2
    return min(t.warmup_steps, max(cap, 1)) if t.warmup_steps else 0


def warmup_note(t) -> str | None:
    """The note a run prints when effective_warmup capped train.warmup_steps, else None."""
    w = effective_warmup(t)
    if w == t.warmup_steps:
        return None
    where = "where the wsd decay starts" if t.schedule == "wsd" else "half of train.steps under cosine"
    return (f"note: train.warmup_steps={t.warmup_steps} overruns the {t.steps}-step schedule: the lr warms up "
            f"over {w} steps ({where})")


def eval_shape(phases: list, eval_seq_len, grad_accum: int, world: int = 1) -> tuple[int, int]:
    """(seq_len, batch) of evaluation: the last phase's context (or train.eval_seq_len) over no more
    tokens per forward than one training micro-batch, so evaluating never needs more memory than a
    step does (with train.grad_accum, a whole step's tokens at once could, at a large vocabulary)."""
    last = phases[-1]
    T = eval_seq_len or last.seq_len
    return T, max(1, last.batch_size(grad_accum, world) * last.seq_len // T)
