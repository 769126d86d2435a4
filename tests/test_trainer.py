"""Trainer: phases as data, the global schedule, metrics fields, NaN guard, checkpoint averaging,
distillation, quality ordering and the one-line errors for bad input."""
import importlib.util
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from trainer_helpers import ROOT, tiny_overrides, write_corpus

from slmlab.checkpoint import latest_checkpoint, load_tensors
from slmlab.cli import run_cli
from slmlab.config import load_config
from slmlab.curriculum import OrderedStream, document_spans
from slmlab.errors import CheckpointError, ConfigError, DataError, SlmlabError
from slmlab.phases import lr_mult, phase_at, resolve_phases
from slmlab.trainer import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return write_corpus(d / "c.txt"), d


def tiny_cfg(corpus, **extra):
    path, d = corpus
    return load_config(overrides=[f"data.spec={path}", *tiny_overrides(d, **extra)])


def cli(argv, capsys):
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = run_cli(mod.main, argv)
    return rc, capsys.readouterr()


# ---- phases and schedule (pure) ----

def test_default_phases_256_1024_2048_constant_tokens():
    cfg = load_config(arch="hybrid")
    ph = resolve_phases(cfg)
    assert [p.seq_len for p in ph] == [256, 1024, 2048]
    assert sum(p.steps for p in ph) == cfg.train.steps
    assert [p.batch_size(1) * p.seq_len for p in ph] == [4096] * 3  # batch shrinks as seq grows
    cfg = load_config(arch="hybrid", overrides=["train.steps=1000"])
    assert [p.steps for p in resolve_phases(cfg)] == [700, 200, 100]  # --steps scales every phase
    short = resolve_phases(load_config(arch="hybrid", overrides=["train.steps=2"]))
    assert [p.describe().split(" seq_len")[0] for p in short] == [
        "phase 1: steps 1-1", "phase 2: steps 2-2", "phase 3: no steps (train.steps too few)"]


def test_empty_phases_is_the_old_single_stage():
    cfg = load_config(overrides=["train.phases=[]", "train.seq_len=128", "train.batch_size=8"])
    (p,) = resolve_phases(cfg)
    assert (p.seq_len, p.batch_size(1), p.steps) == (128, 8, cfg.train.steps)


@pytest.mark.parametrize("phases,msg", [
    ("[{seq_len: 64, share: 0.5}, {seq_len: 128, share: 0.4}]", "sum to 0.9"),
    ("[{seq_len: 100, share: 1.0, tokens_per_step: 4096}]", "not divisible"),
    ("[{seq_len: 64, share: 1.0, colour: red}]", "unknown key 'colour'"),
    ("[{seq_len: 64}, {seq_len: 128}]", "share is required"),
])
def test_bad_phases_are_config_errors(phases, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(overrides=[f"train.phases={phases}"])


def test_each_phase_draws_the_same_batches_whatever_the_step_count():
    """Seed k of an equal-FLOPs ablation's variants trains different step counts, which moves the phase
    boundaries: with one generator across phases, every batch after the first boundary differed."""
    import types

    from slmlab.trainer import BatchSource

    sets = {None: (types.SimpleNamespace(train=np.arange(20_000, dtype=np.int64) % 300), "spec")}
    phases = "train.phases=[{seq_len: 16, share: 0.5, tokens_per_step: 64}, {seq_len: 32, share: 0.5, tokens_per_step: 64}]"
    seen = []
    for steps in (10, 13):
        phs = resolve_phases(load_config(overrides=[phases, f"train.steps={steps}"]))
        src = BatchSource(sets, None, "", types.SimpleNamespace(world=1, rank=0), 3, print)
        per_phase = [[], []]
        for step in range(steps):
            ph = phase_at(phs, step)
            per_phase[ph.index].append(src.next(ph, ph.batch_size(1, 1), torch.device("cpu"))[0])
        seen.append(per_phase)
    (a1, a2), (b1, b2) = seen
    assert (len(a1), len(b1)) == (5, 6)  # the boundary moved
    assert all(torch.equal(x, y) for x, y in zip(a1, b1)) and all(torch.equal(x, y) for x, y in zip(a2, b2))
    assert not torch.equal(b1[-1], b2[0][:, :16])  # phase 2 does not replay phase 1's draws
    # a checkpoint at the boundary (after step 6 of 13) and one inside phase 2 resume the same draws
    for at in (6, 8):
        src = BatchSource(sets, None, "", types.SimpleNamespace(world=1, rank=0), 3, print)
        for step in range(at):
            ph = phase_at(phs, step)
            src.next(ph, ph.batch_size(1, 1), torch.device("cpu"))
        state = {**src.state_dict(), "phase": phase_at(phs, at - 1).index}
        resumed = BatchSource(sets, None, "", types.SimpleNamespace(world=1, rank=0), 3, print)
        resumed.load_state_dict(state, phs)
        assert torch.equal(resumed.next(phase_at(phs, at), 2, torch.device("cpu"))[0], b2[at - 6])


def test_divisibility_accounts_for_ranks():
    cfg = load_config(overrides=["train.phases=[{seq_len: 256, share: 1.0, tokens_per_step: 256}]"])
    resolve_phases(cfg, world=1)
    with pytest.raises(ConfigError, match="2 ranks"):
        resolve_phases(cfg, world=2)


def test_wsd_and_cosine_one_schedule_across_phases():
    cfg = load_config(overrides=["train.steps=100", "train.warmup_steps=10", "train.decay_frac=0.2"])
    m = [lr_mult(s, cfg.train) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[50] == 1.0 and m[79] == 1.0
    # the decay's first step (0-based 80) runs at full lr, its last (99) just above the floor
    assert m[80] == 1.0 and m[81] == pytest.approx(0.95) and m[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))
    cfg = load_config(overrides=["train.steps=100", "train.warmup_steps=10", "train.schedule=cosine"])
    c = [lr_mult(s, cfg.train) for s in range(100)]
    assert c[10] == pytest.approx(1.0) and 0.45 < c[55] < 0.55 and 0 < c[99] < 0.01
    ph = resolve_phases(cfg)
    assert phase_at(ph, 0).index == 0 and phase_at(ph, 69).index == 0 and phase_at(ph, 70).index == 1


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_the_last_step_still_learns_and_the_floor_comes_after_it(schedule):
    """A step at lr 0 (min_lr_frac's default) changes nothing: both decays reach min_lr_frac at
    step t.steps, one past the last (0-based) step."""
    t = load_config(overrides=["train.steps=10", "train.warmup_steps=2", f"train.schedule={schedule}",
                               "train.min_lr_frac=0.1", "train.decay_frac=0.8"]).train
    assert lr_mult(9, t) > 0.1 + 1e-3 and lr_mult(10, t) == pytest.approx(0.1)
    assert lr_mult(2, t) == 1.0  # the first step after warmup, WSD's first decay step here: at full lr


def test_rope_prefix_consistency_at_phase_lengths():
    """A causal RoPE model's logits on a prefix don't depend on the longer context it is part of,
    so training at 256 and evaluating/continuing at 2048 sees the same positions."""
    from arch import build_model
    from arch.config import ModelConfig

    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="CA")).eval()
    x = torch.randint(0, 64, (1, 256))
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, :32]), m(x)[:, :32], rtol=1e-4, atol=1e-5)


# ---- runs (in process, ~seconds each) ----

def test_phased_run_logs_phase_and_seq_len(corpus, tmp_path, capsys):
    cfg = tiny_cfg(corpus, steps=6, **{"optim.name": "muon", "train.eval_every": 3,
                                       "train.phases": "[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                                                       "{seq_len: 32, share: 0.5, tokens_per_step: 128, lr_mul: 0.5}]"})
    s = train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert "entering phase 2" in out and "optimizer routing" in out and "MFU peak" in out
    recs = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [(r["phase"], r["seq_len"]) for r in steps] == [(1, 16)] * 3 + [(2, 32)] * 3
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    assert steps[3]["lr_mult"] == pytest.approx(0.5 * lr_mult(3, cfg.train))  # phase lr_mul applied
    assert any("val_bpb" in r for r in recs) and recs[-1]["final"]
    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "summary.json", "sample.txt"):
        assert (tmp_path / "run" / name).is_file()
    assert s["tokens"] == 6 * 128 and math.isfinite(s["val_bpb"])


def test_periodic_evals_use_the_models_windows_and_log_the_eval_seq_len(corpus, tmp_path, monkeypatch):
    """A phase's `window` is for training: periodic evals run at the model's own windows, like the
    final one, so they compare; every eval line says the seq_len it measured at."""
    from slmlab.trainer import Trainer

    seen = []  # (what ran, the attention layer's window then)
    evaluate, train_step = Trainer.evaluate, Trainer.train_step
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: (
        seen.append(("eval", self.model.layers[2].mixer.window)), evaluate(self, *a, **k))[1])
    monkeypatch.setattr(Trainer, "train_step", lambda self, n, ph: (
        seen.append((n, self.model.layers[2].mixer.window)), train_step(self, n, ph))[1])
    cfg = tiny_cfg(corpus, steps=4, **{"train.eval_every": 1, "model.window_pattern": "S", "model.window": 8,
                                       "train.phases": "[{seq_len: 16, share: 0.5, tokens_per_step: 128, window: 4}, "
                                                       "{seq_len: 32, share: 0.5, tokens_per_step: 128, window: 4}]"})
    train(cfg, tmp_path / "run")
    assert seen == [(1, 4), ("eval", 8), (2, 4), ("eval", 8), (3, 4), ("eval", 8), (4, 4), ("eval", 8)]
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["seq_len"], r["eval_seq_len"]) for r in recs if "val_loss" in r]
    assert evals == [(1, 16, 32), (2, 16, 32), (3, 32, 32), (4, 32, 32)] and recs[-1]["final"]


def test_progress_eta_counts_the_steps_this_process_ran(monkeypatch, capsys):
    from slmlab import progress

    clock = iter([1000.0, 1010.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    bar = progress.Progress(100, start=90)  # resumed at step 90
    bar.update(95, 1.0, 100.0)  # 5 steps in 10 s, 5 to go
    err = capsys.readouterr().err
    assert "[" + "#" * 19 + ".] step 95/100" in err and "eta 0m10s" in err, err


def test_progress_eta_weighs_the_steps_left_by_their_phase_cost(monkeypatch, capsys):
    """Phases of unequal cost per step (longer context): 10 steps of cost 1 took 10 s, so 10 left of cost 1
    and 10 of cost 3 take 40 s; counted as equal steps the ETA said 20 s."""
    from slmlab import progress

    clock = iter([1000.0, 1010.0])
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    bar = progress.Progress(30, costs=[(0, 20, 1.0), (20, 10, 3.0)])
    bar.update(10, 1.0, 100.0)
    # the bar shows steps done (a third), whatever they cost
    assert "[" + "#" * 6 + "." * 14 + "] step 10/30" in (err := capsys.readouterr().err) and "eta 0m40s" in err, err


def test_avg_last_without_checkpoints_is_refused():
    with pytest.raises(ConfigError, match=r"^train.avg_last=2 averages checkpoints, but train.ckpt_every=0 writes none"):
        load_config(overrides=["train.avg_last=2", "train.keep_checkpoints=2", "train.ckpt_every=0"])


def test_force_removes_every_file_slmlab_wrote_and_nothing_else(tmp_path):
    from slmlab.rundir import RunDir

    run = tmp_path / "run"
    written = ["config.yaml", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "model_avg.safetensors",
               "metrics.jsonl", "summary.json", "sample.txt", "chat_template.jinja", "lora_base.json", "imports.json",
               "checkpoints/step_000002/state.pt", "wandb/offline-run-1-abc/run-abc.wandb", "wandb/latest-run"]
    for name in written + ["notes.txt", "plots/loss.png"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("old")
    RunDir.create(run, force=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["checkpoints", "notes.txt", "plots",
                                                                       "plots/loss.png"]


def test_nan_guard_skips_then_aborts(corpus, tmp_path, capsys):
    cfg = tiny_cfg(corpus, steps=20, **{"optim.lr": "1.0e+30", "train.warmup_steps": 1, "train.max_bad_steps": 3,
                                        "optim.name": "adamw", "train.grad_clip": "1.0e+30"})
    with pytest.raises(SlmlabError, match="3 consecutive non-finite steps"):
        train(cfg, tmp_path / "run")
    assert "update skipped" in capsys.readouterr().out


def test_grad_clip_0_is_no_clipping_and_the_norm_is_still_logged(corpus, tmp_path):
    """max_norm 0 scaled every gradient to zero: the run trained nothing. 0 now trains as a clip no
    gradient reaches, and grad_norm is still measured."""
    from trainer_helpers import losses

    runs = {}
    for clip in ("0", "1.0e+30"):
        train(tiny_cfg(corpus, steps=12, **{"train.grad_clip": clip, "optim.weight_decay": 0}), tmp_path / clip)
        runs[clip] = losses(tmp_path / clip)
    assert runs["0"] == runs["1.0e+30"]
    first, last = runs["0"][1], runs["0"][12]
    assert last < first - 1.0, runs["0"]
    norms = [json.loads(line).get("grad_norm") for line in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines()]
    norms = [n for n in norms if n is not None]
    assert len(norms) == 12 and all(n > 0 and math.isfinite(n) for n in norms), norms


def test_checkpoint_average(corpus, tmp_path):
    cfg = tiny_cfg(corpus, steps=6, **{"train.ckpt_every": 2, "train.keep_checkpoints": 3, "train.avg_last": 2})
    s = train(cfg, tmp_path / "run")
    ck = sorted((tmp_path / "run/checkpoints").iterdir())
    assert [p.name for p in ck] == ["step_000002", "step_000004", "step_000006"]  # kept the last 3
    avg = load_tensors(tmp_path / "run/model_avg.safetensors")
    a, b = (load_tensors(p / "model.safetensors") for p in ck[1:])
    torch.testing.assert_close(avg["embed.weight"], (a["embed.weight"] + b["embed.weight"]) / 2)
    assert s["avg_of"] == ["step_000004", "step_000006"] and math.isfinite(s["avg_val_loss"])


def test_distillation_chunked_equals_whole_and_teacher_checks(corpus, tmp_path):
    teacher = tmp_path / "teacher"
    train(tiny_cfg(corpus, steps=2), teacher)
    runs = {}
    for chunk in (0, 16):  # the chunked head runs the teacher's logits 16 rows at a time too
        out = tmp_path / f"student{chunk}"
        s = train(tiny_cfg(corpus, steps=3, **{"train.teacher": str(teacher), "train.distill_alpha": 0.7,
                                               "model.loss_chunk": chunk}), out)
        runs[chunk] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        assert all("ce" in r and r["loss"] != r["ce"] for r in runs[chunk]) and math.isfinite(s["val_loss"])
    for whole, chunked in zip(*runs.values(), strict=True):
        assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert chunked["ce"] == pytest.approx(whole["ce"], rel=1e-5)
    # the dry run counts the teacher: its weights, and its logits beside the student's
    from slmlab.estimate import estimate, report

    with_teacher = estimate(tiny_cfg(corpus, **{"train.teacher": str(teacher)}))
    alone = estimate(tiny_cfg(corpus))
    assert with_teacher["static_bytes"]["teacher"] == 4 * alone["params"]  # the same shape as the student
    assert with_teacher["phases"][0]["no_checkpoint"]["logits"] > 2 * alone["phases"][0]["no_checkpoint"]["logits"]
    assert "teacher weights" in report(with_teacher) and "teacher weights" not in report(alone)
    with pytest.raises(ConfigError, match="train.teacher=.*nowhere"):
        estimate(tiny_cfg(corpus, **{"train.teacher": str(tmp_path / "nowhere")}))
    with pytest.raises(ConfigError, match="different tokenizer"):
        train(tiny_cfg(corpus, steps=2, **{"train.teacher": str(teacher), "model.vocab_size": 280}),
              tmp_path / "bad")
    with pytest.raises(ConfigError, match="has model.vocab_size=300, this run 320: distillation compares logits"):
        train(tiny_cfg(corpus, steps=2, **{"train.teacher": str(teacher), "model.vocab_size": 320,
                                           "data.tokenizer": str(teacher)}), tmp_path / "bad")
    with pytest.raises(ConfigError, match="distills into autoregressive models; objective.name is 'mdlm'"):
        train(tiny_cfg(corpus, steps=2, **{"train.teacher": str(teacher), "objective.name": "mdlm",
                                           "model.causal": False}), tmp_path / "bad")
    mdlm = tmp_path / "mdlm"
    train(tiny_cfg(corpus, steps=1, **{"objective.name": "mdlm", "model.causal": False}), mdlm)
    with pytest.raises(ConfigError, match="is an objective.name=mdlm run: distillation needs an autoregressive"):
        train(tiny_cfg(corpus, steps=2, **{"train.teacher": str(mdlm)}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_teacher_with_too_few_learned_positions_is_refused_before_training(corpus, tmp_path):
    teacher = tmp_path / "teacher"
    train(tiny_cfg(corpus, steps=1, **{"model.pos": "learned", "model.max_positions": 16,
                                       "train.phases": "[{seq_len: 16, share: 1.0, tokens_per_step: 128}]"}), teacher)
    with pytest.raises(ConfigError, match="model.max_positions=16, but this run trains on sequences of 32 tokens"):
        train(tiny_cfg(corpus, steps=2, **{"train.teacher": str(teacher)}), tmp_path / "student")
    assert not (tmp_path / "student").exists()


def test_a_failing_sample_loses_neither_weights_nor_summary(corpus, tmp_path, monkeypatch):
    from slmlab import trainer
    from slmlab.rundir import RunDir

    def broken_sample(*a, **k):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(trainer, "generate_sample", broken_sample)
    with pytest.raises(RuntimeError, match="generation failed"):
        train(tiny_cfg(corpus, steps=2), tmp_path / "run")
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == 2
    RunDir.open(tmp_path / "run").load()  # the final weights are there
    assert not (tmp_path / "run/sample.txt").exists()


def test_a_diverged_run_ends_without_a_sample(corpus, tmp_path, monkeypatch):
    """Sampling from non-finite weights fails (probabilities with nan): a run whose final loss is
    not finite ends normally, saying why it has no sample."""
    from slmlab import trainer

    real = trainer.evaluate

    def diverged(*a, **k):
        return {**real(*a, **k), "val_loss": float("nan")}

    def no_sample(*a, **k):
        raise AssertionError("sampled a diverged model")

    monkeypatch.setattr(trainer, "evaluate", diverged)
    monkeypatch.setattr(trainer, "generate_sample", no_sample)
    s = train(tiny_cfg(corpus, steps=2), tmp_path / "run")
    assert math.isnan(s["val_loss"])
    assert (tmp_path / "run/sample.txt").read_text() == "(no sample: the final validation loss is nan; the run diverged)"


def test_quality_stream_orders_low_to_high_and_repeats_top():
    eos = 0
    docs = [[5, 5, 5, eos], [1, 2, eos], [7, 8, 9, 6, eos]]
    tokens = np.array(sum(docs, []))
    spans = document_spans(tokens, eos)
    assert spans == [(0, 4), (4, 7), (7, 12)]
    s = OrderedStream(tokens, spans, np.array([3.0, 1.0, 2.0]))
    x, y = s.next(1, 11)
    assert x[0].tolist() == [1, 2, eos, 7, 8, 9, 6, eos, 5, 5, 5]  # scores 1 -> 2 -> 3
    top = OrderedStream(tokens, spans, np.array([3.0, 1.0, 2.0]), top_frac=0.3)
    x, _ = top.next(2, 4)
    assert x.tolist() == [[5, 5, 5, eos], [5, 5, 5, eos]]  # only the best document, repeated


@pytest.mark.parametrize("frac,n,keep", [(0.14, 50, 7), (0.29, 100, 29), (0.3, 10, 3), (0.5, 3, 2), (1e-6, 5, 1)])
def test_top_frac_keeps_the_fraction_as_written(frac, n, keep):
    """ceil(0.14 * 50) was 8 in floats (7.000000000000001): one document below the top 14% streamed too."""
    tokens = np.array(sum(([i + 1] * 2 + [0] for i in range(n)), []))
    s = OrderedStream(tokens, document_spans(tokens, 0), np.arange(n, dtype=float), top_frac=frac)
    streamed = set(s.take(np.arange(len(s))).tolist()) - {0}
    assert s.n_docs == keep and sorted(streamed) == list(range(n - keep + 1, n + 1))


@pytest.mark.parametrize("top_frac", [1.0, 0.4])
def test_a_quality_stream_reads_what_a_token_index_of_its_documents_reads(top_frac):
    """The stream keeps its documents' spans, not an int64 index of every token: the windows are those the
    explicit index (the documents' token positions concatenated in score order) gives, wrapping included."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, 400).astype(np.uint16)
    tokens[rng.choice(400, 30, replace=False)] = 0
    spans = document_spans(tokens, 0)
    scores = rng.random(len(spans))
    s = OrderedStream(tokens, spans, scores, top_frac=top_frac, reads=1000)
    order = np.argsort(scores, kind="stable")[len(spans) - s.n_docs:]
    index = np.concatenate([np.arange(*spans[i]) for i in order])
    cursor = s.cursor
    for b, t in [(3, 7), (1, 1), (5, 63), (2, 300)]:  # 2 x 300 wraps the stream
        x, y = s.next(b, t)
        pos = (cursor + np.arange(b)[:, None] * t + np.arange(t + 1)[None, :]) % len(index)
        want = torch.from_numpy(tokens[index[pos]].astype(np.int64))
        assert len(s) == len(index) and torch.equal(x, want[:, :-1]) and torch.equal(y, want[:, 1:])
        cursor = (cursor + b * t) % len(index)


def test_a_quality_score_too_large_for_a_float_is_the_one_line_error(tmp_path):
    """An integer of 400 digits raised OverflowError in math.isfinite."""
    from slmlab.curriculum import jsonl_scores

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "q": 1}) + "\n" + '{"text": "b", "q": 1' + "0" * 400 + "}\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: quality score field 'q' missing or not a finite number$"):
        jsonl_scores(str(path), "q", 2)
    path.write_text(json.dumps({"text": "a", "q": 10 ** 300}) + "\n")
    assert jsonl_scores(str(path), "q", 1) == [1e300]


@pytest.mark.parametrize("reads", [4, 8, 20])
def test_a_quality_stream_ends_on_its_best_token_however_much_the_phase_reads(reads):
    """The cursor started at 0: a phase reading less than the stream saw only its worst documents."""
    eos = 0
    tokens = np.array([5, 5, 5, eos, 1, 2, eos, 7, 8, 9, 6, eos])
    s = OrderedStream(tokens, document_spans(tokens, eos), np.array([3.0, 1.0, 2.0]), reads=reads)
    for _ in range(reads // 4):
        x, y = s.next(1, 4)
    assert y[0].tolist() == [5, 5, 5, eos]  # the best document's last tokens are the phase's last targets


def test_quality_ordered_phase_from_jsonl_field(tmp_path):
    rows = [{"text": f"doc {i} " + "abc " * (i + 1), "q": float(i % 5)} for i in range(200)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=[f"data.spec={path}", *tiny_overrides(tmp_path, steps=4), "train.quality_score=q",
                                 "train.phases=[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                                 "{seq_len: 16, share: 0.5, tokens_per_step: 128, order: quality, top_frac: 0.3}]"])
    s = train(cfg, tmp_path / "run")
    assert math.isfinite(s["val_loss"])
    with pytest.raises(ConfigError, match="needs train.quality_score"):
        load_config(overrides=["train.phases=[{seq_len: 16, share: 1.0, order: quality}]"])


@pytest.mark.parametrize("score,q,needle", [
    ("fn:bogus", 1.0, "unknown quality scorer 'fn:bogus'"),
    ("q", float("nan"), "d.jsonl:4: quality score field 'q' missing or not a finite number (nan)"),
    ("quality", 1.0, "d.jsonl:1: quality score field 'quality' missing or not a finite number"),
])
def test_a_bad_quality_score_stops_the_run_before_its_first_step(tmp_path, score, q, needle):
    """It failed when the quality phase began, after the earlier phases had trained; a NaN score
    ranked as the best text."""
    rows = [{"text": f"doc {i} " + "abc " * (i + 1), "q": q if i == 3 else float(i % 5)} for i in range(200)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=[f"data.spec={path}", *tiny_overrides(tmp_path, steps=4),
                                 f"train.quality_score={score}",
                                 "train.phases=[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                                 "{seq_len: 16, share: 0.5, tokens_per_step: 128, order: quality}]"])
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run")
    assert needle in str(e.value) and not (tmp_path / "run").exists(), str(e.value)


def test_the_final_records_name_the_phase_that_trained_the_last_step(corpus, tmp_path):
    """A last phase with no steps (share 0, or train.steps too few) was named by the final eval's record."""
    path, d = corpus
    cfg = load_config(overrides=[f"data.spec={path}", *tiny_overrides(d, steps=4, **{
        "train.ckpt_every": 2, "train.avg_last": 2,
        "train.phases": "[{seq_len: 16, share: 0.5, tokens_per_step: 128}, "
                        "{seq_len: 32, share: 0.5, tokens_per_step: 128}, {seq_len: 64, share: 0.0}]"})])
    train(cfg, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r.get("final") or r.get("final_avg")]
    assert len(last) == 2 and all((r["step"], r["phase"], r["seq_len"]) == (4, 2, 32) for r in last), last


# ---- CLI: one-line errors, exit 2, nothing overwritten ----

def test_cli_bad_input_exits_2(corpus, tmp_path, capsys):
    path, d = corpus
    base = ["--data", str(path), "--out", str(tmp_path / "x"), *tiny_overrides(d)]
    for extra, msg in ((["train.phases=[{seq_len: 16, share: 0.3}]"], "sum to 0.3"),
                       (["train.phases=[{seq_len: 48, share: 1.0, tokens_per_step: 128}]"], "not divisible"),
                       (["optim.name=sgd"], "optim.name")):
        rc, cap = cli(base + extra, capsys)
        assert rc == 2 and msg in cap.err and cap.err.count("\n") == 1, cap.err
    assert not (tmp_path / "x").exists()
    rc, cap = cli(["--resume", "--out", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "holds no run" in cap.err


def test_cli_resume_errors_leave_run_untouched(corpus, tmp_path, capsys):
    path, d = corpus
    run = tmp_path / "run"
    rc, _ = cli(["--data", str(path), "--out", str(run), *tiny_overrides(d, steps=2)], capsys)
    assert rc == 0
    rc, cap = cli(["--resume", "--out", str(run)], capsys)  # ckpt_every=0: no checkpoint
    assert rc == 2 and "no checkpoint" in cap.err
    rc, _ = cli(["--data", str(path), "--out", str(run), "--force", *tiny_overrides(d, steps=4),
                 "train.ckpt_every=2"], capsys)
    assert rc == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, cap = cli(["--resume", "--out", str(run), "model.d_model=64", "model.loss_chunk=8"], capsys)
    # Only what changes the weights is named: loss_chunk (like grad_checkpoint) may change on resume.
    assert rc == 2 and cap.err.endswith("model.d_model 32 -> 64\n") and cap.err.count("\n") == 1, cap.err
    rc, cap = cli(["--data", str(path), "--out", str(run), *tiny_overrides(d, steps=4)], capsys)
    assert rc == 2 and "--force" in cap.err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A torn checkpoint: a clear error naming the file, not a stack trace.
    state = latest_checkpoint(run) / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    rc, cap = cli(["--resume", "--out", str(run)], capsys)
    assert rc == 2 and str(state) in cap.err and "corrupt or truncated" in cap.err
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tensors(weights)


def test_a_flipped_bit_in_a_checkpoint_is_caught_by_its_checksums(corpus, tmp_path, capsys):
    """safetensors and torch.load read a flipped bit inside a tensor as a value: resume went on with it."""
    path, d = corpus
    run = tmp_path / "run"
    assert cli(["--data", str(path), "--out", str(run), *tiny_overrides(d, steps=4), "train.ckpt_every=2"],
               capsys)[0] == 0
    ckpt = latest_checkpoint(run)
    for name in ("model.safetensors", "state.pt"):
        f = ckpt / name
        good = f.read_bytes()
        bad = bytearray(good)
        # the last tensor's data (safetensors ends with it); state.pt's middle (a zip: its directory is last)
        bad[len(good) - 9 if name == "model.safetensors" else len(good) // 2] ^= 0x10
        f.write_bytes(bytes(bad))
        rc, cap = cli(["--resume", "--out", str(run)], capsys)
        assert rc == 2 and cap.err.startswith(f"error: checkpoint {ckpt} is corrupt: {name} differs from the "
                                              "sha256 recorded when it was written"), cap.err
        f.write_bytes(good)
    assert cli(["--resume", "--out", str(run)], capsys)[0] == 0


def test_wandb_offline(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = train(tiny_cfg(corpus, steps=2, **{"logging.wandb": True, "logging.wandb_mode": "offline"}),
                    tmp_path / "run")
    (run_file,) = (tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb")
    # wandb's service process may still be flushing the file after finish() returns: read it
    # until its exit record is there (a poll with a deadline, not a timing assertion).
    deadline = time.monotonic() + 60
    while not (found := read_wandb_offline(run_file))[2] and time.monotonic() < deadline:
        time.sleep(0.2)
    history, wb_summary, complete = found
    assert complete, f"{run_file} has no exit record"
    # every metrics.jsonl value reached wandb at its step (the final eval shares the last step's row)
    recs = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == sorted({r["step"] for r in recs}) == [1, 2]
    for rec in recs:
        for k, v in rec.items():
            assert history[rec["step"]][k] == pytest.approx(v), (rec["step"], k)
    assert history[1]["loss"] > 0 and "val_bpb" in history[2]
    for k in ("val_loss", "val_bpb", "tokens", "params", "arch"):
        assert wb_summary[k] == pytest.approx(summary[k]) if isinstance(summary[k], float) else wb_summary[k] == summary[k]


def wandb_history(run_file):
    # wandb's service process may still be flushing the file after finish() returns: read it
    # until its exit record is there (a poll with a deadline, not a timing assertion).
    deadline = time.monotonic() + 60
    while not (found := read_wandb_offline(run_file))[2] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found[2], f"{run_file} has no exit record"
    return found[0]


def test_wandb_resume_continues_the_run_from_the_next_new_step(corpus, tmp_path, monkeypatch):
    """--resume logs into the same wandb run (offline: a second directory under the same id), and
    only the steps wandb has not had: it refuses steps below ones it has."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    train(tiny_cfg(corpus, steps=4, **{"logging.wandb": True, "logging.wandb_mode": "offline",
                                       "train.ckpt_every": 2}), run)
    shutil.rmtree(latest_checkpoint(run))  # resume from step 2: steps 3 and 4 are replayed
    train(load_config(run / "config.yaml", overrides=["train.steps=6"]), run, resume=True)
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.stem for f in files}) == 1, files  # run-<id>.wandb: one id
    steps = sorted(sorted(wandb_history(f)) for f in files)
    assert steps == [[1, 2, 3, 4], [5, 6]]


def read_wandb_offline(path):
    """({_step: history row}, merged summary, has an exit record) from an offline run's .wandb file: wandb's
    LevelDB-style log (a 7-byte header, then 32 KiB blocks of records: crc32 u32, length u16,
    type u8 (1 full, 2 first, 3 middle, 4 last), payload) of wandb_internal_pb2.Record protos."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, part, payloads = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            payloads.append(part + chunk)
            part = b""
        elif kind in (2, 3):
            part += chunk
    history, summary, complete = {}, {}, False
    for p in payloads:
        rec = pb.Record()
        rec.ParseFromString(p)
        complete |= rec.WhichOneof("record_type") == "exit"
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
        elif rec.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    return history, summary, complete


def _step_losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r and not r.get("final")], recs[-1]


def test_compiled_training_equals_eager(corpus, tmp_path, capsys):
    """train.compile=true (torch.compile of the training and eval forward) against eager on CPU:
    the same per-step losses within 1e-4 (inductor fuses and reorders fp32 sums) and final val loss."""
    common = {"train.steps": 4, "train.log_every": 1}  # two phases: T=16 then T=32, each compiled
    eager = train(tiny_cfg(corpus, **common, **{"train.compile": False}), tmp_path / "eager")
    comp = train(tiny_cfg(corpus, **common, **{"train.compile": True}), tmp_path / "compiled")
    a, _ = _step_losses(tmp_path / "eager")
    b, _ = _step_losses(tmp_path / "compiled")
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert abs(eager["val_loss"] - comp["val_loss"]) < 1e-4
    captured = capsys.readouterr()  # a compile failure runs eager with a warning: eager against eager
    assert "torch.compile failed" not in captured.out + captured.err


def test_backward_compile_failure_redoes_the_step_eagerly(corpus, tmp_path, capsys, monkeypatch):
    """The compiled backward graph compiles at the first backward, outside the compiled call: a
    failure there must also fall back (one warning), zero what the partial backward wrote and redo
    the step on the same micro-batches, so the run's losses are the eager run's."""
    import torch._dynamo.exc as dynamo_exc

    class BackwardFails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):
            return loss.clone()

        @staticmethod
        def backward(ctx, g):
            raise dynamo_exc.TorchDynamoException("backward graph failed to compile")

    def compile_with_broken_backward(fn, **kw):
        return lambda *a, **k: BackwardFails.apply(fn(*a, **k)) if len(a) == 2 else fn(*a, **k)

    monkeypatch.setattr(torch, "compile", compile_with_broken_backward)
    common = {"train.steps": 3, "train.log_every": 1, "train.grad_accum": 2}
    train(tiny_cfg(corpus, **common, **{"train.compile": True}), tmp_path / "fallback")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: torch.compile")]
    assert len(warnings) == 1 and "the training forward" in warnings[0] and "backward graph" in warnings[0]
    train(tiny_cfg(corpus, **common, **{"train.compile": False}), tmp_path / "ref")
    assert _step_losses(tmp_path / "fallback")[0] == _step_losses(tmp_path / "ref")[0]
    # several ranks: DDP's reducer (or FSDP's reduce-scatters) are left mid-backward, so no redo: one line
    from slmlab.trainer import Trainer

    tr = Trainer(tiny_cfg(corpus, **common, **{"train.compile": True}), tmp_path / "ranks")
    tr.dist.world = 2
    ph = tr.phases[0]
    tr.batches.stream(ph)
    with pytest.raises(ConfigError, match="with 2 ranks the step cannot be redone eagerly: rerun with train.compile"):
        tr.train_step(1, ph)


def test_compile_failure_falls_back_to_eager_with_one_warning(corpus, tmp_path, capsys, monkeypatch):
    import torch._dynamo.exc as dynamo_exc

    def broken_compile(fn, **kw):
        def call(*a, **k):
            raise dynamo_exc.TorchDynamoException("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    common = {"train.steps": 3, "train.log_every": 1}
    s = train(tiny_cfg(corpus, **common, **{"train.compile": True}), tmp_path / "fallback")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: torch.compile failed")]
    assert len(warnings) == 2 and "the training forward" in warnings[0] and "the eval forward" in warnings[1]
    ref = train(tiny_cfg(corpus, **common, **{"train.compile": False}), tmp_path / "ref")
    assert _step_losses(tmp_path / "fallback")[0] == _step_losses(tmp_path / "ref")[0]
    assert s["val_loss"] == ref["val_loss"]


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc's mallopt")
def test_cpu_training_keeps_freed_memory_unless_the_user_chose():
    """resolve_device('cpu') raises glibc's mmap/trim thresholds (freed activations stay mapped for
    the next step) but leaves them alone when the user set MALLOC_* or preloads another allocator.
    With the thresholds raised, a freed 64 MB tensor's pages stay resident for the next one."""
    import os
    import subprocess
    import sys

    code = ("import torch; from slmlab.runtime import resolve_device, keep_freed_memory\n"
            "def rss():\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            "resolve_device('cpu'); t = torch.ones(16 << 20); before = rss(); del t\n"
            "print(keep_freed_memory(), before - rss() < 32 << 10)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    for name, extra in (("default", {}), ("user", {"MALLOC_TRIM_THRESHOLD_": "131072"})):
        env_i = {k: v for k, v in env.items() if not k.startswith("MALLOC_")} | extra
        r = subprocess.run([sys.executable, "-c", code], env=env_i, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-1000:]
        out[name] = r.stdout.split()
    assert out["default"] == ["True", "True"]
    assert out["user"] == ["False", "False"]


def test_a_validation_split_shorter_than_a_training_sequence_is_fine_with_a_short_eval(corpus, tmp_path):
    """The validation split is read at train.eval_seq_len only: training sequences longer than it
    (~910 tokens here) need a shorter eval length, not a larger split."""
    over = {"train.phases": "[]", "train.seq_len": 1000, "train.batch_size": 1, "train.eval_seq_len": 64}
    s = train(tiny_cfg(corpus, steps=1, **over), tmp_path / "long")
    assert math.isfinite(s["val_loss"])
    with pytest.raises(DataError, match="lower train.eval_seq_len"):
        train(tiny_cfg(corpus, steps=1, **{**over, "train.eval_seq_len": 1000}), tmp_path / "bad")


def test_evaluate_outside_the_trainer_uses_the_runs_eval_shape():
    """The int8 export's val-bpb report evaluated at train.seq_len (256 by default), which the default
    phases never train at: the run evaluated at 2048. A learned position table caps the length."""
    from slmlab.evaluate import run_eval_shape

    assert run_eval_shape(load_config()) == (2048, 2)  # the last phase: 4096 tokens per step
    assert run_eval_shape(load_config(overrides=["train.eval_seq_len=512"])) == (512, 8)
    assert run_eval_shape(load_config(overrides=["train.phases=[]", "train.seq_len=32", "train.batch_size=4"])) == (32, 4)
    gpt2 = load_config(overrides=["model.pos=learned", "model.max_positions=1024"])
    assert run_eval_shape(gpt2) == (1024, 4)
