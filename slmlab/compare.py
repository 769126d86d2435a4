"""A few runs side by side (compare.py): a table, what differs in their configs, notes on what
their numbers cannot be compared for, and an optional plot of their curves.

Every run is read from its directory alone: config.yaml and metrics.jsonl, and summary.json once it
finished. A run still training, or killed, is compared from its metrics.jsonl, and says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, RunDirError, SlmlabError
from .fmt import count, duration
from .harness import primary_scores, to_json
from .rundir import CONFIG, METRICS, SUMMARY, TOKENIZER, RunDir, read_metrics, split_evals
from .unused import changed, settings, show, why_unused

# Settings left out of "what differs": they say where files go and what is printed or mirrored,
# never what is trained, evaluated or timed (the sample is drawn after summary.json is written;
# model.context_length is metadata only). train.device, model.kernels and train.compile stay in:
# they change the speed, and a CUDA run's autocast the numbers too.
NEVER_MATTER = frozenset({"data.cache_dir", "logging.progress", "logging.wandb", "logging.wandb_project",
                          "logging.wandb_mode", "train.sample_prompt", "train.sample_tokens", "model.context_length"})
VAL_DATA = ("data.spec", "data.val_frac")  # the validation split is the last val_frac of the spec's text
# --x: (the metrics.jsonl key, the axis label)
X_AXES = {"tokens": ("tokens", "training tokens"), "steps": ("step", "optimizer steps"),
          "time": ("elapsed_s", "training time (s)")}
# The train-loss panel's smoothing: an average whose weights halve every HALF_LIFE of the x axis's extent
# behind each point. Per x, not per logged point: a run logged every 5 steps and the same run logged every
# step get one curve (per point, the first was smoothed over 5x the steps, up to 0.4 nats apart).
HALF_LIFE = 0.01
RUNNING = "running or stopped"
COLUMNS = ("run", "arch", "layers", "params", "steps", "tokens", "train time", "tokens/s", "val bpb",
           "best eval bpb")
NUMERIC = {3, 4, 5, 6, 7, 8, 9}  # right-aligned columns
BOUND = "≤: masked-diffusion runs report the ELBO, an upper bound on bpb, not an exact bpb"
# The metrics.jsonl and summary.json keys compare.py computes with, and their types: a value of another type
# (a hand-edited "4000") is no reading, where it would be a TypeError mid-table.
TYPES = {**dict.fromkeys(("step", "phase", "tokens", "elapsed_s", "loss", "ce", "val_bpb", "val_tokens",
                          "eval_seq_len", "params", "params_active", "steps", "train_time_s", "tokens_per_s"),
                         (int, float)), "val_sha256": (str,)}


@dataclass
class Run:
    name: str  # the path as given
    dir: RunDir
    cfg: RunConfig
    summary: dict | None  # None: not finished (still training, or killed)
    stale_steps: int | None  # the steps of a summary.json left by an earlier finish (a resume with more steps)
    records: list[dict]  # metrics.jsonl
    bad_lines: list[int]  # metrics.jsonl lines that read as no record
    layers: str
    params: int
    params_active: int  # a MoE's: the experts a token runs


def load(path: str) -> Run:
    from .estimate import meta_model

    run = RunDir.open(path, need=(CONFIG, METRICS))
    cfg = run.config()
    records, bad = read_metrics(run.path / METRICS, valid=lambda rec: _wrong_type(rec) is None)
    if bad and not records:
        raise RunDirError(f"{run.path / METRICS} is torn: none of its {len(bad)} line(s) reads as a record")
    summary, stale = run.summary(), None
    key = summary and _wrong_type(summary)
    if key:
        raise RunDirError(f"{run.path / SUMMARY}: {key!r} is {summary[key]!r}, expected "
                          f"{' or '.join(t.__name__ for t in TYPES[key])} (edited since?): fix it, or move it aside "
                          "to see the run as unfinished")
    if summary is not None and summary.get("steps", cfg.train.steps) != cfg.train.steps:
        # Directories written before the trainer removed it on --resume: that finish is not this run's.
        summary, stale = None, summary.get("steps")
    # a run without a summary (or from before summaries had params_active) is sized by its model, built
    # with no storage
    known = summary or {}
    model = None if {"params", "params_active"} <= set(known) else meta_model(cfg)
    params = known["params"] if "params" in known else model.num_params()
    active = known["params_active"] if "params_active" in known else model.num_params(active=True)
    return Run(path, run, cfg, summary, stale, records, bad, cfg.model.layer_summary(), params, active)


def _wrong_type(rec: dict) -> str | None:
    """The first key of TYPES whose value in `rec` is of another type (a bool is no number), or None."""
    return next((k for k, types in TYPES.items() if k in rec
                 and (not isinstance(rec[k], types) or isinstance(rec[k], bool))), None)


def open_runs(paths: list[str]) -> list[Run]:
    if not paths:
        raise ConfigError("give one run directory or more: python compare.py RUN [RUN ...]")
    seen = {}
    for p in paths:
        key = Path(p).expanduser().resolve()
        if key in seen:
            twice = f"{p} is given twice" + (f" (as {seen[key]} too)" if seen[key] != p else "")
            raise ConfigError(f"{twice}: give each run once")
        seen[key] = p
    return [load(p) for p in paths]


# ---- the table ----
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _last(records: list[dict], key: str):
    """`key` of the last record that has it (the final eval's line has no elapsed_s, say)."""
    return next((r[key] for r in reversed(records) if key in r), None)


def eval_stretches(periodic: list[dict]) -> list[list[dict]]:
    """The periodic evals split where their shape (context, tokens evaluated) changes, as a --resume
    with another train.eval_seq_len or eval_tokens makes it: evals of two shapes do not compare."""
    stretches = []
    for e in periodic:
        if not stretches or _eval_shape(e) != _eval_shape(stretches[-1][-1]):
            stretches.append([])
        stretches[-1].append(e)
    return stretches


def _eval_shape(e: dict) -> tuple:
    return e.get("eval_seq_len"), e.get("val_tokens")


def tokens_per_step_change(records: list[dict]) -> tuple | None:
    """(last step at the old rate, first step at the new, old, new) where the tokens per optimizer step
    change inside a phase (a --resume with another batch shape; a new phase changes them as planned),
    from the logged steps' token counts; None if none, or if they vary from step to step (an SFT
    run's batches are as long as their longest example)."""
    pts = [(r["step"], r["tokens"], r.get("phase")) for r in records
           if _finite(r.get("step")) and _finite(r.get("tokens")) and not (r.get("final") or r.get("final_avg"))]
    for phase in dict.fromkeys(p for _, _, p in pts):
        at = [(s, t) for s, t, p in pts if p == phase]
        rates = [((t1 - t0) / (s1 - s0), s0, s1) for (s0, t0), (s1, t1) in zip(at, at[1:]) if s1 > s0]
        if not rates or rates[0][0] == rates[-1][0]:
            continue
        old, new = rates[0][0], rates[-1][0]
        if len({rate for rate, _, _ in rates} - {old, new}) > 1:  # more than the one interval across the change
            return None
        last_old = max(s1 for rate, _, s1 in rates if rate == old)
        first_new = min(s0 for rate, s0, _ in rates if rate == new) + 1
        return last_old, first_new, old, new
    return None


def row(r: Run) -> dict:
    """One run's numbers: its summary's when it finished, else the last of its metrics.jsonl. The best
    periodic eval is of those at the run's last evaluation shape."""
    s = r.summary or {}
    periodic, final = split_evals(r.records)
    evals = [*periodic, final] if final else periodic
    last_shape = eval_stretches(periodic)[-1] if periodic else []
    best = min((e for e in last_shape if _finite(e["val_bpb"])), key=lambda e: e["val_bpb"], default={})
    bpb = s.get("val_bpb", final and final["val_bpb"])
    tokens = s.get("tokens", _last(r.records, "tokens"))
    time = s.get("train_time_s", _last(r.records, "elapsed_s"))
    tps = s.get("tokens_per_s", tokens / time if tokens and time else None)
    return {"run": r.name, "status": _status(r, bpb), "arch": r.cfg.arch, "layers": r.layers, "params": r.params,
            "params_active": r.params_active,
            "steps": s.get("steps", _last(r.records, "step") or 0), "steps_planned": r.cfg.train.steps,
            "tokens": tokens, "train_time_s": time, "tokens_per_s": tps, "val_bpb": bpb,
            "best_val_bpb": best.get("val_bpb"), "best_val_step": best.get("step"),
            "val_bpb_is_bound": any(e.get("val_bpb_is_bound") for e in (*evals, s)),
            "eval_seq_len": _last(evals, "eval_seq_len"), "device": s.get("device"),
            "tasks": primary_scores(final or {})}


def _status(r: Run, bpb) -> str:
    """done, diverged or running: a run without a summary whose last logged train loss is non-finite
    diverged (the trainer aborts after train.max_bad_steps non-finite steps in a row)."""
    if r.summary is not None:
        return "diverged" if bpb is not None and not _finite(bpb) else "done"
    losses = _losses(r)
    return "diverged" if losses and not _finite(losses[-1][1]) else RUNNING


def _losses(r: Run) -> list[tuple]:
    """(step, train loss) of the logged steps."""
    return [(x.get("step"), x["loss"]) for x in r.records if "loss" in x]


def task_lines(rows: list[dict]) -> list[str]:
    """A table of the runs' final downstream scores (train.eval_tasks), when any run has them."""
    names = sorted({k for w in rows for k in w["tasks"]})
    if not names:
        return []
    cells = [["run", *names]] + [[w["run"], *(f"{100 * w['tasks'][n]:.1f}%" if n in w["tasks"] else "–"
                                             for n in names)] for w in rows]
    return ["", "Downstream tasks (train.eval_tasks, the final eval; eval.py compares runs on the same items with "
                "paired differences):", *markdown(cells, set(range(1, len(names) + 1)))]


def _cells(w: dict) -> list[str]:
    le = "≤ " if w["val_bpb_is_bound"] else ""
    bpb = w["val_bpb"]
    if bpb is None:  # unfinished: diverged when its train losses went non-finite
        final = "diverged" if w["status"] == "diverged" else "–"
    else:
        final = f"{le}{bpb:.4f}" if _finite(bpb) else f"diverged ({bpb})"
    best = f"{le}{w['best_val_bpb']:.4f} @{w['best_val_step']}" if w["best_val_bpb"] is not None else "–"
    params = count(w["params"]) + (f" ({count(w['params_active'])} active)" if w["params_active"] != w["params"] else "")
    return [w["run"], w["arch"], w["layers"], params, f"{w['steps']}/{w['steps_planned']}",
            count(w["tokens"]) if w["tokens"] is not None else "–",
            duration(w["train_time_s"], sub_second=True) if w["train_time_s"] is not None else "–",
            f"{w['tokens_per_s']:,.0f}" if w["tokens_per_s"] is not None else "–", final, best]


def markdown(rows: list[list[str]], right: set[int]) -> list[str]:
    """A markdown table padded to read as columns on a terminal too; rows[0] is the header."""
    widths = [max(3, *map(len, col)) for col in zip(*rows)]
    pad = [str.rjust if i in right else str.ljust for i in range(len(widths))]
    lines = ["| " + " | ".join(f(c, w) for f, c, w in zip(pad, r, widths)) + " |" for r in rows]
    rule = "| " + " | ".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return [lines[0], rule, *lines[1:]]


# ---- what differs ----
def _unused(r: Run, base: Run, key: str) -> str | None:
    """Why one of the two runs never reads `key` (then its value explains no difference), or None."""
    why = why_unused(r.cfg, key)
    if why:
        return why
    why = why_unused(base.cfg, key)
    return f"{base.name} does not read it: {why}" if why else None


def differences(runs: list[Run]) -> dict[str, list[dict]]:
    """Per run after the first: the settings in which its config differs from the first run's."""
    base, out = runs[0], {}
    for r in runs[1:]:
        a, b = settings(base.cfg), settings(r.cfg)
        out[r.name] = [{"key": k, "first": a.get(k), "this": b.get(k), "unused": _unused(r, base, k)}
                       for k in sorted(set(changed(r.cfg, base.cfg)) - NEVER_MATTER)]
    return out


def _diff_line(d: dict, base: Run, r: Run) -> str:
    # The layer pattern as the table shows it, not as a list of block names.
    first, this = (base.layers, r.layers) if d["key"] == "model.layers" else (show(d["first"]), show(d["this"]))
    return f"    {d['key']}: {first} -> {this}" + (f" (unused: {d['unused']})" if d["unused"] else "")


# ---- notes ----
def _run_notes(r: Run, w: dict) -> list[str]:
    """What to know about one run on its own: unfinished, skipped metrics lines, diverged."""
    notes = []
    if w["status"] == RUNNING:
        why = "no summary.json" if r.stale_steps is None else \
            f"its summary.json is of a {r.stale_steps}-step finish, before a --resume with more steps"
        notes.append(f"{r.name}: {RUNNING} at step {w['steps']} of {w['steps_planned']} ({why}: its "
                     "numbers are its metrics.jsonl's last)")
    if r.bad_lines:
        shown = ", ".join(map(str, r.bad_lines[:5])) + (", ..." if len(r.bad_lines) > 5 else "")
        notes.append(f"{r.name}: {METRICS} line(s) {shown} read as no record (cut by a kill?) or hold a value of "
                     "the wrong type: skipped")
    periodic, final = split_evals(r.records)
    bad = next((e for e in (*periodic, final) if e and not _finite(e["val_bpb"])), None)
    if bad or (w["status"] == "diverged" and r.summary is not None):
        at = "in its final eval" if bad is None or bad.get("final") else f"at step {bad.get('step', '?')}"
        notes.append(f"{r.name} diverged: a non-finite val bpb ({(bad or w)['val_bpb']}) {at}")
    return notes + _loss_notes(r, w)


def _loss_notes(r: Run, w: dict) -> list[str]:
    """Non-finite train losses: not plotted, so counted here; a run that ends on them aborted."""
    bad = [(step, loss) for step, loss in _losses(r) if not _finite(loss)]
    if not bad:
        return []
    notes = [f"{r.name}: {len(bad)} logged step(s) with a non-finite train loss (the last: {bad[-1][1]} at step "
             f"{bad[-1][0]}); the trainer skipped their updates, and the plot has no point for them"]
    if w["status"] == "diverged" and r.summary is None:
        notes.append(f"{r.name} diverged: its last logged train loss is non-finite and it has no summary.json (the "
                     "trainer aborts after train.max_bad_steps non-finite steps in a row)")
    return notes


def _resume_notes(r: Run) -> list[str]:
    """Settings a --resume changed mid-run, from its metrics.jsonl (config.yaml holds the new values only)."""
    notes = []
    stretches = eval_stretches(split_evals(r.records)[0])
    for before, after in zip(stretches, stretches[1:]):
        (seq0, tok0), (seq1, tok1) = _eval_shape(before[-1]), _eval_shape(after[0])
        what = [f"{name} {a} -> {b}" for name, a, b in (("eval_seq_len", seq0, seq1), ("val_tokens", tok0, tok1))
                if a != b]
        notes.append(f"{r.name}: its periodic evals change between steps {before[-1].get('step')} and "
                     f"{after[0].get('step')} ({', '.join(what)}; a --resume): they do not compare across it, so "
                     f"the val curve breaks there and best eval bpb is of the evals from step {stretches[-1][0].get('step')} on")
    change = tokens_per_step_change(r.records)
    if change:
        last_old, first_new, old, new = change
        when = f"from step {first_new}" if last_old + 1 == first_new else f"between steps {last_old} and {first_new}"
        notes.append(f"{r.name}: tokens per step change {old:,.0f} -> {new:,.0f} {when}, inside a phase (a --resume "
                     "with another batch shape): config.yaml, which what differs reads, holds the new value only")
    return notes


def _same_tokenizer(a: Run, b: Run) -> bool:
    """Unknown is the same: a run writes its tokenizer.json before its first step."""
    fa, fb = a.dir.path / TOKENIZER, b.dir.path / TOKENIZER
    return not (fa.is_file() and fb.is_file()) or fa.read_bytes() == fb.read_bytes()


def _other_val_text(base: Run, r: Run) -> list[str]:
    """Why `r` is validated on other text than `base` ([] when the same). Finished runs' summaries
    hold their validation split's sha256, which settles it (a relative data.spec may name two files,
    and two specs one text); else the specs and val_frac are compared as written."""
    sha = [(x.summary or {}).get("val_sha256") for x in (base, r)]
    a, b = settings(base.cfg), settings(r.cfg)
    if all(sha):
        return [] if sha[0] == sha[1] else [f"validation text sha256 {sha[0][:12]}… -> {sha[1][:12]}…"]
    return [f"{k}: {show(a[k])} -> {show(b[k])}" for k in VAL_DATA if a[k] != b[k]]


def _pair_notes(base: Run, wb: dict, r: Run, w: dict) -> list[str]:
    """Where run `r`'s numbers do not measure the same thing as the first run's."""
    notes = []
    data = _other_val_text(base, r)
    if data:
        notes.append(f"{r.name} is validated on other text than {base.name} ({'; '.join(data)}): their val bpb "
                     "are not comparable")
    elif not _same_tokenizer(base, r):
        notes.append(f"{r.name} has another tokenizer than {base.name}: bpb is per byte of the same validation "
                     "text, so the final val bpb compare (but for the few bytes whole eval windows leave out); "
                     "train losses are per token and do not, nor do the periodic evals (the first "
                     "train.eval_tokens tokens are other text)")
    if wb["eval_seq_len"] and w["eval_seq_len"] and wb["eval_seq_len"] != w["eval_seq_len"]:
        notes.append(f"{r.name} is evaluated at {w['eval_seq_len']} tokens of context, {base.name} at "
                     f"{wb['eval_seq_len']}: bpb falls with context, so part of any difference is the eval's")
    both_evaluated = wb["best_val_bpb"] is not None and w["best_val_bpb"] is not None
    if base.cfg.train.eval_tokens != r.cfg.train.eval_tokens and both_evaluated:
        notes.append(f"{r.name}'s periodic evals cover the first {r.cfg.train.eval_tokens:,} validation tokens, "
                     f"{base.name}'s the first {base.cfg.train.eval_tokens:,}: the best eval bpb differ in what "
                     "they measure (the final evals cover the whole split)")
    if wb["device"] and w["device"] and wb["device"] != w["device"]:
        notes.append(f"{r.name} ran on {w['device']}, {base.name} on {wb['device']}: tokens/s and train time "
                     "compare the machines as much as the runs")
    return notes


def notes(runs: list[Run], rows: list[dict]) -> list[str]:
    out = [n for r, w in zip(runs, rows) for n in (*_run_notes(r, w), *_resume_notes(r))]
    out += [n for r, w in zip(runs[1:], rows[1:]) for n in _pair_notes(runs[0], rows[0], r, w)]
    bound = [w["val_bpb_is_bound"] for w in rows]
    if any(bound):
        out.append(BOUND + ("; a ≤ value below an exact one still shows the better model, one above it shows "
                            "nothing" if not all(bound) else ""))
    return out


# ---- the plot ----
def _points(records: list[dict], x: str, y) -> list[tuple]:
    """(x, y(record)) of the records that have `x` and a finite y: a diverged step has no point."""
    pts = [(r[x], y(r)) for r in records if x in r]
    return [(a, b) for a, b in pts if _finite(b)]


def _smooth(xs: list[float], ys: list[float], half_life: float) -> list[float]:
    """The exponential moving average in x of the line through (xs, ys): exact on each straight
    segment, so sparser logging of the same curve changes it only by the curvature it misses."""
    out, tau = [ys[0]], half_life / math.log(2)
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x1 <= x0:  # no x between them (a metrics.jsonl cut and appended to): nothing to average over
            out.append(out[-1])
            continue
        # lead (slope x tau): how far a straight line's average trails it
        decay, lead = math.exp(-(x1 - x0) / tau), (y1 - y0) / (x1 - x0) * tau
        out.append(y1 + (out[-1] - y0 + lead) * decay - lead)
    return out


def loss_curves(runs: list[Run], key: str) -> list[tuple[list, list, list]]:
    """Each run's logged train losses against `key` and their smoothed curve: (xs, ys, smoothed). One
    half-life for all runs, so their curves compare. A distilled run's loss mixes in the teacher's
    term; its "ce" is what the other runs' loss is."""
    pts = [_points([s for s in r.records if "loss" in s], key, lambda s: s.get("ce", s["loss"])) for r in runs]
    every_x = [x for run in pts for x, _ in run]
    half_life = HALF_LIFE * (max(every_x) - min(every_x)) if every_x else 0
    curves = []
    for run in pts:
        xs, ys = [x for x, _ in run], [y for _, y in run]
        curves.append((xs, ys, _smooth(xs, ys, half_life) if run else []))
    return curves


def _final_x(r: Run, final: dict, key: str) -> float:
    """Where the final eval sits on the x axis: its own step and tokens; in time, the end of training
    (the summary's train time; the last logged time of a run without one)."""
    if key == "elapsed_s" and r.summary and _finite(r.summary.get("train_time_s")):
        return r.summary["train_time_s"]
    return final.get(key, _last(r.records, key))


def plot(runs: list[Run], path, x: str = "tokens"):
    """Two panels against `x`: val bpb (periodic evals joined, the final eval a diamond apart) and
    the train loss (faint as logged, solid smoothed)."""
    from .plot import figure, save

    key, label = X_AXES[x]
    plt, fig, (bpb_ax, loss_ax) = figure(2, "val bpb: lines are the periodic evals (the first train.eval_tokens "
                                            "of the validation split), diamonds the final eval over the whole split "
                                            "(another token set, so not joined). Train loss: faint as logged, solid "
                                            f"smoothed (half-life {HALF_LIFE:.0%} of the x axis).")
    losses = loss_curves(runs, key)
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        periodic, final = split_evals(r.records)
        pts = False
        for evals in eval_stretches(periodic):  # evals of two shapes do not compare: not joined
            stretch = _points(evals, key, lambda e: e["val_bpb"])
            if stretch:
                bpb_ax.plot(*zip(*stretch), marker="o", ms=3, color=color, label=None if pts else r.name)
                pts = True
        if final and _finite(final["val_bpb"]) and _last(r.records, key) is not None:
            bpb_ax.plot([_final_x(r, final, key)], [final["val_bpb"]], marker="D", ms=6,
                        color=color, linestyle="none", label=None if pts else r.name)
        xs, ys, smoothed = losses[i]
        if xs:
            loss_ax.plot(xs, ys, color=color, alpha=0.2, lw=0.8)
            loss_ax.plot(xs, smoothed, color=color, label=r.name)
    bound = any(e.get("val_bpb_is_bound") for r in runs for e in r.records)
    elbo = any(r.cfg.objective.name == "mdlm" for r in runs)  # its training loss is the ELBO, a bound too
    for ax, ylabel in ((bpb_ax, "val bpb" + (" (≤: an upper bound for diffusion runs)" if bound else "")),
                       (loss_ax, "train loss (nats/token)" + (" (≤: the ELBO, an upper bound, for diffusion runs)"
                                                              if elbo else ""))):
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    save(plt, fig, path)


def check_plot(path: str, force: bool):
    """Refuse a --plot before anything is read: not a .png, an existing file without --force (as
    convert.py's --out), or no matplotlib."""
    from .export import check_out

    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"--plot {path}: the plot is a PNG; give a path ending in .png")
    check_out(path, force, is_dir=False)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SlmlabError("--plot needs matplotlib: pip install matplotlib (or -e '.[ablate]')") from None


# ---- output ----
def text(runs: list[Run], out: dict) -> str:
    lines = markdown([list(COLUMNS), *map(_cells, out["runs"])], NUMERIC)
    lines += ["", "val bpb: the final eval, over the whole validation split; best eval bpb: the lowest periodic "
                  "eval (the first train.eval_tokens of the split) @ its step."]
    lines += task_lines(out["runs"])
    if len(runs) > 1:
        lines += ["", f"What differs from {runs[0].name} (unused: a setting that run never reads, so it cannot "
                      "explain a difference):"]
        for r in runs[1:]:
            diff = out["differences"][r.name]
            lines += [f"  {r.name}" + ("" if diff else ": nothing")] + [_diff_line(d, runs[0], r) for d in diff]
    if out["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in out["notes"])]
    if out.get("plot"):
        lines += ["", f"plot: {out['plot']}"]
    return "\n".join(lines)


def compare(paths: list[str], plot_path: str | None = None, x: str = "tokens", as_json: bool = False) -> dict:
    """Print the comparison of the runs at `paths` (text, or one JSON object) and return it."""
    runs = open_runs(paths)
    rows = [row(r) for r in runs]
    out = {"runs": rows, "differences": differences(runs), "notes": notes(runs, rows)}
    if plot_path:
        plot(runs, plot_path, x)
        out["plot"] = str(plot_path)
    print(to_json(out, indent=2, default=str) if as_json else text(runs, out))
    return out
