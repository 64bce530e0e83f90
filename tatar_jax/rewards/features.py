"""Host-side reward inputs (plain Python / numpy, never jitted): the per-completion features of
decoded completions, the per-completion records host plug-ins receive, and the reference
evaluation's rescaling. None of them raises on any string."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tatar_jax import answer_format
from tatar_jax.data import prompts
from tatar_jax.data.batch import RowMeta


def reference_rescale_prediction(value: float | None, task: str) -> float | None:
    """The reference evaluation's value-based rescaling of a prediction (spec §4 step 5, bug B2).

    Non-monotone by construction (IQA 4.5 → 87.5 but 5.01 → 5.01); use only in
    reference-compatible evaluation. ``task`` is ``"iqa"`` or ``"iaa"``.
    """
    if task not in ("iqa", "iaa"):
        raise ValueError(f"task must be 'iqa' or 'iaa', got {task!r}")
    if value is None or not math.isfinite(value):
        return None
    if 0.0 <= value <= 1.0:
        return 100.0 * value
    if task == "iqa" and 1.0 < value <= 5.0:
        return 25.0 * (value - 1.0)
    if task == "iaa" and 1.0 < value <= 10.0:
        return 10.0 * value
    return min(max(value, 0.0), 100.0)


@dataclasses.dataclass(frozen=True)
class CompletionFeatures:
    """Per-completion reward inputs, numpy arrays of shape (N,).

    prediction: float32, the parsed number clipped to [0, 100]; 0 where not parsed.
    parsed: bool, the parser returned a number.
    num_words: int32, whitespace-separated tokens of the whole completion (spec §8).
    think_len: int32, length of the first ``<think>`` block (tokens if a counter was given,
        otherwise whitespace words); 0 without a think block.
    has_think: bool, a ``<think>`` tag is present.
    """

    prediction: np.ndarray
    parsed: np.ndarray
    num_words: np.ndarray
    think_len: np.ndarray
    has_think: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def completion_features(
    texts: Sequence[str],
    *,
    count_tokens: Callable[[str], int] | None = None,
    think_token_counts: Sequence[int] | None = None,
    parser: str | Callable[[str], float | None] = "strict",
) -> CompletionFeatures:
    """Builds the reward inputs from decoded completions (special tokens already stripped).

    Think length: ``think_token_counts`` (precomputed per completion, e.g. from token ids and
    the think-tag positions) wins; else ``count_tokens(think_text)`` (e.g.
    ``lambda s: len(tokenizer.encode(s))``); else whitespace words of the think text. No model is
    needed for any of them. ``parser`` is ``"strict"`` (spec §4, the default), ``"lenient"`` or a
    callable. Non-``str`` entries count as unparsed, empty completions. Never raises on text.
    """
    parse = answer_format.get_parser(parser)
    n = len(texts)
    if think_token_counts is not None and len(think_token_counts) != n:
        raise ValueError(
            f"think_token_counts has {len(think_token_counts)} entries for {n} completions"
        )
    prediction = np.zeros(n, np.float32)
    parsed = np.zeros(n, bool)
    num_words = np.zeros(n, np.int32)
    think_len = np.zeros(n, np.int32)
    has_think = np.zeros(n, bool)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        value = parse(text)
        if value is not None and not math.isnan(value):
            parsed[i] = True
            prediction[i] = min(max(value, 0.0), 100.0)
        num_words[i] = len(text.split())
        has_think[i] = answer_format.has_think(text)
        if think_token_counts is not None:
            think_len[i] = int(think_token_counts[i])
        elif has_think[i]:
            think = answer_format.think_text(text)
            think_len[i] = int(count_tokens(think)) if count_tokens else len(think.split())
    return CompletionFeatures(prediction, parsed, num_words, think_len, has_think)


def completion_records(meta: RowMeta, group_size: int) -> list[dict[str, Any]]:
    """The (N,) per-completion records a host reward receives, N = prompts x ``group_size``
    (prompt-major, as the rollout's rows): ``prompt`` (index in the step), ``task`` ("iqa" /
    "iaa"), ``gt_100``, ``valid``, ``row_id`` and, where ``meta`` has them for every row,
    ``dataset`` and ``image_path``. ``meta``: a pipeline batch's rows (``batch.meta``). On a
    run over several processes the arrays are the global batch's but the strings this host's
    rows only (``Batch.process_rows``): ``dataset`` / ``image_path`` are then left out."""
    names = prompts.task_names(meta.task_id)
    b = len(names)
    strings = {"dataset": meta.dataset, "image_path": meta.image_path}
    strings = {k: v for k, v in strings.items() if len(v) == b}
    out = []
    for r in range(b):
        rec = {
            "prompt": r,
            "task": str(names[r]),
            "gt_100": float(meta.gt_100[r]),
            "valid": bool(meta.valid[r]),
            "row_id": int(meta.row_id[r]),
        }
        for key, values in strings.items():
            rec[key] = values[r]
        out.extend(dict(rec) for _ in range(group_size))
    return out
