"""How durations and counts read in everything slmlab prints: one style each, so a time or a
size reads the same in the progress bar, the dry run, the data summary and the ablation report."""
from __future__ import annotations


def duration(s: float, sub_second: bool = False) -> str:
    """Wall-clock style: 0m09s, 4m05s, 2h07m, 3d04h. sub_second shows times under a minute to
    the hundredth (0.35s) and under a tenth of a second in ms (4.2ms), for estimated step times
    that round to 0m00s (or 0.00s, a small model's on a GPU) otherwise."""
    if sub_second and s < 0.1:
        return f"{s * 1e3:.1f}ms"
    if sub_second and s < 60:
        return f"{s:.2f}s"
    s = int(round(s))
    if s >= 86400:  # estimates of long runs: hours alone would run to four digits
        return f"{s // 86400}d{s // 3600 % 24:02d}h"
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def count(n: float) -> str:
    """Parameters, tokens, FLOPs with a k/M/B suffix: two decimals below 10, one above (5.74M, 123.6M)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{2 if abs(n) < 10 * div else 1}f}{unit}"
    return f"{n:.0f}"
