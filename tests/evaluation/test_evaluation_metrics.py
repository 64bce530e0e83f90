"""Correlation metrics vs scipy.stats (reference implementation) and the 4-parameter logistic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tatar_jax.evaluation import metrics as M


def _tied(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Two-decimal scores drawn from few values: many ties in both inputs, like real predictions.
    gt = np.round(rng.choice(np.linspace(0, 100, 17), n) + rng.normal(0, 3, n) * (n % 2), 2)
    pred = np.round(0.6 * gt + rng.choice([0.0, 5.0, 10.0, 20.0], n), 2)
    return gt, pred


@pytest.mark.parametrize("seed", range(6))
def test_srcc_plcc_krcc_equal_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    gt, pred = _tied(rng, n)
    assert len(np.unique(pred)) < n  # the case that matters: ties present
    np.testing.assert_allclose(M.average_ranks(pred), stats.rankdata(pred), rtol=0, atol=0)
    m = M.correlation_metrics(gt, pred)
    assert m["n_pairs"] == n and m["reason"] is None
    assert m["srcc"] == pytest.approx(stats.spearmanr(gt, pred).statistic, abs=1e-12)
    assert m["plcc"] == pytest.approx(stats.pearsonr(gt, pred).statistic, abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(gt, pred).statistic, abs=1e-12)


def test_nan_pairs_dropped_and_under_three_pairs_is_nan_with_reason():
    gt = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    pred = np.array([12.0, np.nan, 33.0, np.nan, 41.0])
    m = M.correlation_metrics(gt, pred)
    assert m["n_pairs"] == 3
    keep = ~np.isnan(pred)
    assert m["srcc"] == pytest.approx(stats.spearmanr(gt[keep], pred[keep]).statistic)
    m2 = M.correlation_metrics(gt[:2], pred[:2])
    assert m2["n_pairs"] == 1 and math.isnan(m2["srcc"]) and math.isnan(m2["plcc"])
    assert "valid pairs" in m2["reason"]
    m3 = M.correlation_metrics(gt, np.full(5, 50.0))
    assert math.isnan(m3["srcc"]) and "equal" in m3["reason"]


def test_reference_srcc_is_the_double_argsort_rule_and_differs_under_ties():
    gt = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    pred = np.array([5.0, 5.0, 5.0, 5.0, 6.0, 1.0])
    ranks = np.argsort(np.argsort(pred)).astype(float)
    expected = np.corrcoef(np.argsort(np.argsort(gt)), ranks)[0, 1]
    m = M.correlation_metrics(gt, pred, reference_compat=True)
    assert m["srcc_reference"] == pytest.approx(expected, abs=1e-12)
    assert m["srcc"] == pytest.approx(stats.spearmanr(gt, pred).statistic, abs=1e-12)
    assert abs(m["srcc_reference"] - m["srcc"]) > 0.05


def test_logistic_fit_recovers_known_curve():
    rng = np.random.default_rng(0)
    true = (90.0, 10.0, 50.0, 8.0)
    pred = rng.uniform(0, 100, 500)
    gt = M.logistic4(pred, *true) + rng.normal(0, 0.5, pred.size)
    params, status = M.fit_logistic4(pred, gt)
    assert status == "ok"
    np.testing.assert_allclose(params[:3], true[:3], rtol=0.02, atol=0.5)
    assert abs(params[3]) == pytest.approx(true[3], rel=0.05)
    m = M.correlation_metrics(gt, pred)
    assert m["logistic_fit"] == "ok"
    assert m["plcc_logistic"] > 0.999
    assert m["plcc"] < 0.97  # a sigmoid is far from linear: plain PLCC is clearly lower
    assert m["plcc_logistic"] > m["plcc"]


def test_logistic_fit_decreasing_curve_and_fallback():
    rng = np.random.default_rng(1)
    pred = rng.uniform(0, 100, 300)
    gt = M.logistic4(pred, 5.0, 95.0, 40.0, 10.0) + rng.normal(0, 0.5, pred.size)
    m = M.correlation_metrics(gt, pred)
    assert m["logistic_fit"] == "ok" and m["plcc_logistic"] > 0.999 and m["plcc"] < 0


def test_logistic_fit_failure_falls_back_to_plain_plcc(monkeypatch):
    from scipy import optimize

    rng = np.random.default_rng(2)
    gt, pred = _tied(rng, 50)
    params, status = M.fit_logistic4(pred, gt, maxfev=1)  # cannot converge in one evaluation
    assert params is None and status.startswith("curve_fit failed (RuntimeError")

    def fail(*a, **k):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(optimize, "curve_fit", fail)
    m = M.correlation_metrics(gt, pred)
    assert m["logistic_fit"].startswith("curve_fit failed")
    assert m["logistic_params"] is None
    assert m["plcc_logistic"] == m["plcc"]
    m4 = M.correlation_metrics(gt[:4], pred[:4] + np.arange(4))
    assert "cannot determine" in m4["logistic_fit"] and m4["plcc_logistic"] == m4["plcc"]


def test_json_ready_turns_nan_into_null():
    out = M.json_ready({"a": math.nan, "b": [1.0, math.inf], "c": {"d": np.float64(2.0)}})
    assert out == {"a": None, "b": [1.0, None], "c": {"d": 2.0}}
