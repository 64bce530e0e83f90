"""Evaluation: correlation metrics, the resumable eval runner, reports and plots (spec §9).

The model enters through ``predict_fn(records) -> list[str]`` (see :mod:`.runner`); everything
here is model-independent and is used by ``scripts/eval.py`` and the trainer's periodic eval.
"""

from tatar_jax.evaluation.metrics import (
    correlation_metrics,
    fit_logistic4,
    logistic4,
    pearson,
    spearman,
    spearman_reference,
)
from tatar_jax.evaluation.outputs import EvalError, read_jsonl
from tatar_jax.evaluation.runner import (
    EvalOptions,
    PredictFn,
    RecordFailure,
    evaluate_dataset,
    evaluate_shard,
    merge_shards,
    run_eval,
)
from tatar_jax.evaluation.scoring import (
    dataset_metrics,
    metrics_from_completions,
    score_completion,
)
from tatar_jax.evaluation.shards import shard_rows

__all__ = [
    "EvalError",
    "EvalOptions",
    "PredictFn",
    "RecordFailure",
    "correlation_metrics",
    "dataset_metrics",
    "evaluate_dataset",
    "evaluate_shard",
    "fit_logistic4",
    "logistic4",
    "merge_shards",
    "metrics_from_completions",
    "pearson",
    "read_jsonl",
    "run_eval",
    "score_completion",
    "shard_rows",
    "spearman",
    "spearman_reference",
]
