"""Measured CPU peak memory of real training steps next to slmlab/estimate.py's estimate.

    python bench/measure_memory.py --arch hybrid --size 124m --batch 1 --seq-len 256 --steps 2
    python bench/measure_memory.py --arch transformer --teacher-arch hybrid model.vocab_size=16384

With --teacher-arch the steps distil from a frozen teacher of that preset (and --teacher-size), on
the student's model.vocab_size, as train.teacher does (random weights: memory does not depend on them).

Method: this process imports everything first and reads its resident set size (VmRSS) as the
baseline; it then builds the model and optimizer and runs `--steps` steps the way the trainer
does (forward + loss, backward, grad-norm clip, optimizer step, zero_grad; fp32, no autocast, on
random tokens). The measurement is the process's peak RSS (VmHWM, reset to the current RSS
first through /proc/self/clear_refs) minus the baseline. glibc is told (mallopt) to serve every
allocation above 1 MB with mmap, so a freed tensor leaves the RSS at once and the peak counts
live tensors, not the allocator's free lists; several measurements can then share one process
(tests/test_sizes.py does). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def set_mmap_threshold(nbytes: int = 1 << 20):
    """Allocations above `nbytes` go straight to mmap and back to the OS when freed (glibc;
    elsewhere a no-op, and the RSS peak may then include freed memory the allocator kept)."""
    from slmlab.runtime import M_MMAP_THRESHOLD, mallopt

    mallopt(M_MMAP_THRESHOLD, nbytes)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _reset_hwm():
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the import-time peak
    # (torch's own start-up) does not mask a smaller training peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(arch: str, size, overrides: list[str], batch: int, seq_len: int, steps: int,
            checkpoint: bool, teacher_arch=None, teacher_size=None) -> dict:
    import torch

    from arch import build_model
    from arch.loss import Distill
    from slmlab.config import load_config
    from slmlab.estimate import meta_model, static_memory, train_peak
    from slmlab.optim import build_optimizer

    overrides = list(overrides) + ["train.phases=[]", f"train.seq_len={seq_len}", f"train.batch_size={batch}",
                                   f"model.grad_checkpoint={str(checkpoint).lower()}", "train.device=cpu"]
    cfg = load_config(arch=arch, size=size, overrides=overrides)
    tcfg = None if teacher_arch is None else load_config(
        arch=teacher_arch, size=teacher_size, overrides=[f"model.vocab_size={cfg.model.vocab_size}"])
    meta = meta_model(cfg)
    st = static_memory(meta, cfg, cuda=False, world=1, teacher=None if tcfg is None else meta_model(tcfg, lora=False))
    est = train_peak(meta, st, cfg, batch, seq_len, checkpoint, cuda=False)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq_len))
    y = torch.randint(0, cfg.model.vocab_size, (batch, seq_len))
    import gc

    gc.collect()  # the previous measurement's model, when several share a process
    base = _status("VmRSS")
    _reset_hwm()
    model = build_model(cfg.model, cfg.objective)
    model.train()
    teacher = None if tcfg is None else build_model(tcfg.model, tcfg.objective).eval().requires_grad_(False)
    opt = build_optimizer(model, cfg.optim, verbose=False)
    for _ in range(steps):
        if teacher is None:
            loss = model(x, y)
        else:  # as Trainer.compute_loss: the teacher's hidden states, its head inside the loss
            with torch.no_grad():
                hidden = teacher.hidden(x)[0]
            loss = model(x, y, teacher=Distill(hidden, teacher.lm_head.weight, 0.5, 2.0))[0]
            del hidden
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf)  # 0: no clipping
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    measured = _status("VmHWM") - base
    return {"arch": arch, "size": size, "batch": batch, "seq_len": seq_len, "steps": steps,
            "grad_checkpoint": checkpoint, "params": meta.num_params(), "teacher": teacher_arch,
            "estimate_bytes": est["peak"],
            "estimate_peak_at": est["peak_at"], "measured_bytes": measured,
            "ratio": est["peak"] / measured}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="hybrid")
    p.add_argument("--size", default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--teacher-arch", default=None, help="distil from a frozen teacher of this preset")
    p.add_argument("--teacher-size", default=None, help="the teacher's --size (default: the preset's)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as train.py takes them")
    args = p.parse_args(argv)
    set_mmap_threshold()
    print(json.dumps(measure(args.arch, args.size, args.overrides, args.batch, args.seq_len, args.steps,
                             args.grad_checkpoint, args.teacher_arch, args.teacher_size)))


if __name__ == "__main__":
    main()
