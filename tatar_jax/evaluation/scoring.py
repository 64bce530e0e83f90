"""Scores of completions: the parsed prediction and think length of one completion, and the
metrics of a dataset from its scored rows (spec §9, with B1/B2/B12 fixed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tatar_jax import answer_format, rewards
from tatar_jax.data import manifest as manifest_mod
from tatar_jax.evaluation import metrics as metrics_mod

CountTokens = Callable[[str], int]
AGGREGATES = ("mean", "median")


class Samples(NamedTuple):
    """A predict function's K completions of one record (``num_samples`` > 1, or a constrained
    decoder): ``texts`` (K,) and ``forced`` (K,) bools, True where the answer constraint had to
    override the model's own token (the unconstrained decode would have left the answer format:
    ``n_would_be_unparsed``); ``forced`` None without a constraint."""

    texts: tuple[str, ...]
    forced: tuple[bool, ...] | None = None


def score_completion(
    completion: str,
    task: str,
    *,
    reference_compat: bool = False,
    count_tokens: CountTokens | None = None,
) -> dict[str, Any]:
    """Parsed prediction and think length of one completion.

    Strict parser (spec §4, :func:`tatar_jax.rewards.parse_answer`). ``reference_compat``: the
    reference's lenient parser and value-based rescaling (B2). Returns ``parsed`` (bool),
    ``answer`` (the parsed value as written, or None), ``out_of_range`` (a parsed answer outside
    0-100, :func:`tatar_jax.answer_format.out_of_scale`), ``prediction`` (the answer clipped to
    [0, 100] for the correlations, as the rewards clip it; None when unparsed), ``think_tokens``
    (int, or None without ``count_tokens``), ``think_words`` and ``num_words`` (whitespace words).
    """
    if reference_compat:
        value = rewards.reference_rescale_prediction(rewards.parse_answer_lenient(completion), task)
    else:
        value = rewards.parse_answer(completion)
    parsed = value is not None and not math.isnan(value)
    feats = rewards.completion_features([completion], parser=lambda _: None)
    think_words = int(feats.think_len[0])
    think_tokens = None
    if count_tokens is not None:
        think_tokens = int(
            rewards.completion_features([completion], count_tokens=count_tokens).think_len[0]
        )
    return {
        "parsed": bool(parsed),
        "answer": float(value) if parsed else None,
        "out_of_range": bool(parsed and answer_format.out_of_scale(value)),
        "prediction": float(min(max(value, 0.0), 100.0)) if parsed else None,
        "think_tokens": think_tokens,
        "think_words": think_words,
        "num_words": int(feats.num_words[0]),
    }


def aggregate_answers(values: Sequence[float], how: str = "mean") -> float:
    """The prediction of K parsed answers (already clipped to [0, 100]): their mean or median;
    NaN when none parsed."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if not len(values):
        return math.nan
    v = np.asarray(values, np.float64)
    return float(np.mean(v) if how == "mean" else np.median(v))


def score_samples(
    samples: Samples,
    task: str,
    *,
    aggregate: str = "mean",
    reference_compat: bool = False,
    count_tokens: CountTokens | None = None,
) -> dict[str, Any]:
    """The scored row of K completions of one record: each scored by :func:`score_completion`.

    ``prediction`` is the ``aggregate`` (mean | median) of the parsed samples' clipped predictions
    (None when no sample parsed), ``pred_std`` their population standard deviation (0 for one),
    ``n_parsed`` / ``n_samples`` the counts, ``answers`` each sample's prediction (None:
    unparsed), ``samples`` every completion and ``completion`` the first; ``parsed`` is
    ``n_parsed > 0``; ``out_of_range`` counts samples answering outside 0-100; think lengths are
    means over the samples; ``n_forced`` (constrained decoding) the samples whose answer the
    constraint had to force.
    """
    scored = [
        score_completion(t, task, reference_compat=reference_compat, count_tokens=count_tokens)
        for t in samples.texts
    ]
    preds = [s["prediction"] for s in scored]
    good = [p for p in preds if p is not None]
    agg = aggregate_answers(good, aggregate)
    think = [s["think_tokens"] for s in scored if s["think_tokens"] is not None]
    row = {
        "parsed": bool(good),
        "answer": agg if good else None,
        "out_of_range": sum(bool(s["out_of_range"]) for s in scored),
        "prediction": agg if good else None,
        "pred_std": float(np.std(good)) if good else None,
        "n_parsed": len(good),
        "n_samples": len(scored),
        "answers": preds,
        "raw_answers": [s["answer"] for s in scored],
        "think_tokens": float(np.mean(think)) if think else None,
        "think_words": float(np.mean([s["think_words"] for s in scored])),
        "num_words": float(np.mean([s["num_words"] for s in scored])),
        "samples": list(samples.texts),
    }
    if samples.forced is not None:
        row["n_forced"] = int(sum(bool(f) for f in samples.forced))
    return row


def sample_metrics(rows: Sequence[Mapping[str, Any]], gt: np.ndarray) -> dict[str, Any]:
    """The K-sample statistics of scored rows (``n_samples`` in them): ``num_samples``,
    ``mean_pred_std`` (mean per-image std over images with a parsed sample),
    ``n_samples_unparsed`` / ``frac_samples_unparsed`` and ``srcc_single`` / ``plcc_single``:
    the SRCC / PLCC of sample j's answers alone, averaged over j (what one sampled decode
    gives, against the aggregate's ``srcc`` / ``plcc``); ``n_would_be_unparsed``: samples the
    answer constraint had to force (constrained decoding only)."""
    k = max(int(r.get("n_samples", 1)) for r in rows) if rows else 0
    stds = [r["pred_std"] for r in rows if r.get("pred_std") is not None]
    n_total = sum(int(r.get("n_samples", 1)) for r in rows)
    n_bad = sum(int(r.get("n_samples", 1)) - int(r.get("n_parsed", 0)) for r in rows)
    single_s, single_p = [], []
    answers = [list(r.get("answers") or ()) for r in rows]
    for j in range(k):
        pj = np.array([_nan_if_none(a[j]) if j < len(a) else math.nan for a in answers])
        m = metrics_mod.correlation_metrics(gt, pj, logistic=False)
        single_s.append(m["srcc"])
        single_p.append(m["plcc"])
    out = {
        "num_samples": k,
        "mean_pred_std": float(np.mean(stds)) if stds else math.nan,
        "n_samples_unparsed": n_bad,
        "frac_samples_unparsed": n_bad / n_total if n_total else math.nan,
        "srcc_single": float(np.mean(single_s)) if single_s else math.nan,
        "plcc_single": float(np.mean(single_p)) if single_p else math.nan,
    }
    if any("n_forced" in r for r in rows):
        out["n_would_be_unparsed"] = sum(int(r.get("n_forced", 0)) for r in rows)
    return out


def _nan_if_none(x: Any) -> float:
    return math.nan if x is None else float(x)


def dataset_metrics(
    spec: manifest_mod.DatasetSpec,
    rows: Sequence[Mapping[str, Any]],
    *,
    num_records: int,
    errors: Sequence[Mapping[str, Any]] = (),
    reference_compat: bool = False,
) -> dict[str, Any]:
    """metrics.json of one dataset from its prediction rows (any order) and error rows.

    Denominators: ``n_records`` = selected manifest rows; ``n_scored`` = rows with a completion;
    ``n_image_errors`` / ``n_bad_rows`` / ``n_predict_errors`` = listed in errors.jsonl;
    ``n_missing`` = the rest (0 after a complete run); ``frac_unparsed`` = unparsed / scored;
    ``n_out_of_range`` = parsed answers outside 0-100 (clipped for the correlations, counted
    here). Correlations use the ``n_pairs`` parsed rows. Rows of K samples
    (:func:`score_samples`) add :func:`sample_metrics`; ``n_unparsed`` then counts images without
    a parsed sample and ``n_out_of_range`` samples.
    """
    rows = sorted(rows, key=lambda r: r["row_id"])
    gt = np.array([r["gt_100"] for r in rows], np.float64)
    pred = np.array(
        [math.nan if r["prediction"] is None else r["prediction"] for r in rows], np.float64
    )
    n_scored = len(rows)
    n_unparsed = sum(1 for r in rows if not r["parsed"])
    think_tok = [r["think_tokens"] for r in rows if r.get("think_tokens") is not None]
    out: dict[str, Any] = {
        "dataset": spec.name,
        "task": spec.task,
        "score_range": list(spec.score_range),
        "mode": "reference_compat" if reference_compat else "fixed",
        "n_records": int(num_records),
        "n_scored": n_scored,
        "n_image_errors": sum(1 for e in errors if e.get("kind") == "image"),
        "n_bad_rows": sum(1 for e in errors if e.get("kind") == "bad_row"),
        "n_predict_errors": sum(1 for e in errors if e.get("kind") == "predict"),
        "n_unparsed": n_unparsed,
        "n_out_of_range": sum(int(r.get("out_of_range") or 0) for r in rows),
        "frac_unparsed": n_unparsed / n_scored if n_scored else math.nan,
        "mean_think_tokens": float(np.mean(think_tok)) if think_tok else math.nan,
        "mean_think_words": (
            float(np.mean([r["think_words"] for r in rows])) if rows else math.nan
        ),
    }
    out["n_missing"] = (
        out["n_records"]
        - n_scored
        - out["n_image_errors"]
        - out["n_bad_rows"]
        - out["n_predict_errors"]
    )
    out.update(metrics_mod.correlation_metrics(gt, pred, reference_compat=reference_compat))
    if any("n_samples" in r for r in rows):
        out.update(sample_metrics(rows, gt))
    return metrics_mod.json_ready(out)


def metrics_from_completions(
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    reference_compat: bool = False,
    count_tokens: CountTokens | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Metrics of completions already generated elsewhere (the trainer's periodic evaluation).

    ``records`` need ``gt_100`` and ``task`` (one task per call); ``completions[i]`` answers
    ``records[i]``. Same parsing and statistics as
    :func:`tatar_jax.evaluation.runner.evaluate_dataset`, no files.
    """
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    tasks = {r["task"] for r in records}
    if len(tasks) > 1:
        raise ValueError(f"one task per call, got {sorted(tasks)}")
    task = tasks.pop() if tasks else "iqa"
    rows = [
        {
            "row_id": i,
            "gt_100": float(r["gt_100"]),
            **score_completion(
                c, task, reference_compat=reference_compat, count_tokens=count_tokens
            ),
        }
        for i, (r, c) in enumerate(zip(records, completions, strict=True))
    ]
    spec = manifest_mod.DatasetSpec(name or "eval", task, manifest="")
    out = dataset_metrics(spec, rows, num_records=len(rows), reference_compat=reference_compat)
    out.pop("score_range")  # not known here: gt_100 is already on 0-100
    return out
