"""Correlation metrics of predicted vs ground-truth scores (spec §9; fixes B12).

One implementation for ``scripts/eval.py`` and the trainer's periodic evaluation. Inputs are 1-D
arrays of equal length ``N`` on the 0-100 scale; pairs where either value is NaN (an unparsed
answer) are dropped before any statistic, and the drop is counted by the caller.

* ``srcc``: Spearman's rho with **average ranks for ties** (equal to ``scipy.stats.spearmanr``).
* ``plcc``: plain Pearson correlation (the reference's PLCC).
* ``plcc_logistic``: Pearson after the standard 4-parameter logistic mapping of predictions to
  ground truth (VQEG / IQA convention), see :func:`fit_logistic4`.
* ``krcc``: Kendall's tau-b (``scipy.stats.kendalltau``).
* ``srcc_reference``: the reference's SRCC (Pearson of 0-based ordinal ranks from a double
  ``argsort``, ties broken by the sort: bug B12); only for comparisons.

Every statistic is NaN with a ``reason`` when it is undefined (fewer than 3 valid pairs, or a
constant input), never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MIN_PAIRS = 3  # the reference reports NaN below 3 valid pairs (spec §9)


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def average_ranks(x: Any) -> np.ndarray:
    """1-based ranks of ``x`` (N,), tied values get the mean of their ranks (scipy ``rankdata``)."""
    a = _as_1d(x, "x")
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # Start of each run of equal values in sorted order.
    new_run = np.empty(a.size, bool)
    new_run[:1] = True
    new_run[1:] = sorted_a[1:] != sorted_a[:-1]
    starts = np.flatnonzero(new_run)
    ends = np.append(starts[1:], a.size)  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(a.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def ordinal_ranks_reference(x: Any) -> np.ndarray:
    """The reference's ranks: ``argsort(argsort(x))`` (0-based; ties broken arbitrarily, B12)."""
    a = _as_1d(x, "x")
    return np.argsort(np.argsort(a)).astype(np.float64)


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation in float64; NaN if either input is constant or has < 2 values."""
    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in shape: {a.shape} vs {b.shape}")
    if a.size < 2:
        return math.nan
    da, db = a - a.mean(), b - b.mean()
    den = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    if den == 0.0:
        return math.nan
    return float(np.clip(np.dot(da, db) / den, -1.0, 1.0))


def spearman(x: Any, y: Any) -> float:
    """Spearman's rho with average ranks (equal to ``scipy.stats.spearmanr(x, y).statistic``)."""
    return pearson(average_ranks(x), average_ranks(y))


def spearman_reference(x: Any, y: Any) -> float:
    """The reference's SRCC: Pearson of double-argsort ordinal ranks (B12; comparison only)."""
    return pearson(ordinal_ranks_reference(x), ordinal_ranks_reference(y))


def kendall(x: Any, y: Any) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``); NaN when undefined."""
    from scipy import stats

    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(stats.kendalltau(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# 4-parameter logistic


def logistic4(x: Any, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2`` (VQEG 4-parameter logistic).

    ``b1`` / ``b2`` are the upper / lower asymptotes, ``b3`` the midpoint, ``|b4|`` the scale.
    """
    x = np.asarray(x, dtype=np.float64)
    z = np.clip(-(x - b3) / max(abs(b4), 1e-12), -500.0, 500.0)  # exp overflow guard
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic4(pred: Any, gt: Any, maxfev: int = 20000) -> tuple[np.ndarray | None, str]:
    """Least-squares fit of :func:`logistic4` mapping ``pred`` (N,) onto ``gt`` (N,).

    Initialisation (the usual IQA choice): ``b1 = max(gt)``, ``b2 = min(gt)``,
    ``b3 = mean(pred)``, ``b4 = std(pred)`` (1 if the predictions are constant). For negatively
    correlated data the asymptotes start swapped so the fit starts on the right branch.

    Returns ``(params (4,), "ok")`` or ``(None, reason)`` when scipy does not converge, the fit is
    non-finite, or the fitted curve is constant on the data. Callers then fall back to the plain
    PLCC and report the reason (``metrics["logistic_fit"]``).
    """
    from scipy import optimize

    x, y = _as_1d(pred, "pred"), _as_1d(gt, "gt")
    if x.size <= 4:
        return None, f"{x.size} pairs cannot determine 4 parameters"
    sx = float(np.std(x))
    if sx == 0.0:
        return None, "constant predictions"
    hi, lo = float(np.max(y)), float(np.min(y))
    if pearson(x, y) < 0:
        hi, lo = lo, hi
    p0 = [hi, lo, float(np.mean(x)), sx]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic4, x, y, p0=p0, maxfev=maxfev)
    except (RuntimeError, optimize.OptimizeWarning, ValueError, TypeError) as err:
        return None, f"curve_fit failed ({type(err).__name__}: {err})"
    params = np.asarray(params, np.float64)
    if not np.all(np.isfinite(params)):
        return None, "curve_fit returned non-finite parameters"
    fitted = logistic4(x, *params)
    if not np.all(np.isfinite(fitted)) or float(np.std(fitted)) == 0.0:
        return None, "fitted curve is constant on the data"
    return params, "ok"


# ---------------------------------------------------------------------------------------------
# All metrics of one dataset


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def correlation_metrics(
    gt: Sequence[float] | np.ndarray,
    pred: Sequence[float] | np.ndarray,
    *,
    reference_compat: bool = False,
    logistic: bool = True,
) -> dict[str, Any]:
    """SRCC / PLCC / logistic PLCC / KRCC of the valid pairs of ``gt`` (N,) and ``pred`` (N,).

    NaN in ``pred`` (unparsed) or ``gt`` drops that pair. Returns a dict with ``n_pairs``,
    ``srcc``, ``plcc``, ``plcc_logistic``, ``krcc`` (floats, NaN when undefined), ``logistic_fit``
    (``"ok"`` or why the plain PLCC was used instead), ``logistic_params`` ([b1..b4] or None),
    ``reason`` (why the statistics are NaN, else None) and, with ``reference_compat``,
    ``srcc_reference`` (B12).
    """
    g, p = _as_1d(gt, "gt"), _as_1d(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt and pred differ in length: {g.size} vs {p.size}")
    ok = np.isfinite(g) & np.isfinite(p)
    g, p = g[ok], p[ok]
    out: dict[str, Any] = {
        "n_pairs": int(g.size),
        "srcc": math.nan,
        "plcc": math.nan,
        "plcc_logistic": math.nan,
        "krcc": math.nan,
        "logistic_fit": "not run",
        "logistic_params": None,
        "reason": None,
    }
    if reference_compat:
        out["srcc_reference"] = math.nan
    if g.size < MIN_PAIRS:
        out["reason"] = f"only {g.size} valid pairs (< {MIN_PAIRS})"
        return out
    if np.all(p == p[0]):
        out["reason"] = "all predictions are equal"
        return out
    if np.all(g == g[0]):
        out["reason"] = "all ground-truth scores are equal"
        return out
    out["srcc"] = spearman(g, p)
    out["plcc"] = pearson(g, p)
    out["krcc"] = kendall(g, p)
    if reference_compat:
        out["srcc_reference"] = spearman_reference(g, p)
    if logistic:
        params, status = fit_logistic4(p, g)
        out["logistic_fit"] = status
        if params is None:
            out["plcc_logistic"] = out["plcc"]  # documented fallback: plain PLCC
        else:
            out["logistic_params"] = [float(v) for v in params]
            out["plcc_logistic"] = pearson(logistic4(p, *params), g)
    return out


def json_ready(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf floats -> None (strict JSON); nested dicts and lists handled."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.generic):
            v = v.item()
        return _nan_to_none(v)

    return conv(metrics)
