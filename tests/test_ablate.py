"""ablate.py: statistics against scipy.stats on fixed numbers, the inline and file forms giving
one run set, equal-compute budgets, every bad input as a one-line error, and on tiny real runs:
a 2x2 grid through submitit's local executor, a SIGKILLed coordinator re-run (interrupted run
resumed) and --report alone, each ending with the same results.csv; a crashed run; --tasks scored by
the workers (added to a finished ablation without retraining, never twice) and tabulated."""
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as sps
from trainer_helpers import ROOT, write_corpus

from slmlab import plot
from slmlab.ablate import report, runner, stats
from slmlab.ablate.plan import (
    Ablation,
    AblationError,
    Run,
    Variant,
    corpus_dirs,
    file_ablation,
    inline_ablation,
    plan,
    read_manifest,
)
from slmlab.ablate.worker import config_sha, run_state
from slmlab.checkpoint import checkpoint_dirs

spec = importlib.util.spec_from_file_location("ablate_cli", ROOT / "ablate.py")
ablate_cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate_cli)

BASE = {1: 2.031, 2: 2.118, 3: 1.954, 4: 2.070}
VAR = {1: 1.962, 2: 2.075, 3: 1.911, 4: 2.049}


# ---- statistics ----
def test_paired_comparison_matches_scipy():
    c = stats.compare(BASE, VAR)
    v, b = [VAR[s] for s in sorted(BASE)], [BASE[s] for s in sorted(BASE)]
    ref = sps.ttest_rel(v, b)
    ci = ref.confidence_interval(0.95)
    assert c.test == "paired t" and c.n == 4
    assert c.diff == pytest.approx(np.mean(np.subtract(v, b)))
    assert (c.lo, c.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert c.p == pytest.approx(ref.pvalue)
    assert c.p_wilcoxon == pytest.approx(sps.wilcoxon(np.subtract(v, b)).pvalue)


def test_unpaired_falls_back_to_welch():
    var = {10 + k: x for k, x in VAR.items()}  # no seed shared with the baseline
    c = stats.compare(BASE, var)
    ref = sps.ttest_ind(list(var.values()), list(BASE.values()), equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert c.test == "Welch t" and math.isnan(c.p_wilcoxon)
    assert c.p == pytest.approx(ref.pvalue)
    assert (c.lo, c.hi) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_summary_noise_and_ranking():
    s = stats.summarize(BASE.values())
    assert (s.mean, s.sd, s.n) == (pytest.approx(np.mean(list(BASE.values()))),
                                   pytest.approx(sps.tstd(list(BASE.values()))), 4)
    # |diff| 0.044 is below the baseline's sd 0.069, but the paired CI excludes 0: resolved, not noise
    assert not stats.compare(BASE, VAR).within_noise
    assert stats.compare(BASE, {k: x + (0.02 if k % 2 else -0.021) for k, x in BASE.items()}).within_noise
    assert stats.ranking_agreement({"a": {"x": 1.0, "y": 2.0, "z": 3.0}, "b": {"x": 1.5, "y": 2.5, "z": 2.9}}) == (True, 1.0)
    agree, tau = stats.ranking_agreement({"a": {"x": 1.0, "y": 2.0, "z": 3.0}, "b": {"x": 3.0, "y": 2.0, "z": 1.0}})
    assert not agree and tau == pytest.approx(-1.0)


def test_non_finite_values_are_dropped_pair_by_pair():
    """A diverged run's NaN or inf made the standard error NaN, and p fell back to 0."""
    var = {**VAR, 2: math.nan}
    base = {**BASE, 4: math.inf}
    c = stats.compare(base, var)
    ref = sps.ttest_rel([VAR[1], VAR[3]], [BASE[1], BASE[3]])  # the two finite pairs
    assert c.test == "paired t" and c.n == 2 and c.p == pytest.approx(ref.pvalue)
    assert (c.lo, c.hi) == (pytest.approx(ref.confidence_interval().low), pytest.approx(ref.confidence_interval().high))
    one = stats.compare(base, {1: VAR[1], 2: math.nan, 3: math.inf})  # one finite pair, one finite variant value
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.lo) and math.isnan(one.hi)
    # Δ is that pair's difference (it was the variant's one value less the mean of every baseline seed)
    assert one.paired and one.diff == pytest.approx(VAR[1] - BASE[1])
    assert report._delta(one, pairs_short=True) == f"{VAR[1] - BASE[1]:+.4f} (1 pair)"
    welch = stats.compare(BASE, {10 + k: x for k, x in VAR.items()})
    assert not welch.paired and " (unpaired)" in report._delta(welch, pairs_short=True)
    assert stats.summarize([1.0, math.nan, 3.0, math.inf]) == stats.Summary(2.0, pytest.approx(math.sqrt(2)), 2)


def test_identical_differences_give_no_p():
    """A constant shift has no spread: scipy's ttest_rel says NaN, the old code said p = 0 with a
    point CI (and 1e-30 when float rounding made the shifts differ in the last bit)."""
    base = {1: 3.0, 2: 3.1, 3: 3.2}
    for shift in (0.0, -0.1, 0.1):
        c = stats.compare(base, {k: x + shift for k, x in base.items()})
        assert math.isnan(c.p) and math.isnan(c.lo) and math.isnan(c.hi) and math.isnan(c.d_z), (shift, c)
        assert c.note == stats.IDENTICAL and c.diff == pytest.approx(shift) and not c.within_noise


def test_holm_and_effect_size():
    c = stats.compare(BASE, VAR)
    ref = sps.ttest_rel([VAR[s] for s in BASE], [BASE[s] for s in BASE])
    d = np.subtract([VAR[s] for s in BASE], [BASE[s] for s in BASE])
    assert c.d_z == pytest.approx(d.mean() / d.std(ddof=1)) == pytest.approx(ref.statistic / math.sqrt(4))
    assert math.isnan(stats.compare(BASE, {10 + k: x for k, x in VAR.items()}).d_z)  # Welch: no pairs, no d_z
    # by hand: sorted 0.01, 0.03, 0.04 (m = 3) -> 0.03, 0.06, max(0.06, 0.04); nan neither counts nor changes
    assert stats.holm([0.04, 0.01, math.nan, 0.03]) == pytest.approx([0.06, 0.03, math.nan, 0.06], nan_ok=True)
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == []
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    ps = [0.001, 0.2, 0.013, 0.04, 0.5, 0.011]
    assert stats.holm(ps) == pytest.approx(list(multipletests(ps, method="holm")[1]))


# ---- the report, from hand-made run directories ----
def fake_out(out, bpb: dict, seeds=(1, 2, 3)):
    """OUT as a finished ablation of variants `base` and `v` leaves it, written by hand: bpb maps
    (variant, seed) to the final val bpb, or to "failed" (error.txt), "cut" (a truncated
    summary.json), "keyless" (one without tokens_per_s, and a resources.json that is a list) or
    "stale" (a finite summary beside another config.yaml); absent: not started."""
    import json

    import yaml

    cells, runs = [], []
    for v in ("base", "v"):
        cells.append({"variant": v, "corpus": "c.txt", "layers": "AA", "params": 1000, "nonembed_params": 500,
                      "flops_per_token": 6000.0, "tokens_per_step": 128.0, "steps": 4, "bpb_is_bound": False})
    for s in seeds:
        for v in ("base", "v"):
            cfg = {"arch": "hybrid", "train": {"seed": s}, "model": {"layers": v}}
            r = Run(v, "c.txt", s, f"{v}/seed{s}", "hybrid", [], "config.yaml", config_sha(cfg))
            runs.append(r.__dict__)
            d = out / r.dir
            d.mkdir(parents=True)
            (d / "ablate.json").write_text(json.dumps(r.__dict__))
            x = bpb.get((v, s))
            if x is None:
                continue
            (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "arch": "other"} if x == "stale" else cfg))
            if x == "failed":
                (d / "error.txt").write_text("exit 1: RuntimeError: CUDA out of memory\n")
                continue
            val = 3.0 if x in ("cut", "stale", "keyless") else x
            summary = json.dumps({"val_bpb": val, "val_loss": val * 0.7, "tokens": 512, "train_time_s": 1.0,
                                  "wall_time_s": 2.0, **({} if x == "keyless" else {"tokens_per_s": 256.0})})
            if x == "keyless":
                (d / "resources.json").write_text("[1, 2]")
            (d / "summary.json").write_text(summary[:20] if x == "cut" else summary)
            (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in (
                {"tokens": 256, "val_bpb": val + 0.5}, {"tokens": 384, "val_bpb": val + 0.3},
                {"tokens": 512, "final": True, "val_bpb": val})))
    ab = {"variants": [{"name": "base", "arch": "hybrid", "overrides": []}, {"name": "v", "arch": "hybrid",
                                                                              "overrides": []}],
          "seeds": list(seeds), "corpora": ["c.txt"], "steps": 4, "budget": "steps", "overrides": [],
          "config": "config.yaml"}
    (out / "ablation.json").write_text(json.dumps({"ablation": ab, "cells": cells, "runs": runs}))
    return [Run(**r) for r in runs]


def _row(md: str, variant: str) -> list[str]:
    return next(line for line in md.splitlines() if line.startswith(f"| {variant} |")).split(" | ")


def test_report_and_runner_share_one_done_predicate(tmp_path):
    """Diverged (NaN), failed, truncated, stale-config and finished runs: the report's status and
    the runner's skip decision agree; a non-finite baseline neither crashes the plots nor shows
    as "nan bpb"; statistics use the finite pairs, and the Δ cell says how many."""
    runs = fake_out(tmp_path, {("base", 1): math.nan, ("base", 2): 3.0, ("base", 3): 3.2, ("base", 4): 3.1,
                               ("v", 1): 2.9, ("v", 2): 2.95, ("v", 3): math.inf, ("v", 4): 3.0},
                    seeds=(1, 2, 3, 4))
    results = report.write_report(tmp_path)
    status = {r.dir: r.status for r in results}
    assert status == {"base/seed1": "diverged", "base/seed2": "done", "base/seed3": "done", "base/seed4": "done",
                      "v/seed1": "done", "v/seed2": "done", "v/seed3": "diverged", "v/seed4": "done"}
    assert {r.dir: runner.is_done(tmp_path, r) for r in runs} == {d: True for d in status}
    md = (tmp_path / "results.md").read_text()
    assert "nan" not in md.lower() and "(3/4, seed 1 diverged)" in md and "(3/4, seed 3 diverged)" in md
    cmp = stats.compare({2: 3.0, 4: 3.1}, {2: 2.95, 4: 3.0})
    assert f"{cmp.diff:+.4f} [{cmp.lo:+.4f}, {cmp.hi:+.4f}] (2 pairs)" in _row(md, "v")[8]
    assert "- base: seed 1 diverged (non-finite final val bpb)" in md and "not retried" in md
    csv = (tmp_path / "results.csv").read_text()
    assert "base/seed1,diverged," in csv and ",nan,nan," in csv
    assert (tmp_path / "final.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_failed_truncated_and_stale_runs_are_rerun(tmp_path):
    runs = fake_out(tmp_path, {("base", 1): 3.0, ("base", 2): "cut", ("base", 3): "stale",
                               ("v", 1): "failed", ("v", 2): 2.9})
    results = report.write_report(tmp_path)
    status = {r.dir: r.status for r in results}
    assert status == {"base/seed1": "done", "base/seed2": "missing", "base/seed3": "missing",
                      "v/seed1": "failed", "v/seed2": "done", "v/seed3": "missing"}
    assert {r.dir for r in runs if runner.is_done(tmp_path, r)} == {"base/seed1", "v/seed2"}
    md = (tmp_path / "results.md").read_text()
    assert "- v: seed 1 failed: exit 1: RuntimeError: CUDA out of memory (a re-run retries it" in md
    assert "(1/3, seed 1 failed, missing seed 3)" in md
    assert "its summary.json is unreadable" in md and "its config.yaml is not the one this ablation plans" in md
    assert run_state(tmp_path / "v/seed1", runs[1].config_sha).why == "exit 1: RuntimeError: CUDA out of memory"


def test_a_summary_lacking_a_reported_number_is_no_result(tmp_path):
    """--report on a hand-damaged OUT: a summary.json without tokens_per_s (a KeyError in the table) is
    not a result, and a resources.json that is no mapping reads as none (an AttributeError)."""
    fake_out(tmp_path, {("base", 1): 3.0, ("base", 2): "keyless", ("v", 1): 2.9, ("v", 2): 2.8}, seeds=(1, 2))
    (tmp_path / "v/seed1/resources.json").write_text('["not", "a", "mapping"]')
    status = {r.dir: r.status for r in report.write_report(tmp_path)}
    assert status == {"base/seed1": "done", "base/seed2": "missing", "v/seed1": "done", "v/seed2": "done"}
    assert "its summary.json is unreadable" in (tmp_path / "results.md").read_text()


def test_holm_column_and_within_noise_follow_the_paired_ci(tmp_path):
    """The old flag compared |Δ| with the baseline's between-seed sd, so a Δ at p < 0.001 read
    *within noise*; now it marks a CI that includes 0. Holm adjusts over the table's comparisons."""
    man = {"ablation": {"variants": [{"name": n} for n in ("base", "a", "b", "c")]},
           "cells": [{"variant": n, "corpus": "x", "layers": "A", "params": 1, "nonembed_params": 1,
                      "flops_per_token": 1.0, "steps": 1} for n in ("base", "a", "b", "c")]}
    base = {1: 3.0, 2: 3.3, 3: 2.9, 4: 3.2}  # sd 0.18
    vals = {"base": base, "a": {k: x - 0.1 + 0.001 * k for k, x in base.items()},  # tiny spread: p ~ 1e-5
            "b": {k: x + (0.05 if k % 2 else -0.06) for k, x in base.items()},  # CI includes 0
            "c": {k: x + 0.1 + 0.001 * k for k, x in base.items()}}
    results = [report.RunResult("x", v, s, f"{v}/seed{s}", {"val_bpb": y, "val_loss": y, "tokens": 1,
                                                             "tokens_per_s": 1.0, "wall_time_s": 1.0})
               for v, d in vals.items() for s, y in d.items()]
    lines, means = report.corpus_table(man, results, "x")
    md = "\n".join(lines)
    cmps = {v: stats.compare(base, vals[v]) for v in ("a", "b", "c")}
    assert cmps["a"].p < 0.001 and abs(cmps["a"].diff) < stats.summarize(base.values()).sd
    assert "within noise" not in _row(md, "a")[8] and "*within noise*" in _row(md, "b")[8]
    assert "p Holm (3 comparisons)" in lines[0]
    holm = stats.holm([cmps[v].p for v in ("a", "b", "c")])
    for v, h in zip("abc", holm):
        assert _row(md, v)[9:12] == [f"{cmps[v].d_z:+.2f}", f"{cmps[v].p:.3g}", f"{h:.3g}"]
    assert "a difference smaller than that" not in md and "*within noise* marks a Δ whose 95% CI includes 0" in md


def test_identical_differences_are_noted_in_the_table(tmp_path):
    fake_out(tmp_path, {("base", s): 3.0 + s / 10 for s in (1, 2, 3)} | {("v", s): 2.9 + s / 10 for s in (1, 2, 3)})
    report.write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert _row(md, "v")[8:12] == ["-0.1000", "–", "–", "–"]
    assert "- v: differences identical across seeds (Δ -0.1000 over 3 pairs)" in md


def test_curves_keep_the_final_eval_apart_and_the_title_fits(tmp_path):
    fake_out(tmp_path, {("base", 1): 3.0, ("v", 1): 2.9}, seeds=(1,))
    _, results = report.collect(tmp_path)
    assert results[0].curve == [(256, 3.5), (384, 3.3)] and results[0].final == (512, 3.0)
    plt, fig, _ = plot.figure(1, "x " * 150)
    assert all(len(line) <= 14 * 6.5 for line in fig._suptitle.get_text().splitlines())
    plt.close(fig)


def test_the_bpb_plots_mark_a_diffusion_runs_bound(tmp_path, monkeypatch):
    """results.md marked a masked-diffusion run's ELBO bound with ≤; the plots' val bpb axes now do too."""
    import json

    fake_out(tmp_path, {("base", 1): 3.0, ("v", 1): 2.9}, seeds=(1,))
    labels = {}
    monkeypatch.setattr(report, "save", lambda plt, fig, path: labels.update({path.name: fig.axes[0].get_ylabel()}))
    report.write_report(tmp_path)
    assert labels == {"curves.png": "val bpb", "final.png": "val bpb"}
    summary = tmp_path / "v/seed1/summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "val_bpb_is_bound": True}))
    report.write_report(tmp_path)
    assert set(labels.values()) == {"val bpb (≤: an upper bound for diffusion runs)"}


def _fake_plan(runs):
    cells = [plan_cell(v) for v in ("base", "v")]
    return lambda ab: (cells, runs)


def plan_cell(v):
    from slmlab.ablate.plan import Cell

    return Cell(v, "c.txt", "AA", 1000, 500, 6000.0, 128.0, 4, False)


def test_force_deletes_the_ablation_it_finds(tmp_path, monkeypatch):
    """--force on an OUT without ablation.json kept the stale runs (and reported them finished);
    with one, it kept invocations.jsonl, .submitit/ and the emptied variant directories."""
    ab = Ablation(variants=[Variant("base", "hybrid"), Variant("v", "hybrid")], seeds=[1], corpora=["c.txt"], steps=4)
    old = tmp_path / "old"
    stale = fake_out(old, {("base", 1): 3.0, ("v", 1): 2.9}, seeds=(1,))
    (old / "invocations.jsonl").write_text('{"elapsed_s": 100}\n')
    (old / ".submitit" / "123").mkdir(parents=True)
    (old / "notes.txt").write_text("mine")
    fresh = [Run(r.variant, r.corpus, r.seed, f"{r.variant}/seed{r.seed}", "hybrid", [], "config.yaml", "0" * 16)
             for r in stale]  # the same directories, another config
    monkeypatch.setattr(runner, "plan", _fake_plan(fresh))
    for with_manifest in (False, True):
        out = tmp_path / f"out{with_manifest}"
        shutil.copytree(old, out)
        if not with_manifest:
            (out / "ablation.json").unlink()
        with pytest.raises(AblationError, match="pass --force"):
            runner.prepare_out(out, ab, force=False)
        runner.prepare_out(out, ab, force=True)
        assert sorted(p.name for p in out.iterdir()) == ["ablation.json", "base", "notes.txt", "v"], with_manifest
        assert sorted(p.name for p in (out / "base" / "seed1").iterdir()) == ["ablate.json"]
        assert not any(runner.is_done(out, r) for r in fresh)


def test_a_killed_write_of_the_manifest_does_not_claim_out(tmp_path, monkeypatch):
    """ablation.json is published like every file an ablation writes; a coordinator killed while
    writing it leaves a temporary, which the next one clears instead of finding OUT not empty."""
    runs = fake_out(tmp_path / "ref", {}, seeds=(1,))
    monkeypatch.setattr(runner, "plan", _fake_plan(runs))
    ab = Ablation(variants=[Variant("base", "hybrid"), Variant("v", "hybrid")], seeds=[1], corpora=["c.txt"], steps=4)
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".tmp-ablation.json-{dead.stdout.strip()}-0a1b2c3d").mkdir(parents=True)
    runner.prepare_out(out, ab, force=False)
    assert sorted(p.name for p in out.iterdir()) == ["ablation.json", "base", "v"]


def test_corrupt_manifest_is_one_line(tmp_path, monkeypatch, capsys):
    runs = fake_out(tmp_path, {("base", 1): 3.0}, seeds=(1,))
    (tmp_path / "ablation.json").write_text('{"ablation": {"variants"')
    with pytest.raises(AblationError, match="ablation.json is not valid JSON"):
        read_manifest(tmp_path)
    monkeypatch.setattr(runner, "plan", _fake_plan(runs))
    ab = Ablation(variants=[Variant("base", "hybrid"), Variant("v", "hybrid")], seeds=[1], corpora=["c.txt"], steps=4)
    with pytest.raises(AblationError, match="not valid JSON .*; pass --force"):
        runner.prepare_out(tmp_path, ab, force=False)
    assert ablate_cli.run_cli(ablate_cli.main, ["--report", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_failed_attempt_stores_its_error_line(tmp_path):
    """run_local: a worker that dies leaves its last error line in RUN_DIR/error.txt (the report's
    source), and the run stays retried (not done)."""
    runs = fake_out(tmp_path, {}, seeds=(1,))
    (tmp_path / "base/seed1/ablate.json").write_text("{not json")  # the worker dies reading it
    prog = runner.Progress(runs[:1], [plan_cell("base"), plan_cell("v")], tmp_path, say=lambda *_: None)
    runner.run_local(tmp_path, runs[:1], prog, 1, 1, [], "g")
    assert [r.dir for r in prog.failed] == ["base/seed1"]
    err = (tmp_path / "base/seed1/error.txt").read_text()
    assert err.startswith("exit 1: ") and "JSONDecodeError" in err and len(err.splitlines()) == 1
    assert run_state(tmp_path / "base/seed1", runs[0].config_sha).status == "failed"
    assert not runner.is_done(tmp_path, runs[0])


# ---- plans ----
def tiny(tmp_path, **extra):
    """Overrides for a 3-layer d_model-32 model on a small synthetic corpus: seconds per run."""
    ov = {"model.d_model": 32, "model.n_layers": 3, "model.n_heads": 2, "model.n_kv_heads": 1, "model.vocab_size": 300,
          "train.phases": "[]", "train.seq_len": 32, "train.batch_size": 4, "train.warmup_steps": 2,
          "train.eval_every": 3, "train.eval_tokens": 256, "train.log_every": 1, "train.ckpt_every": 2,
          "train.sample_tokens": 4, "data.cache_dir": str(tmp_path / "cache"), "logging.progress": False,
          "train.device": "cpu", "optim.name": "adamw", **extra}  # the optimizer these tests were written against
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    return d, write_corpus(d / "c.txt", lines=1500)


def ablation_file(path: Path, data: Path, seeds: int, variants: str) -> Path:
    """A 6-step hybrid ablation file on `data` with the given `variants:` block."""
    path.write_text(f"arch: hybrid\nseeds: {seeds}\nsteps: 6\ndata: {data}\nvariants:{variants}")
    return path


def test_inline_and_file_forms_give_the_same_runs(corpus, tmp_path):
    d, text = corpus
    inline = inline_ablation("hybrid", ["model.layers=CCA,C", "model.conv_kernel=3,4"], 2, 6, [str(text)],
                             overrides=tiny(d))
    f = ablation_file(tmp_path / "abl.yaml", text, 2, """
  layers=CCA+conv_kernel=3: {overrides: {model.layers: CCA, model.conv_kernel: 3}}
  layers=CCA+conv_kernel=4: {overrides: {model.layers: CCA, model.conv_kernel: 4}}
  layers=C+conv_kernel=3: {overrides: [model.layers=C, model.conv_kernel=3]}
  layers=C+conv_kernel=4: {overrides: {model.layers: C, model.conv_kernel: 4}}
""")
    from_file = file_ablation(f, overrides=tiny(d))
    (cells_a, runs_a), (cells_b, runs_b) = plan(inline), plan(from_file)
    assert [(r.dir, r.seed, r.config_sha) for r in runs_a] == [(r.dir, r.seed, r.config_sha) for r in runs_b]
    assert cells_a == cells_b
    assert [r.dir for r in runs_a][:4] == ["layers=CCA+conv_kernel=3/seed1", "layers=CCA+conv_kernel=4/seed1",
                                           "layers=C+conv_kernel=3/seed1", "layers=C+conv_kernel=4/seed1"]  # interleaved


def test_a_variant_that_trains_an_earlier_ones_model_again_is_dropped_or_refused(corpus, tmp_path, capsys):
    """conv_kernel is read by no layer of an all-attention model: layers=A+conv_kernel=4 would train
    layers=A+conv_kernel=3 again and show a null result. Inline (a product of axes) drops it and says
    so; a file's own list is refused."""
    d, text = corpus
    ab = inline_ablation("hybrid", ["model.layers=CCA,A", "model.conv_kernel=3,4"], 1, 6, [str(text)],
                         overrides=tiny(d))
    assert [v.name for v in ab.variants] == ["layers=CCA+conv_kernel=3", "layers=CCA+conv_kernel=4",
                                             "layers=A+conv_kernel=3"]
    assert ("[ablate] variant layers=A+conv_kernel=4 dropped: it trains the same model as layers=A+conv_kernel=3 "
            "(model.conv_kernel=4 has no effect: no layer is a short conv (model.layers AAA))") in capsys.readouterr().out
    # a common override that no variant reads is said once, when the plan is made
    ab.overrides += ["optim.muon_lr=0.02", "model.mixer_opts.lif.beta=0.5", "model.window=8"]
    plan(ab)
    assert [line for line in capsys.readouterr().out.splitlines() if "note:" in line] == [
        "[ablate] note: optim.muon_lr=0.02 has no effect in any variant: optim.name is adamw",
        "[ablate] note: model.mixer_opts.lif.beta=0.5 has no effect in any variant: no layer uses the lif block "
        "(model.layers, model.mlp)",
        "[ablate] note: model.window=8 has no effect in any variant: no layer slides a window (model.window_pattern "
        "is L: S marks sliding layers)"]
    f = ablation_file(tmp_path / "abl.yaml", text, 1, """
  adamw: {}
  adamw-momentum: {overrides: [optim.muon_momentum=0.8]}
  transformer: {arch: transformer, overrides: [model.layers=CCA]}
""")
    with pytest.raises(AblationError, match=r"^variant adamw-momentum trains the same model as adamw "
                                            r"\(optim.muon_momentum=0.8 has no effect: optim.name is adamw\): drop one"):
        plan(file_ablation(f, overrides=tiny(d)))
    f.write_text(f.read_text().replace("  adamw-momentum: {overrides: [optim.muon_momentum=0.8]}\n", ""))
    with pytest.raises(AblationError, match=r"^variant transformer trains the same model as adamw \(the same "
                                            r"resolved config\)"):
        plan(file_ablation(f, overrides=tiny(d)))


@pytest.mark.parametrize("budget", ["steps", "tokens", "flops"])
def test_budgets(corpus, budget):
    d, text = corpus
    ab = inline_ablation("transformer", ["model.layers=A,C"], 1, 400, [str(text), "stdlib"], budget=budget,
                         overrides=tiny(d, **{"train.seq_len": 256}))
    cells, runs = plan(ab)
    base, conv = cells[0], cells[1]
    assert conv.flops_per_token < base.flops_per_token  # at 256 tokens attention costs more than the conv
    assert (conv.steps > base.steps) == (budget == "flops")  # so the conv gets more steps at equal FLOPs
    spend = {"steps": lambda c: c.steps, "tokens": lambda c: c.steps * c.tokens_per_step,
             "flops": lambda c: c.steps * c.tokens_per_step * c.flops_per_token}[budget]
    assert spend(conv) == pytest.approx(spend(base), rel=1 / base.steps)  # equal up to rounding to whole steps
    assert {r.dir.split("/")[0] for r in runs} == {"c", "stdlib"}  # one directory level per corpus
    assert list(corpus_dirs(["a/x.txt", "b/x.txt", "stdlib"]).values()) == ["x", "x-2", "stdlib"]


def test_equal_flops_counts_a_phases_own_attention_window(corpus):
    """A phase's `window` narrows the S layers the trainer runs: the budget counts those FLOPs (it
    counted the model's own window, so a windowed variant got fewer steps than equal compute gives)."""
    d, text = corpus
    from arch import build_model
    from slmlab.config import load_config

    ov = tiny(d, **{"model.window": 256, "model.window_pattern": "S", "train.phases": "[{seq_len: 256, share: 0.5, tokens_per_step: 1024, "
                                                        "window: 16}, {seq_len: 256, share: 0.5, tokens_per_step: 1024}]"})
    cells, _ = plan(inline_ablation("transformer", ["model.layers=A,CCA"], 1, 40, [str(text)], budget="flops",
                                    overrides=ov))
    cfg = load_config(arch="transformer", overrides=ov + ["model.layers=A"])
    model = build_model(cfg.model, cfg.objective)
    wide = model.flops_per_token(256)
    model.set_windows([16] * len(model.layers))
    narrow = model.flops_per_token(256)
    assert narrow < wide and cells[0].flops_per_token == pytest.approx((narrow + wide) / 2)


def test_prepared_corpora_are_the_ones_the_trainer_reads(corpus, tmp_path, capsys):
    """With data.added_tokens (and a phase's own data) the coordinator tokenized under other cache
    keys than the trainer, so every run tokenized its corpora again, concurrently."""
    from slmlab.config import DEFAULT_CONFIG, load_config
    from slmlab.data import prepare_data
    from slmlab.trainer import Trainer

    d, text = corpus
    other = write_corpus(tmp_path / "other.txt", lines=800, seed=1)
    prepare_data(str(text), 300, tmp_path / "base", progress=False, quiet=True).tokenizer.save(tmp_path / "tok.json")
    phases = f"[{{seq_len: 32, share: 0.5, tokens_per_step: 128}}, {{seq_len: 32, share: 0.5, tokens_per_step: 128, data: {other}}}]"
    overrides = [*tiny(tmp_path, **{"train.phases": phases}), f"data.tokenizer={tmp_path / 'tok.json'}",
                 'data.added_tokens=["<think>"]', f"data.spec={text}", "train.steps=4"]
    runner.prepare_corpora([Run("v", str(text), 1, "v/seed1", "hybrid", overrides, str(DEFAULT_CONFIG), "-")])
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    capsys.readouterr()
    Trainer(load_config(DEFAULT_CONFIG, arch="hybrid", overrides=overrides), tmp_path / "run")
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data: ")]
    assert len(said) == 2 and all(ln.endswith("(cached)") for ln in said), said
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries and len(entries) == 2


def test_what_the_ablation_does_not_say_comes_from_the_config(corpus, tmp_path):
    """ablate.py forced --arch hybrid, so a run's saved config.yaml (no presets) as --config was an
    error, and the file form wanted steps: where the inline form took train.steps."""
    from slmlab.config import DEFAULT_CONFIG, load_config

    d, text = corpus
    saved = tmp_path / "config.yaml"
    load_config(DEFAULT_CONFIG, arch="transformer", overrides=[*tiny(d), f"data.spec={text}", "train.steps=5"]).save(saved)
    inline = ablate_cli.build_ablation(ablate_cli.parse_args(["--config", str(saved), "--vary", "model.d_model=32,64"]))
    f = tmp_path / "a.yaml"
    f.write_text("variants: {a: {}, b: {overrides: {model.d_model: 64}}}\n")
    from_file = file_ablation(f, config=saved)
    for ab in (inline, from_file):
        assert [v.arch for v in ab.variants] == ["transformer"] * 2 and (ab.steps, ab.corpora) == (5, [str(text)])
        assert len(plan(ab)[1]) == 6  # 3 seeds: the default
    assert (inline.budget, from_file.budget) == ("flops", "flops")


# ---- bad input: one line, exit status 2, nothing trained ----
@pytest.mark.parametrize("argv, message", [
    (["--vary", "model.conv_kernl=3,4"], "variant conv_kernl=3: unknown config key 'model.conv_kernl'; did you mean"),
    (["--vary", "model.conv_kernel=3,four"], "variant conv_kernel=four: model.conv_kernel expects an integer"),
    (["--vary", "model.layers=CCA,CQ"], "variant layers=CQ: unknown block 'Q'"),
    (["--vary", "model.conv_kernel"], "is not of the form section.key=v1,v2"),
    (["--vary", "model.conv_kernel=3,,4"], "has an empty value"),
    (["--vary", "model.n_heads=2,3"], "variant n_heads=3"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--gpus", "0", "--launcher", "submitit"], "--gpus is for --launcher local"),
    (["--gpus", "0,0"], "--gpus names GPU 0 twice"),
    pytest.param(["--gpus", "0"], "--gpus 0: this machine has no CUDA device torch can use",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")),
    # submitit's errors, before anything is written: a typo, Slurm settings without Slurm, no Slurm at all
    (["--vary", "model.conv_kernel=3,4", "--launcher", "submitit", "--slurm", "slurm_partiton=gpu"],
     "Unknown argument 'partiton' for executor 'slurm'"),
    pytest.param(["--vary", "model.conv_kernel=3,4", "--launcher", "submitit", "--slurm", "slurm_partition=gpu"],
                 "--slurm slurm_partition=gpu: submitit found no Slurm here (no srun)",
                 marks=pytest.mark.skipif(bool(shutil.which("srun")), reason="a machine without Slurm")),
    pytest.param(["--vary", "model.conv_kernel=3,4", "--launcher", "submitit", "--cluster", "slurm"],
                 'Could not detect "srun"', marks=pytest.mark.skipif(bool(shutil.which("srun")),
                                                                     reason="a machine without Slurm")),
    (["--data", "{tmp}/nope.txt"], "nope.txt"),  # before OUT records an ablation a corrected rerun would meet
    (["--slurm", "timeout_min=5"], "--slurm needs --launcher submitit"),
    (["--dry-run", "--jobs", "2"], "--dry-run only prints the plan; drop --out"),
    (["--tasks", "hellaswg"], "--tasks: unknown task 'hellaswg': built-in tasks are hellaswag"),
    (["--tasks", "{tmp}/nope.jsonl"], "no such file"),
    (["--tasks", "{tmp}/bad.jsonl"], "bad.jsonl:2: keys ['context'] fit no item format"),
    (["--tasks", "{tmp}/t.jsonl,{tmp}/t.jsonl"], "--tasks names task 't' twice"),
    (["--tasks", "{tmp}/t.jsonl", "--task-limit", "0"], "--task-limit must be >= 1"),
    (["--tasks", "{tmp}/bad.txt"], "--tasks: bad is a text task (bits per byte): ablate.py compares bpb on its --data"),
])
def test_bad_input_is_one_line(corpus, tmp_path, capsys, argv, message):
    d, text = corpus
    task_file(tmp_path / "t.jsonl")
    (tmp_path / "bad.jsonl").write_text((tmp_path / "t.jsonl").read_text().splitlines()[0] + '\n{"context": "x"}\n')
    (tmp_path / "bad.txt").write_text("a text task: scored for bits per byte\n")
    rc = ablate_cli.run_cli(ablate_cli.main, ["--arch", "hybrid", "--steps", "4", "--data", str(text),
                                              "--out", str(tmp_path / "o"), *[a.format(tmp=tmp_path) for a in argv],
                                              *tiny(d)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o" / "ablation.json").exists()


def test_gpus_that_are_not_there_or_a_cpu_device_are_refused(corpus, tmp_path, capsys, monkeypatch):
    """A run given a GPU id past the machine's, or train.device=cpu, trained on the CPU while the log said GPU."""
    d, text = corpus
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    argv = ["--arch", "hybrid", "--steps", "4", "--data", str(text), "--out", str(tmp_path / "o"),
            "--vary", "model.conv_kernel=3,4", *tiny(d)]
    for extra, message in ((["--gpus", "0,7"], "--gpus 7: torch sees 2 CUDA devices here (0..1"),
                           (["--gpus", "0,1", "train.device=cpu"], "--gpus with train.device=cpu (variant")):
        assert ablate_cli.run_cli(ablate_cli.main, argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o" / "ablation.json").exists()
    from slmlab.ablate.runner import _worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _worker_env(1, "1")["CUDA_VISIBLE_DEVICES"] == "3"  # torch's GPU 1 here is physical GPU 3


def test_keys_the_ablation_sets_itself_are_refused(corpus, tmp_path, capsys):
    """data.spec, train.steps and train.seed come from --data, --steps and --seeds on every run:
    varied or overridden, they would be overwritten, so each is an error naming where it goes."""
    d, text = corpus
    f = tmp_path / "a.yaml"
    f.write_text("steps: 4\nvariants: {a: {}, b: {overrides: {train.seed: 3}}}\n")
    g = tmp_path / "b.yaml"
    g.write_text("steps: 4\noverrides: [data.spec=x]\nvariants: {a: {}}\n")
    inline = ["--arch", "hybrid", "--data", str(text)]
    for argv, message in (
            ([*inline, "--steps", "4", "--vary", "train.steps=4,8"], "--vary train.steps: the ablation sets train.steps "
                                                                     "on every run, so it is no variant axis; give "
                                                                     "the baseline's steps with --steps N"),
            ([*inline, "--steps", "4", "--vary", "train.seed=1,2"], "--vary train.seed: the ablation sets train.seed "
                                                                    "on every run, so it is no variant axis; seeds are "
                                                                    "every variant's repeats: give --seeds N"),
            ([*inline, "--steps", "4", "--vary", "data.spec=a,b"], "give --data SPEC per corpus (file key data:)"),
            ([*inline, "--vary", "model.layers=CCA,A", "train.steps=10"], "override 'train.steps=10': the ablation "
                                                                          "sets train.steps on every run"),
            ([*inline, "--steps", "4", "--vary", "model.layers=CCA,A", "train.seed=7"], "override 'train.seed=7'"),
            ([*inline, "--steps", "4", "--vary", "model.layers=CCA,A", "data.spec=/x"], "override 'data.spec=/x'"),
            ([str(f), "--data", str(text)], "variant 'b': overrides 'train.seed=3': the ablation sets train.seed"),
            ([str(g), "--data", str(text)], "b.yaml: overrides 'data.spec=x': the ablation sets data.spec")):
        assert ablate_cli.run_cli(ablate_cli.main, ["--dry-run", "--seeds", "1", *argv, *tiny(d)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_import_brings_a_custom_block_into_every_run(corpus, tmp_path, capsys, monkeypatch):
    """--import as in train.py: the file is recorded by absolute path (each run starts in its own
    directory), so a relative path works too."""
    import re

    d, text = corpus
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import torch, torch.nn as nn\nfrom arch import Mixer, register\n.*?)```",
                      readme, re.S).group(1)
    (tmp_path / "shift.py").write_text(block.replace('"shift", "S"', '"shift_ab", "V"'))  # its own name here
    monkeypatch.chdir(tmp_path)
    argv = ["--dry-run", "--seeds", "1", "--arch", "hybrid", "--data", str(text), "--steps", "4",
            "--vary", "model.layers=CCA,VVA", *tiny(d)]
    assert ablate_cli.run_cli(ablate_cli.main, argv) == 2  # without it, V is no block
    assert "unknown block" in capsys.readouterr().err
    assert ablate_cli.run_cli(ablate_cli.main, [*argv, "--import", "shift.py"]) == 0
    out = capsys.readouterr().out
    assert "VVA" in out and "note: one seed per variant: the differences get no confidence interval" in out
    assert ablate_cli.imports_override(["shift.py"]) == [f'model.imports=["{tmp_path / "shift.py"}"]']
    from arch.registry import _LOADED, LETTERS, MIXERS

    MIXERS.pop("shift_ab"), LETTERS.pop("V")  # leave the registry as the other tests expect it
    for key in [k for k in _LOADED if k.startswith(str(tmp_path))]:
        del _LOADED[key]


def test_bad_file_and_report_arguments(tmp_path, capsys):
    f = tmp_path / "a.yaml"
    f.write_text("steps: 4\nvariants: {a: {arch: hybrid, overides: {model.d_model: 64}}}\n")
    g = tmp_path / "b.yaml"
    g.write_text("steps: 4\nvariants: {a: {arch: hybrid}, b: {arch: transformer}}\n")
    for argv, message in ([str(f), "--out", str(tmp_path / "o")], "variant 'a': unknown key 'overides'; did you mean overrides?"), \
            ([str(f), "--vary", "model.layers=A,C", "--out", "x"], "--vary is for the inline form"), \
            (["--report", str(tmp_path), "--seeds", "2"], "--report OUT takes no other arguments"), \
            (["--report", str(tmp_path), "--tasks", "t.jsonl"], "--report OUT takes no other arguments (got --tasks)"), \
            (["--report", str(tmp_path), "--launcher", "submitit"], "no other arguments (got --launcher submitit)"), \
            (["--task-limit", "4", "--out", "x"], "--task-limit N limits --tasks; give --tasks too"), \
            (["--report", str(tmp_path)], "holds no ablation"), \
            ([str(g), "--arch", "diffusion", "--dry-run"], f"--arch diffusion has no effect: every variant of {g} "
                                                           "names its own arch"):
        assert ablate_cli.run_cli(ablate_cli.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("doc, message", [
    ("arch: [hybrid]\nvariants: {a: {}}", "arch must be a preset name, got ['hybrid']"),
    ("data: 5\nvariants: {a: {}}", "data must be a data spec or a non-empty list of them, got 5"),
    ("data: {a: 1}\nvariants: {a: {}}", "data must be a data spec or a non-empty list of them, got {'a': 1}"),
    ("data: []\nvariants: {a: {}}", "data must be a data spec or a non-empty list of them, got []"),
    ("steps: many\nvariants: {a: {}}", "steps must be a positive integer, got 'many'"),
    # a variant's directory: `..` put its runs outside OUT; results.md's run was replaced by the report
    ("variants: {a: {}, '..': {}}", "variant name '..' cannot name a directory of OUT: it starts with a dot"),
    ("variants: {a: {}, results.md: {}}", "variant name 'results.md' cannot name a directory of OUT: the ablation "
                                          "writes that file"),
])
def test_bad_ablation_files_are_one_line(tmp_path, capsys, doc, message):
    f = tmp_path / "a.yaml"
    f.write_text(doc + "\n")
    assert ablate_cli.run_cli(ablate_cli.main, [str(f), "--dry-run", "--steps", "4", "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_corpus_directories_stay_inside_out():
    assert corpus_dirs(["..", ".", "/data/.hidden"]) == {"..": "data", ".": "data-2", "/data/.hidden": "hidden"}


# ---- real (tiny) runs ----
def run_ablate(out, args, env=None, popen=False):
    cmd = [sys.executable, str(ROOT / "ablate.py"), "--out", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ablate_here(out, args, capsys):
    """ablate.py's coordinator in this process (run_cli, as its __main__ runs it; the runs' workers are still
    processes of their own): (exit status, stdout, stderr); a SystemExit's code is the exit status."""
    capsys.readouterr()
    try:
        rc = ablate_cli.run_cli(ablate_cli.main, ["--out", str(out), *args])
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def grid(corpus):
    d, text = corpus
    return ["--arch", "hybrid", "--vary", "model.layers=CCA,A", "--seeds", "2", "--steps", "6", "--data", str(text),
            "--threads", "1", *tiny(d)]


@pytest.fixture(scope="module")
def submitit_run(corpus):
    """One uninterrupted 2 variants x 2 seeds ablation through submitit's local executor (each run
    a submitit job, as on Slurm): the results every other path must reproduce."""
    out = corpus[0] / "ref"
    p = run_ablate(out, grid(corpus) + ["--launcher", "submitit", "--cluster", "local", "--slurm", "timeout_min=10"])
    assert p.returncode == 0, p.stderr
    return out, p.stdout


@pytest.fixture(scope="module")
def reference(submitit_run):
    return submitit_run[0]


def test_outputs(reference):
    for name in ("results.md", "results.csv", "timings.csv", "curves.png", "final.png", "ablation.json"):
        assert (reference / name).is_file(), name
    for run in ("layers=CCA/seed1", "layers=CCA/seed2", "layers=A/seed1", "layers=A/seed2"):
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "model.safetensors", "resources.json"):
            assert (reference / run / name).is_file(), (run, name)
    md = (reference / "results.md").read_text()
    assert "| layers=A | `AAA` |" in md and "Δ bpb vs layers=CCA [95% CI]" in md and "Run-to-run noise" in md
    rows = (reference / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and all(",done," in r for r in rows[1:])


def test_a_resume_on_changed_text_is_refused(tmp_path, capsys):
    """The corpus's text (its splits' sha256) is part of what OUT's runs were trained on: rewritten
    since, the seeds left to run would train on other text than the finished ones, so the same
    command is refused until the text is back (or --force starts over)."""
    text = write_corpus(tmp_path / "c.txt", lines=600)
    argv = ["--arch", "hybrid", "--vary", "model.layers=CCA", "--seeds", "1", "--steps", "2", "--data", str(text),
            "--threads", "1", *tiny(tmp_path)]
    rc, _, err = ablate_here(tmp_path / "o", argv, capsys)
    assert rc == 0, err
    original = text.read_text()
    write_corpus(text, lines=600, seed=1)
    rc, _, err = ablate_here(tmp_path / "o", argv, capsys)
    assert rc == 2 and f"runs trained on other text than {text} holds now" in err and len(err.splitlines()) == 1, err
    text.write_text(original)
    rc, out, err = ablate_here(tmp_path / "o", argv, capsys)
    assert rc == 0 and "1 of 1 runs already finished" in out, err


def test_same_command_skips_finished_runs(reference, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.glob("*/seed*/summary.json")}
    rc, out, err = ablate_here(reference, grid_from(reference), capsys)
    assert rc == 0, err
    assert "4 of 4 runs already finished" in out
    assert {q: q.stat().st_mtime_ns for q in reference.glob("*/seed*/summary.json")} == before


def grid_from(out):
    return grid((out.parent, out.parent / "c.txt"))


def _kill_mid_run(out, args):
    """Start the ablation and SIGKILL the coordinator once a run has a checkpoint but no summary (its
    worker dies with it). Returns the interrupted run directories; empty when every run slipped
    from checkpoint to summary between two polls (a starved poller on a busy machine)."""
    proc = run_ablate(out, args, popen=True)
    # a published checkpoint: checkpoints/ also holds a writer's temp folder before it is renamed
    # [!.]: not the coordinator's staging folders (.tmp-ablation.json-*), which vanish mid-scan when published
    interrupted = lambda: [d for d in out.glob("[!.]*/seed*") if checkpoint_dirs(d)  # noqa: E731
                           and not (d / "summary.json").exists()]
    deadline = time.monotonic() + 240  # a guard against a hang, not a timing assertion
    while not interrupted() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return interrupted()


def test_killed_coordinator_rerun_resumes_and_gives_identical_results(corpus, reference, capsys):
    args = grid(corpus) + ["--jobs", "2"]  # a checkpoint every 2 of 6 steps
    for attempt in range(3):  # a kill that came too late says nothing about resuming: try again afresh
        out = corpus[0] / f"killed{attempt}"
        killed = _kill_mid_run(out, args)
        if killed:
            break
    assert killed, "the coordinator finished before it could be killed mid-run, three times"
    rc, _, err = ablate_here(out, args, capsys)  # the re-run's coordinator: this process
    assert rc == 0, err
    assert "resumed from" in (killed[0] / "train.log").read_text()
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_a_second_coordinator_on_one_out_is_refused_in_one_line(corpus, capsys):
    """OUT is held as a trainer holds its run (RunLock): a second ablate.py would train the same runs."""
    from slmlab.rundir import RunLock

    out = corpus[0] / "held"
    with RunLock(out):
        rc, _, err = ablate_here(out, grid(corpus), capsys)
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{out} is in use: another process is coordinating an ablation in it (pid {os.getpid()} " in err, err
    assert "then run the same command again" in err and not (out / "ablation.json").exists()


def test_crashed_run_is_marked_and_the_others_go_on(corpus, capsys):
    d, text = corpus
    out = d / "crash"
    # lr 1e9 turns the loss non-finite at step 2, and max_bad_steps=1 makes that a crash
    rc, stdout, err = ablate_here(out, ["--arch", "hybrid", "--vary", "optim.lr=3e-3,1e9", "--seeds", "1", "--steps",
                                        "4", "--data", str(text), "--jobs", "2", "--threads", "1",
                                        *tiny(d, **{"train.max_bad_steps": 1, "train.warmup_steps": 1})], capsys)
    assert rc == 1 and "1 run(s) failed: lr=1e9/seed1" in err, err
    assert "training diverged" in stdout  # the progress line gives the run's last log line
    md = (out / "results.md").read_text()
    assert "(0/1, seed 1 failed)" in md and "| lr=3e-3 |" in md
    assert "- lr=1e9: seed 1 failed: exit 2: error: training diverged" in md  # its error.txt, kept for the report
    assert (out / "lr=3e-3" / "seed1" / "summary.json").is_file()


def test_report_alone_rebuilds_outputs(corpus, reference):
    out = corpus[0] / "report-only"
    shutil.copytree(reference, out)
    for name in ("results.md", "results.csv", "timings.csv", "curves.png", "final.png"):
        (out / name).unlink()
    p = subprocess.run([sys.executable, str(ROOT / "ablate.py"), "--report", str(out)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0, p.stderr
    for name in ("results.csv", "timings.csv"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert (out / "results.md").read_text() == (reference / "results.md").read_text().replace("`ref`", "`report-only`")
    assert (out / "curves.png").stat().st_size > 0 and (out / "final.png").stat().st_size > 0


def test_other_ablation_in_out_is_refused(corpus, reference, capsys):
    rc, _, err = ablate_here(reference, grid(corpus) + ["--seeds", "3"], capsys)
    assert rc == 2 and "holds a different ablation (seeds differs); pass --force" in err, err


# ---- downstream tasks (--tasks) ----
WORDS = "the of and to a in is it you that he was for on are with as his they be at one have this".split()


def task_file(path: Path, n: int = 8) -> Path:
    """A generic multiple-choice task on write_corpus's words: n items of 2 choices."""
    import json
    import random

    rng = random.Random(0)
    rows = [{"context": " ".join(rng.choices(WORDS, k=6)), "choices": [" " + w for w in rng.sample(WORDS, 2)],
             "label": i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n#", 1)[0]


def test_tasks_added_to_a_finished_ablation_score_it_without_retraining(corpus, reference, capsys):
    """--tasks is no part of the ablation's identity: on a finished OUT it scores the runs and trains
    nothing. A task no run can score (a continuation longer than the models' context) is said, with
    exit 1, and keeps no other task from being scored; the same command without it, or without
    --tasks at all, scores nothing again (the tasks are remembered)."""
    import json

    from slmlab.harness import paired

    d, _ = corpus
    out = d / "tasks-added"
    shutil.copytree(reference, out)
    t, long = task_file(d / "t.jsonl"), d / "long.jsonl"
    long.write_text(json.dumps({"context": "the", "continuation": " of and" * 30}) + "\n")
    trained = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/model.safetensors")}
    rc, stdout, err = ablate_here(out, grid(corpus) + ["--jobs", "2", "--tasks", f"{t},{long}"], capsys)
    assert rc == 1 and "4 run(s) trained but not scored on --tasks" in err, err
    assert "4 of 4 runs already finished" in stdout and "4 of them to score on --tasks" in stdout
    assert "[ablate] scoring layers=A/seed1 on t, long" in stdout
    assert {p: p.stat().st_mtime_ns for p in trained} == trained and len(trained) == 4
    md = (out / "results.md").read_text()
    assert "- layers=A: seed 1, 2 not scored: exit 2: error: task long: a continuation of" in md
    res = {(v, s): json.loads((out / f"layers={v}/seed{s}/tasks.json").read_text())["t"]
           for v in ("CCA", "A") for s in (1, 2)}
    acc = {v: {s: 100 * res[v, s]["metrics"]["acc_norm"] for s in (1, 2)} for v in ("CCA", "A")}
    table = _section(md, "### `t` (8 of 8 items; multiple choice, chance 50.00%)")
    cmp, (d_pooled, se) = stats.compare(acc["CCA"], acc["A"]), paired(
        *([x for s in (1, 2) for x in res[v, s]["per_item"]["acc_norm"]] for v in ("CCA", "A")))
    row = _row(table, "layers=A")
    assert row[1] == f"{stats.summarize(acc['A'].values()).mean:.2f} ± {stats.summarize(acc['A'].values()).sd:.2f} (2)"
    assert row[2].startswith(f"{cmp.diff:+.2f}") and row[-1] == f"{100 * d_pooled:+.2f} ± {100 * se:.2f} |"
    assert "| *chance* | 50.00 |" in table and "Δ acc_norm vs layers=CCA [95% CI]" in table
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0].endswith(",t.acc_norm,long.acc") and all(r.endswith(f",{res[v, s]['metrics']['acc_norm']!r},")
                                                            for r, (v, s) in zip(csv[1:], [("CCA", 1), ("A", 1),
                                                                                           ("CCA", 2), ("A", 2)]))
    scored = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/tasks.json")}
    for args in (["--tasks", str(t)], []):
        rc, stdout, err = ablate_here(out, grid(corpus) + args, capsys)
        assert rc == 0 and "4 of 4 runs already finished" in stdout and "scoring" not in stdout, err
        assert {p: p.stat().st_mtime_ns for p in scored} == scored and len(scored) == 4
        md = (out / "results.md").read_text()
        assert "### `t` (8 of 8 items" in md and "### `long`" not in md


def test_a_run_is_scored_by_its_worker_after_training(corpus, capsys):
    """With --tasks from the start the worker scores its run right after training it: the scores are
    eval.py's on the run's final weights."""
    import json

    from slmlab import harness, tasks

    d, text = corpus
    t = task_file(d / "t-fresh.jsonl")
    out = d / "tasks-fresh"
    rc, stdout, err = ablate_here(out, ["--arch", "hybrid", "--vary", "model.layers=CCA", "--seeds", "1", "--steps",
                                        "4", "--data", str(text), "--threads", "1", "--tasks", str(t), *tiny(d)], capsys)
    assert rc == 0, err
    assert "start: layers=CCA seed 1 on" in stdout and ", then scoring on t-fresh" in stdout
    run = out / "layers=CCA" / "seed1"
    assert f"[ablate] scoring {run} on t-fresh (8 items)" in (run / "train.log").read_text()
    got = json.loads((run / "tasks.json").read_text())["t-fresh"]
    assert f"[ablate] scored layers=CCA/seed1: t-fresh acc_norm {100 * got['metrics']['acc_norm']:.2f}%" in stdout
    ref = harness.evaluate_models([("run", str(run))], [tasks.resolve(str(t))], "cpu", say=lambda m: None)
    assert got["metrics"] == pytest.approx({k: ref["tasks"]["t-fresh"]["results"][str(run)][k] for k in got["metrics"]})
    assert got["per_item"] == ref["tasks"]["t-fresh"]["per_item"][str(run)]


def test_a_task_edited_after_the_coordinator_read_it_is_not_scored(reference, tmp_path):
    """The worker scores the items the coordinator read (their digest) or none: runs scored on other
    items would be paired in the tables."""
    import json

    from slmlab.ablate.scoring import score_run, task_entries, unscored
    from slmlab.errors import DataError

    run = tmp_path / "run"
    shutil.copytree(reference / "layers=A" / "seed1", run)
    t = task_file(tmp_path / "t.jsonl")
    entries = task_entries(str(t), None, say=lambda m: None)
    (run / "ablate.json").write_text(json.dumps({**json.loads((run / "ablate.json").read_text()), "tasks": entries}))
    t.write_text(t.read_text() * 2)
    with pytest.raises(DataError, match="task t: its items changed since ablate.py read them"):
        score_run(run)
    assert unscored(run) == entries and not (run / "tasks.json").exists()


def test_submitit_local_executor_runs_the_grid(submitit_run):
    out, stdout = submitit_run
    assert stdout.count(" as job ") == 4 and stdout.count(" done: ") == 4
    assert len(list(out.glob(".submitit/*/*_result.pkl"))) == 4


def test_variant_that_fails_to_build_is_named_before_training(corpus):
    d, text = corpus
    ab = Ablation(variants=[Variant("base", "hybrid"), Variant("odd-heads", "hybrid", ["model.n_heads=3"])],
                  seeds=[1], corpora=[str(text)], steps=4, overrides=tiny(d))
    with pytest.raises(AblationError, match="^variant odd-heads"):
        plan(ab)


def test_a_config_key_added_later_at_its_default_keeps_the_runs_hashes():
    """A run directory's config.yaml from before a key existed hashes as the plan's config with that key
    at its default (a later slmlab adds keys; the ablation must still resume), but any value change shows."""
    import json

    from slmlab.config import load_config

    tree = load_config(arch="hybrid").to_dict()
    older = json.loads(json.dumps(tree))
    del older["train"]["eval_tasks"], older["train"]["eval_tasks_limit"]
    assert config_sha(older) == config_sha(tree)
    older["train"]["eval_tasks_limit"] = 7
    assert config_sha(older) != config_sha(tree)
    tree["optim"]["lr"] = 1e-4
    assert config_sha(tree) != config_sha(load_config(arch="hybrid").to_dict())


@pytest.mark.parametrize("path", sorted((ROOT / "ablations").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_ablation_files_plan(path, capsys):
    """Each file in ablations/ (the README's commands) still plans: its variants build, their FLOPs fit."""
    assert ablate_cli.run_cli(ablate_cli.main, [str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in yaml.safe_load(path.read_text())["variants"])
