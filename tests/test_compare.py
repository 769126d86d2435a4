"""compare.py: the table's numbers are the runs' own, the differences are exactly the changed
settings, the notes say when numbers do not compare, an unfinished run is shown from its metrics,
the plot is a PNG, and bad input is one line with exit 2. Run directories are written by hand
(config, metrics.jsonl, summary.json); one test trains a real tiny run."""
import hashlib
import json
import math

import pytest
from trainer_helpers import tiny_overrides, write_corpus

import compare
import train
from slmlab import compare as compare_mod
from slmlab.cli import run_cli
from slmlab.config import load_config
from slmlab.data import DEFAULT_VAL_FRAC, iter_documents, split_documents
from slmlab.rundir import read_metrics


def fake_records(steps=30, evals=(10, 20), final=True, bpb=2.0, eval_seq_len=32, bound=False):
    """metrics.jsonl as the trainer writes it: a line every 5 steps, periodic evals merged into
    their step's line, and the final eval's line (no loss, no elapsed_s)."""
    extra = {"val_bpb_is_bound": True} if bound else {}
    recs = []
    for s in range(5, steps + 1, 5):
        rec = {"step": s, "phase": 1, "seq_len": 16, "loss": 6.0 - s / 10, "lr": 1e-3, "tokens": s * 128,
               "tokens_per_s": 1000.0, "elapsed_s": s / 10}
        if s in evals:
            rec |= {"val_loss": 2.0, "val_bpb": bpb + (steps - s) / 100, "val_tokens": 256,
                    "eval_seq_len": eval_seq_len, **extra}
        recs.append(rec)
    if final:
        recs.append({"step": steps, "phase": 2, "seq_len": 32, "tokens": steps * 128, "final": True,
                     "eval_seq_len": eval_seq_len, "val_loss": 1.5, "val_bpb": bpb, "val_tokens": 896, **extra})
    return recs


def fake_run(path, overrides=(), records=None, summary=True, bpb=2.0, params=58176, device="cpu", tail="",
             **extra):
    """A run directory by hand: the resolved config of tiny_overrides + `overrides`, `records` (default
    a finished 30-step run's) as metrics.jsonl plus `tail` (a cut line, say), and its summary.json
    (its val bpb the final eval line's, as the trainer's)."""
    path.mkdir(parents=True)
    cfg = load_config(arch="hybrid", overrides=[*tiny_overrides(path.parent, steps=30), *overrides])
    cfg.save(path / "config.yaml")
    records = fake_records(bpb=bpb) if records is None else records
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if summary:
        final = {k: v for r in records if r.get("final") for k, v in r.items() if k.startswith("val_bpb")}
        (path / "summary.json").write_text(json.dumps(
            {"arch": "hybrid", "params": params, "flops_per_token": 1e6, "steps": 30, "tokens": 3840,
             "train_time_s": 3.0, "wall_time_s": 5.0, "tokens_per_s": 1280.0, "val_loss": 1.5, "val_bpb": bpb,
             "val_tokens": 896, "device": device, **final, **extra}))
    return str(path)


def run_json(capsys, *argv):
    assert run_cli(compare.main, [*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def cells(text: str, run: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {run} "))
    return [c.strip() for c in line.strip("| ").split(" | ")]


def one_line_error(capsys, argv, needle):
    assert run_cli(compare.main, argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert cap.out == ""


def test_table_numbers_are_the_summaries(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", bpb=1.8), fake_run(tmp_path / "b", ["model.layers=A"], bpb=1.9, params=56000)
    rows = run_json(capsys, a, b)["runs"]
    for row, path in zip(rows, (a, b)):
        s = json.loads((tmp_path / path / "summary.json").read_text())
        assert {k: row[k] for k in ("params", "steps", "tokens", "train_time_s", "tokens_per_s", "val_bpb")} == \
               {k: s[k] for k in ("params", "steps", "tokens", "train_time_s", "tokens_per_s", "val_bpb")}
        assert row["status"] == "done" and row["steps_planned"] == 30 and row["eval_seq_len"] == 32
    # the best periodic eval is the lowest one, with its step; the final eval is not among them
    assert (rows[0]["best_val_bpb"], rows[0]["best_val_step"]) == (pytest.approx(1.9), 20)
    assert [r["layers"] for r in rows] == ["CCA", "AAA"]
    assert run_cli(compare.main, [a, b]) == 0
    out = capsys.readouterr().out
    assert cells(out, b) == [b, "hybrid", "AAA", "56.0k", "30/30", "3.84k", "3.00s", "1,280", "1.9000", "2.0000 @20"]


def test_a_moe_run_shows_its_active_parameters(tmp_path, capsys):
    """Its summary's params_active, or, in a summary from before it had one, its model's."""
    moe = ["model.mlp=moe", "model.mixer_opts={moe: {experts: 4, top_k: 1}}"]
    a, b = fake_run(tmp_path / "a", moe, params=90000), fake_run(tmp_path / "b", moe, summary=False)
    rows = run_json(capsys, a, b)["runs"]
    assert rows[0]["params_active"] < rows[0]["params"] == 90000
    assert rows[1]["params"] - rows[1]["params_active"] == 3 * (3 * 32 * 128) * 3  # 3 of 4 experts idle, 3 layers
    assert run_cli(compare.main, [a]) == 0
    assert cells(capsys.readouterr().out, a)[3] == f"90.0k ({rows[0]['params_active'] / 1e3:.1f}k active)"


def test_differences_are_exactly_the_changed_settings(tmp_path, capsys):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", ["model.layers=CCA", "model.n_layers=6", "optim.muon_momentum=0.9",
                                  "logging.progress=true", "train.sample_tokens=9", f"data.cache_dir={tmp_path}"])
    out = run_json(capsys, a, b)
    diff = {d["key"]: d for d in out["differences"][b]}
    # the last three differ too, but never matter for a comparison: left out
    assert sorted(diff) == ["model.layers", "model.n_layers", "optim.muon_momentum"]
    assert diff["optim.muon_momentum"]["unused"] == "optim.name is adamw" and diff["model.n_layers"]["unused"] is None
    assert (diff["model.n_layers"]["first"], diff["model.n_layers"]["this"]) == (3, 6)
    assert run_cli(compare.main, [a, b]) == 0
    text = capsys.readouterr().out
    assert "    model.layers: CCA -> CCACCA\n" in text
    assert "    optim.muon_momentum: 0.95 -> 0.9 (unused: optim.name is adamw)\n" in text
    assert "sample_tokens" not in text and "progress" not in text


def test_notes_for_other_data_context_device_and_tokenizer(tmp_path, capsys):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", ["data.spec=other.txt"], records=fake_records(eval_seq_len=64), device="cuda:0")
    c = fake_run(tmp_path / "c", ["train.eval_tokens=512"])
    for run, vocab in ((a, "x"), (c, "y")):
        (tmp_path / run / "tokenizer.json").write_text(vocab)
    notes = run_json(capsys, a, b, c)["notes"]
    assert len(notes) == 5, notes
    assert notes[0] == f"{b} is validated on other text than {a} (data.spec: stdlib -> other.txt): their val bpb " \
                       "are not comparable"
    assert notes[1].startswith(f"{b} is evaluated at 64 tokens of context, {a} at 32")
    assert notes[2].startswith(f"{b} ran on cuda:0, {a} on cpu")
    assert notes[3].startswith(f"{c} has another tokenizer than {a}: bpb is per byte of the same validation text")
    assert notes[4].startswith(f"{c}'s periodic evals cover the first 512 validation tokens, {a}'s the first 256")


def test_finished_runs_are_told_apart_by_their_validation_text_not_the_spec(tmp_path, capsys):
    """A relative data.spec names whatever file the working directory holds: two runs with the same
    spec string may be validated on other text, and two spellings of one path on the same. Their
    summaries' val_sha256 decide; a run without one falls back on the specs."""
    a = fake_run(tmp_path / "a", ["data.spec=small.txt"], val_sha256="1" * 64)
    same_spec = fake_run(tmp_path / "b", ["data.spec=small.txt"], val_sha256="2" * 64)
    other_spec = fake_run(tmp_path / "c", [f"data.spec={tmp_path}/small.txt"], val_sha256="1" * 64)
    unknown = fake_run(tmp_path / "d", ["data.spec=small.txt"])
    notes = run_json(capsys, a, same_spec, other_spec, unknown)["notes"]
    assert notes == [f"{same_spec} is validated on other text than {a} (validation text sha256 111111111111… -> "
                     "222222222222…): their val bpb are not comparable"]


def test_a_killed_run_is_compared_from_its_metrics(tmp_path, capsys):
    from arch import build_model

    a = fake_run(tmp_path / "a")
    recs = [r for r in fake_records(steps=400, evals=(20,), final=False) if r["step"] <= 35]
    b = fake_run(tmp_path / "b", ["train.steps=400"], records=recs, summary=False, tail='{"step": 40, "lo')
    out = run_json(capsys, a, b)
    row = out["runs"][1]
    cfg = load_config(arch="hybrid", overrides=tiny_overrides(tmp_path, steps=400))
    assert row["params"] == build_model(cfg.model, cfg.objective).num_params()
    assert (row["status"], row["steps"], row["tokens"], row["train_time_s"], row["val_bpb"]) == \
           ("running or stopped", 35, 35 * 128, 3.5, None)
    assert (row["best_val_bpb"], row["best_val_step"]) == (pytest.approx(5.8), 20)
    assert f"{b}: running or stopped at step 35 of 400 (no summary.json: its numbers are its metrics.jsonl's last)" \
           in out["notes"]
    assert f"{b}: metrics.jsonl line(s) 8 read as no record (cut by a kill?) or hold a value of the wrong type: " \
           "skipped" in out["notes"]
    assert [d["key"] for d in out["differences"][b]] == ["train.steps"]
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[1] == [8]


def test_diffusion_bound_and_a_diverged_run(tmp_path, capsys):
    a = fake_run(tmp_path / "a", ["objective.name=mdlm", "model.causal=false"],
                 records=fake_records(bpb=1.7, bound=True))
    recs = fake_records()
    recs[-1]["val_bpb"] = math.nan  # finite periodic evals, then a non-finite final one
    b = fake_run(tmp_path / "b", records=recs)
    assert run_cli(compare.main, [a, b]) == 0
    text = capsys.readouterr().out
    assert cells(text, a)[8:] == ["≤ 1.7000", "≤ 1.8000 @20"] and cells(text, b)[8:] == ["diverged (nan)", "2.1000 @20"]
    assert f"- {b} diverged: a non-finite val bpb (nan) in its final eval" in text
    assert "- ≤: masked-diffusion runs report the ELBO, an upper bound on bpb, not an exact bpb; a ≤ value below" in text
    rows = run_json(capsys, a, b)["runs"]
    assert rows[1]["val_bpb"] is None and rows[1]["status"] == "diverged" and rows[0]["val_bpb_is_bound"]


def test_plot_is_a_png_and_an_existing_one_needs_force(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", ["optim.lr=1e-3"])
    png = tmp_path / "cmp.png"
    assert run_cli(compare.main, [a, b, "--plot", str(png), "--x", "time"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in capsys.readouterr().out
    before = png.read_bytes()
    one_line_error(capsys, [a, b, "--plot", str(png)], "--force")
    assert png.read_bytes() == before
    assert run_json(capsys, a, b, "--plot", str(png), "--force", "--x", "steps")["plot"] == str(png)
    assert not list(tmp_path.glob(".tmp-*"))  # written through publish


@pytest.mark.parametrize("case, needle", [
    ("no_runs", "give one run directory or more"),
    ("not_a_run", "holds no run (no config.yaml)"),
    ("no_metrics", "holds no run (no metrics.jsonl)"),
    ("torn_metrics", "is torn: none of its 2 line(s) reads as a record"),
    ("torn_summary", "summary.json is damaged"),
    ("typed_summary", "summary.json: 'tokens' is 'abc', expected int or float (edited since?): fix it, or move it"),
    ("twice", "is given twice"),
    ("x_without_plot", "--x applies to --plot PATH"),
    ("not_png", "give a path ending in .png"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case, needle):
    a = fake_run(tmp_path / "a")
    b = tmp_path / "b"
    argv = {"no_runs": [], "twice": [a, f"{tmp_path}/b/../a"], "x_without_plot": [a, "--x", "steps"],
            "not_png": [a, "--plot", str(tmp_path / "cmp.pdf")]}.get(case, [a, str(b)])
    if case in ("not_a_run", "no_metrics", "torn_metrics", "torn_summary", "typed_summary"):
        fake_run(b)
    if case == "not_a_run":
        (b / "config.yaml").unlink()
    elif case == "no_metrics":
        (b / "metrics.jsonl").unlink()
    elif case == "torn_metrics":
        (b / "metrics.jsonl").write_bytes(b"\x00\xff garbage\n[1, 2]\n")
    elif case == "torn_summary":
        (b / "summary.json").write_text('{"arch": "hyb')
    elif case == "typed_summary":
        (b / "summary.json").write_text('{"arch": "hybrid", "tokens": "abc"}')
    elif case == "twice":
        b.mkdir()
    one_line_error(capsys, argv, needle)


def test_real_tiny_run_compares_as_its_summary_says(tmp_path, capsys):
    """The trainer's own run directory: the row is its summary's, the layers its pattern, and the
    plot draws from its metrics.jsonl."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=600)
    out = tmp_path / "run"
    argv = ["--data", str(corpus), "--out", str(out),
            *tiny_overrides(tmp_path, steps=6, **{"train.eval_every": 3, "train.log_every": 5})]
    assert run_cli(train.main, argv) == 0
    capsys.readouterr()
    res = run_json(capsys, str(out), "--plot", str(tmp_path / "cmp.png"))
    row, s = res["runs"][0], json.loads((out / "summary.json").read_text())
    assert (row["params"], row["tokens"], row["val_bpb"], row["train_time_s"]) == \
           (s["params"], s["tokens"], s["val_bpb"], s["train_time_s"])
    assert row["layers"] == "CCA" and row["status"] == "done" and row["best_val_step"] in (3, 6)
    assert res["differences"] == {} and (tmp_path / "cmp.png").stat().st_size > 0
    # the eval at step 3 (no log step) has its time: --x time plots it (the final one sits at train_time_s)
    evals = [r for r in read_metrics(out / "metrics.jsonl")[0] if "val_bpb" in r]
    assert [r["step"] for r in evals] == [3, 6] and evals[0]["elapsed_s"] > 0 and evals[1].get("final")
    assert compare_mod._final_x(compare_mod.load(str(out)), evals[1], "elapsed_s") == s["train_time_s"]
    # the corpus's text, by content: what compare.py and ablate.py tell corpora apart by
    val_docs = split_documents(list(iter_documents(corpus)), DEFAULT_VAL_FRAC)[1]
    assert s["val_sha256"] == hashlib.sha256(b"".join(d.encode() + b"\0" for d in val_docs)).hexdigest()
    assert len(s["train_sha256"]) == 64


def test_downstream_task_scores_of_the_final_evals(tmp_path, capsys):
    """train.eval_tasks' final scores get a table of their own: acc_norm for multiple choice, acc
    for completions; a run without a task shows a dash."""
    recs = fake_records()
    recs[-1] |= {"task_tails_acc": 0.5, "task_tails_acc_norm": 0.625, "task_lam_acc": 0.25, "task_lam_ppl": 9.0}
    a, b = fake_run(tmp_path / "a", records=recs), fake_run(tmp_path / "b")
    rows = run_json(capsys, a, b)["runs"]
    assert rows[0]["tasks"] == {"tails acc_norm": 0.625, "lam acc": 0.25} and rows[1]["tasks"] == {}
    assert run_cli(compare.main, [a, b]) == 0
    out = capsys.readouterr().out
    assert "Downstream tasks (train.eval_tasks, the final eval" in out
    tasks = out.split("Downstream tasks")[1]
    assert "lam acc" in tasks.splitlines()[1] and "tails acc_norm" in tasks.splitlines()[1]
    assert cells(tasks, a)[1:] == ["25.0%", "62.5%"] and cells(tasks, b)[1:] == ["–", "–"]


def test_a_summary_of_fewer_steps_than_planned_is_an_earlier_finish(tmp_path, capsys):
    """A finished 30-step run resumed with train.steps=400 by a trainer that left its summary.json: that
    summary is the old finish's, so the run is read as unfinished, from its metrics."""
    recs = [r for r in fake_records(steps=400, evals=(20,), final=False) if r["step"] <= 35]
    a = fake_run(tmp_path / "a", ["train.steps=400"], records=recs)
    out = run_json(capsys, a)
    row = out["runs"][0]
    assert (row["status"], row["steps"], row["val_bpb"], row["tokens"]) == ("running or stopped", 35, None, 35 * 128)
    assert f"{a}: running or stopped at step 35 of 400 (its summary.json is of a 30-step finish, before a --resume " \
           "with more steps: its numbers are its metrics.jsonl's last)" in out["notes"]


def test_the_smoothed_train_loss_does_not_depend_on_how_often_it_was_logged(tmp_path):
    """The same training logged every step and every 5 steps: their smoothed curves agree at the
    steps both have (per logged point, the sparser one was smoothed over 5x the steps: 0.27 apart here)."""
    def records(every):
        return [{"step": s, "loss": 2 + 4 * math.exp(-s / 40), "tokens": 128 * s, "elapsed_s": s / 10}
                for s in range(1, 301) if s == 1 or s % every == 0]

    runs = [compare_mod.load(fake_run(tmp_path / name, ["train.steps=300"], records=records(every), summary=False))
            for name, every in (("dense", 1), ("sparse", 5))]
    for x in ("step", "tokens", "elapsed_s"):
        (dense_x, _, dense), (sparse_x, _, sparse) = compare_mod.loss_curves(runs, x)
        at = dict(zip(dense_x, dense))
        assert max(abs(at[a] - b) for a, b in zip(sparse_x, sparse)) < 0.005
    assert compare_mod.loss_curves(runs, "step")[0][2][-1] > 2 + 4 * math.exp(-300 / 40)  # it averages the past


def test_a_resume_that_changed_the_evaluation_breaks_the_curve_and_the_best_eval(tmp_path, capsys, monkeypatch):
    """train.eval_seq_len 32 -> 16 on a --resume after step 15: the evals before it were at another
    context (here lower bpb), so the best eval is of those after, the curve is not joined across, and a
    note names where it changed."""
    recs = fake_records(evals=(5, 10, 15, 20, 25))
    for r in recs:
        if "val_bpb" in r and not r.get("final"):
            r |= {"eval_seq_len": 32, "val_bpb": 1.0} if r["step"] <= 15 else {"eval_seq_len": 16}
    a = fake_run(tmp_path / "a", records=recs)
    out = run_json(capsys, a)
    assert (out["runs"][0]["best_val_bpb"], out["runs"][0]["best_val_step"]) == (pytest.approx(2.05), 25)
    assert f"{a}: its periodic evals change between steps 15 and 20 (eval_seq_len 32 -> 16; a --resume): they do " \
           "not compare across it, so the val curve breaks there and best eval bpb is of the evals from step 20 on" \
           in out["notes"]
    drawn = []
    monkeypatch.setattr("slmlab.plot.save", lambda plt, fig, path: drawn.append(fig))
    compare_mod.plot([compare_mod.load(a)], tmp_path / "x.png", "steps")
    bpb_lines = drawn[0].axes[0].lines
    assert [list(line.get_xdata()) for line in bpb_lines] == [[5, 10, 15], [20, 25], [30]]  # the last: the final eval
    assert [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()] == [a]


def _steps(tokens_per_step, phase=lambda s: 1):
    return [{"step": s, "phase": phase(s), "seq_len": 16, "loss": 3.0, "tokens": sum(map(tokens_per_step, range(1, s + 1))),
             "elapsed_s": s / 10} for s in range(5, 31, 5)]


@pytest.mark.parametrize("tokens_per_step, phase, note", [
    (lambda s: 128 if s <= 12 else 256, lambda s: 1, "tokens per step change 128 -> 256 between steps 10 and 16"),
    (lambda s: 128 if s <= 15 else 256, lambda s: 1, "tokens per step change 128 -> 256 from step 16"),
    (lambda s: 128 if s <= 15 else 256, lambda s: 1 if s <= 15 else 2, None),  # as its phases planned
    (lambda s: 100 + (s * 37) % 50, lambda s: 1, None),  # an SFT run's: its batches' lengths vary
])
def test_a_resume_that_changed_the_tokens_per_step_is_noted(tmp_path, capsys, tokens_per_step, phase, note):
    """config.yaml holds a resumed run's new batch shape only, so what differs shows it as the run's
    whole setting: a note says where the logged tokens per step changed inside a phase."""
    a = fake_run(tmp_path / "a", records=_steps(tokens_per_step, phase), summary=False)
    notes = [n for n in run_json(capsys, a)["notes"] if "tokens per step" in n]
    assert notes == ([] if note is None else [f"{a}: {note}, inside a phase (a --resume with another batch shape): "
                                              "config.yaml, which what differs reads, holds the new value only"])


def test_non_finite_train_losses_are_counted_and_a_run_that_ends_on_them_diverged(tmp_path, capsys):
    """metrics.jsonl keeps a skipped step's NaN/Infinity loss, which the plot cannot draw: a note counts
    them. A run without a summary whose last logged losses are non-finite aborted ("training
    diverged"), not "running or stopped"."""
    recs = fake_records()
    recs[1]["loss"] = math.inf  # step 10: skipped, then the run recovered and finished
    recovered = fake_run(tmp_path / "a", records=recs)
    recs = [r for r in fake_records(steps=400, evals=(), final=False) if r["step"] <= 35]
    for r in recs[-2:]:
        r["loss"] = math.nan
    aborted = fake_run(tmp_path / "b", ["train.steps=400"], records=recs, summary=False)
    out = run_json(capsys, recovered, aborted)
    assert [w["status"] for w in out["runs"]] == ["done", "diverged"]
    assert out["notes"] == [
        f"{recovered}: 1 logged step(s) with a non-finite train loss (the last: inf at step 10); the trainer skipped "
        "their updates, and the plot has no point for them",
        f"{aborted}: 2 logged step(s) with a non-finite train loss (the last: nan at step 35); the trainer skipped "
        "their updates, and the plot has no point for them",
        f"{aborted} diverged: its last logged train loss is non-finite and it has no summary.json (the trainer aborts "
        "after train.max_bad_steps non-finite steps in a row)"]
    assert run_cli(compare.main, [recovered, aborted]) == 0
    assert cells(capsys.readouterr().out, aborted)[4:] == ["35/400", "4.48k", "3.50s", "1,280", "diverged", "–"]


def test_a_metrics_line_with_a_wrongly_typed_value_is_skipped(tmp_path, capsys):
    """A hand-edited "tokens": "4000" was a TypeError traceback; the line is skipped, and said."""
    recs = [r for r in fake_records(steps=400, evals=(20,), final=False) if r["step"] <= 35]
    recs[-1]["tokens"] = str(recs[-1]["tokens"])  # step 35
    recs[3]["val_bpb"] = None  # step 20's eval
    a = fake_run(tmp_path / "a", ["train.steps=400"], records=recs, summary=False)
    out = run_json(capsys, a, "--plot", str(tmp_path / "a.png"))
    row = out["runs"][0]
    assert (row["steps"], row["tokens"], row["best_val_bpb"]) == (30, 30 * 128, None)
    assert f"{a}: metrics.jsonl line(s) 4, 7 read as no record (cut by a kill?) or hold a value of the wrong type: " \
           "skipped" in out["notes"]


def test_the_plot_marks_a_diffusion_runs_train_loss_as_a_bound(tmp_path, monkeypatch):
    """A masked-diffusion run's training loss is the ELBO, an upper bound, as its val bpb is: both axes
    say so (the loss axis did not)."""
    ar = compare_mod.load(fake_run(tmp_path / "ar"))
    mdlm = compare_mod.load(fake_run(tmp_path / "mdlm", ["objective.name=mdlm", "model.causal=false"],
                                     records=fake_records(bound=True)))
    labels = []
    monkeypatch.setattr("slmlab.plot.save", lambda plt, fig, path: labels.append([a.get_ylabel() for a in fig.axes]))
    compare_mod.plot([ar], tmp_path / "x.png")
    compare_mod.plot([ar, mdlm], tmp_path / "x.png")
    assert labels == [["val bpb", "train loss (nats/token)"],
                      ["val bpb (≤: an upper bound for diffusion runs)",
                       "train loss (nats/token) (≤: the ELBO, an upper bound, for diffusion runs)"]]
