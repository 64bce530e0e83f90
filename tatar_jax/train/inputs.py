"""The step-input contract of both training stages: host batch -> numpy step inputs -> device.

A pipeline batch (``tatar_jax.data.pipeline``) becomes :class:`StepInputs`, two dicts of arrays:

- ``rows``: per-row arrays, leading dim N (sharded over the batch axes): ``input_ids`` (N, L),
  ``attention_mask`` (N, L), ``position_ids`` (N, 3, L) (row-major so that rows can be sliced
  into micro-batches), ``feat_index`` (N, L) int32 (the image-feature row each image token takes;
  -1 elsewhere) and the stage's labels: SFT ``target_pos`` / ``target_valid`` (N, K); GRPO
  ``completion_mask`` (N, T), ``advantages`` (N,), optionally ``old_logps`` / ``ref_logps`` (N, T).
- ``shared``: ``pixel_values`` (Q, patch_dim) padded to a patch bucket and its
  :class:`VisionLayout` (a fixed bucket per Q, so one compilation per (L, Q)), replicated; and
  ``pack_slots`` (K,) when only K lm_head positions are computed (:func:`pack_slots`).

The vision tower runs once per *image* of the step and every row gathers its features through
``feat_index``: GRPO scores the G completions of a prompt without running the vision tower G
times, and micro-batches are row slices inside one jitted step. :func:`hidden_states` maps the
contract onto the model's one forward (``Qwen2_5_VLForConditionalGeneration.hidden_states``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax import sharding
from tatar_jax.models.qwen2_5_vl.vision_layout import fixed_bucket, vision_layout
from tatar_jax.train import metrics, optim


class StepInputs(TypedDict):
    """One optimizer step's inputs (numpy on the host, jax arrays after :func:`put_inputs`)."""

    rows: dict[str, Any]
    shared: dict[str, Any]


# --------------------------------------------------------------------------------------------
# The forward of a step


def image_features(model: nnx.Module, shared: Mapping[str, Any]) -> jax.Array:
    """(M, D) features of the step's images in HF order: the vision tower once per step."""
    return model.image_features(shared["pixel_values"], shared["layout"])


def hidden_states(
    model: nnx.Module,
    rows: Mapping[str, jax.Array],
    shared: Mapping[str, Any],
    features: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states (N, L, D) of ``rows`` through the model's one forward.

    ``features`` (M, D): the step's image features (:func:`image_features`), computed once and
    shared by every micro-batch of the GRPO update and of the reference pass, are handed to
    ``model.hidden_states(image_features=...)`` instead of the pixels. None: the vision tower
    runs inside the forward.
    """
    h, _ = model.hidden_states(
        rows["input_ids"],
        rows["attention_mask"],
        None if features is not None else shared["pixel_values"],
        position_ids=jnp.swapaxes(rows["position_ids"], 0, 1),  # (3, N, L)
        vision_layout=shared["layout"],
        feat_index=rows["feat_index"],
        image_features=features,
    )
    return h


def vision_trains(trainable: Any) -> bool:
    """Whether any vision-tower leaf of a trainable mask (``optim.trainable_mask``) is True."""
    return trainable is None or any(bool(x) for x in jax.tree.leaves(trainable["visual"]))


def vision_features(
    graphdef: nnx.GraphDef, params: Any, shared: Mapping[str, Any], train_vision: bool
) -> tuple[jax.Array, Callable[[jax.Array], Any] | None]:
    """(M, D) image features of the step and, when the vision tower trains, the function
    ``d loss / d features -> d loss / d params["visual"]`` (one backward through the tower)."""

    def features(visual: Any) -> jax.Array:
        p = jax.tree.map(lambda x: x, params)  # a new State: swap the vision subtree in
        p["visual"] = visual
        return image_features(nnx.merge(graphdef, p), shared)

    if not train_vision:
        return jax.lax.stop_gradient(features(params["visual"])), None
    feats, vjp = jax.vjp(features, params["visual"])
    return feats, lambda d_feats: vjp(d_feats.astype(feats.dtype))[0]


def accumulate_with_features(
    loss_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]],
    graphdef: nnx.GraphDef,
    params: Any,
    rows: Mapping[str, jax.Array],
    shared: Mapping[str, Any],
    num_micro: int,
    *,
    train_vision: bool = True,
) -> tuple[jax.Array, Any, Any]:
    """``optim.accumulate_gradients`` of ``loss_fn(params, features, micro_batch)`` over row
    micro-batches with the vision tower run once per step: the features are an input of every
    micro-batch, their gradients are summed and sent back through the tower in one backward.

    ``train_vision=False`` (a frozen tower): no backward through it, zero ``visual`` grads.
    Returns (loss, float32 grads, aux) summed over micro-batches.
    """
    feats, vision_vjp = vision_features(graphdef, params, shared, train_vision)
    loss, (grads, d_feats), aux = optim.accumulate_gradients(
        lambda pf, mb: loss_fn(pf[0], pf[1], mb), (params, feats), dict(rows), num_micro
    )
    if vision_vjp is not None:
        # The loss reads the tower only through ``feats``: the "visual" grads of the
        # accumulation are zeros, the tower's gradient is this one backward.
        d_visual = vision_vjp(d_feats)
        grads["visual"] = jax.tree.map(
            lambda a, b: a + b.astype(jnp.float32), grads["visual"], d_visual
        )
    return loss, grads, aux


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
) -> StepInputs:
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


def expand_prompts(
    batch: Mapping[str, Any], tokens: np.ndarray, cmask: np.ndarray, g: int, image_token_id: int
) -> dict[str, np.ndarray]:
    """GRPO rows: prompts (B, Lp) + their G completions each (B*G, T, prompt-major) -> the
    update's row arrays (B*G, Lp + T). The prompt's image features are indexed, never copied."""
    ids_p = np.asarray(batch["input_ids"], np.int32)
    mask_p = np.asarray(batch["attention_mask"], np.int32)
    pos_p = np.swapaxes(np.asarray(batch["position_ids"], np.int32), 0, 1)  # (B, 3, Lp)
    feat_p = running_feat_index(ids_p, image_token_id)  # indices into the B images' features
    n_valid = mask_p.sum(axis=1)
    deltas = np.asarray(batch["rope_deltas"], np.int32).reshape(-1)
    t = tokens.shape[1]
    rep = lambda x: np.repeat(x, g, axis=0)  # noqa: E731
    # Generated token s sits at position n_valid + s + rope_delta on all three mRoPE axes.
    pos_c = (n_valid + deltas)[:, None] + np.arange(t)[None, :]
    pos_c = np.broadcast_to(pos_c[:, None, :], (pos_c.shape[0], 3, t))
    return {
        "input_ids": np.concatenate([rep(ids_p), tokens.astype(np.int32)], axis=1),
        "attention_mask": np.concatenate([rep(mask_p), cmask.astype(np.int32)], axis=1),
        "position_ids": np.concatenate([rep(pos_p), rep(pos_c)], axis=2).astype(np.int32),
        "feat_index": np.concatenate(
            [rep(feat_p), np.full((len(tokens), t), -1, np.int32)], axis=1
        ),
    }


# --------------------------------------------------------------------------------------------
# FLOPs of a step


def step_flops(
    model_config: Any,
    inputs: StepInputs,
    *,
    num_micro: int = 1,
    training: bool = True,
    train_vision: bool = True,
) -> float:
    """Model FLOPs of one pass over a step's inputs (host or device arrays: shapes only):
    an update (``training``) or a forward-only log-prob pass (the GRPO reference / pi_old).

    Counted on the shapes the compiled program runs: the decoder on every row x position, the
    lm_head only on the scored positions (GRPO: N x T completion tokens or the packed slots;
    SFT: the N x K target positions), the vision tower once on the step's patch bucket (every
    row gathers its image's features). Rematerialisation is not counted.
    """
    rows, shared = inputs["rows"], inputs["shared"]
    n, length = np.shape(rows["input_ids"])
    if "pack_slots" in shared:
        heads = np.shape(shared["pack_slots"])[0] * max(int(num_micro), 1)
    elif "completion_mask" in rows:
        heads = np.size(rows["completion_mask"])
    else:
        heads = np.size(rows["target_pos"])
    patches = np.shape(shared["pixel_values"])[0]
    per_image = np.shape(shared["layout"].segment_rows)[1] if patches else 0
    per_token = metrics.flops_per_token(
        model_config.text, model_config.vision, length, training=training,
        patches_per_seq=patches / n, patches_per_image=per_image, train_vision=train_vision,
        lm_head_tokens=heads / n,
    )  # fmt: skip
    return per_token * n * length


# --------------------------------------------------------------------------------------------
# Packing: only the positions that count go through the lm_head


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
# Host -> device


def cast_pixels(tree: dict[str, Any], dtype: Any) -> None:
    """``tree["pixel_values"]`` (a pipeline batch or a step's ``inputs["shared"]``) in the compute
    dtype, on the host, before it travels (half the bytes in bfloat16). The vision tower casts
    them to that dtype first thing, so its output does not change."""
    pv = tree["pixel_values"]
    if np.dtype(pv.dtype) != np.dtype(dtype):
        tree["pixel_values"] = np.asarray(pv).astype(dtype)


def put_inputs(inputs: StepInputs, mesh: Any, rules: Any) -> StepInputs:
    """Host inputs (the global batch) -> device: ``rows`` sharded over the batch axes,
    ``shared`` replicated. On a mesh spanning several processes each process transfers only
    its own shards of the (identical) global host arrays."""
    if mesh is None or mesh.size == 1:
        return jax.tree.map(jnp.asarray, inputs)
    rows = {
        k: sharding.put_global(v, sharding.batch_sharding(mesh, np.ndim(v), rules))
        for k, v in inputs["rows"].items()
    }
    shared = sharding.put_tree_global(inputs["shared"], sharding.replicated(mesh))
    return {"rows": rows, "shared": shared}
