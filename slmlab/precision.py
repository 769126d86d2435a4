"""Numeric precision: which autocast a run's forward uses (`train.precision`, eval.py's `--dtype`) and
the dynamic loss scaling that fp16 training needs.

auto = bf16 on a CUDA GPU with bf16 tensor cores (Ampere and newer), fp16 on one without (T4, V100:
bf16 runs emulated there, several times slower), fp32 on CPU. CPU stays fp32 on every CPU: on this
project's 2-core AVX-512 machines without AMX bf16 matmul ran ~3.5x slower than fp32; CPUs with AMX
are faster in bf16 (slmlab/optim.py fast_ns_dtype probes for that, for Muon's Newton-Schulz only),
but the dry run sizes a CPU run as fp32 and tests/golden's trace is fp32. bf16 and fp16 may be asked
for on any device (they run on CPU too, slower: what the tests use to exercise fp16 loss scaling).
"""
from __future__ import annotations

import math

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 matmul hardware (a CUDA GPU of compute capability 8.0 or newer)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def check_precision(setting: str, what: str = "train.precision"):
    if setting not in PRECISIONS:
        raise ConfigError(f"{what} must be one of {', '.join(PRECISIONS)}, got {setting!r}")


def resolve_precision(setting: str, device: torch.device, what: str = "train.precision") -> str:
    """`setting` (one of PRECISIONS) as fp32 | bf16 | fp16 on `device`."""
    check_precision(setting, what)
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def autocast(device, precision: str = "auto"):
    """The autocast context of a forward at `precision` (fp32: none)."""
    device = torch.device(device)
    p = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=DTYPES[p], enabled=p != "fp32")


def describe_precision(precision: str, device: torch.device) -> str:
    """How a run's forward computes, for its set-up line."""
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        return "bf16 autocast, emulated on this GPU: train.precision=fp16 runs on its tensor cores"
    return {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast, dynamic loss scaling"}[precision]


FP32_ON_GPU = "train.precision=fp32: TF32 matmuls, which run at about half of it"


class LossScale:
    """Dynamic loss scaling for fp16 training: fp16's range (max 65,504, smallest normal 6e-5) loses
    small gradients to zero, so the loss is multiplied by `scale` before backward and the gradients
    divided by it before clipping. A step whose gradients overflow (the loss finite, the grad norm
    not) is skipped and the scale halved; after GROWTH_INTERVAL steps without one it doubles
    (torch.amp.GradScaler's schedule and defaults).

    Written here rather than GradScaler because GradScaler decides per optimizer whether to skip a
    step (Muon's matrices and AdamW's vectors could part ways on one step), while the trainer decides
    once per step from the global grad norm, which every DDP/FSDP rank sees alike. An overflow at
    scale 1 is not fp16's range but a diverging run: it counts as a bad step (train.max_bad_steps).
    Disabled (bf16, fp32) it is the identity and holds no state worth saving."""

    INIT, GROWTH_INTERVAL = 2.0 ** 16, 2000

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = self.INIT if enabled else 1.0
        self.good_steps = 0

    def unscale_(self, params):
        if self.enabled:
            inv = 1.0 / self.scale
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(inv)

    def overflowed(self, loss: float, grad_norm: float) -> bool:
        """Whether a step that cannot be taken is fp16 overflow (skip it, halve the scale) rather than
        a bad step."""
        return self.enabled and self.scale > 1.0 and math.isfinite(loss) and not math.isfinite(grad_norm)

    def update(self, overflow: bool):
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale / 2, 0
            return
        self.good_steps += 1
        if self.good_steps == self.GROWTH_INTERVAL:
            self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict):
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def loss_scale_problem(state) -> str | None:
    """A saved LossScale.state_dict() that no run writes (checkpoint validation), else None."""
    if not isinstance(state, dict) or set(state) != {"scale", "good_steps"}:
        return f"'loss_scale' is {state!r}, expected {{'scale': float, 'good_steps': int}}"
    scale, good = state["scale"], state["good_steps"]
    if type(scale) not in (int, float) or not (math.isfinite(scale) and scale > 0):
        return f"'loss_scale' scale is {scale!r}, expected a number > 0"
    if type(good) is not int or good < 0:
        return f"'loss_scale' good_steps is {good!r}, expected an integer >= 0"
    return None
