"""One ablation run in its own process: `python -m slmlab.ablate.worker RUN_DIR`, or the function
submitit pickles onto a Slurm node.

RUN_DIR/ablate.json (written by the coordinator) says what to run. The run directory decides how
(`run_state`, the one predicate the coordinator, this worker and the report share): a readable
summary.json of the planned config -> no training (done, or diverged); the planned config.yaml and
a checkpoint -> the trainer's exact resume; anything else -> a fresh start. Peak memory goes to
RUN_DIR/resources.json after training. A done run is then scored on the --tasks its ablate.json
lists and its tasks.json lacks (scoring.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import publish
from ..config import read_yaml
from ..errors import ConfigError
from ..rundir import CONFIG, SUMMARY

SPEC = "ablate.json"
RESOURCES = "resources.json"
ERROR = "error.txt"  # the last error line of a failed attempt, written by the coordinator
TASKS = "tasks.json"  # the run's --tasks results (scoring.py)
# run_state's answers. DONE and DIVERGED are terminal (a re-run skips them); FAILED and MISSING are
# (re)started by a re-run.
DONE, DIVERGED, FAILED, MISSING = "done", "diverged", "failed", "missing"


def config_sha(tree: dict) -> str:
    """The hash the plan records per run (Run.config_sha) of a resolved config as a plain tree:
    RunConfig.to_dict() at planning time, the run directory's config.yaml read back afterwards. Keys
    at their dataclass default are left out: a key a later slmlab adds (at its default) leaves the
    hashes of an existing ablation's runs as they were, so the ablation still resumes and reports."""
    from ..config import SECTIONS

    def plain(v) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    kept = {}
    for section, values in tree.items():
        if section in SECTIONS and isinstance(values, dict):
            default = dataclasses.asdict(SECTIONS[section]())
            values = {k: v for k, v in values.items() if k not in default or plain(v) != plain(default[k])}
        kept[section] = values
    return hashlib.sha256(plain(kept).encode()).hexdigest()[:16]


@dataclass
class RunState:
    status: str  # DONE | DIVERGED | FAILED | MISSING
    summary: Optional[dict] = None  # the parsed summary.json when DONE or DIVERGED
    why: str = ""  # FAILED: the stored error line; MISSING: why a present summary does not count


def read_json(path: Path):
    """The parsed file, or None when it is missing or not JSON (cut short by a kill, say)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_text(path: Path, text: str):
    """Every file the ablation writes goes through checkpoint.publish: a kill leaves the old or the new one."""
    with publish(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _config_matches(run_dir: Path, sha: Optional[str]) -> bool:
    if sha is None:  # a manifest from before config hashes were compared
        return True
    try:
        tree = read_yaml(run_dir / CONFIG)
    except (OSError, ConfigError):
        return False
    return config_sha(tree) == sha


def run_state(run_dir, sha: Optional[str]) -> RunState:
    """Where one run stands, from its directory alone. A summary counts only when it parses, has a
    numeric val_bpb and sits beside the config.yaml the plan would write (hash `sha`): a truncated
    summary or a run left from another plan would otherwise pass for a result. A finite val_bpb is
    DONE; a non-finite one is DIVERGED, a result too (retraining the same config and seed would
    diverge again). Without a counting summary, a stored error line makes the run FAILED, else
    it is MISSING (not started, interrupted, or its summary does not count: `why`)."""
    d = Path(run_dir)
    why = ""
    if (d / SUMMARY).is_file():
        s = read_json(d / SUMMARY)
        if not isinstance(s, dict) or not all(_is_number(s.get(k)) for k in REPORTED):
            why = "its summary.json is unreadable"
        elif not _config_matches(d, sha):
            why = "its config.yaml is not the one this ablation plans"
        else:
            return RunState(DONE if math.isfinite(s["val_bpb"]) else DIVERGED, s)
    err = error_line(d)
    if err:
        return RunState(FAILED, None, err)
    return RunState(MISSING, None, why)


# What the report reads of a done run's summary.json: a summary lacking one is not a result (a KeyError
# in the report otherwise).
REPORTED = ("val_bpb", "val_loss", "tokens", "tokens_per_s", "wall_time_s")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def error_line(run_dir: Path) -> str:
    """The last attempt's error line (ERROR), or ''. Beside a counting summary it is a scoring
    error: the run trained, and its --tasks scoring failed."""
    try:
        return (run_dir / ERROR).read_text().strip()
    except OSError:
        return ""


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
    """Train (or resume) the run in `run_dir` unless it is finished, then score it on the tasks of
    its ablate.json it has no result for (scoring.score_run; not a diverged run: its scores would
    mean nothing); return its summary."""
    from .scoring import score_run, unscored

    out = Path(run_dir)
    spec = json.loads((out / SPEC).read_text())
    state = run_state(out, spec.get("config_sha"))
    if state.status == DIVERGED or (state.status == DONE and not unscored(out)):
        return state.summary
    import torch

    if threads:
        torch.set_num_threads(threads)
    summary = state.summary if state.status == DONE else _train(out, spec, group)
    if math.isfinite(summary["val_bpb"]):
        score_run(out)
    return summary


def _train(out: Path, spec: dict, group: str) -> dict:
    import torch

    from ..checkpoint import checkpoint_dirs
    from ..config import load_config
    from ..trainer import train

    # logging.wandb=true: one wandb group per ablation, one job type per variant (wandb reads these)
    os.environ["WANDB_RUN_GROUP"] = group or out.parent.parent.name
    os.environ["WANDB_JOB_TYPE"] = spec["variant"]
    cfg = load_config(spec["config"], arch=spec["arch"], overrides=spec["overrides"])
    # Resume only the planned config's own checkpoints; a run left from another plan starts afresh
    # (force clears its outputs, as a resume its summary.json: the trainer removes it).
    resume = _config_matches(out, spec.get("config_sha")) and (out / CONFIG).is_file() \
        and bool(checkpoint_dirs(out))
    (out / TASKS).unlink(missing_ok=True)  # scores of weights this training replaces
    summary = train(cfg, out, force=not resume, resume=resume)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mb": rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    # before any scoring: the peaks are training's
    write_text(out / RESOURCES, json.dumps(peak, indent=2))
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
