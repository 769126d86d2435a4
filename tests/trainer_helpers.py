"""Tiny runs for trainer tests: a synthetic corpus, a 2-layer d_model-32 model, seconds per run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, lines: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the of and to a in is it you that he was for on are with as his they be at one have this".split()
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(lines)))
    return path


def tiny_overrides(tmp: Path, steps: int = 8, **extra) -> list[str]:
    # optim.name pinned to the optimizer these tests were written against (the default is Muon):
    # a test that compares two processes' runs would otherwise depend on each one's Newton-Schulz dtype probe.
    ov = {"model.d_model": 32, "model.n_layers": 3, "model.n_heads": 2, "model.n_kv_heads": 1,
          "model.vocab_size": 300, "model.layers": "CCA", "optim.name": "adamw",
          "train.steps": steps, "train.eval_every": 1000,
          "train.log_every": 1, "train.warmup_steps": 2, "train.ckpt_every": 0, "train.sample_tokens": 4, "train.eval_tokens": 256,
          "data.cache_dir": str(tmp / "cache"), "logging.progress": False, "train.device": "cpu",
          "train.phases": "[{seq_len: 16, share: 0.5, tokens_per_step: 128}, {seq_len: 32, share: 0.5, tokens_per_step: 128}]"}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def run_train(args: list[str], env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_here(script: str, *argv) -> tuple[int, str, str]:
    """train.py, sample.py or convert.py run in this process as its __main__ runs it (run_cli):
    (exit status, stdout, stderr). A subprocess adds seconds of start-up that nothing checks; use
    run_train where the process itself matters (its environment, a kill, a fresh RNG)."""
    import contextlib
    import importlib
    import io

    from slmlab.cli import run_cli

    main = importlib.import_module(script).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_cli(main, [str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (Linux), whichever session it runs in."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        except (OSError, IndexError, ValueError):
            continue  # exited while being read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_after_checkpoint(cmd: list[str], run_dir: Path, min_step: int, log: Path, timeout: float = 180,
                          sig: int = signal.SIGKILL) -> int:
    """Run `cmd` in its own process group; once `run_dir` holds a complete checkpoint at a step
    >= min_step, send `sig` to the whole group: SIGINT as Ctrl-C, SIGTERM as a scheduler (torchrun
    forwards both to its workers), SIGKILL as a crash would, to every descendant as well (torchrun starts
    each worker in a session of its own, which outlived a SIGKILL of torchrun's group and trained on
    beside the resumed run). Returns the exit status (-SIGKILL when it was
    still running; a run still going 60 s after another signal is SIGKILLed). The caller picks
    min_step with enough steps after it that the run cannot finish before the poll (10 ms)
    notices the checkpoint."""
    from slmlab.checkpoint import checkpoint_dirs

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not any(int(d.name[5:]) >= min_step for d in checkpoint_dirs(run_dir)):
                if p.poll() is not None:
                    raise AssertionError(f"the run exited ({p.returncode}) before a checkpoint at step >= {min_step}: "
                                         + log.read_text()[-2000:])
                if time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")
                time.sleep(0.01)
        finally:
            for pid in [p.pid, *(descendants(p.pid) if sig == signal.SIGKILL else [])]:
                try:
                    os.killpg(pid, sig) if pid == p.pid else os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return p.returncode
