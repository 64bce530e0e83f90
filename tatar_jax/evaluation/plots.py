"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

Input rows are ``predictions.jsonl`` rows (``gt_100``, ``prediction`` or None, ``think_tokens``
or None, ``think_words``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; never opens a window
    import matplotlib.pyplot as plt

    return plt


def scatter(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """Predicted vs ground-truth (0-100) of the parsed rows, with the y = x line; SRCC / PLCC
    from ``metrics`` (a metrics.json dict) in the title when given."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("prediction") is not None]
    gt = np.array([r["gt_100"] for r in ok], np.float64)
    pred = np.array([r["prediction"] for r in ok], np.float64)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(gt, pred, s=6, alpha=0.5, linewidths=0)
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("ground truth (0-100)")
    ax.set_ylabel("prediction (0-100)")
    n_un = len(rows) - len(ok)
    head = f"{title}  (n = {len(ok)}, unparsed = {n_un})"
    if metrics is not None:
        s, p = metrics.get("srcc"), metrics.get("plcc")
        fmt = lambda v: "—" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        head += f"\nSRCC {fmt(s)}   PLCC {fmt(p)}"
    ax.set_title(head)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return os.fspath(path)


def think_histogram(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> str:
    """Histogram of think lengths: tokens when every row has them, otherwise words."""
    plt = _pyplot()
    use_tokens = bool(rows) and all(r.get("think_tokens") is not None for r in rows)
    key, unit = ("think_tokens", "tokens") if use_tokens else ("think_words", "words")
    vals = np.array([r.get(key) or 0 for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(vals, bins=min(50, max(1, len(np.unique(vals)))))
    ax.set_xlabel(f"think length ({unit})")
    ax.set_ylabel("completions")
    mean = float(vals.mean()) if vals.size else float("nan")
    ax.set_title(f"{title}  (n = {vals.size}, mean = {mean:.1f} {unit})")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return os.fspath(path)
