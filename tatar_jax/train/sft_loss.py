"""Stage-1 SFT loss: assistant-only cross-entropy from explicit span labels (spec §6.2).

Labels come from token *spans* (the assistant content plus its closing ``<|im_end|>``), given as a
``loss_mask`` aligned with ``input_ids``; padding side does not matter (fixes B3, B4).

Normalisation (the Hugging Face default is a token mean over unmasked tokens). Under gradient
accumulation the loss of an optimizer step must be

    sum over all micro-batches of token NLLs / total loss tokens of the whole step,

not the mean of per-micro-batch means (which over-weights tokens of short micro-batches). So
``sft_loss_fn`` takes the step's token count ``num_tokens`` (count it once from the whole batch's
``loss_mask`` with ``count_loss_tokens``) and returns its micro-batch's *share*; the shares sum to
the step's token mean and ``optim.accumulate_gradients`` sums them. Multi-device data parallelism
is the same sum (the jitted step sees the global batch). ``sequence_mean`` (mean over sequences of
per-sequence token means) is offered for ablations; it divides by the step's sequence count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tatar_jax.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from tatar_jax.train import optim

PyTree = Any
# (params, batch) -> (hidden (B, L, D) before the lm_head, lm_head weight (D, V) or (V, D))
ApplyFn = Callable[[PyTree, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]


def shift_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and their mask, same (B, L) shape (static under jit).

    Position t predicts ``input_ids[:, t + 1]`` and counts when ``loss_mask[:, t + 1]``; the last
    position predicts nothing. Returns (targets int32 with -1 where ignored, mask float32).
    """
    tgt = jnp.concatenate([input_ids[:, 1:], jnp.full_like(input_ids[:, :1], -1)], axis=1)
    m = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    m = m.astype(jnp.float32)
    return jnp.where(m > 0, tgt, -1).astype(jnp.int32), m


def count_loss_tokens(loss_mask: jax.Array) -> jax.Array:
    """Number of target tokens of a (B, L) ``loss_mask`` aligned with ``input_ids``."""
    return jnp.sum(loss_mask[:, 1:].astype(jnp.float32))


def span_nll(
    hidden: jax.Array,
    lm_head: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_layout: str = "dv",
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood of the masked next tokens.

    Args:
      hidden: (B, L, D) final hidden states. lm_head: (D, V) (or (V, D) with layout "vd").
      input_ids: (B, L) int. loss_mask: (B, L) 0/1, 1 on assistant-span tokens (incl. im_end).
    Returns:
      (nll (B, L) float32, 0 where not a target; mask (B, L) float32 of the targets).
    """
    targets, mask = shift_targets(input_ids, loss_mask)
    logp = token_logprobs(
        hidden, lm_head, targets, chunk_size=chunk_size, weight_layout=weight_layout
    )
    return -logp * mask, mask


def sft_loss_fn(
    params: PyTree,
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: ApplyFn,
    num_tokens: jax.Array | None = None,
    num_sequences: jax.Array | None = None,
    normalization: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_layout: str = "dv",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(params, batch) -> (loss, metrics); pure, for ``jax.value_and_grad(has_aux=True)``.

    Args:
      batch: ``input_ids`` (B, L), ``loss_mask`` (B, L) and whatever ``apply_fn`` needs.
      num_tokens: target tokens of the whole optimizer step (``count_loss_tokens`` of the whole
        batch); None = this batch's own count (no accumulation).
      num_sequences: sequences of the whole step (for ``sequence_mean``); None = this batch's.
      normalization: "token_mean" (HF / reference) or "sequence_mean".
    Returns:
      loss: this micro-batch's share of the step loss (shares sum to the step loss).
      metrics (all sums, so they add up over micro-batches): ``nll_sum``, ``loss_tokens``,
      ``sequences`` (with at least one target), ``confident_correct`` (targets with p > 0.5,
      which are necessarily the argmax).
    """
    hidden, lm_head = apply_fn(params, batch)
    nll, mask = span_nll(
        hidden,
        lm_head,
        batch["input_ids"],
        batch["loss_mask"],
        chunk_size=chunk_size,
        weight_layout=weight_layout,
    )
    tokens = jnp.sum(mask)
    seq_tokens = jnp.sum(mask, axis=1)
    has_target = (seq_tokens > 0).astype(jnp.float32)
    nll_sum = jnp.sum(nll)
    if normalization == "token_mean":
        denom = tokens if num_tokens is None else num_tokens
        loss = nll_sum / jnp.maximum(denom, 1.0)
    elif normalization == "sequence_mean":
        denom = jnp.sum(has_target) if num_sequences is None else num_sequences
        per_seq = jnp.sum(nll, axis=1) / jnp.maximum(seq_tokens, 1.0)
        loss = jnp.sum(per_seq * has_target) / jnp.maximum(denom, 1.0)
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    metrics = {
        "nll_sum": nll_sum,
        "loss_tokens": tokens,
        "sequences": jnp.sum(has_target),
        "confident_correct": jnp.sum((nll < jnp.log(2.0)) * mask),
    }
    return loss, metrics


def make_sft_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    trainable: PyTree | None = None,
    normalization: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_layout: str = "dv",
    schedule: optax.Schedule | None = None,
) -> Callable[[optim.TrainState, Mapping[str, jax.Array]], tuple[optim.TrainState, dict]]:
    """A pure ``step(state, batch) -> (state, metrics)`` for ``jax.jit`` (shardings by the caller).

    ``batch`` is the whole optimizer step (B = grad_accum_steps x micro-batch); the token count
    is taken from it before splitting, so accumulation reproduces the full-batch token mean.
    Metrics: loss (step token-mean NLL), grad_norm, update_skipped, nonfinite_count, loss_tokens,
    sequences, token_accuracy (p > 0.5 fraction), and lr when ``schedule`` is given.
    """

    def step(state: optim.TrainState, batch: Mapping[str, jax.Array]):
        n_tok = count_loss_tokens(batch["loss_mask"])
        n_seq = jnp.sum(jnp.any(batch["loss_mask"][:, 1:] > 0, axis=1).astype(jnp.float32))

        def loss_fn(p, mb):
            return sft_loss_fn(
                p,
                mb,
                apply_fn=apply_fn,
                num_tokens=n_tok,
                num_sequences=n_seq,
                normalization=normalization,
                chunk_size=chunk_size,
                weight_layout=weight_layout,
            )

        loss, grads, aux = optim.accumulate_gradients(
            loss_fn, state.params, batch, grad_accum_steps
        )
        return apply_sft_update(
            state, loss, grads, aux, tx=tx, trainable=trainable, schedule=schedule
        )

    return step


def apply_sft_update(
    state: optim.TrainState,
    loss: jax.Array,
    grads: PyTree,
    aux: Mapping[str, jax.Array],
    *,
    tx: optax.GradientTransformation,
    trainable: PyTree | None,
    schedule: optax.Schedule | None,
) -> tuple[optim.TrainState, dict]:
    """The optimizer update and metrics shared by every SFT step (``aux`` from ``sft_loss_fn``)."""
    new_state, info = optim.apply_gradients(state, grads, tx, loss=loss, trainable=trainable)
    metrics = {
        "loss": loss,
        "loss_tokens": aux["loss_tokens"],
        "sequences": aux["sequences"],
        "token_accuracy": aux["confident_correct"] / jnp.maximum(aux["loss_tokens"], 1.0),
        **info,
    }
    if schedule is not None:
        # The optimizer's update count equals the number of applied (non-skipped) updates.
        applied = state.step - state.nonfinite_total
        metrics["lr"] = jnp.asarray(schedule(applied), jnp.float32)
    return new_state, metrics
