"""Sampling settings and the pure, jittable token sampler (transformers' order): logits /
temperature -> top-k -> top-p -> categorical draw; ``temperature == 0`` is greedy. What the
returned log-probs mean (``SamplingParams.logprobs``) is in :mod:`tatar_jax.generate`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

LOGPROB_MODES = ("tempered", "raw", "policy")
IM_END_ID = 151645  # <|im_end|> of the Qwen2.5-VL tokenizer
ENDOFTEXT_ID = 151643  # <|endoftext|>


class GenerateOutput(NamedTuple):
    """tokens (N, S) int32, mask (N, S) bool, logps (N, S) float32; N = B * num_samples."""

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Everything that fixes the compiled decode program (hashable).

    temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters; ``stop_token_ids``
    end a row (the stop token itself is kept and masked in); ``pad_token_id`` fills the rest.
    """

    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
    pad_token_id: int = 0
    logprobs: str = "tempered"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")

    @classmethod
    def from_config(
        cls, block: Any, tokenizer: Any, *, num_samples: int, logprobs: str = "tempered"
    ) -> SamplingParams:
        """The settings of a config block (``max_new_tokens``, ``temperature``, ``top_k``,
        ``top_p``: the ``eval`` and ``grpo`` blocks name them alike) with ``num_samples``
        completions per prompt, stopping at the tokenizer's end ids and padding with its pad id."""
        return cls(
            max_new_tokens=int(block.max_new_tokens),
            num_samples=int(num_samples),
            temperature=float(block.temperature),
            top_k=int(block.top_k),
            top_p=float(block.top_p),
            stop_token_ids=tuple(tokenizer.eos_ids),
            pad_token_id=int(tokenizer.pad_id),
            logprobs=logprobs,
        )


def _top_p_sorted(srt: jax.Array, top_p: float) -> jax.Array:
    """srt (..., K) scores sorted descending → the same with tokens outside the nucleus at -inf
    (kept: the most likely tokens until their mass reaches ``top_p``, at least one)."""
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = (before < jnp.float32(top_p)).at[..., 0].set(True)
    return jnp.where(keep, srt, -jnp.inf)


def warp_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """(..., V) logits → float32 scores with filtered tokens at -inf, as transformers'
    ``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper`` (ties at the top-k
    threshold are kept; top-p keeps the smallest set of most likely tokens whose mass reaches
    ``top_p``, at least one). ``temperature`` must be > 0 here. (The decode loop samples top-k
    from the k candidates directly, see :func:`sample_tokens`; this full-vocabulary form is the
    reference semantics and the top-p-only path.)"""
    z = logits.astype(jnp.float32) / jnp.float32(temperature)
    vocab = z.shape[-1]
    k = min(int(top_k), vocab) if top_k else 0
    if k:
        top_vals = jax.lax.top_k(z, k)[0]  # (..., k) descending
        z = jnp.where(z < top_vals[..., -1:], -jnp.inf, z)
    if top_p < 1.0:
        srt = top_vals if k else jnp.flip(jnp.sort(z, axis=-1), axis=-1)
        # Threshold = smallest kept score; equal scores are kept (HF's sort order is arbitrary
        # there, so only exact ties could differ).
        kept = _top_p_sorted(srt, top_p)
        thresh = jnp.min(jnp.where(jnp.isfinite(kept), srt, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < thresh, -jnp.inf, z)
    return z


def sample_tokens(
    logits: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """logits (N, V), keys (N,) typed PRNG keys → tokens (N,) int32 and their logps (N,) float32
    (``params.logprobs`` decides which log-prob, see the module docstring).

    With top-k the draw is among the ``k`` candidates of ``lax.top_k`` (top-p applied to them):
    the same distribution as :func:`warp_logits` except that tokens tied *exactly* with the k-th
    score beyond the first k are not candidates, and ~50x cheaper on CPU than masking the full
    vocabulary (XLA then sorts all V scores).
    """
    logits = logits.astype(jnp.float32)
    greedy = params.temperature == 0.0
    k = min(params.top_k, logits.shape[-1])
    policy_lp = None
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif k:
        vals, idx = jax.lax.top_k(logits / jnp.float32(params.temperature), k)
        if params.top_p < 1.0:
            vals = _top_p_sorted(vals, params.top_p)
        choice = jax.vmap(jax.random.categorical)(keys, vals)
        tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        lsm = jax.nn.log_softmax(vals, axis=-1)
        policy_lp = jnp.take_along_axis(lsm, choice[:, None], axis=-1)[:, 0]
    else:
        scores = warp_logits(logits, params.temperature, 0, params.top_p)
        tok = jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)
        lsm = jax.nn.log_softmax(scores, axis=-1)
        policy_lp = jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0]
    if params.logprobs == "policy":
        return tok, (jnp.zeros(tok.shape, jnp.float32) if greedy else policy_lp)
    if params.logprobs == "raw" or greedy:
        base = logits
    else:  # tempered
        base = logits / jnp.float32(params.temperature)
    lp = jnp.take_along_axis(jax.nn.log_softmax(base, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp
