"""The host side of generation: a prompt batch with its layout (mRoPE positions, rope deltas,
the patches at a patch bucket and its vision layout), computed once where the batch is made
(:mod:`tatar_jax.data.batch`; :meth:`Sampler.prepare` for raw prompts), and the length / patch
buckets of raw prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import struct

from tatar_jax.data.batch import Batch, Vision
from tatar_jax.models.qwen2_5_vl.vision_layout import VisionBucket, vision_bucket, window_len

__all__ = ["PromptBatch", "Vision", "next_bucket", "pad_rows", "patch_bucket", "prompt_batch"]


@struct.dataclass
class PromptBatch:
    """Left-padded prompts with their host-side layout, computed once where the batch is made
    and consumed as it is by :meth:`Sampler.generate_prompts` (and by the GRPO update):
    ``input_ids`` / ``attention_mask`` (B, L) int32, ``position_ids`` (3, B, L) int32 mRoPE
    positions (0 on padding), ``rope_deltas`` (B, 1) int32, ``vision`` (None: text only)."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    rope_deltas: Any
    vision: Vision | None = None

    def arrays(self) -> tuple[Any, ...]:
        """The prefill's host arguments ``(ids, mask, positions, deltas, pixels, layout)``
        (:meth:`Sampler.lower`)."""
        v = self.vision
        return (
            self.input_ids, self.attention_mask, self.position_ids, self.rope_deltas,
            None if v is None else v.pixel_values, None if v is None else v.layout,
        )  # fmt: skip


def prompt_batch(batch: Batch, model_cfg: Any) -> PromptBatch:
    """The prompts of a pipeline batch (``stage="grpo"`` / ``"eval"``, left-padded) with their
    layout exactly as the pipeline made it: the batch's own ids, mask, positions, rope deltas
    and vision inputs (the same objects; nothing is recomputed or re-bucketed). The batch's
    vision layout must have been made for ``model_cfg.vision`` (:meth:`Batch.layout_for`)."""
    if batch.padding_side != "left":
        raise ValueError(
            f"prompts must be left-padded for generation; this batch is {batch.padding_side}-"
            "padded (an SFT pipeline batch?)"
        )
    return PromptBatch(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        rope_deltas=batch.rope_deltas,
        vision=batch.layout_for(model_cfg.vision),
    )


def next_bucket(n: int, buckets: Sequence[int] | None, multiple: int) -> int:
    """Smallest entry of ``buckets`` >= n, or n rounded up to a multiple of ``multiple``."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
    return -(-int(n) // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def patch_bucket(grid: np.ndarray, vcfg: Any, patch_buckets: Sequence[int] | None) -> VisionBucket:
    """Patch budget from ``patch_buckets`` (else the next power of two), windows/segments as
    :func:`vision_bucket` rounds them, the segment length rounded up to a power-of-two number of
    windows so images of similar size share a program."""
    unit = vcfg.spatial_merge_size**2
    n = int(np.prod(grid, axis=-1).sum())
    p = next_bucket(n, patch_buckets, unit) if patch_buckets else max(_pow2(n), unit)
    if p % unit:
        raise ValueError(f"patch bucket {p} is not a multiple of spatial_merge_size**2={unit}")
    b = vision_bucket(grid, vcfg, p)
    units = -(-b.segment_len // window_len(vcfg))
    seg_len = min(_pow2(units) * window_len(vcfg), max(p, b.segment_len))
    return VisionBucket(p, b.num_windows, b.num_segments, seg_len)


def pad_rows(prompts: PromptBatch, n: int, pad_id: int) -> PromptBatch:
    """Appends ``n`` rows holding one valid pad token (left-padded, no image tokens, text
    positions: 0 at the last slot; rope delta 0)."""
    ids = np.asarray(prompts.input_ids)
    length = ids.shape[1]
    extra_mask = np.zeros((n, length), np.int32)
    extra_mask[:, -1] = 1
    cat = lambda a, b: np.concatenate([np.asarray(a), b.astype(np.asarray(a).dtype)])  # noqa: E731
    pos = np.asarray(prompts.position_ids)
    return prompts.replace(
        input_ids=cat(ids, np.full((n, length), pad_id)),
        attention_mask=cat(prompts.attention_mask, extra_mask),
        position_ids=np.concatenate([pos, np.zeros((3, n, length), pos.dtype)], axis=1),
        rope_deltas=cat(prompts.rope_deltas, np.zeros((n, 1))),
    )
