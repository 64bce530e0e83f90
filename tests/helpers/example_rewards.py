"""Example extra rewards for ``configs/rewards.py`` ``extra`` (used by the reward plug-in tests;
the README's "Rewards and the GRPO objective" shows the same two)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np


def brevity(pred, gt, parsed, num_words, is_iaa, group_ids, *, max_words=60):
    """Features kind (jittable): 1 for a parsed answer within ``max_words`` words, decaying as
    max_words / words beyond it; 0 when unparsed. All arrays (N,)."""
    del pred, gt, is_iaa, group_ids
    words = jnp.maximum(jnp.asarray(num_words, jnp.float32), 1.0)
    return jnp.where(parsed, jnp.minimum(1.0, max_words / words), 0.0)


def keywords(
    texts: Sequence[str], records: Sequence[Mapping[str, Any]], *, words="sharp,blur,noise"
) -> np.ndarray:
    """Host kind: for IQA completions the fraction of ``words`` (comma-separated) the text
    mentions; IAA completions get 0."""
    vocab = [w.strip().lower() for w in words.split(",") if w.strip()]
    out = np.zeros(len(texts), np.float32)
    for i, (text, rec) in enumerate(zip(texts, records, strict=True)):
        if rec["task"] == "iqa":
            low = text.lower()
            out[i] = sum(w in low for w in vocab) / len(vocab)
    return out


def wrong_shape(texts, records):
    return np.zeros(len(texts) + 1)


def not_finite(pred, gt, parsed, num_words, is_iaa, group_ids):
    return jnp.where(parsed, jnp.nan, 0.0)


def raises(texts, records):
    raise RuntimeError("boom")


def not_jittable(pred, gt, parsed, num_words, is_iaa, group_ids):
    return np.asarray(pred) * 0.0  # numpy on a tracer fails under jit
