"""The statistics of a comparison over seeds, all through scipy.stats.

A variant and the baseline trained with the same seed saw the same initialisation RNG stream and
the same data order, so their difference is paired: the test is a paired t-test on the per-seed
differences, which removes the seed-to-seed variation both share. When fewer than two seeds are
shared (crashed runs), it falls back to Welch's unequal-variance t-test on the two samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass
class Summary:
    mean: float
    sd: float  # sample sd (ddof 1); nan with one value
    n: int


@dataclass
class Comparison:
    """variant - baseline (negative: the variant has lower bpb)."""

    diff: float
    lo: float  # the 95% confidence interval of diff
    hi: float
    p: float  # two-sided; nan when there is too little data
    test: str  # "paired t" | "Welch t" | "" (too few runs)
    n: int  # pairs (paired) or the smaller sample (Welch)
    p_wilcoxon: float = math.nan  # paired only: the signed-rank test, which does not assume normal diffs
    within_noise: bool = False  # |diff| below the baseline's run-to-run sd


def summarize(values) -> Summary:
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


def _t_interval(mean: float, se: float, df: float) -> tuple[float, float]:
    if not (se > 0 and df > 0):
        return mean, mean  # every difference equal: no spread to put an interval on
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
    return mean - half, mean + half


def compare(baseline: dict[int, float], variant: dict[int, float], noise_sd: Optional[float] = None) -> Comparison:
    """`baseline` and `variant` map seed -> final metric. Paired over the shared seeds when there
    are at least two, else Welch over everything; `noise_sd` (the baseline's run-to-run sd) marks
    a difference smaller than the noise."""
    shared = sorted(set(baseline) & set(variant))
    if len(shared) >= 2:
        d = np.array([variant[s] - baseline[s] for s in shared])
        se = d.std(ddof=1) / math.sqrt(d.size)
        lo, hi = _t_interval(float(d.mean()), se, d.size - 1)
        p = float(stats.ttest_rel([variant[s] for s in shared], [baseline[s] for s in shared]).pvalue) if se > 0 \
            else (1.0 if d.mean() == 0 else 0.0)
        pw = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
        out = Comparison(float(d.mean()), lo, hi, p, "paired t", int(d.size), pw)
    else:
        a, b = np.array(list(variant.values())), np.array(list(baseline.values()))
        if a.size < 2 or b.size < 2:
            diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
            return Comparison(diff, math.nan, math.nan, math.nan, "", min(a.size, b.size))
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        se = math.sqrt(va + vb)
        # Welch-Satterthwaite degrees of freedom, the ones scipy's ttest_ind(equal_var=False) uses
        df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)) if se > 0 else 0
        lo, hi = _t_interval(float(a.mean() - b.mean()), se, df)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        out = Comparison(float(a.mean() - b.mean()), lo, hi, p, "Welch t", int(min(a.size, b.size)))
    if noise_sd is not None and math.isfinite(noise_sd):
        out.within_noise = abs(out.diff) < noise_sd
    return out


def ranking_agreement(means_by_corpus: dict[str, dict[str, float]]) -> tuple[bool, float]:
    """(same order on every corpus, the smallest pairwise Kendall tau between corpora) over the
    variants measured on all of them."""
    corpora = list(means_by_corpus)
    common = [v for v in means_by_corpus[corpora[0]] if all(
        v in means_by_corpus[c] and math.isfinite(means_by_corpus[c][v]) for c in corpora)]
    orders = [tuple(sorted(common, key=means_by_corpus[c].get)) for c in corpora]
    taus = [stats.kendalltau([means_by_corpus[a][v] for v in common], [means_by_corpus[b][v] for v in common]).statistic
            for i, a in enumerate(corpora) for b in corpora[i + 1:]] if len(common) > 1 else [1.0]
    return len(set(orders)) == 1, float(min(taus))
