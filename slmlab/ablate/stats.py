"""The statistics of a comparison over seeds, all through scipy.stats.

A variant and the baseline trained with the same seed saw the same initialisation RNG stream and
the same data order, so their difference is paired: the test is a paired t-test on the per-seed
differences, which removes the seed-to-seed variation both share. When fewer than two seeds are
shared (crashed runs), it falls back to Welch's unequal-variance t-test on the two samples.
Non-finite values (diverged runs) are dropped first, pair by pair: a NaN would otherwise turn the
standard error into NaN and the p-value into nonsense. `holm` adjusts a table's p-values for
testing several variants against one baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
    lo: float  # the 95% confidence interval of diff; nan when there is no spread to put one on
    hi: float
    p: float  # two-sided; nan when there is too little data or no spread
    test: str  # "paired t" | "Welch t" | "" (too few runs)
    n: int  # finite pairs (paired) or the smaller finite sample (Welch)
    p_wilcoxon: float = math.nan  # paired only: the signed-rank test, which does not assume normal diffs
    within_noise: bool = False  # the 95% CI of diff includes 0: not resolved from the seed-to-seed noise
    d_z: float = math.nan  # paired only: the standardized effect mean(d) / sd(d) over the pairs
    note: str = ""  # why p and the CI are missing although there are values
    paired: bool = True  # diff is the mean of per-seed differences; else the difference of the two means


IDENTICAL = "differences identical across seeds"


def summarize(values) -> Summary:
    """Mean and sd of the finite values (a diverged run's NaN or inf is no sample of the noise)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size))


def _t_interval(mean: float, se: float, df: float) -> tuple[float, float]:
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
    return mean - half, mean + half


def _no_spread(x: np.ndarray) -> bool:
    """Every value equal, up to float rounding: 3.1 - 3.0 and 3.2 - 3.1 differ in the last bit, which
    would give a standard error of ~1e-16 and a p of ~1e-30 (scipy warns "catastrophic
    cancellation") for what is a constant shift with no spread to test against."""
    return float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))


def compare(baseline: dict[int, float], variant: dict[int, float]) -> Comparison:
    """`baseline` and `variant` map seed -> final metric. Paired over the seeds where both are
    finite when there are at least two such pairs, else Welch over each side's finite values (diff:
    the difference of the means, `paired` False), or with one pair and a side of one value, that pair.
    With fewer than two values on a side, or no spread at all, p and the CI are nan: a t-test
    cannot put a probability on a difference it has no variance for (a constant difference over
    seeds is said in `note`)."""
    baseline = {k: v for k, v in baseline.items() if math.isfinite(v)}
    variant = {k: v for k, v in variant.items() if math.isfinite(v)}
    shared = sorted(set(baseline) & set(variant))
    if len(shared) >= 2:
        d = np.array([variant[s] - baseline[s] for s in shared])
        out = Comparison(float(d.mean()), math.nan, math.nan, math.nan, "paired t", int(d.size))
        # all zero: scipy's exact signed-rank p is 1, with a warning; keep it quiet
        out.p_wilcoxon = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
        if _no_spread(d):
            out.note = IDENTICAL
            return out
        sd = float(d.std(ddof=1))
        out.lo, out.hi = _t_interval(out.diff, sd / math.sqrt(d.size), d.size - 1)
        out.p = float(stats.ttest_rel([variant[s] for s in shared], [baseline[s] for s in shared]).pvalue)
        out.d_z = out.diff / sd
    elif len(shared) == 1 and min(len(baseline), len(variant)) < 2:
        # no test either way: the one pair's difference, not the means' (a side's other seed has no partner)
        s = shared[0]
        return Comparison(variant[s] - baseline[s], math.nan, math.nan, math.nan, "", 1)
    else:
        a, b = np.array(list(variant.values())), np.array(list(baseline.values()))
        diff = float(a.mean() - b.mean()) if a.size and b.size else math.nan
        out = Comparison(diff, math.nan, math.nan, math.nan, "Welch t", int(min(a.size, b.size)), paired=False)
        if a.size < 2 or b.size < 2:
            out.test = ""
            return out
        if _no_spread(a) and _no_spread(b):
            out.note = "values identical across seeds on both sides"
            return out
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        # Welch-Satterthwaite degrees of freedom, the ones scipy's ttest_ind(equal_var=False) uses
        df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
        out.lo, out.hi = _t_interval(diff, math.sqrt(va + vb), df)
        out.p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    out.lo, out.hi = float(out.lo), float(out.hi)
    out.within_noise = bool(out.lo <= 0 <= out.hi)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment over the finite p-values (nan stays nan, and does not count):
    the i-th smallest of m is multiplied by m - i + 1, then made monotone and capped at 1. Like
    Bonferroni it bounds the chance of any false positive among the m comparisons, and it is never
    less powerful. (scipy has only false-discovery-rate adjustments; this is statsmodels'
    multipletests(method="holm").)"""
    idx = sorted((i for i, p in enumerate(pvalues) if math.isfinite(p)), key=lambda i: pvalues[i])
    m, out, running = len(idx), [math.nan] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
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
