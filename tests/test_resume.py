"""A run SIGKILLed at an arbitrary step and resumed reproduces the uninterrupted run's per-step
losses exactly (CPU, fixed seed): model, optimizers, schedule, RNG, data position and phase all
come back from the checkpoint."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from trainer_helpers import ROOT, losses, run_train, tiny_overrides, write_corpus

from slmlab.checkpoint import checkpoint_dirs, latest_checkpoint, load_state


@pytest.mark.parametrize("optim", ["muon"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, optim):
    corpus = write_corpus(tmp_path / "c.txt")
    # 10 steps over two phases (16 then 32 tokens per sequence); checkpoints at 4 and 8; killed
    # after step 6, i.e. mid-phase-2 and two steps past the last checkpoint, which are replayed.
    ov = tiny_overrides(tmp_path, steps=10, **{"train.ckpt_every": 4, "optim.name": optim})
    full = run_train(["--data", str(corpus), "--out", str(tmp_path / "full"), *ov])
    assert full.returncode == 0, full.stderr
    killed = run_train(["--data", str(corpus), "--out", str(tmp_path / "run"), *ov],
                       env_extra={"SLMLAB_KILL_AFTER_STEP": "6"})
    assert killed.returncode == -signal.SIGKILL
    assert sorted(losses(tmp_path / "run")) == list(range(1, 7))
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    resumed = run_train(["--resume", "--out", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = losses(tmp_path / "full"), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6, (a, b)


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path):
    """Kill the trainer at random moments while it checkpoints every step: whatever survives in
    checkpoints/ is complete (the directory rename is the commit point) and resumable."""
    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=400, **{"train.ckpt_every": 1, "train.keep_checkpoints": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out",
                          str(tmp_path / "run"), *ov], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and len(checkpoint_dirs(tmp_path / "run")) < 2:
        time.sleep(0.05)
    time.sleep(0.37)
    p.send_signal(signal.SIGKILL)
    p.wait()
    dirs = checkpoint_dirs(tmp_path / "run")
    assert dirs, "no checkpoint was written before the kill"
    for d in dirs:
        assert load_state(d / "state.pt")["step"] == int(d.name[5:])
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # resume re-prepares data if it must
    r = run_train(["--resume", "--out", str(tmp_path / "run"), "train.steps=" + str(
        load_state(dirs[-1] / "state.pt")["step"] + 2)])
    assert r.returncode == 0, r.stderr
