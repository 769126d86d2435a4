"""Figures, drawn one way everywhere (the ablation report, compare.py): matplotlib's Agg backend
and every file written through checkpoint.publish, so a kill leaves the old picture or the new one."""
from __future__ import annotations

import textwrap

from .checkpoint import publish


def figure(n: int, title: str):
    """(pyplot, figure, axes) of n panels side by side under a wrapped title."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    # Wrapped to the figure's width (~14 characters per inch at this size): one panel is too narrow
    # for the title on one line, and matplotlib cuts a suptitle off instead of wrapping it.
    fig.suptitle(textwrap.fill(title, width=int(14 * 6.5 * n)), fontsize=10)
    return plt, fig, axes[0]


def save(plt, fig, path):
    fig.tight_layout()
    with publish(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
