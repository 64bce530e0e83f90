"""The ``eval`` settings of ``configs/eval.py`` as a plain namespace, for the evaluation tests
that call ``tatar_jax.evaluation.predict`` directly (no config file, no flags)."""

from __future__ import annotations

import types
from typing import Any


def eval_settings(**overrides: Any) -> types.SimpleNamespace:
    """Greedy single-sample decoding of batches of 4 with the reference evaluation prompt, at most
    40 new tokens, images resized into [3136, 200000] pixels, no answer constraint; ``overrides``
    replace or add fields."""
    settings = dict(
        batch_size=4,
        max_new_tokens=40,
        min_pixels=3136,
        max_pixels=200_000,
        prompt_variant="reference_eval",
        num_samples=1,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        constrained_answer=False,
    )
    settings.update(overrides)
    return types.SimpleNamespace(**settings)
