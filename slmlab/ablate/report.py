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
from .worker import DIVERGED, DONE, FAILED, MISSING, RESOURCES, read_json, run_state, write_text

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


def collect(out: Path) -> tuple[dict, list[RunResult]]:
    man = read_manifest(out)
    results = []
    for r in man["runs"]:
        d = out / r["dir"]
        st = run_state(d, r.get("config_sha"))
        curve, final = _curve(d / METRICS) if st.status == DONE else ([], None)
        results.append(RunResult(r["corpus"], r["variant"], r["seed"], r["dir"], st.summary, st.status, st.why,
                                 read_json(d / RESOURCES) or {}, curve, final))
    return man, results


def _pm(s: stats.Summary) -> str:
    return f"{s.mean:.4f} ± {s.sd:.4f}" if s.n > 1 else f"{s.mean:.4f}"


def write_csvs(out: Path, man: dict, results: list[RunResult]):
    cells = {(c["variant"], c["corpus"]): c for c in man["cells"]}
    with publish(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RESULT_COLS)
        for r in results:
            c, s = cells[r.variant, r.corpus], r.summary or {}
            w.writerow([r.corpus, r.variant, r.seed, r.dir, r.status, c["layers"], c["params"],
                        c["nonembed_params"], repr(c["flops_per_token"]), c["steps"], s.get("tokens", ""),
                        repr(s.get("val_loss", math.nan)) if r.finished else "",
                        repr(s["val_bpb"]) if r.finished else "",
                        bool(s.get("val_bpb_is_bound", False)) if r.finished else ""])
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


def _delta(cmp: stats.Comparison, pairs_short: bool) -> str:
    """The Δ cell: the difference, its CI, and the pair count when some seed of either side has no
    pair (then Δ is not the difference of the two means shown beside it)."""
    if not math.isfinite(cmp.diff):
        return "–"
    text = f"{cmp.diff:+.4f}"
    if math.isfinite(cmp.lo):
        text += f" [{cmp.lo:+.4f}, {cmp.hi:+.4f}]"
    if cmp.test == "paired t" and pairs_short:
        text += f" ({cmp.n} pairs)"
    return text + (" *within noise*" if cmp.within_noise else "")


def _g(x: float, welch: bool = False) -> str:
    return (f"{x:.3g}" + (" (Welch)" if welch else "")) if math.isfinite(x) else "–"


def corpus_table(man: dict, results: list[RunResult], corpus: str) -> tuple[list[str], dict[str, float]]:
    """Markdown lines of one corpus's table and notes, and the variants' mean val bpb."""
    variants = [v["name"] for v in man["ablation"]["variants"]]
    base = variants[0]
    cells = {c["variant"]: c for c in man["cells"] if c["corpus"] == corpus}
    runs = defaultdict(list)
    for r in results:
        if r.corpus == corpus:
            runs[r.variant].append(r)
    # finite results only: a diverged run has no bpb to average or pair
    bpb = {v: {r.seed: r.summary["val_bpb"] for r in runs[v] if r.done} for v in variants}
    cmps = {v: stats.compare(bpb[base], bpb[v]) for v in variants[1:]}
    # Holm over this table's comparisons: each variant against the baseline is one test
    adjusted = dict(zip(cmps, stats.holm([c.p for c in cmps.values()])))
    m = sum(math.isfinite(c.p) for c in cmps.values())
    base_sum = stats.summarize(bpb[base].values())
    lines, notes, means = _header(base, m), [], {}
    for v in variants:
        b = stats.summarize(bpb[v].values())
        means[v] = b.mean
        cmp = cmps.get(v)
        lines.append(_row(v, cells[v], runs[v], b, _comparison(cmp, adjusted.get(v), b.n, base_sum.n)))
        if cmp is not None and cmp.note:
            notes.append(f"- {v}: {cmp.note} (Δ {cmp.diff:+.4f} over {cmp.n} "
                         f"{'pairs' if cmp.test == 'paired t' else 'runs each'}): no spread, so no CI, d_z or "
                         "p (shown –)")
        notes += _run_notes(v, runs[v])
    if any(r.done and r.summary.get("val_bpb_is_bound") for r in results if r.corpus == corpus):
        notes.append("- ≤: masked-diffusion runs report the ELBO, an upper bound on bpb, not an exact bpb.")
    return lines + [""] + _table_notes(base, base_sum, m) + notes, means


def _header(base: str, m: int) -> list[str]:
    return [f"| variant | layers | params / non-emb | FLOPs/token | tokens | steps | val bpb mean ± sd (n) | "
            f"val loss mean ± sd | Δ bpb vs {base} [95% CI] | d_z | p (t-test) | "
            f"p Holm{f' ({m} comparisons)' if m > 1 else ''} | "
            "p (Wilcoxon) | tokens/s | peak mem | wall / run |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: |"]


def _comparison(cmp: Optional[stats.Comparison], adjusted: Optional[float], n: int, base_n: int) -> tuple:
    """A variant's Δ, d_z, p, p Holm and p Wilcoxon cells (cmp None: the baseline's)."""
    if cmp is None:
        return "baseline", "", "", "", ""
    dz = f"{cmp.d_z:+.2f}" if math.isfinite(cmp.d_z) else "–"
    return (_delta(cmp, cmp.n < max(n, base_n)), dz, _g(cmp.p, cmp.test == "Welch t"), _g(adjusted),
            _g(cmp.p_wilcoxon))


def _row(v: str, c: dict, runs: list[RunResult], b: stats.Summary, comparison: tuple) -> str:
    """One variant's table row; `b` summarizes its finite val bpbs."""
    done = [r for r in runs if r.done]
    by = _by_status(runs)
    why_not = [w for w in (f"seed {_seeds(by[DIVERGED])} diverged" if by[DIVERGED] else "",
                           f"seed {_seeds(by[FAILED])} failed" if by[FAILED] else "",
                           f"missing seed {_seeds(by[MISSING])}" if by[MISSING] else "") if w]
    n = f"{b.n}" + (f"/{len(runs)}, {', '.join(why_not)}" if why_not else "")
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


def _table_notes(base: str, base_sum: stats.Summary, m: int) -> list[str]:
    """The notes above the variants' own: the baseline's noise and what p Holm adjusts for."""
    notes = []
    if base_sum.n > 1:
        notes.append(f"- Run-to-run noise (sd of {base} over {base_sum.n} seeds): {base_sum.sd:.4f} bpb. Pairing by "
                     "seed removes the part of it both runs share, so Δ is judged against the spread of the "
                     "per-seed differences instead: *within noise* marks a Δ whose 95% CI includes 0.")
    if m:
        notes.append(f"- p Holm: the t-test p adjusted (Holm) for the {m} comparison(s) with {base} in this "
                     "table; below 0.05 it keeps the chance of any false positive among them under 5%. d_z: "
                     "mean / sd of the per-seed differences (paired only).")
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
    lines += ["Variants: " + "; ".join(f"**{v['name']}** `--arch {v['arch']}`"
                                       + "".join(f" `{o}`" for o in v["overrides"]) for v in ab["variants"]), ""]
    means = {}
    for corpus in ab["corpora"]:
        lines += [f"## {corpus}", ""]
        table, means[corpus] = corpus_table(man, results, corpus)
        lines += table + [""]
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
        ax.set_ylabel("val bpb")
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
        ax.set_ylabel("val bpb")
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
