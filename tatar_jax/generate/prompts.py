"""The host side of generation: a prompt batch with its layout (mRoPE positions, rope deltas,
the patches at a patch bucket and its vision layout), computed once where the batch is made,
and the length / patch buckets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import struct

from tatar_jax.models.qwen2_5_vl.vision_layout import (
    VisionBucket,
    VisionLayout,
    fixed_bucket,
    vision_bucket,
    vision_layout,
    window_len,
)


@struct.dataclass
class Vision:
    """A batch's images: ``pixel_values`` (Q, patch_dim) padded to the patch bucket Q and their
    ``layout`` (:class:`VisionLayout` of Q, computed once where the batch is made)."""

    pixel_values: Any
    layout: VisionLayout

    def cast(self, dtype: Any) -> Vision:
        """Pixels in ``dtype`` on the host, before they travel (half the bytes in bfloat16). The
        vision tower casts them to the compute dtype first thing: its output does not change."""
        pv = self.pixel_values
        if np.dtype(pv.dtype) == np.dtype(dtype):
            return self
        return self.replace(pixel_values=np.asarray(pv).astype(dtype))


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


def batch_vision(batch: Mapping[str, Any], vision_cfg: Any) -> Vision:
    """A collated batch's patches (``pixel_values`` (Q, patch_dim), already padded to its patch
    bucket Q) and a fixed layout for Q (one compilation per Q)."""
    pv = np.asarray(batch["pixel_values"], np.float32)
    grid = np.asarray(batch["image_grid_thw"])
    bucket = fixed_bucket(vision_cfg, pv.shape[0], max_frames=max(int(grid.shape[0]), 1))
    return Vision(pixel_values=pv, layout=vision_layout(grid, vision_cfg, bucket))


def prompt_batch(batch: Mapping[str, Any], model_cfg: Any) -> PromptBatch:
    """The prompts of a pipeline batch (``stage="grpo"`` / ``"eval"``, left-padded) with their
    layout: positions and rope deltas as the pipeline computed them, the patches at the
    batch's patch bucket with their layout (:func:`batch_vision`)."""
    return PromptBatch(
        input_ids=np.asarray(batch["input_ids"], np.int32),
        attention_mask=np.asarray(batch["attention_mask"], np.int32),
        position_ids=np.asarray(batch["position_ids"], np.int32),
        rope_deltas=np.asarray(batch["rope_deltas"], np.int32).reshape(-1, 1),
        vision=batch_vision(batch, model_cfg.vision),
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
