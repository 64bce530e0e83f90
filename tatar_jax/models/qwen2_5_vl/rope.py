"""Multimodal rotary position embedding (mRoPE) of the Qwen2.5-VL decoder.

Two halves:

- host side (numpy): :func:`get_rope_index` computes the 3D (temporal, height, width) position ids
  and the per-row rope delta exactly as transformers' ``Qwen2_5_VLModel.get_rope_index``; the
  data pipeline calls it too, so positions are computed once per example, outside ``jax.jit``.
  :func:`text_position_ids` is the text-only case (1D positions repeated on the 3 axes).
- device side (jnp): :func:`mrope_cos_sin` turns (3, B, L) positions into cos/sin tables
  (float32) with ``mrope_section`` chunking (NOT interleaving): frequency band ``i`` of chunk
  ``c`` uses the position of axis ``c % 3``; :func:`apply_rope`; :func:`decode_position_ids`
  gives the positions of generated tokens from the rope delta.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tatar_jax.models.layers import apply_rotary, cos_sin, inv_frequencies

__all__ = [
    "apply_rope",
    "decode_position_ids",
    "get_rope_index",
    "mrope_cos_sin",
    "text_position_ids",
]


def _merge_size(cfg: Any) -> int:
    m = getattr(cfg, "spatial_merge_size", None)
    return int(m if m is not None else cfg.vision.spatial_merge_size)


def _tokens_per_second(cfg: Any) -> float:
    t = getattr(cfg, "tokens_per_second", None)
    if t is None and hasattr(cfg, "vision"):
        t = cfg.vision.tokens_per_second
    return float(2 if t is None else t)


def _vision_positions(start: int, thw: np.ndarray, merge: int, interval: float) -> np.ndarray:
    """(3, t*h*w/merge**2) positions of one image/video, offset by ``start`` (HF order)."""
    t, h, w = int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge
    tt = (np.arange(t) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(tt, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def get_rope_index(
    input_ids: Any,
    image_grid_thw: Any,
    attention_mask: Any,
    cfg: Any,
    *,
    video_grid_thw: Any = None,
    second_per_grid_ts: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3D mRoPE positions and rope deltas, equal to transformers' ``get_rope_index``.

    Args:
      input_ids: (B, L) int; image/video tokens are runs of ``cfg.image_token_id`` /
        ``cfg.video_token_id``, one run per image (the chat template wraps each in
        vision_start/vision_end tokens).
      image_grid_thw: (num_images, 3) int or None; images in row-major order over the batch.
      attention_mask: (B, L) {0,1} or None (all ones). Padding (left or right) gets position 0.
      cfg: needs ``image_token_id``, ``video_token_id`` and ``spatial_merge_size`` (a
        :class:`Qwen2_5_VLConfig` or any object with those attributes); ``tokens_per_second``
        for videos.
      video_grid_thw, second_per_grid_ts: videos (num_videos, 3) and seconds per temporal patch.

    Returns:
      position_ids (3, B, L) int32 and rope_deltas (B, 1) int32 with
      ``delta = max(position) + 1 - num_valid_tokens`` (the next token's position is
      ``num_valid_tokens + delta``).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    b, length = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    merge = _merge_size(cfg)
    grids = {
        1: iter(
            np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
        ),
        2: iter(
            np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw)
        ),
    }
    seconds = iter([] if second_per_grid_ts is None else np.asarray(second_per_grid_ts).tolist())
    tps = _tokens_per_second(cfg)
    positions = np.zeros((3, b, length), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    for row in range(b):
        valid = ids[row][mask[row]]
        kind = np.where(valid == cfg.image_token_id, 1, np.where(valid == cfg.video_token_id, 2, 0))
        pieces: list[np.ndarray] = []
        cur = 0
        start = 0
        n = len(valid)
        while start < n:
            end = start + 1
            while end < n and kind[end] == kind[start]:
                end += 1
            k = int(kind[start])
            if k == 0:
                pieces.append(np.broadcast_to(np.arange(end - start) + cur, (3, end - start)))
                cur += end - start
            else:
                name = "image" if k == 1 else "video"
                try:
                    thw = next(grids[k])
                except StopIteration:
                    raise ValueError(
                        f"row {row}: more {name} token runs than {name}_grid_thw entries"
                    ) from None
                if k == 2:
                    try:
                        interval = tps * float(next(seconds))
                    except StopIteration:
                        interval = tps * 1.0
                else:
                    interval = 1.0
                pos = _vision_positions(cur, thw, merge, interval)
                if pos.shape[1] != end - start:
                    raise ValueError(
                        f"row {row}: a run of {end - start} {name} tokens at valid position "
                        f"{start} does not match grid_thw {tuple(int(x) for x in thw)} "
                        f"({pos.shape[1]} tokens after {merge}x{merge} merging)"
                    )
                pieces.append(pos)
                cur += max(int(thw[1]), int(thw[2])) // merge
            start = end
        if pieces:
            llm = np.concatenate(pieces, axis=1)
            positions[:, row, mask[row]] = llm
            deltas[row, 0] = llm.max() + 1 - n
    for k, name in ((1, "image"), (2, "video")):
        left = sum(1 for _ in grids[k])
        if left:
            raise ValueError(f"{left} {name}_grid_thw entries have no {name} tokens in input_ids")
    return positions.astype(np.int32), deltas.astype(np.int32)


def text_position_ids(attention_mask: Any) -> np.ndarray:
    """(B, L) mask → (3, B, L) int32 text-only positions: ``cumsum(mask) - 1``, 0 on padding."""
    mask = np.asarray(attention_mask) != 0
    pos = np.where(mask, np.cumsum(mask, axis=-1) - 1, 0)
    return np.broadcast_to(pos[None], (3, *pos.shape)).astype(np.int32)


def decode_position_ids(num_valid: jax.Array, rope_deltas: jax.Array, steps: int = 1) -> jax.Array:
    """Positions of the next ``steps`` generated tokens (jnp, jittable).

    num_valid (B,) int: non-padding tokens already in the sequence (prompt + generated so far);
    rope_deltas (B, 1) or (B,) from :func:`get_rope_index`. Returns (3, B, steps) int32, equal to
    transformers' decoding positions ``text_position + rope_delta``.
    """
    deltas = jnp.reshape(rope_deltas, (-1, 1)).astype(jnp.int32)
    pos = jnp.asarray(num_valid, jnp.int32)[:, None] + jnp.arange(steps, dtype=jnp.int32)[None]
    return jnp.broadcast_to((pos + deltas)[None], (3, *pos.shape))


def mrope_cos_sin(
    position_ids: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """position_ids (3, B, L) int → cos, sin (B, L, head_dim) float32.

    Frequency band ``j`` (of head_dim/2) belongs to chunk ``c`` of ``mrope_section`` and uses the
    position of axis ``c % 3`` (t, h, w); the table is then duplicated ([f, f]) as in HF.
    """
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2={head_dim // 2}")
    axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
    pos = jnp.moveaxis(jnp.asarray(position_ids), 0, -1)[..., axis]  # (B, L, head_dim/2)
    return cos_sin(pos.astype(jnp.float32) * inv_frequencies(head_dim, theta))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, L, H, hd); cos/sin (B, L, hd) float32 → rotated x in x.dtype (math in float32)."""
    return apply_rotary(x, cos[:, :, None, :], sin[:, :, None, :])
