"""The policy forward used by both training steps, host -> device batches, and the jitted SFT step.

Both stages call the model the same way (:func:`policy_hidden`): the vision tower runs once per
*image* of the step, and each row gathers its image features through a per-token index
(``feat_index``, built on the host). That is what lets

- GRPO score the G completions of a prompt without running the vision tower G times, and
- gradient accumulation slice micro-batches by rows inside one jitted step (the rows' image
  features are a gather from the shared feature array, not a contiguous range of it).

Inputs of one step (numpy on the host, :func:`step_inputs`):

- ``rows``: per-row arrays, leading dim N (sharded over the batch axes): ``input_ids`` (N, L),
  ``attention_mask`` (N, L), ``position_ids`` (N, 3, L) (row-major so rows can be sliced),
  ``feat_index`` (N, L) int32 (row of the image-feature array each image token takes; -1 elsewhere)
  and the stage's labels.
- ``shared``: ``pixel_values`` (Q, patch_dim) padded to a patch bucket and its
  :class:`VisionLayout` (a fixed bucket per Q, so one compilation per (L, Q)), replicated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.models.qwen2_5_vl.vision_layout import fixed_bucket, vision_layout
from tatar_jax.train import optim
from tatar_jax.train import sft_loss as sft

PyTree = Any


# --------------------------------------------------------------------------------------------
# Forward


def policy_hidden(
    model: nnx.Module,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    position_ids: jax.Array,
    feat_index: jax.Array,
    pixel_values: jax.Array | None,
    layout: Any,
) -> jax.Array:
    """Final-normed hidden states (N, L, D) in the compute dtype.

    input_ids / attention_mask / feat_index (N, L); position_ids (N, 3, L); pixel_values (Q, C)
    with its layout (or None for text-only rows). Equal to ``model.hidden_states`` when
    ``feat_index`` is the running count of image tokens (tests/test_train_step.py).
    """
    lm = model.language_model
    embeds = lm.embed(input_ids)
    if pixel_values is not None:
        feats = model.image_features(pixel_values, layout)  # (M, D), vision once per image
        # Only the prompt's image placeholders take features (feat_index >= 0). A completion
        # that *samples* the image-token id is text to the sampler (as in HF generate), so it
        # must be text here too, or the update would score a different sequence than was sampled.
        is_img = ((input_ids == model.config.image_token_id) & (feat_index >= 0))[..., None]
        feat = feats[jnp.maximum(feat_index, 0)].astype(embeds.dtype)
        embeds = jnp.where(is_img, feat, embeds)
    t = model.config.text
    pos = jnp.swapaxes(position_ids, 0, 1)  # (3, N, L)
    cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
    h, _ = lm(embeds, cos, sin, attention_mask, None)
    return h


def lm_head(model: nnx.Module) -> tuple[jax.Array, str]:
    """(weight, layout) of the lm_head in the compute dtype (see ``tatar_jax.logprobs``)."""
    w, layout = model.lm_head_weight()
    return w.astype(model.dtype), layout


# --------------------------------------------------------------------------------------------
# Host -> step inputs


def running_feat_index(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """(N, L) index of the image feature each image token takes (HF row-major order), -1 on
    every other token."""
    is_img = input_ids == image_token_id
    idx = np.cumsum(is_img.reshape(-1)) - 1
    return np.where(is_img, idx.reshape(is_img.shape), -1).astype(np.int32)


def shared_vision(batch: Mapping[str, Any], vision_cfg: Any) -> dict[str, Any]:
    """Patches padded to the batch's patch bucket Q and a fixed layout for Q (one compile per Q)."""
    pv = np.asarray(batch["pixel_values"], np.float32)
    grid = np.asarray(batch["image_grid_thw"])
    bucket = fixed_bucket(vision_cfg, pv.shape[0], max_frames=max(int(grid.shape[0]), 1))
    return {"pixel_values": pv, "layout": vision_layout(grid, vision_cfg, bucket)}


def target_positions(label_mask: np.ndarray, multiple: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) positions ``i >= 1`` of each row's targets (``label_mask[i] = 1``) and their
    validity; K = the longest row's count rounded up to ``multiple`` (a few compiled shapes).

    Only these positions go through the 152k-vocabulary lm_head: an assistant span is a fraction
    of a row that also holds the system prompt and the image tokens.
    """
    m = np.asarray(label_mask).astype(bool).copy()
    m[:, 0] = False  # position 0 has no predecessor
    counts = m.sum(axis=1)
    k = max(int(-(-max(int(counts.max()), 1) // multiple) * multiple), multiple)
    pos = np.ones((m.shape[0], k), np.int32)
    valid = np.zeros((m.shape[0], k), np.int32)
    for r in range(m.shape[0]):
        idx = np.nonzero(m[r])[0]
        pos[r, : len(idx)] = idx
        valid[r, : len(idx)] = 1
    return pos, valid


def sft_inputs(
    batch: Mapping[str, Any], model_cfg: Any, *, num_micro: int = 1, pack_buckets: int = 0
) -> dict[str, Any]:
    """SFT step inputs from a pipeline batch (``stage="sft"``, right-padded).

    ``pack_buckets > 0`` packs the step's targets (over the rows of each of ``num_micro``
    micro-batches) into one of that many static sizes (:func:`pack_slots`): rows of a short IQA
    rationale then do not pay for the K slots a long IAA one needs.
    """
    ids = np.asarray(batch["input_ids"], np.int32)
    pos, valid = target_positions(batch["label_mask"])
    rows = {
        "input_ids": ids,
        "attention_mask": np.asarray(batch["attention_mask"], np.int32),
        "position_ids": np.ascontiguousarray(np.swapaxes(batch["position_ids"], 0, 1)),
        "feat_index": running_feat_index(ids, model_cfg.image_token_id),
        "target_pos": pos,
        "target_valid": valid,
    }
    shared = shared_vision(batch, model_cfg.vision)
    slots = pack_slots(valid, num_micro, pack_buckets)
    if slots is not None:
        shared["pack_slots"] = slots
    return {"rows": rows, "shared": shared}


def pack_slots(
    completion_mask: np.ndarray, num_micro: int = 1, num_buckets: int = 4
) -> np.ndarray | None:
    """The (K,) placeholder that turns packing on for a step; None when it would not help.

    ``completion_mask`` (N, T): the tokens that go through the lm_head (GRPO: counted completion
    tokens; SFT: ``target_valid``). K = the most mask tokens of any of the ``num_micro`` row
    micro-batches, rounded up to one of ``num_buckets`` evenly spaced sizes of a micro-batch's
    ``rows x T`` (so at most ``num_buckets`` compiled shapes of the update).
    ``num_buckets <= 0`` disables packing.
    """
    if num_buckets <= 0:
        return None
    m = np.asarray(completion_mask) > 0
    n, t = m.shape
    per = m.reshape(max(int(num_micro), 1), -1).sum(axis=1).max()
    full = (n // max(int(num_micro), 1)) * t
    step = -(-full // int(num_buckets))
    k = min(full, max(step, -(-int(per) // step) * step))
    return None if k >= full else np.zeros((k,), np.int8)


def pack_index(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(k,) row-major flat indices of ``mask``'s nonzero entries (padded with 0) and (k,) bool
    validity of each slot; k >= the count (:func:`pack_slots`), static inside jit."""
    flat = mask.reshape(-1) > 0
    idx = jnp.nonzero(flat, size=k, fill_value=0)[0]
    return idx, jnp.arange(k) < jnp.sum(flat)


# --------------------------------------------------------------------------------------------
# Accumulation over row micro-batches


def accumulate(
    loss_fn: Callable[[PyTree, Mapping[str, jax.Array]], tuple[jax.Array, PyTree]],
    params: PyTree,
    rows: Mapping[str, jax.Array],
    num_micro: int,
) -> tuple[jax.Array, PyTree, PyTree]:
    """Summed (loss, grads, aux) over ``num_micro`` equal row slices (``optim`` semantics)."""
    return optim.accumulate_gradients(loss_fn, params, dict(rows), max(1, int(num_micro)))


def make_sft_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    trainable: PyTree | None = None,
    normalization: str = "token_mean",
    chunk_size: int = 1024,
    schedule: optax.Schedule | None = None,
) -> Callable[[optim.TrainState, Mapping[str, Any]], tuple[optim.TrainState, dict]]:
    """Pure ``step(state, inputs) -> (state, metrics)``; jit it (``inputs``: :func:`sft_inputs`).

    The loss is the span cross-entropy of :func:`tatar_jax.train.sft_loss.sft_loss_fn`,
    normalised by the whole step's target tokens, summed over ``grad_accum_steps`` row
    micro-batches, then one (non-finite-guarded) optimizer update.
    """

    def step(state: optim.TrainState, inputs: Mapping[str, Any]):
        rows, shared = inputs["rows"], inputs["shared"]
        n_tok = jnp.sum(rows["target_valid"].astype(jnp.float32))
        n_seq = jnp.sum(jnp.any(rows["target_valid"] > 0, axis=1).astype(jnp.float32))

        def loss_fn(p, mb):
            model = nnx.merge(graphdef, p)
            h = policy_hidden(
                model,
                mb["input_ids"],
                mb["attention_mask"],
                mb["position_ids"],
                mb["feat_index"],
                shared["pixel_values"],
                shared["layout"],
            )
            # Gather the predecessors of the K target positions, then lay them out so that
            # sft_loss_fn's shift (position j predicts token j + 1) pairs them up again.
            tp = mb["target_pos"]
            hg = jnp.take_along_axis(h, (tp - 1)[..., None], axis=1)  # (n, K, D)
            ids_g = jnp.take_along_axis(mb["input_ids"], tp, axis=1)
            valid = mb["target_valid"]
            n_rows = jnp.sum(jnp.any(valid > 0, axis=1).astype(jnp.float32))
            if "pack_slots" in shared:
                # One row of the micro-batch's P valid targets (token_mean only: the loss is a
                # sum over tokens, so where a token sits does not change it).
                idx, keep = pack_index(valid, shared["pack_slots"].shape[0])
                hg = hg.reshape(-1, hg.shape[-1])[idx][None]
                ids_g = ids_g.reshape(-1)[idx][None]
                valid = keep.astype(valid.dtype)[None]
            n = hg.shape[0]
            hidden = jnp.concatenate([hg, jnp.zeros((n, 1, hg.shape[-1]), hg.dtype)], axis=1)
            zero = jnp.zeros((n, 1), jnp.int32)
            packed = {
                "input_ids": jnp.concatenate([zero, ids_g], axis=1),
                "loss_mask": jnp.concatenate([zero, valid], axis=1),
            }
            w, layout = lm_head(model)
            loss, aux = sft.sft_loss_fn(
                p,
                packed,
                apply_fn=lambda _p, _b: (hidden, w),
                num_tokens=n_tok,
                num_sequences=n_seq,
                normalization=normalization,
                chunk_size=chunk_size,
                weight_layout=layout,
            )
            return loss, {**aux, "sequences": n_rows}

        if "pack_slots" in shared and normalization != "token_mean":
            raise ValueError("SFT target packing needs normalization='token_mean'")
        loss, grads, aux = accumulate(loss_fn, state.params, rows, grad_accum_steps)
        return sft.apply_sft_update(
            state, loss, grads, aux, tx=tx, trainable=trainable, schedule=schedule
        )

    return step
