"""One ablation run in its own process: `python -m slmlab.ablate.worker RUN_DIR`, or the function
submitit pickles onto a Slurm node.

RUN_DIR/ablate.json (written by the coordinator) says what to run. The run directory decides how:
summary.json present -> nothing to do; config.yaml and a checkpoint -> the trainer's exact resume;
anything else -> a fresh start. Peak memory goes to RUN_DIR/resources.json after training.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
from pathlib import Path

SPEC = "ablate.json"
RESOURCES = "resources.json"


def die_with_parent(parent_pid: int):
    """Linux: get SIGKILLed when the coordinator dies, so a killed ablation leaves no orphan
    training into a run directory that the re-run is about to resume."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: an orphan finishes its run, which the re-run then finds finished
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def run_one(run_dir: str, threads: int = 0, group: str = "") -> dict:
    """Train (or resume) the run in `run_dir`; return its summary."""
    out = Path(run_dir)
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    spec = json.loads((out / SPEC).read_text())
    import torch

    from ..checkpoint import checkpoint_dirs
    from ..config import load_config
    from ..trainer import train

    if threads:
        torch.set_num_threads(threads)
    # logging.wandb=true: one wandb group per ablation, one job type per variant (wandb reads these)
    os.environ["WANDB_RUN_GROUP"] = group or out.parent.parent.name
    os.environ["WANDB_JOB_TYPE"] = spec["variant"]
    cfg = load_config(spec["config"], arch=spec["arch"], overrides=spec["overrides"])
    resume = (out / "config.yaml").is_file() and bool(checkpoint_dirs(out))
    summary = train(cfg, out, force=not resume, resume=resume)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mb": rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    (out / RESOURCES).write_text(json.dumps(peak, indent=2))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description="run one ablation run (started by ablate.py)")
    p.add_argument("run_dir")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--group", default="", help="wandb group (default: the ablation's directory name)")
    p.add_argument("--parent", type=int, default=0, help="coordinator pid: die with it")
    args = p.parse_args(argv)
    if args.parent:
        die_with_parent(args.parent)
    run_one(args.run_dir, args.threads, args.group)


if __name__ == "__main__":
    from ..cli import run_cli

    sys.exit(run_cli(main))
