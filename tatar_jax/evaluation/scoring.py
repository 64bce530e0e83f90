"""Scores of completions: the parsed prediction and think length of one completion, and the
metrics of a dataset from its scored rows (spec §9, with B1/B2/B12 fixed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tatar_jax import answer_format, rewards
from tatar_jax.data import manifest as manifest_mod
from tatar_jax.evaluation import metrics as metrics_mod

CountTokens = Callable[[str], int]


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
    here). Correlations use the ``n_pairs`` parsed rows.
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
        "n_out_of_range": sum(1 for r in rows if r.get("out_of_range")),
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
