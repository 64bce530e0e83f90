"""Stage-1 SFT (spec §6.2): the assistant-span cross-entropy and the jitted SFT step.

Labels come from token *spans* (the assistant content plus its closing ``<|im_end|>``), given as a
``loss_mask`` aligned with ``input_ids``; padding side does not matter (fixes B3, B4).

Normalisation (the Hugging Face default is a token mean over unmasked tokens). Under gradient
accumulation the loss of an optimizer step must be

    sum over all micro-batches of token NLLs / total loss tokens of the whole step,

not the mean of per-micro-batch means (which over-weights tokens of short micro-batches). So
:func:`sft_loss` takes the step's token count ``num_tokens`` and returns its micro-batch's
*share*; the shares sum to the step's token mean and ``optim.accumulate_gradients`` sums them.
Multi-device data parallelism is the same sum (the jitted step sees the global batch).
``sequence_mean`` (mean over sequences of per-sequence token means) is offered for ablations; it
divides by the step's sequence count.

The step's inputs are a frozen :class:`tatar_jax.train.inputs.SftBatch` (``inputs.sft_batch``);
the model runs through its one forward (``inputs.hidden_states``) and only the target positions
go through the lm_head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tatar_jax.logprobs import DEFAULT_CHUNK_SIZE, token_logprobs
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import optim

PyTree = Any
NORMALIZATIONS = ("token_mean", "sequence_mean")


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


def sft_loss(
    hidden: jax.Array,
    lm_head: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    num_tokens: jax.Array | None = None,
    num_sequences: jax.Array | None = None,
    normalization: str = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_layout: str = "dv",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the span cross-entropy; pure, differentiable in ``hidden``/``lm_head``.

    Args:
      hidden: (B, L, D) final hidden states. lm_head: (D, V) (or (V, D) with layout "vd").
      input_ids: (B, L) int. loss_mask: (B, L) 0/1, 1 on assistant-span tokens (incl. im_end).
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
    nll, mask = span_nll(
        hidden, lm_head, input_ids, loss_mask, chunk_size=chunk_size, weight_layout=weight_layout
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
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    metrics = {
        "nll_sum": nll_sum,
        "loss_tokens": tokens,
        "sequences": jnp.sum(has_target),
        "confident_correct": jnp.sum((nll < jnp.log(2.0)) * mask),
    }
    return loss, metrics


def make_sft_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    trainable: PyTree | None = None,
    normalization: str = "token_mean",
    chunk_size: int = 1024,
    schedule: optax.Schedule | None = None,
) -> Callable[[optim.TrainState, step_inputs.SftBatch], tuple[optim.TrainState, dict]]:
    """Pure ``step(state, batch) -> (state, metrics)``; jit it (``batch``:
    ``tatar_jax.train.inputs.sft_batch``).

    The loss is the span cross-entropy of :func:`sft_loss`, normalised by the whole step's
    target tokens, summed over ``grad_accum_steps`` row micro-batches, then one
    (non-finite-guarded) optimizer update. Metrics: loss (step token-mean NLL), loss_tokens,
    sequences, token_accuracy (p > 0.5 fraction), grad_norm, update_skipped, nonfinite_count,
    and lr when ``schedule`` is given.
    """

    def step(state: optim.TrainState, batch: step_inputs.SftBatch):
        rows, vision, k = batch.rows, batch.vision, batch.pack_size
        n_tok = jnp.sum(rows.target_valid.astype(jnp.float32))
        n_seq = jnp.sum(jnp.any(rows.target_valid > 0, axis=1).astype(jnp.float32))

        def loss_fn(p, feats, mb):
            model = nnx.merge(graphdef, p)
            h = step_inputs.hidden_states(model, mb, vision, feats)
            # Gather the predecessors of the K target positions, then lay them out so that
            # sft_loss's shift (position j predicts token j + 1) pairs them up again.
            tp = mb.target_pos
            hg = jnp.take_along_axis(h, (tp - 1)[..., None], axis=1)  # (n, K, D)
            ids_g = jnp.take_along_axis(mb.input_ids, tp, axis=1)
            valid = mb.target_valid
            n_rows = jnp.sum(jnp.any(valid > 0, axis=1).astype(jnp.float32))
            if k:
                # One row of the micro-batch's P valid targets (token_mean only: the loss is a
                # sum over tokens, so where a token sits does not change it).
                idx, keep = step_inputs.pack_index(valid, k)
                hg = hg.reshape(-1, hg.shape[-1])[idx][None]
                ids_g = ids_g.reshape(-1)[idx][None]
                valid = keep.astype(valid.dtype)[None]
            n = hg.shape[0]
            hidden = jnp.concatenate([hg, jnp.zeros((n, 1, hg.shape[-1]), hg.dtype)], axis=1)
            zero = jnp.zeros((n, 1), jnp.int32)
            w, layout = step_inputs.lm_head(model)
            loss, aux = sft_loss(
                hidden,
                w,
                jnp.concatenate([zero, ids_g], axis=1),
                jnp.concatenate([zero, valid], axis=1),
                num_tokens=n_tok,
                num_sequences=n_seq,
                normalization=normalization,
                chunk_size=chunk_size,
                weight_layout=layout,
            )
            return loss, {**aux, "sequences": n_rows}

        if k and normalization != "token_mean":
            raise ValueError("SFT target packing needs normalization='token_mean'")
        # The vision tower runs once per step (every micro-batch gathers its rows' features).
        loss, grads, aux = step_inputs.accumulate_with_features(
            loss_fn, graphdef, state.params, rows, vision, max(1, int(grad_accum_steps)),
            train_vision=step_inputs.vision_trains(trainable),
        )  # fmt: skip
        new_state, info = optim.apply_gradients(
            state, grads, tx, loss=loss, trainable=trainable, schedule=schedule
        )
        metrics = {
            "loss": loss,
            "loss_tokens": aux["loss_tokens"],
            "sequences": aux["sequences"],
            "token_accuracy": aux["confident_correct"] / jnp.maximum(aux["loss_tokens"], 1.0),
            **info,
        }
        return new_state, metrics

    return step
