"""A run SIGKILLed at an arbitrary step and resumed reproduces the uninterrupted run's per-step
losses exactly (CPU, fixed seed): model, optimizers, schedule, RNG, data position and phase all
come back from the checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from trainer_helpers import ROOT, kill_after_checkpoint, losses, run_train, tiny_overrides, write_corpus

from slmlab.checkpoint import checkpoint_dirs, latest_checkpoint, load_state


@pytest.mark.parametrize("optim", ["muon"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, optim):
    corpus = write_corpus(tmp_path / "c.txt")
    # 120 steps over two phases (16 then 32 tokens per sequence, phase 2 from step 61), checkpoints
    # every 4. The kill comes from outside once a phase-2 checkpoint (step >= 64) exists: it lands
    # wherever the run is then, usually a few steps past that checkpoint (replayed on resume), and
    # with 56 steps (> 1 s) still to go the run cannot finish first.
    ov = tiny_overrides(tmp_path, steps=120, **{"train.ckpt_every": 4, "optim.name": optim})
    full = run_train(["--data", str(corpus), "--out", str(tmp_path / "full"), *ov])
    assert full.returncode == 0, full.stderr
    run = tmp_path / "run"
    rc = kill_after_checkpoint([sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out", str(run), *ov],
                               run, min_step=64, log=tmp_path / "killed.log")
    assert rc == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # killed mid-run, not after it
    ckpt = int(latest_checkpoint(run).name[5:])
    logged = sorted(losses(run))
    assert 64 <= ckpt <= len(logged) < 120 and logged == list(range(1, len(logged) + 1))
    resumed = run_train(["--resume", "--out", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = losses(tmp_path / "full"), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 121))
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


@pytest.mark.parametrize("mutate,needle", [
    (lambda st: st.pop("rng"), "lacks 'rng'"),
    (lambda st: st.update(step="6"), "'step' is a str, expected int"),
    (lambda st: st.update(train_time=None), "'train_time' is a NoneType"),
])
def test_resume_from_a_malformed_state_is_refused_before_anything_changes(tmp_path, mutate, needle, capsys):
    import torch

    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=6, **{"train.ckpt_every": 3})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    state_pt = latest_checkpoint(run) / "state.pt"
    st = torch.load(state_pt, weights_only=True)
    mutate(st)
    torch.save(st, state_pt)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing rewritten


def test_resume_removes_a_killed_writers_temporaries(tmp_path):
    """A kill during the final save leaves .tmp-model.safetensors-<pid>-<id>/; the next run removes it."""
    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=4, **{"train.ckpt_every": 2})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / f".tmp-model.safetensors-{int(dead.stdout)}-0123abcd"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6"]) == 0
    assert not stale.exists()


def test_a_kill_while_resume_rewrites_config_leaves_a_run_that_resumes_exactly(tmp_path, monkeypatch):
    """--resume dies half-way through publishing config.yaml (the writer stops mid-file, as a kill
    would leave it); config.yaml is intact and the next --resume reproduces the uninterrupted losses."""
    import train
    from slmlab import rundir
    from slmlab.checkpoint import publish
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    full = tmp_path / "full"
    ov = tiny_overrides(tmp_path, steps=8, **{"train.ckpt_every": 2, "train.keep_checkpoints": 4})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(full), *ov]) == 0
    run = tmp_path / "run"  # the same run as if killed right after its step-4 checkpoint
    shutil.copytree(full, run)
    for d in checkpoint_dirs(run)[2:]:
        shutil.rmtree(d)
    for name in ("model.safetensors", "summary.json", "sample.txt"):
        (run / name).unlink()
    config = (run / "config.yaml").read_bytes()

    def killed_mid_write(self, cfg):
        with publish(self.path / "config.yaml") as tmp:
            tmp.write_bytes(config[: len(config) // 2])
            raise SystemExit(137)

    with monkeypatch.context() as m:
        m.setattr(rundir.RunDir, "write_config", killed_mid_write)
        with pytest.raises(SystemExit):
            run_cli(train.main, ["--resume", "--out", str(run)])
    assert (run / "config.yaml").read_bytes() == config
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0
    assert losses(run) == losses(full)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    import train
    from slmlab.cli import run_cli

    tmp = tmp_path_factory.mktemp("resume_base")
    corpus = write_corpus(tmp / "c.txt")
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp / "base"), *tiny_overrides(tmp, steps=2)]) == 0
    return tmp


def test_resume_needs_more_steps_than_the_checkpoint_and_not_the_init_from_base(base_run, tmp_path, capsys):
    import train
    from slmlab.cli import run_cli

    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(base_run / "base", base)
    ov = tiny_overrides(base_run, steps=4, **{"train.ckpt_every": 2, "train.init_from": str(base),
                                              "data.tokenizer": str(base)})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    shutil.rmtree(base)  # the checkpoint holds every weight, the run its tokenizer: resuming needs no base
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --resume: the checkpoint is at step 4; train.steps (2) must be at least that\n", err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    (run / "summary.json").unlink()  # as if killed in the final evaluation: resuming at step 4 finishes it
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "4"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6"]) == 0
    assert sorted(losses(run)) == list(range(1, 7))


def test_resume_with_other_added_tokens_names_them(base_run, tmp_path, capsys):
    import train
    from slmlab.cli import run_cli

    run = tmp_path / "run"  # a padded vocabulary: one added token fits without growing the model
    ov = tiny_overrides(base_run, steps=2, **{"train.ckpt_every": 2, "model.vocab_size": 320,
                                              "data.tokenizer": str(base_run / "base")})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "4", "data.added_tokens=[<think>]"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "data.added_tokens [] -> ['<think>']?" in err and "data.spec" not in err
