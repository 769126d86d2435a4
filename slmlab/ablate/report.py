"""Everything an ablation shows, rebuilt from OUT alone (ablation.json plus the run directories).

results.csv holds only what a re-run reproduces bit for bit (configs, sizes, final losses), so a
killed-and-resumed ablation gives the same file as an uninterrupted one; what the machine measured
(wall time, tokens/s, peak memory) goes to timings.csv. Tokens/s and wall time are shown, never
used to rank.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..checkpoint import publish
from ..fmt import count, duration
from ..plot import figure, save
from ..rundir import METRICS, read_metrics, split_evals
from . import stats
from .plan import read_manifest
from .scoring import current, primary, run_results
from .worker import DIVERGED, DONE, FAILED, MISSING, RESOURCES, error_line, read_json, run_state, write_text

INVOCATIONS = "invocations.jsonl"  # one line per coordinator invocation: when, how many runs, how long
RESULT_COLS = ("corpus", "variant", "seed", "dir", "status", "layers", "params", "nonembed_params",
               "flops_per_token", "steps", "tokens", "val_loss", "val_bpb", "val_bpb_is_bound")
TIMING_COLS = ("corpus", "variant", "seed", "dir", "train_time_s", "wall_time_s", "tokens_per_s", "peak_rss_mb",
               "peak_cuda_mb", "device")


@dataclass
class RunResult:
    corpus: str
    variant: str
    seed: int
    dir: str
    summary: Optional[dict]  # the summary of a finished run (done or diverged); else None
    status: str = DONE  # worker.run_state's: done | diverged | failed | missing
    why: str = ""  # failed: the attempt's last error line; missing: why a summary present does not count
    resources: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # (tokens, val bpb) of the periodic evals (first eval_tokens)
    final: Optional[tuple] = None  # (tokens, val bpb) of the final eval over the whole validation split
    tasks: dict = field(default_factory=dict)  # a done run's tasks.json: task name -> result (scoring.py)

    @property
    def done(self) -> bool:
        """Finished with a finite val bpb: the runs the statistics use."""
        return self.status == DONE

    @property
    def finished(self) -> bool:
        """Finished, diverged included: a summary with timings, and not retried."""
        return self.status in (DONE, DIVERGED)


def _point(rec: Optional[dict]) -> Optional[tuple]:
    """(tokens, val bpb) of an eval record; None without one or with a non-finite bpb."""
    if rec is None or "tokens" not in rec or not math.isfinite(rec["val_bpb"]):
        return None
    return rec["tokens"], rec["val_bpb"]


def _curve(path: Path) -> tuple[list, Optional[tuple]]:
    """The periodic evals' points and the final eval's, apart (rundir.split_evals says why)."""
    try:
        periodic, final = split_evals(read_metrics(path)[0])
    except OSError:
        return [], None
    return [p for p in map(_point, periodic) if p], _point(final)


def _mapping(x) -> dict:
    """A run's resources.json as its numbers by name ({} for a file that is not one: hand-edited, say)."""
    if not isinstance(x, dict):
        return {}
    return {k: v for k, v in x.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(out: Path) -> tuple[dict, list[RunResult]]:
    man = read_manifest(out)
    results = []
    for r in man["runs"]:
        d = out / r["dir"]
        st = run_state(d, r.get("config_sha"))
        done = st.status == DONE
        curve, final = _curve(d / METRICS) if done else ([], None)
        # a done run's error line is its --tasks scoring's
        results.append(RunResult(r["corpus"], r["variant"], r["seed"], r["dir"], st.summary, st.status,
                                 st.why or (error_line(d) if done else ""), _mapping(read_json(d / RESOURCES)), curve,
                                 final, run_results(d) if done else {}))
    return man, results


def _pm(s: stats.Summary, digits: int = 4) -> str:
    return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}"


def task_value(r: RunResult, task: dict) -> Optional[float]:
    """The run's primary metric on `task` (a fraction), or None when it has no current result."""
    res = current(r.tasks, task)
    return res["metrics"][primary(task)] if res else None


def write_csvs(out: Path, man: dict, results: list[RunResult]):
    cells = {(c["variant"], c["corpus"]): c for c in man["cells"]}
    tasks = man.get("tasks", [])
    with publish(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RESULT_COLS + tuple(f"{t['name']}.{primary(t)}" for t in tasks))
        for r in results:
            c, s = cells[r.variant, r.corpus], r.summary or {}
            w.writerow([r.corpus, r.variant, r.seed, r.dir, r.status, c["layers"], c["params"],
                        c["nonembed_params"], repr(c["flops_per_token"]), c["steps"], s.get("tokens", ""),
                        repr(s.get("val_loss", math.nan)) if r.finished else "",
                        repr(s["val_bpb"]) if r.finished else "",
                        bool(s.get("val_bpb_is_bound", False)) if r.finished else ""]
                       + [repr(x) if (x := task_value(r, t)) is not None else "" for t in tasks])
    with publish(out / "timings.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TIMING_COLS)
        for r in results:
            if r.finished:
                s, m = r.summary, r.resources
                w.writerow([r.corpus, r.variant, r.seed, r.dir, f"{s['train_time_s']:.1f}", f"{s['wall_time_s']:.1f}",
                            f"{s['tokens_per_s']:.1f}", f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else "",
                            f"{m['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in m else "", s.get("device", "")])


def _seeds(runs) -> str:
    return ", ".join(map(str, sorted(r.seed for r in runs)))


def _by_status(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    by = defaultdict(list)
    for r in runs:
        by[r.status].append(r)
    return by


def _delta(cmp: stats.Comparison, pairs_short: bool, digits: int = 4) -> str:
    """The Δ cell: the difference, its CI, and the pair count when some seed of either side has no
    pair (then Δ is not the difference of the two means shown beside it), or "unpaired" when Δ is
    that difference of means although the column is paired by seed."""
    if not math.isfinite(cmp.diff):
        return "–"
    text = f"{cmp.diff:+.{digits}f}"
    if math.isfinite(cmp.lo):
        text += f" [{cmp.lo:+.{digits}f}, {cmp.hi:+.{digits}f}]"
    if not cmp.paired:
        text += " (unpaired)"
    elif pairs_short:
        text += f" ({cmp.n} pair{'s' if cmp.n > 1 else ''})"
    return text + (" *within noise*" if cmp.within_noise else "")


def _g(x: float, welch: bool = False) -> str:
    return (f"{x:.3g}" + (" (Welch)" if welch else "")) if math.isfinite(x) else "–"


def _by_variant(man: dict, results: list[RunResult], corpus: str) -> dict[str, list[RunResult]]:
    """The corpus's runs of every variant, the baseline's first."""
    runs = {v["name"]: [] for v in man["ablation"]["variants"]}
    for r in results:
        if r.corpus == corpus:
            runs[r.variant].append(r)
    return runs


@dataclass
class Versus:
    """One metric of every variant against the baseline (the first), paired by seed: the columns and
    notes a table's comparisons take, whatever the metric."""

    values: dict[str, dict[int, float]]  # variant -> seed -> finite value
    digits: int = 4  # decimals of a value, a difference and its CI

    def __post_init__(self):
        self.base, *others = self.values
        self.cmps = {v: stats.compare(self.values[self.base], self.values[v]) for v in others}
        # Holm over this table's comparisons: each variant against the baseline is one test
        self.adjusted = dict(zip(self.cmps, stats.holm([c.p for c in self.cmps.values()])))
        self.m = sum(math.isfinite(c.p) for c in self.cmps.values())

    def summary(self, v: str) -> stats.Summary:
        return stats.summarize(self.values[v].values())

    def header(self, metric: str) -> str:
        return (f"Δ {metric} vs {self.base} [95% CI] | d_z | p (t-test) | "
                f"p Holm{f' ({self.m} comparisons)' if self.m > 1 else ''} | p (Wilcoxon)")

    def cells(self, v: str) -> tuple:
        """A variant's Δ, d_z, p, p Holm and p Wilcoxon cells (the baseline's: "baseline" and blanks)."""
        cmp = self.cmps.get(v)
        if cmp is None:
            return "baseline", "", "", "", ""
        n, base_n = len(self.values[v]), len(self.values[self.base])
        dz = f"{cmp.d_z:+.2f}" if math.isfinite(cmp.d_z) else "–"
        return (_delta(cmp, cmp.n < max(n, base_n), self.digits), dz, _g(cmp.p, cmp.test == "Welch t"),
                _g(self.adjusted[v]), _g(cmp.p_wilcoxon))

    def notes(self, v: str) -> list[str]:
        cmp = self.cmps.get(v)
        if cmp is None or not cmp.note:
            return []
        return [f"- {v}: {cmp.note} (Δ {cmp.diff:+.{self.digits}f} over {cmp.n} "
                f"{'pairs' if cmp.test == 'paired t' else 'runs each'}): no spread, so no CI, d_z or p (shown –)"]

    def table_notes(self, unit: str) -> list[str]:
        """The notes above the variants' own: the baseline's noise and what p Holm adjusts for."""
        notes, b = [], self.summary(self.base)
        if b.n > 1:
            notes.append(f"- Run-to-run noise (sd of {self.base} over {b.n} seeds): {b.sd:.{self.digits}f} {unit}. "
                         "Pairing by seed removes the part of it both runs share, so Δ is judged against the spread "
                         "of the per-seed differences instead: *within noise* marks a Δ whose 95% CI includes 0.")
        if self.m:
            notes.append(f"- p Holm: the t-test p adjusted (Holm) for the {self.m} comparison(s) with {self.base} in "
                         "this table; below 0.05 it keeps the chance of any false positive among them under 5%. d_z: "
                         "mean / sd of the per-seed differences (paired only).")
        return notes


def corpus_table(man: dict, results: list[RunResult], corpus: str) -> tuple[list[str], dict[str, float]]:
    """Markdown lines of one corpus's table and notes, and the variants' mean val bpb."""
    cells = {c["variant"]: c for c in man["cells"] if c["corpus"] == corpus}
    runs = _by_variant(man, results, corpus)
    # finite results only: a diverged run has no bpb to average or pair
    vs = Versus({v: {r.seed: r.summary["val_bpb"] for r in rs if r.done} for v, rs in runs.items()})
    lines, notes, means = _header(vs), [], {}
    for v in runs:
        b = vs.summary(v)
        means[v] = b.mean
        lines.append(_row(v, cells[v], runs[v], b, vs.cells(v)))
        notes += vs.notes(v) + _run_notes(v, runs[v])
    if _bound(results, corpus):
        notes.append("- ≤: masked-diffusion runs report the ELBO, an upper bound on bpb, not an exact bpb.")
    return lines + [""] + vs.table_notes("bpb") + notes, means


def _header(vs: Versus) -> list[str]:
    return [f"| variant | layers | params / non-emb | FLOPs/token | tokens | steps | val bpb mean ± sd (n) | "
            f"val loss mean ± sd | {vs.header('bpb')} | tokens/s | peak mem | wall / run |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]


def _n(n: int, runs: list[RunResult], unscored: list[RunResult] = ()) -> str:
    """'n', or 'n/N, ...' saying why the other seeds have no value (diverged, failed, missing, not scored)."""
    by = _by_status(runs)
    why_not = [w for w in (f"seed {_seeds(by[DIVERGED])} diverged" if by[DIVERGED] else "",
                           f"seed {_seeds(by[FAILED])} failed" if by[FAILED] else "",
                           f"missing seed {_seeds(by[MISSING])}" if by[MISSING] else "",
                           f"seed {_seeds(unscored)} not scored" if unscored else "") if w]
    return f"{n}" + (f"/{len(runs)}, {', '.join(why_not)}" if why_not else "")


def _row(v: str, c: dict, runs: list[RunResult], b: stats.Summary, comparison: tuple) -> str:
    """One variant's table row; `b` summarizes its finite val bpbs."""
    done = [r for r in runs if r.done]
    n = _n(b.n, runs)
    le = "≤ " if any(r.summary.get("val_bpb_is_bound") for r in done) else ""
    bpb = f"{le}{_pm(b)} ({n})" if b.n else f"– ({n})"
    loss = stats.summarize(r.summary["val_loss"] for r in done)
    delta, dz, p, ph, pw = comparison
    tokens = stats.summarize(r.summary["tokens"] for r in done).mean
    tps = stats.summarize(r.summary["tokens_per_s"] for r in done).mean
    wall = stats.summarize(r.summary["wall_time_s"] for r in done).mean
    mem = [r.resources.get("peak_cuda_mb", r.resources.get("peak_rss_mb")) for r in done]
    mem = [x for x in mem if x is not None]
    return (f"| {v} | `{c['layers']}` | {count(c['params'])} / {count(c['nonembed_params'])} | "
            f"{count(c['flops_per_token'])} | {count(tokens) if done else '–'} | {c['steps']} | {bpb} | "
            f"{_pm(loss) if loss.n else '–'} | {delta} | {dz} | {p} | {ph} | {pw} | {f'{tps:,.0f}' if done else '–'} | "
            f"{f'{max(mem):,.0f} MB' if mem else '–'} | {duration(wall) if done else '–'} |")


TASKS_INTRO = ("Downstream tasks (`--tasks`): each run's final weights scored zero-shot by log-likelihood, as "
               "`eval.py` scores them; per task its primary metric in % (acc_norm, per-byte normalised, for multiple "
               "choice; greedy acc for completions), mean ± sd over seeds; Δ is variant − baseline paired by seed "
               "with the same statistics as val bpb (here positive = better). *Δ ± se, items pooled*: the per-item "
               "differences of all paired seeds pooled (as `eval.py` pairs two models): the same Δ with the standard "
               "error of the item sample alone, which leaves out seed-to-seed variation, so the per-seed test is the "
               "one that speaks for the variant rather than for these particular runs.")


def task_table(runs: dict[str, list[RunResult]], task: dict) -> list[str]:
    """One --tasks task's table and notes: its primary metric in % per variant, against the baseline
    as the val bpb table compares, plus the item-pooled Δ."""
    metric = primary(task)
    scored = {v: {r.seed: res for r in rs if (res := current(r.tasks, task))} for v, rs in runs.items()}
    vs = Versus({v: {s: 100 * res["metrics"][metric] for s, res in got.items()} for v, got in scored.items()}, 2)
    kind = f"multiple choice, chance {100 * task['chance']:.2f}%" if task["choice"] else "completion, greedy"
    lines = [f"### `{task['name']}` ({task['items']:,} of {task['of']:,} items; {kind})", "",
             f"| variant | {metric} % mean ± sd (n) | {vs.header(metric)} | Δ ± se, items pooled |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    notes = []
    for v, rs in runs.items():
        s, unscored = vs.summary(v), [r for r in rs if r.done and r.seed not in scored[v]]
        pooled = _pooled(scored[vs.base], scored[v], metric) if v != vs.base else ""
        lines.append(f"| {v} | {_pm(s, 2) if s.n else '–'} ({_n(s.n, rs, unscored)}) | {' | '.join(vs.cells(v))} | "
                     f"{pooled} |")
        notes += vs.notes(v) + _unscored_notes(v, unscored)
    if task["choice"]:
        lines.append(f"| *chance* | {100 * task['chance']:.2f} |" + " |" * 6)
    return lines + [""] + vs.table_notes(f"points of {metric} %") + notes + [""]


def _unscored_notes(v: str, unscored: list[RunResult]) -> list[str]:
    """Why trained runs have no score: their scoring's error line (error.txt), seeds grouped by it."""
    by = defaultdict(list)
    for r in unscored:
        by[r.why].append(r)
    return [f"- {v}: seed {_seeds(rs)} not scored{f': {why}' if why else ''} (re-running the same command "
            "retries it)" for why, rs in by.items()]


def _pooled(base: dict[int, dict], variant: dict[int, dict], metric: str) -> str:
    """variant − baseline over the items of every seed both have, pooled (harness.paired), ± its
    standard error: how sure Δ is from the items alone."""
    from ..harness import paired

    seeds = sorted(set(base) & set(variant))
    if not seeds:
        return "–"
    d, se = paired(*([x for s in seeds for x in side[s]["per_item"][metric]] for side in (base, variant)))
    return f"{100 * d:+.2f}" + (f" ± {100 * se:.2f}" if math.isfinite(se) else "")


def _run_notes(v: str, runs: list[RunResult]) -> list[str]:
    """A variant's notes on its runs without a finite result: diverged, failed, missing."""
    by, notes = _by_status(runs), []
    if by[DIVERGED]:
        notes.append(f"- {v}: seed {_seeds(by[DIVERGED])} diverged (non-finite final val bpb): left out of the "
                     "statistics, and not retried by a re-run (the same seed would diverge again)")
    for r in sorted(by[FAILED], key=lambda r: r.seed):
        notes.append(f"- {v}: seed {r.seed} failed: {r.why} (a re-run retries it; its log: `{r.dir}/train.log`, "
                     "or .submitit/ with --launcher submitit)")
    if by[MISSING]:
        whys = sorted({r.why for r in by[MISSING] if r.why})
        notes.append(f"- {v}: no result for seed {_seeds(by[MISSING])} (not run yet or interrupted"
                     + "".join(f"; {w}" for w in whys) + ": re-running the same command resumes or restarts it)")
    return notes


def record_invocation(out: Path, rec: dict):
    """Add one coordinator invocation to OUT/invocations.jsonl. The file is rewritten whole (via
    publish): an append cut short by a kill would leave a line the Time section cannot read."""
    path = out / INVOCATIONS
    write_text(path, (path.read_text() if path.is_file() else "") + json.dumps(rec) + "\n")


def write_markdown(out: Path, man: dict, results: list[RunResult]):
    ab = man["ablation"]
    finished = [r for r in results if r.finished]
    diverged = sum(r.status == DIVERGED for r in results)
    failed = sum(r.status == FAILED for r in results)
    lines = [f"# Ablation `{out.name}`", "",
             f"Budget: equal **{ab['budget']}** ({ab['steps']} steps for the baseline `{ab['variants'][0]['name']}`); "
             f"seeds {', '.join(map(str, ab['seeds']))}; {len(finished)} of {len(results)} runs finished"
             + (f" ({diverged} diverged)" if diverged else "") + (f"; {failed} failed" if failed else "") + ". "
             "Δ is variant − baseline in val bpb (negative = better), paired by seed (same init seed and data "
             "order), 95% t confidence interval, two-sided p; d_z is the paired effect size, p Holm the p adjusted "
             "for the table's several comparisons. Final val bpb over the whole validation split.", ""]
    if ab["overrides"]:
        lines += ["Common overrides: " + " ".join(f"`{o}`" for o in ab["overrides"]), ""]
    if man.get("tasks"):
        lines += [TASKS_INTRO, ""]
    lines += ["Variants: " + "; ".join(f"**{v['name']}** `--arch {v['arch']}`"
                                       + "".join(f" `{o}`" for o in v["overrides"]) for v in ab["variants"]), ""]
    means = {}
    for corpus in ab["corpora"]:
        lines += [f"## {corpus}", ""]
        table, means[corpus] = corpus_table(man, results, corpus)
        lines += table + [""]
        for task in man.get("tasks", []):
            lines += task_table(_by_variant(man, results, corpus), task)
    if len(ab["corpora"]) > 1:
        agree, tau = stats.ranking_agreement(means)
        order = "; ".join(f"{c}: " + " < ".join(sorted((v for v in m if math.isfinite(m[v])), key=m.get))
                          for c, m in means.items())
        lines += ["## Across corpora", "",
                  f"Ranking by mean val bpb (best first): {order}. The ranking "
                  + ("**agrees** on every corpus" if agree else "**differs** between corpora")
                  + f" (smallest pairwise Kendall tau {tau:.2f}).", ""]
    inv = []
    if (out / INVOCATIONS).is_file():
        inv = [json.loads(x) for x in (out / INVOCATIONS).read_text().splitlines() if x.strip()]
    run_wall = sum(r.summary.get("wall_time_s", 0.0) for r in finished)
    lines += ["## Time", "",
              f"Sum of the runs' wall times: {duration(run_wall)}"
              + (f"; the coordinator ran {duration(sum(i['elapsed_s'] for i in inv))} over {len(inv)} "
                 f"invocation(s)" if inv else "") + ". Per-run timings: `timings.csv`.", ""]
    write_text(out / "results.md", "\n".join(lines))


def _bound(results: list[RunResult], corpus: str) -> bool:
    """Whether a finished run on `corpus` reports the ELBO, an upper bound on bpb (masked diffusion)."""
    return any(r.done and r.summary.get("val_bpb_is_bound") for r in results if r.corpus == corpus)


def _bpb_label(results: list[RunResult], corpus: str) -> str:
    return "val bpb" + (" (≤: an upper bound for diffusion runs)" if _bound(results, corpus) else "")


def plot_curves(out: Path, man: dict, results: list[RunResult]):
    import numpy as np

    ab = man["ablation"]
    plt, fig, axes = figure(len(ab["corpora"]), "val bpb against training tokens, mean ± sd over seeds. "
                                 "Lines: periodic evals on the first train.eval_tokens of the validation split; "
                                 "diamond: the final eval on the whole split (another token set, so not joined)")
    for ax, corpus in zip(axes, ab["corpora"]):
        for i, v in enumerate(v["name"] for v in ab["variants"]):
            mine = [r for r in results if r.corpus == corpus and r.variant == v and r.done]
            color = f"C{i % 10}"  # one colour per variant on every corpus
            curves = [dict(r.curve) for r in mine if r.curve]
            label = f"{v} (n={len(mine)})"
            if curves:
                xs = sorted(set.intersection(*(set(c) for c in curves)))  # tokens every seed evaluated at
                ys = np.array([[c[x] for x in xs] for c in curves])
                mean, sd = ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
                ax.plot(xs, mean, marker="o", ms=3, color=color, label=label)
                ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.2)
                label = None
            finals = [r.final for r in mine if r.final]
            if finals:
                fy = np.array([y for _, y in finals])
                ax.errorbar([max(x for x, _ in finals)], [fy.mean()], yerr=[fy.std(ddof=1) if fy.size > 1 else 0],
                            marker="D", ms=5, color=color, capsize=3, linestyle="none", label=label)
        ax.set_title(corpus)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(_bpb_label(results, corpus))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(plt, fig, out / "curves.png")


def plot_final(out: Path, man: dict, results: list[RunResult]):
    ab = man["ablation"]
    plt, fig, axes = figure(len(ab["corpora"]), "final val bpb per variant (mean ± sd; dots: seeds)")
    names = [v["name"] for v in ab["variants"]]
    for ax, corpus in zip(axes, ab["corpora"]):
        # finite results only (r.done): a diverged run's NaN or inf would make the axis limits NaN
        vals = [[r.summary["val_bpb"] for r in results if r.corpus == corpus and r.variant == v and r.done]
                for v in names]
        div = [sum(r.corpus == corpus and r.variant == v and r.status == DIVERGED for r in results) for v in names]
        s = [stats.summarize(x) for x in vals]
        ax.bar(range(len(names)), [x.mean if x.n else 0 for x in s],
               yerr=[x.sd if x.n > 1 else 0 for x in s], capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, x in enumerate(vals):
            ax.scatter([i] * len(x), x, color="k", s=10, zorder=3)
        finite = [y for x in vals for y in x if math.isfinite(y)]
        if finite:  # zoom on the differences: bars from zero would hide them
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 1e-3) * 0.6
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(names)), [f"{v} ({k} diverged)" if k else v for v, k in zip(names, div)],
                      rotation=30, ha="right")
        ax.set_title(corpus)
        ax.set_ylabel(_bpb_label(results, corpus))
        ax.grid(axis="y", alpha=0.3)
    save(plt, fig, out / "final.png")


def write_report(out) -> list[RunResult]:
    """(Re)build results.md, results.csv, timings.csv, curves.png and final.png in `out`."""
    out = Path(out)
    man, results = collect(out)
    write_csvs(out, man, results)
    write_markdown(out, man, results)
    plot_curves(out, man, results)
    plot_final(out, man, results)
    return results
