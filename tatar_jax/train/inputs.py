"""The step-input contract of both training stages: frozen typed batches, host -> device.

A step's inputs are a frozen :class:`SftBatch` or :class:`GrpoBatch` (``flax.struct``
dataclasses: pytrees whose static fields are part of the jit cache key):

- ``rows`` (:class:`SftRows` / :class:`GrpoRows`): per-row arrays, leading dim N (sharded over the
  batch axes): ``input_ids`` (N, L), ``attention_mask`` (N, L), ``position_ids`` (N, 3, L)
  (row-major so that rows can be sliced into micro-batches), ``feat_index`` (N, L) int32 (the
  image-feature row each image token takes; -1 elsewhere) and the stage's labels: SFT
  ``target_pos`` / ``target_valid`` (N, K); GRPO ``completion_mask`` (N, T), ``advantages`` (N,),
  ``task_id`` (N,), optionally ``old_logps`` / ``ref_logps`` (N, T) (None when absent).
- ``vision`` (:class:`~tatar_jax.generate.Vision`): ``pixel_values`` (Q, patch_dim) padded to
  the batch's patch bucket and its ``VisionLayout``, replicated.

The layout of a pipeline batch (mRoPE positions and rope deltas, the patch bucket Q of its
collation, the vision layout of Q) is computed once, where the batch is made
(:class:`tatar_jax.data.batch.Batch`), and read as it is: ``generate.prompt_batch`` hands the
same objects to the sampler (GRPO, evaluation), :func:`sft_batch` to the SFT update; the GRPO
update takes the rollout's prompts as they are and only appends the completions (their
positions by ``rope.decode_position_ids``, as the sampler's decode loop placed them).
- ``pack_size`` (static int): K lm_head slots when only the positions that count go through
  the lm_head (:func:`pack_size`); 0 = no packing.

Nothing mutates a batch: a stage adds ``ref_logps`` / ``old_logps`` with ``dataclasses.replace``
(``batch.replace(rows=batch.rows.replace(ref_logps=...))``).

The vision tower runs once per *image* of the step and every row gathers its features through
``feat_index``: GRPO scores the G completions of a prompt without running the vision tower G
times, and micro-batches are row slices inside one jitted step. :func:`hidden_states` maps the
contract onto the model's one forward (``Qwen2_5_VLForConditionalGeneration.hidden_states``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from tatar_jax import sharding
from tatar_jax.data.batch import Batch
from tatar_jax.generate import PromptBatch, Vision
from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.train import flop_model, optim


@struct.dataclass
class Rows:
    """The sequences of a step's N rows (prompt + answer / completion)."""

    input_ids: Any  # (N, L) int32
    attention_mask: Any  # (N, L) int32
    position_ids: Any  # (N, 3, L) int32
    feat_index: Any  # (N, L) int32


@struct.dataclass
class SftRows(Rows):
    """SFT rows: the sequence (right-padded) and its K target positions."""

    target_pos: Any  # (N, K) int32
    target_valid: Any  # (N, K) int32


@struct.dataclass
class GrpoRows(Rows):
    """GRPO rows (N = prompts x G, prompt-major; L = Lp + T): prompt + completion."""

    completion_mask: Any  # (N, T) float32: tokens that count (0 on invalid rows)
    advantages: Any  # (N,) float32
    task_id: Any  # (N,) int32 (``prompts.TASK_IDS``)
    old_logps: Any = None  # (N, T) pi_old (mu > 1)
    ref_logps: Any = None  # (N, T) the reference (beta > 0)


@struct.dataclass
class SftBatch:
    """One SFT optimizer step's inputs."""

    rows: SftRows
    vision: Vision
    pack_size: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class GrpoBatch:
    """One GRPO optimizer step's inputs."""

    rows: GrpoRows
    vision: Vision
    pack_size: int = struct.field(pytree_node=False, default=0)


StepBatch = SftBatch | GrpoBatch


# --------------------------------------------------------------------------------------------
# The forward of a step


def image_features(model: nnx.Module, vision: Vision) -> jax.Array:
    """(M, D) features of the step's images in HF order: the vision tower once per step."""
    return model.image_features(vision.pixel_values, vision.layout)


def hidden_states(
    model: nnx.Module,
    rows: Rows,
    vision: Vision,
    features: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states (N, L, D) of ``rows`` through the model's one forward.

    ``features`` (M, D): the step's image features (:func:`image_features`), computed once and
    shared by every micro-batch of the GRPO update and of the reference pass, are handed to
    ``model.hidden_states(image_features=...)`` instead of the pixels. None: the vision tower
    runs inside the forward.
    """
    h, _ = model.hidden_states(
        rows.input_ids,
        rows.attention_mask,
        None if features is not None else vision.pixel_values,
        position_ids=jnp.swapaxes(rows.position_ids, 0, 1),  # (3, N, L)
        vision_layout=vision.layout,
        feat_index=rows.feat_index,
        image_features=features,
    )
    return h


def vision_trains(trainable: Any) -> bool:
    """Whether any vision-tower leaf of a trainable mask (``optim.trainable_mask``) is True."""
    return trainable is None or any(bool(x) for x in jax.tree.leaves(trainable["visual"]))


def vision_features(
    graphdef: nnx.GraphDef, params: Any, vision: Vision, train_vision: bool
) -> tuple[jax.Array, Callable[[jax.Array], Any] | None]:
    """(M, D) image features of the step and, when the vision tower trains, the function
    ``d loss / d features -> d loss / d params["visual"]`` (one backward through the tower)."""

    def features(visual: Any) -> jax.Array:
        p = jax.tree.map(lambda x: x, params)  # a new State: swap the vision subtree in
        p["visual"] = visual
        return image_features(nnx.merge(graphdef, p), vision)

    if not train_vision:
        return jax.lax.stop_gradient(features(params["visual"])), None
    feats, vjp = jax.vjp(features, params["visual"])
    return feats, lambda d_feats: vjp(d_feats.astype(feats.dtype))[0]


def accumulate_with_features(
    loss_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]],
    graphdef: nnx.GraphDef,
    params: Any,
    rows: Rows,
    vision: Vision,
    num_micro: int,
    *,
    train_vision: bool = True,
) -> tuple[jax.Array, Any, Any]:
    """``optim.accumulate_gradients`` of ``loss_fn(params, features, micro_batch_rows)`` over row
    micro-batches with the vision tower run once per step: the features are an input of every
    micro-batch, their gradients are summed and sent back through the tower in one backward.

    ``train_vision=False`` (a frozen tower): no backward through it, zero ``visual`` grads.
    Returns (loss, float32 grads, aux) summed over micro-batches.
    """
    feats, vision_vjp = vision_features(graphdef, params, vision, train_vision)
    loss, (grads, d_feats), aux = optim.accumulate_gradients(
        lambda pf, mb: loss_fn(pf[0], pf[1], mb), (params, feats), rows, num_micro
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


def sft_batch(
    batch: Batch, model_cfg: Any, *, num_micro: int = 1, pack_buckets: int = 0
) -> SftBatch:
    """The SFT step's inputs from a pipeline batch (``stage="sft"``, right-padded): its ids,
    mask and positions (row-major), its vision inputs as they are, the target positions.

    ``pack_buckets > 0`` packs the step's targets (over the rows of each of ``num_micro``
    micro-batches) into one of that many static sizes (:func:`pack_size`): rows of a short IQA
    rationale then do not pay for the K slots a long IAA one needs.
    """
    if batch.label_mask is None:
        raise ValueError("an SFT step needs a batch with label_mask (a stage='sft' pipeline)")
    ids = batch.input_ids
    pos, valid = target_positions(batch.label_mask)
    rows = SftRows(
        input_ids=ids,
        attention_mask=batch.attention_mask,
        position_ids=np.ascontiguousarray(np.swapaxes(batch.position_ids, 0, 1)),
        feat_index=running_feat_index(ids, model_cfg.image_token_id),
        target_pos=pos,
        target_valid=valid,
    )
    vision = batch.layout_for(model_cfg.vision)
    return SftBatch(rows, vision, pack_size(valid, num_micro, pack_buckets))


def expand_prompts(
    prompts: PromptBatch, tokens: np.ndarray, cmask: np.ndarray, g: int, image_token_id: int
) -> dict[str, np.ndarray]:
    """GRPO rows: prompts (B, Lp) + their G completions each (B*G, T, prompt-major) -> the
    update's sequence arrays (B*G, Lp + T): ``input_ids``, ``attention_mask``, ``position_ids``
    (B*G, 3, Lp + T), ``feat_index``. The prompt's image features are indexed, never copied."""
    ids_p = np.asarray(prompts.input_ids, np.int32)
    mask_p = np.asarray(prompts.attention_mask, np.int32)
    pos_p = np.swapaxes(np.asarray(prompts.position_ids, np.int32), 0, 1)  # (B, 3, Lp)
    feat_p = running_feat_index(ids_p, image_token_id)  # indices into the B images' features
    t = tokens.shape[1]
    rep = lambda x: np.repeat(x, g, axis=0)  # noqa: E731
    # Generated token s sits where the sampler's decode loop put it (rope.decode_position_ids).
    deltas = np.asarray(prompts.rope_deltas, np.int32).reshape(-1, 1)
    pos_c = np.asarray(rope.decode_position_ids(mask_p.sum(axis=1), deltas, t), np.int32)
    return {
        "input_ids": np.concatenate([rep(ids_p), tokens.astype(np.int32)], axis=1),
        "attention_mask": np.concatenate([rep(mask_p), cmask.astype(np.int32)], axis=1),
        "position_ids": np.concatenate([rep(pos_p), rep(np.swapaxes(pos_c, 0, 1))], axis=2),
        "feat_index": np.concatenate(
            [rep(feat_p), np.full((len(tokens), t), -1, np.int32)], axis=1
        ),
    }


def grpo_batch(
    prompts: PromptBatch,
    task_id: np.ndarray,
    tokens: np.ndarray,
    cmask: np.ndarray,
    completion_mask: np.ndarray,
    advantages: np.ndarray,
    image_token_id: int,
    *,
    num_micro: int = 1,
    pack_buckets: int = 0,
) -> GrpoBatch:
    """The GRPO update's inputs: ``prompts`` (B, as the rollout sampled them, their vision
    inputs included) with their G completions each (``tokens`` / ``cmask`` (B*G, T),
    prompt-major), the counted ``completion_mask`` (B*G, T), ``advantages`` (B*G,), the
    prompts' ``task_id`` (B,) and the packing size."""
    g = len(tokens) // max(len(prompts.input_ids), 1)
    seq = expand_prompts(prompts, tokens, cmask, g, image_token_id)
    comp = np.asarray(completion_mask, np.float32)
    rows = GrpoRows(
        **seq,
        completion_mask=comp,
        advantages=np.asarray(advantages, np.float32),
        task_id=np.repeat(np.asarray(task_id, np.int32), g),
    )
    return GrpoBatch(rows, prompts.vision, pack_size(comp, num_micro, pack_buckets))


# --------------------------------------------------------------------------------------------
# FLOPs of a step


def step_flops(
    model_config: Any,
    inputs: StepBatch,
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
    rows, vision = inputs.rows, inputs.vision
    n, length = np.shape(rows.input_ids)
    if inputs.pack_size:
        heads = inputs.pack_size * max(int(num_micro), 1)
    elif isinstance(rows, GrpoRows):
        heads = np.size(rows.completion_mask)
    else:
        heads = np.size(rows.target_pos)
    patches = np.shape(vision.pixel_values)[0]
    per_image = np.shape(vision.layout.segment_rows)[1] if patches else 0
    per_token = flop_model.flops_per_token(
        model_config.text, model_config.vision, length, training=training,
        patches_per_seq=patches / n, patches_per_image=per_image, train_vision=train_vision,
        lm_head_tokens=heads / n,
    )  # fmt: skip
    return per_token * n * length


# --------------------------------------------------------------------------------------------
# Packing: only the positions that count go through the lm_head


def pack_size(completion_mask: np.ndarray, num_micro: int = 1, num_buckets: int = 4) -> int:
    """The K lm_head slots of a packed step (a static size); 0 when packing would not help.

    ``completion_mask`` (N, T): the tokens that go through the lm_head (GRPO: counted completion
    tokens; SFT: ``target_valid``). K = the most mask tokens of any of the ``num_micro`` row
    micro-batches, rounded up to one of ``num_buckets`` evenly spaced sizes of a micro-batch's
    ``rows x T`` (so at most ``num_buckets`` compiled shapes of the update).
    ``num_buckets <= 0`` disables packing.
    """
    if num_buckets <= 0:
        return 0
    m = np.asarray(completion_mask) > 0
    n, t = m.shape
    per = m.reshape(max(int(num_micro), 1), -1).sum(axis=1).max()
    full = (n // max(int(num_micro), 1)) * t
    step = -(-full // int(num_buckets))
    k = min(full, max(step, -(-int(per) // step) * step))
    return 0 if k >= full else int(k)


def pack_index(mask: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(k,) row-major flat indices of ``mask``'s nonzero entries (padded with 0) and (k,) bool
    validity of each slot; k >= the count (:func:`pack_size`), static inside jit."""
    flat = mask.reshape(-1) > 0
    idx = jnp.nonzero(flat, size=k, fill_value=0)[0]
    return idx, jnp.arange(k) < jnp.sum(flat)


# --------------------------------------------------------------------------------------------
# Host -> device


def put_inputs(inputs: StepBatch, mesh: Any, rules: Any) -> StepBatch:
    """Host inputs (the global batch) -> device: ``rows`` sharded over the batch axes,
    ``vision`` replicated. On a mesh spanning several processes each process transfers only
    its own shards of the (identical) global host arrays."""
    if mesh is None or mesh.size == 1:
        return jax.tree.map(jnp.asarray, inputs)
    rows = jax.tree.map(
        lambda v: sharding.put_global(v, sharding.batch_sharding(mesh, np.ndim(v), rules)),
        inputs.rows,
    )
    vision = sharding.put_tree_global(inputs.vision, sharding.replicated(mesh))
    return inputs.replace(rows=rows, vision=vision)
