"""torchrun with 2 CPU processes (gloo): each rank trains on its half of the global batch, and
the losses match a 1-process run with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from trainer_helpers import ROOT, losses, run_train, tiny_overrides, write_corpus

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(args, port, nproc=2, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "train.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _compare(tmp_path, port, extra):
    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=5, **extra)
    one = run_train(["--data", str(corpus), "--out", str(tmp_path / "one"), *ov])
    assert one.returncode == 0, one.stderr
    two = torchrun(["--data", str(corpus), "--out", str(tmp_path / "two"), *ov], port)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5, (a, b)
    return tmp_path / "two"


def test_ddp_two_processes_match_one(tmp_path):
    run = _compare(tmp_path, 29531, {"optim.name": "muon"})
    assert (run / "model.safetensors").is_file() and not list(run.glob("*rank*"))


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tmp_path):
    from slmlab.checkpoint import load_run

    run = _compare(tmp_path, 29532, {"optim.name": "adamw", "train.parallel": "fsdp"})
    load_run(run)  # the gathered full weights load into a plain model


@pytest.mark.slow
def test_ddp_resume(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=6, **{"optim.name": "muon", "train.ckpt_every": 2})
    one = run_train(["--data", str(corpus), "--out", str(tmp_path / "one"), *ov])
    assert one.returncode == 0, one.stderr
    killed = torchrun(["--data", str(corpus), "--out", str(tmp_path / "two"), *ov], 29533,
                      env_extra={"SLMLAB_KILL_AFTER_STEP": "3"})
    assert killed.returncode != 0
    resumed = torchrun(["--resume", "--out", str(tmp_path / "two")], 29534)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) for k in a) <= 1e-5, (a, b)
