"""A run SIGKILLed at an arbitrary step and resumed reproduces the uninterrupted run's per-step
losses exactly (CPU, fixed seed): model, optimizers, schedule, RNG, data position and phase all
come back from the checkpoint."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from trainer_helpers import ROOT, kill_after_checkpoint, losses, run_here, run_train, tiny_overrides, write_corpus

from slmlab.checkpoint import checkpoint_dirs, latest_checkpoint, load_state
from slmlab.rundir import read_metrics


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    # 120 steps over two phases (16 then 32 tokens per sequence, phase 2 from step 61), Muon, checkpoints
    # every 8 (the `uninterrupted` run's settings). The kill comes from outside once a phase-2 checkpoint
    # (step >= 64) exists: it lands wherever the run is then, usually a few steps past that checkpoint
    # (replayed on resume), and with 56 steps (> 1 s) still to go the run cannot finish first.
    corpus, ov, full = uninterrupted
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
    b = losses(run)
    assert sorted(full) == sorted(b) == list(range(1, 121))
    assert max(abs(full[k] - b[k]) for k in full) <= 1e-6, (full, b)


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
    rc, _, err = run_here("train", "--resume", "--out", tmp_path / "run",
                          f"train.steps={load_state(dirs[-1] / 'state.pt')['step'] + 2}")
    assert rc == 0, err


@pytest.mark.parametrize("mutate,needle", [
    (lambda st: st.pop("rng"), "lacks 'rng'"),
    (lambda st: st.update(step="6"), "'step' is a str, expected int"),
    (lambda st: st.update(train_time=None), "'train_time' is a NoneType"),
    # nested values: each restore failed with a traceback, and a negative step trained steps -2..9
    (lambda st: st["rng"].update(torch=__import__("torch").zeros(3, dtype=__import__("torch").uint8)),
     "rng.torch is not a saved generator state (Expected a CPUGeneratorImplState of size"),
    (lambda st: st["rng"].pop("data"), "rng lacks 'data'"),
    (lambda st: st["rng"]["numpy"].update(pos=5000), "rng.numpy is not a saved generator state (pos 5000 is outside"),
    (lambda st: st.update(step=-3), "'step' is -3, expected a number >= 0"),
    (lambda st: st.update(step=2), "'step' is 2, but the checkpoint is step_000006"),
    (lambda st: st.update(metrics_offset=-1), "'metrics_offset' is -1"),
    (lambda st: st.update(wall_time=math.nan), "'wall_time' is nan, expected a number >= 0"),
    (lambda st: st.update(streams={"x": 1}), "'streams' entry 'x'"),
    (lambda st: st.update(loss_scale={"scale": math.inf, "good_steps": 0}), "'loss_scale' scale is inf"),
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """120 steps over two phases, Muon (its AdamW groups too), checkpoints every 8: the run the
    SIGKILLed, SIGINTed and SIGTERMed ones must reproduce (one uninterrupted run for all three)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_corpus(tmp / "c.txt")
    # float32 Newton-Schulz: auto's probe is timed in each process, and a killed run and its resume are
    # processes apart from this one (bf16 against fp32 moved the losses 3e-6 by step 4; the bound is 1e-6)
    ov = tiny_overrides(tmp, steps=120, **{"train.ckpt_every": 8, "optim.name": "muon", "optim.muon_ns_dtype": "float32"})
    full = run_train(["--data", str(corpus), "--out", str(tmp / "full"), *ov])
    assert full.returncode == 0, full.stderr
    return corpus, ov, losses(tmp / "full")


def test_a_signal_checkpoints_the_step_it_stops_after_and_resume_continues_exactly(tmp_path, uninterrupted):
    """SIGTERM (a scheduler's) between steps: a checkpoint of the last finished step (not only the last
    ckpt_every one), one line naming it and the resume command, exit 128 + signum. Ctrl-C goes to the same
    handler: the tests below call it in-process (exit 130, exact resumes) at a fraction of this one's ~19 s."""
    corpus, ov, full = uninterrupted
    sig = signal.SIGTERM
    run, log = tmp_path / "run", tmp_path / "stopped.log"
    rc = kill_after_checkpoint([sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out", str(run), *ov],
                               run, min_step=10, log=log, sig=sig)
    assert rc == 128 + sig, log.read_text()[-2000:]
    last_line = log.read_text().splitlines()[-1]
    step = max(losses(run))
    assert int(latest_checkpoint(run).name[5:]) == step < 120, last_line
    assert last_line == (f"{signal.Signals(sig).name} at step {step}: stopped after it; last checkpoint "
                         f"{latest_checkpoint(run)}; continue with: python train.py --resume --out {run}")
    resumed = run_train(["--resume", "--out", str(run)])
    assert resumed.returncode == 0, resumed.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, 121))
    assert max(abs(full[k] - got[k]) for k in full) <= 1e-6


def ctrl_c_once_at(monkeypatch, at: int):
    """Ctrl-C (the trainer's handler, called as Python would) inside training step `at`, once."""
    from slmlab.trainer import Trainer

    step, fired = Trainer.train_step, []

    def train_step(self, n, ph):
        if n == at and not fired:
            fired.append(n)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return step(self, n, ph)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_moe_load_statistics_since_the_last_eval_survive_a_resume(tmp_path, monkeypatch, capsys):
    """The MoE layers' loads since the last eval go into the checkpoint: the eval after a resume
    reported the loads of the steps since the checkpoint only (moe.max_load 1.283 vs 1.366)."""
    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=8, **{"train.ckpt_every": 4, "train.eval_every": 6, "model.mlp": "moe",
                                               "model.mixer_opts": "{moe: {experts: 4, top_k: 2}}"})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp_path / "full"), *ov]) == 0
    ctrl_c_once_at(monkeypatch, 5)
    run = tmp_path / "stopped"
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    evals = [[{k: v for k, v in r.items() if k.startswith("moe.")} for r in read_metrics(d / "metrics.jsonl")[0]
              if "val_bpb" in r] for d in (tmp_path / "full", run)]
    assert evals[0] == evals[1] and len(evals[0]) == 2 and "moe.max_load" in evals[0][0]


def test_a_signal_checkpoint_leaves_retention_and_the_average_as_uninterrupted(tmp_path, monkeypatch, capsys):
    """The stop's checkpoint (step 9, off the every-4 schedule) resumes the run but is no scheduled one:
    it used to evict step 4 from train.keep_checkpoints=2 and enter train.avg_last's average."""
    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=10, **{"train.ckpt_every": 4, "train.avg_last": 2})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp_path / "full"), *ov]) == 0
    run = tmp_path / "stopped"
    ctrl_c_once_at(monkeypatch, 9)
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    assert (run / "checkpoints/step_000009/unscheduled").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000009"]
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", run))
    assert a["avg_of"] == b["avg_of"] == ["step_000008", "step_000010"] and a["avg_val_loss"] == b["avg_val_loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000008", "step_000010"]


def test_a_run_stopped_inside_a_quality_ordered_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
    """The stream is built at set-up (placed to end on the best text) and its cursor restored."""
    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=10, **{
        "train.ckpt_every": 4, "train.quality_score": "fn:unique_ratio",
        "train.phases": "[{seq_len: 16, share: 0.4, tokens_per_step: 128}, "
                        "{seq_len: 16, share: 0.6, tokens_per_step: 128, order: quality, top_frac: 0.5}]"})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp_path / "full"), *ov]) == 0
    run = tmp_path / "stopped"
    ctrl_c_once_at(monkeypatch, 7)
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0
    assert "placed again" not in capsys.readouterr().out  # the same phases: the saved cursor is where it was
    assert losses(run) == losses(tmp_path / "full")


def train_quality_phase_run(tmp_path, ckpt_every: int):
    """A finished 4-step run whose second phase (steps 3-4) is quality-ordered."""
    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    run = tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=4, **{
        "train.ckpt_every": ckpt_every, "train.quality_score": "fn:unique_ratio",
        "train.phases": "[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                        "{seq_len: 16, share: 0.5, tokens_per_step: 128, order: quality}]"})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    return run


def test_a_quality_ordered_phase_resumed_with_more_steps_still_ends_on_its_best_text(tmp_path, monkeypatch, capsys):
    """--resume with a new train.steps lays the phases out anew: the stream is placed again from the tokens
    its phase has left (not left at the saved cursor), so the last batch still ends on the best text."""
    import train
    from slmlab.cli import run_cli
    from slmlab.curriculum import OrderedStream

    run = train_quality_phase_run(tmp_path, ckpt_every=2)
    read = OrderedStream.next
    last = []
    monkeypatch.setattr(OrderedStream, "next", lambda s, *a: last.append(s) or read(s, *a))
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "8"]) == 0  # phase 2: steps 5-8
    assert "phase 2's quality-ordered stream is placed again for the 512 tokens" in capsys.readouterr().out
    s = last[-1]
    assert len(last) == 4 and s.cursor == len(s) - 1  # the last window's target was the stream's last token


def test_a_second_signal_stops_at_once_and_without_checkpoints_nothing_is_resumable(tmp_path, monkeypatch, capsys):
    import train
    from slmlab.cli import run_cli
    from slmlab.trainer import Trainer

    corpus = write_corpus(tmp_path / "c.txt")
    step = Trainer.train_step

    def ctrl_c_at_step_3(self, n, ph):  # Ctrl-C twice inside step 3: the second one stops it there
        if n == 3:
            for _ in range(times):  # the handler called as Python would: two real signals may coalesce into one
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        return step(self, n, ph)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_at_step_3)
    times, run = 2, tmp_path / "twice"
    ov = tiny_overrides(tmp_path, steps=6, **{"train.ckpt_every": 2})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    err = capsys.readouterr().err
    assert err.startswith("SIGINT again: stopped at once") and err.count("\n") == 1, err
    assert f"last checkpoint {run / 'checkpoints' / 'step_000002'};" in err and sorted(losses(run)) == [1, 2]
    times, run = 1, tmp_path / "none"
    ov = tiny_overrides(tmp_path, steps=6, **{"train.ckpt_every": 0})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    err = capsys.readouterr().err
    assert err == "SIGINT at step 3: stopped after it; no checkpoint was written (train.ckpt_every=0), so it " \
                  "cannot be resumed\n", err
    assert not (run / "checkpoints").exists()


def test_resume_applies_new_optim_values_and_refuses_a_new_seed(base_run, tmp_path, capsys):
    """optim.* given on --resume is what the param groups use from then on (as config.yaml and
    metrics.jsonl record it); a new seed could not apply (the RNG states go on) and is refused."""
    import train
    from slmlab.cli import run_cli
    from slmlab.config import load_config
    from slmlab.trainer import Trainer

    run = tmp_path / "run"
    ov = tiny_overrides(base_run, steps=4, **{"train.ckpt_every": 2, "optim.name": "muon"})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6", "--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: train.seed 1337 -> 9: ") and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # train.steps=10 moves phase 2 to steps 6-10: the checkpoint's step 4 is now in phase 1
    cfg = load_config(run / "config.yaml", overrides=["train.steps=10", "optim.lr=0.03", "optim.weight_decay=0.2",
                                                      "optim.betas=[0.8, 0.9]", "optim.muon_momentum=0.9"])
    tr = Trainer(cfg, run, resume=True)
    assert "(step 4, phase 1)" in capsys.readouterr().out
    adamw, muon = tr.opt.optimizers["adamw"].param_groups, tr.opt.optimizers["muon"].param_groups
    assert [g["base_lr"] for g in adamw + muon] == [0.03] * (len(adamw) + len(muon))
    assert [g["weight_decay"] for g in adamw] == [0.2, 0.0] and [g["weight_decay"] for g in muon] == [0.2]
    assert all(g["betas"] == (0.8, 0.9) for g in adamw) and all(g["momentum"] == 0.9 for g in muon)


@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_resume_with_a_lost_or_cut_metrics_file_appends_without_padding(base_run, tmp_path, capsys, damage):
    import train
    from slmlab.cli import run_cli

    run = tmp_path / "run"
    ov = tiny_overrides(base_run, steps=4, **{"train.ckpt_every": 2})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    metrics = run / "metrics.jsonl"
    if damage == "missing":
        metrics.unlink()
    else:  # the first line and half the second, as a copy cut short would leave it
        text = metrics.read_text()
        metrics.write_text(text[: text.index("\n") + 40])
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("is missing" if damage == "missing" else "is shorter than") in err, err
    lines = metrics.read_text().splitlines()
    assert "\0" not in "".join(lines)
    resumed = [json.loads(line) for line in lines[-3:]]  # steps 5, 6 and the final line
    assert [r["step"] for r in resumed] == [5, 6, 6] and resumed[-1]["final"]


def test_resume_after_the_quality_phases_changed_is_one_line(tmp_path, capsys):
    import train
    from slmlab.cli import run_cli

    run = train_quality_phase_run(tmp_path, ckpt_every=4)
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6",
                                "train.phases=[{seq_len: 16, share: 1.0, tokens_per_step: 128}]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint holds a position in the quality-ordered stream of "
                          "train.phases[1]") and err.count("\n") == 1, err
    # Still a quality phase, but over other documents: the saved cursor would count in another order.
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6",
                                "train.phases=[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                                "{seq_len: 16, share: 0.5, tokens_per_step: 128, order: quality, top_frac: 0.5}]"]) == 2
    err = capsys.readouterr().err
    assert "train.phases[1] is mid-way through its quality-ordered documents" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_final_evaluation_names_the_checkpoint_that_finishes_the_run(tmp_path, monkeypatch, capsys,
                                                                                      sig):
    """The trainer's handler (called as Python would) stops at once there: SIGTERM, a scheduler's, killed
    the process without a word before."""
    import train
    from slmlab.cli import run_cli
    from slmlab.trainer import Trainer

    corpus, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=4, **{"train.ckpt_every": 2})
    evaluate, before = Trainer.evaluate, signal.getsignal(sig)

    def signalled(self, *a, **k):
        signal.getsignal(sig)(sig, None)
        raise AssertionError("the handler returned: the final evaluation would have gone on")

    monkeypatch.setattr(Trainer, "evaluate", signalled)
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 128 + sig
    err = capsys.readouterr().err
    assert err.startswith(f"{signal.Signals(sig).name} at step 4") \
        and f"step_000004; continue with: python train.py --resume --out {run}" in err, err
    assert signal.getsignal(sig) == before and not (run / "summary.json").exists()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0 and (run / "summary.json").is_file()


def test_resume_compares_the_model_as_built_and_lets_runtime_options_change(tmp_path, capsys):
    """A derived default spelled out (ffn_dim, head_dim), an option of a block the model lacks, a default
    given explicitly and MoE's runtime options resume; a real change of the weights is refused."""
    import train
    from slmlab.cli import run_cli

    corpus, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=2, **{"train.ckpt_every": 2, "model.mlp": "moe",
                                              "model.mixer_opts": "{moe: {experts: 4}}"})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    capsys.readouterr()
    same = ["model.ffn_dim=128", "model.head_dim=16", "model.mixer_opts.lif.T_sim=8",
            "model.mixer_opts.moe.router=softmax"]
    runtime = ["model.mixer_opts.moe.core=dense", "model.mixer_opts.moe.aux_loss_coef=0.001",
               "model.mixer_opts.moe.bias_update_rate=0.01", "model.loss_chunk=8"]
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "4", *same, *runtime]) == 0
    out = capsys.readouterr().out
    assert "--resume: model.loss_chunk 0 -> 8, model.mixer_opts.moe.aux_loss_coef 0.01 -> 0.001, " \
           "model.mixer_opts.moe.core 'sorted' -> 'dense', model.mixer_opts.moe.bias_update_rate 0.001 -> 0.01: " \
           "applies from the resumed step on" in out, out
    assert sorted(losses(run)) == [1, 2, 3, 4]
    for change, line in (("model.ffn_dim=192", "model.ffn_dim 128 -> 192"),
                         ("model.mixer_opts.moe.experts=8", "model.mixer_opts.moe.experts 4 -> 8"),
                         ("model.mixer_opts.moe.expert_ffn=32", "model.mixer_opts.moe.expert_ffn 64 -> 32")):
        assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6", change]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --resume: the model config differs from the run in {run}: {line}\n", err


def test_resume_announces_a_new_batch_shape_and_that_evals_no_longer_compare(tmp_path, capsys):
    """train.batch_size / seq_len / grad_accum may change on --resume (config.yaml then holds the new
    values): one line names each and says the val losses before and after do not compare."""
    import train
    from slmlab.cli import run_cli

    corpus, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=4, **{"train.ckpt_every": 4, "train.phases": "[]", "train.seq_len": 16,
                                              "train.batch_size": 4})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6", "train.batch_size=8",
                                "train.seq_len=32", "train.grad_accum=2"]) == 0
    out = capsys.readouterr().out
    assert "--resume: train.batch_size 4 -> 8, train.seq_len 16 -> 32, train.grad_accum 1 -> 2: applies from the " \
           "resumed step on; evaluation moves from seq_len 16 to 32, so val losses before and after do not " \
           "compare\n" in out, out
    assert "--resume: train.steps 4 -> 6: the phases' steps and the lr schedule (warmup, decay) are laid out anew " \
           "over 6 steps" in out, out  # a phase boundary or the lr at the resumed step may move
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["seq_len"]) for r in records if "loss" in r] == [(1, 16), (2, 16), (3, 16), (4, 16),
                                                                           (5, 32), (6, 32)]
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6"]) == 0  # nothing changed: no line
    assert "--resume: " not in capsys.readouterr().out



def test_resume_announces_every_other_setting_it_applies_and_new_data(tmp_path, capsys):
    """The lr schedule, gradient clipping or the data changed on --resume applied without a word."""
    import train
    from slmlab.cli import run_cli

    corpus, run = write_corpus(tmp_path / "c.txt"), tmp_path / "run"
    ov = tiny_overrides(tmp_path, steps=4, **{"train.ckpt_every": 4, "data.tokenizer": "null"})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 0
    other = write_corpus(tmp_path / "other.txt", seed=1)
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "5", "train.schedule=cosine",
                                "train.grad_clip=0.5", "--data", str(other), f"data.tokenizer={run}"]) == 0
    out = capsys.readouterr().out
    assert "--resume: train.schedule wsd -> cosine, train.grad_clip 1.0 -> 0.5, data.tokenizer None -> " in out, out
    assert f"--resume: data.spec {corpus} -> {other}: training reads the new data from the resumed " \
           "step on, and the validation split is the new data's, so val losses before and after do not compare" in out


def _files(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def test_a_run_another_process_trains_into_is_refused_before_anything_changes(base_run, tmp_path, capsys):
    """--resume given twice, a requeued job beside the first, --force over a run still training: the
    second trainer stops on RUN/.lock in one line; both writing checkpoints and metrics.jsonl would
    interleave them. The lock is taken here through a second open file, which flock treats as
    another holder."""
    import train
    from slmlab.cli import run_cli
    from slmlab.rundir import RunLock

    run = tmp_path / "run"
    shutil.copytree(base_run / "base", run)
    before = _files(run)
    capsys.readouterr()
    with RunLock(run):
        for argv in (["--resume", "--out", run, "--steps", "4"],
                     ["--data", base_run / "c.txt", "--out", run, "--force", *tiny_overrides(base_run, steps=2)]):
            assert run_cli(train.main, [str(a) for a in argv]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {run} is in use: another process is training into it (pid {os.getpid()} "
                                  "on ") and err.count("\n") == 1, err
        assert _files(run) == before
    assert not (run / ".lock").exists()


def test_a_lock_left_by_a_killed_trainer_stops_nothing_and_a_failed_start_leaves_no_directory(base_run, tmp_path,
                                                                                               capsys):
    import train
    from slmlab.cli import run_cli

    run = tmp_path / "run"
    shutil.copytree(base_run / "base", run)
    # a holder that dies without its clean exit (kill -9 alike): the file stays, its lock goes with the process
    subprocess.run([sys.executable, "-c", "import os, sys; from slmlab.rundir import RunLock; "
                    "RunLock(sys.argv[1]).__enter__(); os._exit(0)", str(run)], check=True, cwd=ROOT)
    assert (run / ".lock").read_text().startswith("pid ")
    ov = tiny_overrides(base_run, steps=2)
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), "--force", *ov]) == 0
    assert not (run / ".lock").exists() and (run / "summary.json").is_file()
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    new = tmp_path / "a" / "new"
    capsys.readouterr()
    assert run_cli(train.main, ["--data", str(short), "--out", str(new), *ov]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "a" / "new").exists()


def test_a_resume_removes_the_summary_of_the_finish_it_replaces(base_run, tmp_path, monkeypatch):
    """Extending a finished run: its summary.json described the old finish, so compare.py would show
    the run done with those numbers while it trains on; it goes when the resume begins."""
    import train
    from slmlab import trainer
    from slmlab.cli import run_cli

    run = tmp_path / "run"
    ov = tiny_overrides(base_run, steps=4, **{"train.ckpt_every": 2})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    assert (run / "summary.json").is_file()

    def killed(self, step, ph):
        raise SystemExit(137)

    monkeypatch.setattr(trainer.Trainer, "train_step", killed)
    with pytest.raises(SystemExit):
        run_cli(train.main, ["--resume", "--out", str(run), "--steps", "8"])
    assert not (run / "summary.json").exists()


@pytest.mark.parametrize("saved_wall", [1000.0, None])
def test_the_wall_time_adds_up_across_resumes(base_run, tmp_path, saved_wall):
    """summary.json's wall_time_s counts the processes before a resume (up to the checkpoint), as
    train_time_s does: ablate's wall / run and timings.csv counted the last process only. A checkpoint
    from before wall_time was saved (None) still resumes, counting this process only."""
    import torch

    import train
    from slmlab.checkpoint import CHECKSUMS, sha256
    from slmlab.cli import run_cli

    run = tmp_path / "run"
    ov = tiny_overrides(base_run, steps=4, **{"train.ckpt_every": 2})
    assert run_cli(train.main, ["--data", str(base_run / "c.txt"), "--out", str(run), *ov]) == 0
    ckpt = latest_checkpoint(run)
    st = load_state(ckpt / "state.pt")
    assert st["wall_time"] >= st["train_time"] > 0
    if saved_wall is None:
        del st["wall_time"]
    else:
        st["wall_time"] = saved_wall  # as if the processes before took 1000 s
    torch.save(st, ckpt / "state.pt")
    (ckpt / CHECKSUMS).write_text(json.dumps({n: sha256(ckpt / n) for n in ("model.safetensors", "state.pt")}))
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "6"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["wall_time_s"] > 1000) == (saved_wall is not None)
    assert load_state(latest_checkpoint(run) / "state.pt")["wall_time"] > (saved_wall or 0)
