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

from . import stats
from .plan import read_manifest
from .worker import RESOURCES

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
    summary: Optional[dict]  # None: the run has not finished (crashed, interrupted or not started)
    resources: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # (tokens, val bpb) at every eval, the final one last

    @property
    def done(self) -> bool:
        return self.summary is not None


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _curve(path: Path) -> list:
    pts = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return pts
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill; the resume truncates it anyway
        if "val_bpb" in rec and "tokens" in rec:
            pts.append((rec["tokens"], rec["val_bpb"]))
    return pts


def collect(out: Path) -> tuple[dict, list[RunResult]]:
    man = read_manifest(out)
    results = []
    for r in man["runs"]:
        d = out / r["dir"]
        s = _read_json(d / "summary.json")
        results.append(RunResult(r["corpus"], r["variant"], r["seed"], r["dir"], s,
                                 _read_json(d / RESOURCES) or {}, _curve(d / "metrics.jsonl") if s else []))
    return man, results


def _fmt_num(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _pm(s: stats.Summary) -> str:
    return f"{s.mean:.4f} ± {s.sd:.4f}" if s.n > 1 else f"{s.mean:.4f}"


def write_csvs(out: Path, man: dict, results: list[RunResult]):
    cells = {(c["variant"], c["corpus"]): c for c in man["cells"]}
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RESULT_COLS)
        for r in results:
            c, s = cells[r.variant, r.corpus], r.summary or {}
            w.writerow([r.corpus, r.variant, r.seed, r.dir, "done" if r.done else "missing", c["layers"], c["params"],
                        c["nonembed_params"], repr(c["flops_per_token"]), c["steps"], s.get("tokens", ""),
                        repr(s["val_loss"]) if r.done else "", repr(s["val_bpb"]) if r.done else "",
                        bool(s.get("val_bpb_is_bound", False)) if r.done else ""])
    with open(out / "timings.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TIMING_COLS)
        for r in results:
            if r.done:
                s, m = r.summary, r.resources
                w.writerow([r.corpus, r.variant, r.seed, r.dir, f"{s['train_time_s']:.1f}", f"{s['wall_time_s']:.1f}",
                            f"{s['tokens_per_s']:.1f}", f"{m['peak_rss_mb']:.0f}" if "peak_rss_mb" in m else "",
                            f"{m['peak_cuda_mb']:.0f}" if "peak_cuda_mb" in m else "", s.get("device", "")])


def corpus_table(man: dict, results: list[RunResult], corpus: str) -> tuple[list[str], dict[str, float]]:
    """Markdown lines of one corpus's table and notes, and the variants' mean val bpb."""
    ab = man["ablation"]
    variants = [v["name"] for v in ab["variants"]]
    cells = {c["variant"]: c for c in man["cells"] if c["corpus"] == corpus}
    by_var = defaultdict(dict)
    runs = defaultdict(list)
    for r in results:
        if r.corpus == corpus:
            runs[r.variant].append(r)
            if r.done:
                by_var[r.variant][r.seed] = r.summary["val_bpb"]
    base = variants[0]
    base_sum = stats.summarize(by_var[base].values())
    bound = any(r.done and r.summary.get("val_bpb_is_bound") for r in results if r.corpus == corpus)
    lines = [f"| variant | layers | params / non-emb | FLOPs/token | tokens | steps | val bpb mean ± sd (n) | "
             f"val loss mean ± sd | Δ bpb vs {base} [95% CI] | p (t-test) | p (Wilcoxon) | tokens/s | peak mem | "
             "wall / run |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    means, notes = {}, []
    for v in variants:
        c, done = cells[v], [r for r in runs[v] if r.done]
        b = stats.summarize(by_var[v].values())
        loss = stats.summarize(r.summary["val_loss"] for r in done)
        means[v] = b.mean
        le = "≤ " if any(r.summary.get("val_bpb_is_bound") for r in done) else ""
        missing = sorted(r.seed for r in runs[v] if not r.done)
        n = f"{b.n}" + (f"/{len(runs[v])}, missing seed {', '.join(map(str, missing))}" if missing else "")
        bpb = f"{le}{_pm(b)} ({n})" if b.n else f"– ({n})"
        lss = _pm(loss) if loss.n else "–"
        if v == base:
            delta, p, pw = "baseline", "", ""
        else:
            cmp = stats.compare(by_var[base], by_var[v], base_sum.sd)
            if math.isfinite(cmp.lo):
                delta = f"{cmp.diff:+.4f} [{cmp.lo:+.4f}, {cmp.hi:+.4f}]" + (" *within noise*" if cmp.within_noise else "")
            else:
                delta = f"{cmp.diff:+.4f}" if math.isfinite(cmp.diff) else "–"
            p = f"{cmp.p:.3g}" + (" (Welch)" if cmp.test == "Welch t" else "") if math.isfinite(cmp.p) else "–"
            pw = f"{cmp.p_wilcoxon:.3g}" if math.isfinite(cmp.p_wilcoxon) else "–"
        tokens = stats.summarize(r.summary["tokens"] for r in done).mean
        tps = stats.summarize(r.summary["tokens_per_s"] for r in done).mean
        wall = stats.summarize(r.summary["wall_time_s"] for r in done).mean
        mem = [r.resources.get("peak_cuda_mb", r.resources.get("peak_rss_mb")) for r in done]
        mem = [m for m in mem if m is not None]
        lines.append(f"| {v} | `{c['layers']}` | {_fmt_num(c['params'])} / {_fmt_num(c['nonembed_params'])} | "
                     f"{_fmt_num(c['flops_per_token'])} | {_fmt_num(tokens) if done else '–'} | {c['steps']} | {bpb} | "
                     f"{lss} | {delta} | {p} | {pw} | {f'{tps:,.0f}' if done else '–'} | "
                     f"{f'{max(mem):,.0f} MB' if mem else '–'} | {_fmt_time(wall) if done else '–'} |")
        if missing:
            notes.append(f"- {v}: no result for seed {', '.join(map(str, missing))} (not run yet, crashed or "
                         "interrupted: re-running the same command resumes it; its train.log says why)")
    if base_sum.n > 1:
        notes.insert(0, f"- Run-to-run noise (sd of {base} over {base_sum.n} seeds): {base_sum.sd:.4f} bpb; a "
                        "difference smaller than that is marked *within noise*.")
    if bound:
        notes.append("- ≤: masked-diffusion runs report the ELBO, an upper bound on bpb, not an exact bpb.")
    return lines + [""] + notes, means


def write_markdown(out: Path, man: dict, results: list[RunResult]):
    ab = man["ablation"]
    done = [r for r in results if r.done]
    lines = [f"# Ablation `{out.name}`", "",
             f"Budget: equal **{ab['budget']}** ({ab['steps']} steps for the baseline `{ab['variants'][0]['name']}`); "
             f"seeds {', '.join(map(str, ab['seeds']))}; {len(done)} of {len(results)} runs finished. "
             "Δ is variant − baseline in val bpb (negative = better), paired by seed (same init seed and data "
             "order), 95% t confidence interval, two-sided p. Final val bpb over the whole validation split.", ""]
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
    run_wall = sum(r.summary["wall_time_s"] for r in done)
    lines += ["## Time", "",
              f"Sum of the runs' wall times: {_fmt_time(run_wall)}"
              + (f"; the coordinator ran {_fmt_time(sum(i['elapsed_s'] for i in inv))} over {len(inv)} "
                 f"invocation(s)" if inv else "") + ". Per-run timings: `timings.csv`.", ""]
    (out / "results.md").write_text("\n".join(lines))


def _plot_setup(n: int, title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    fig.suptitle(title)
    return plt, fig, axes[0]


def plot_curves(out: Path, man: dict, results: list[RunResult]):
    import numpy as np

    ab = man["ablation"]
    plt, fig, axes = _plot_setup(len(ab["corpora"]), "val bpb against training tokens, mean ± sd over seeds "
                                 "(last point: the whole validation split; earlier: its first train.eval_tokens)")
    for ax, corpus in zip(axes, ab["corpora"]):
        for i, v in enumerate(v["name"] for v in ab["variants"]):
            curves = [dict(r.curve) for r in results if r.corpus == corpus and r.variant == v and r.curve]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))  # tokens every seed evaluated at
            ys = np.array([[c[x] for x in xs] for c in curves])
            mean, sd = ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(xs))
            color = f"C{i % 10}"  # one colour per variant on every corpus
            ax.plot(xs, mean, marker="o", ms=3, color=color, label=f"{v} (n={len(curves)})")
            ax.fill_between(xs, mean - sd, mean + sd, color=color, alpha=0.2)
        ax.set_title(corpus)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("val bpb")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def plot_final(out: Path, man: dict, results: list[RunResult]):
    ab = man["ablation"]
    plt, fig, axes = _plot_setup(len(ab["corpora"]), "final val bpb per variant (mean ± sd; dots: seeds)")
    names = [v["name"] for v in ab["variants"]]
    for ax, corpus in zip(axes, ab["corpora"]):
        vals = [[r.summary["val_bpb"] for r in results if r.corpus == corpus and r.variant == v and r.done]
                for v in names]
        s = [stats.summarize(x) for x in vals]
        ax.bar(range(len(names)), [x.mean if x.n else 0 for x in s],
               yerr=[x.sd if x.n > 1 else 0 for x in s], capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, x in enumerate(vals):
            ax.scatter([i] * len(x), x, color="k", s=10, zorder=3)
        finite = [y for x in vals for y in x]
        if finite:  # zoom on the differences: bars from zero would hide them
            lo, hi = min(finite), max(finite)
            pad = max(hi - lo, 1e-3) * 0.6
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(corpus)
        ax.set_ylabel("val bpb")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "final.png", dpi=110)
    plt.close(fig)


def write_report(out) -> list[RunResult]:
    """(Re)build results.md, results.csv, timings.csv, curves.png and final.png in `out`."""
    out = Path(out)
    man, results = collect(out)
    write_csvs(out, man, results)
    write_markdown(out, man, results)
    plot_curves(out, man, results)
    plot_final(out, man, results)
    return results
