"""What a run reads besides its data, checked before the data is prepared (training a tokenizer and
tokenizing a new corpus take minutes) and by train.py --dry-run: a bad path or name is a one-line
error at once, not after that work."""
from __future__ import annotations

from .errors import ConfigError


def check_inputs(cfg, device_type: str, resuming: bool = False):
    """train.init_from and train.teacher are finished runs (a resumed run needs no base: its checkpoint
    holds every weight), train.eval_tasks resolve, and model.kernels can run on `device_type`."""
    from kernels import unavailable

    from .rundir import RunDir
    from .tasks import resolve_all

    t = cfg.train
    if t.init_from and not (resuming and not t.lora.r):
        RunDir.open(t.init_from, label="train.init_from=")
    if t.teacher:
        RunDir.open(t.teacher, label="train.teacher=")
    if t.eval_tasks.strip():
        resolve_all(t.eval_tasks, "train.eval_tasks")
    why = unavailable(cfg.model.kernels, device_type)
    if why:
        raise ConfigError(f"{why}: use model.kernels=auto or torch on {device_type}")
