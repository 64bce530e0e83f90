"""Host-side (numpy) index computation for the Qwen2.5-VL vision tower.

Everything that depends on the image sizes (``grid_thw``) is computed here, before ``jax.jit``,
into a :class:`VisionLayout` of small int/bool arrays whose *shapes* are the only thing the
compiled forward sees. Batches whose layouts have equal shapes share one compilation.

Internal order. The tower works on ``P = num_patches_padded`` rows in *window order*: HF's
``get_window_index`` permutes the ``spatial_merge_size**2``-patch merge units so that the units of
each attention window are contiguous. Real rows come first (``N = sum(t*h*w)``), padding rows
last (rows ``N..P-1``; they read zero/padding pixel rows and never reach a real token).

Attention groups. Window blocks attend inside windows and full-attention blocks inside each frame
(HF: one segment of ``h*w`` patches per frame of each image). Both are contiguous runs of internal
rows; each kind is gathered into padded groups ``(G, L)``:

- windows: ``(num_windows_padded, window_len)`` with ``window_len = (window_size // patch_size //
  spatial_merge_size)**2 * spatial_merge_size**2`` (64 for the released checkpoints);
- segments (frames): ``(num_segments_padded, segment_len_padded)``.

so attention costs ``G * L**2`` per kind, never ``P**2`` over the whole batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class VisionLayout(NamedTuple):
    """Index arrays for one call of the vision tower (numpy or jax arrays, int32/bool).

    Shapes (``P`` patch budget, ``M = P // spatial_merge_size**2`` merged-token budget, ``W``/``Lw``
    windows, ``S``/``Ls`` segments):

    - ``patch_index`` (P,) int32: internal row ``r`` reads input patch row ``patch_index[r]``.
    - ``pos_ids`` (P, 2) int32: (h, w) rotary position of internal row ``r`` (0 for padding).
    - ``window_rows`` (W, Lw) int32: internal rows of each window (padding slots point at row 0).
    - ``window_valid`` (W, Lw) bool: which slots of ``window_rows`` are real.
    - ``window_slot`` (P,) int32: flat slot ``g * Lw + j`` holding internal row ``r``; ``W * Lw``
      (an all-zero extra slot) for padding rows.
    - ``segment_rows`` / ``segment_valid`` (S, Ls) and ``segment_slot`` (P,): the same for the
      full-attention segments (one per frame of each image).
    - ``merged_index`` (M,) int32: output token ``j`` (HF order: image after image) is merged
      internal unit ``merged_index[j]``.
    - ``merged_valid`` (M,) bool: which output tokens are real (the first ``sum(t*h*w) // 4``).
    """

    patch_index: Any
    pos_ids: Any
    window_rows: Any
    window_valid: Any
    window_slot: Any
    segment_rows: Any
    segment_valid: Any
    segment_slot: Any
    merged_index: Any
    merged_valid: Any


class VisionBucket(NamedTuple):
    """Static sizes of a :class:`VisionLayout` (what ``jax.jit`` specialises on)."""

    num_patches: int
    num_windows: int
    num_segments: int
    segment_len: int


def _window_units(cfg: Any) -> int:
    """Merge units along one side of an attention window: ``window_size // merge // patch``."""
    units = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    if units < 1:
        raise ValueError(
            f"window_size={cfg.window_size} is smaller than patch_size*spatial_merge_size="
            f"{cfg.patch_size * cfg.spatial_merge_size}"
        )
    return units


def window_len(cfg: Any) -> int:
    """Patches per (full) attention window: ``(window_size // patch // merge)**2 * merge**2``."""
    return _window_units(cfg) ** 2 * cfg.spatial_merge_size**2


def _segment_lengths(grid: np.ndarray) -> list[int]:
    """Patches of each full-attention segment: one ``h * w`` segment per frame of each image."""
    return [int(h * w) for t, h, w in grid.tolist() for _ in range(t)]


def _check_grid(grid_thw: Any, cfg: Any) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(
            f"grid_thw must have shape (num_images, 3) with num_images >= 1, got {grid.shape}"
        )
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integer, got dtype {grid.dtype}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw row {i} = {(t, h, w)}: all entries must be >= 1")
        if h % m or w % m:
            raise ValueError(
                f"grid_thw row {i} = {(t, h, w)}: h and w must be multiples of "
                f"spatial_merge_size={m}"
            )
    return grid.astype(np.int64)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _windows(grid: np.ndarray, cfg: Any) -> tuple[np.ndarray, list[int]]:
    """HF ``get_window_index``: unit permutation (U,) and window lengths in patches.

    Windows are laid out per frame, row-major over the window grid, units row-major inside a
    window; windows that fall entirely outside the image are dropped (HF pads by a full window
    when the grid divides evenly and then removes the empty windows).
    """
    m = cfg.spatial_merge_size
    vw = _window_units(cfg)
    unit = m * m
    order: list[np.ndarray] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grid.tolist():
        lh, lw = h // m, w // m
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        for ti in range(t):
            for wi in range(0, lh, vw):
                for wj in range(0, lw, vw):
                    units = index[ti, wi : wi + vw, wj : wj + vw].reshape(-1)
                    order.append(units + offset)
                    lengths.append(units.size * unit)
        offset += t * lh * lw
    return np.concatenate(order), lengths


def hf_position_ids(grid_thw: Any, spatial_merge_size: int) -> np.ndarray:
    """HF ``get_vision_position_ids``: (N, 2) (h, w) positions in input patch order.

    Input patches of a frame come in merge-block order (block row, block col, in-row, in-col).
    """
    m = spatial_merge_size
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def hf_window_index(grid_thw: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """HF ``get_vision_window_index``: (window_index (U,), cu_window_seqlens (num_windows + 1,))."""
    grid = _check_grid(grid_thw, cfg)
    order, lengths = _windows(grid, cfg)
    return order, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _groups(
    starts: list[int], lengths: list[int], num_groups: int, group_len: int, num_rows: int, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(lengths) > num_groups:
        raise ValueError(f"{len(lengths)} {what}s do not fit num_{what}s_padded={num_groups}")
    if max(lengths) > group_len:
        raise ValueError(f"a {what} of {max(lengths)} patches does not fit {what}_len={group_len}")
    rows = np.zeros((num_groups, group_len), np.int32)
    valid = np.zeros((num_groups, group_len), bool)
    slot = np.full((num_rows,), num_groups * group_len, np.int32)
    for g, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        rows[g, :n] = np.arange(s, s + n)
        valid[g, :n] = True
        slot[s : s + n] = g * group_len + np.arange(n)
    return rows, valid, slot


def vision_bucket(
    grid_thw: Any,
    cfg: Any,
    num_patches_padded: int | VisionBucket | None = None,
    *,
    num_windows_padded: int | None = None,
    num_segments_padded: int | None = None,
    segment_len_padded: int | None = None,
) -> VisionBucket:
    """Static sizes for ``grid_thw`` (``num_patches_padded`` may be a whole :class:`VisionBucket`,
    which is then checked and returned); unspecified sizes are rounded up so that similar batches
    share a compilation: patches exact (None) or as given, windows and segments to the next power
    of two, the segment length to a multiple of :func:`window_len`.
    """
    if isinstance(num_patches_padded, VisionBucket):
        if (num_windows_padded, num_segments_padded, segment_len_padded) != (None, None, None):
            raise ValueError("pass either a VisionBucket or separate sizes, not both")
        num_patches_padded, num_windows_padded, num_segments_padded, segment_len_padded = (
            num_patches_padded
        )
    grid = _check_grid(grid_thw, cfg)
    unit = cfg.spatial_merge_size**2
    n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    _, wins = _windows(grid, cfg)
    segs = _segment_lengths(grid)
    lw = window_len(cfg)
    p = n if num_patches_padded is None else int(num_patches_padded)
    if p < n or p % unit:
        raise ValueError(
            f"num_patches_padded={p} must be >= the {n} real patches and a multiple of "
            f"spatial_merge_size**2={unit}"
        )
    w = _next_pow2(len(wins)) if num_windows_padded is None else int(num_windows_padded)
    s = _next_pow2(len(segs)) if num_segments_padded is None else int(num_segments_padded)
    if segment_len_padded is None:
        ls = min(-(-max(segs) // lw) * lw, max(p, max(segs)))
    else:
        ls = int(segment_len_padded)
    return VisionBucket(p, w, s, ls)


def fixed_bucket(
    cfg: Any, num_patches: int, max_frames: int, max_patches_per_frame: int | None = None
) -> VisionBucket:
    """A bucket that fits *every* ``grid_thw`` with at most ``num_patches`` patches in total, at
    most ``max_frames`` frames (images count one frame each, a video ``t``) and at most
    ``max_patches_per_frame`` patches per frame (default ``num_patches``): one compilation for a
    whole run.

    Windows: a frame of ``a x b`` merge units has ``ceil(a/v) * ceil(b/v)`` windows (``v`` units per
    window side) ``<= (ab + (v-1)(a+b) + (v-1)**2) / v**2``, and ``a + b <= ab + 1``, so ``n``
    frames of ``U`` units in total have at most ``(U + n (v-1)) / v`` windows, thin images
    included. Window attention costs ``W * window_len**2`` per head, small next to the MLPs even
    at this bound.
    """
    unit = cfg.spatial_merge_size**2
    if num_patches < unit or num_patches % unit:
        raise ValueError(
            f"num_patches={num_patches} must be a positive multiple of spatial_merge_size**2={unit}"
        )
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    v = _window_units(cfg)
    lw = window_len(cfg)
    per_frame = num_patches if max_patches_per_frame is None else int(max_patches_per_frame)
    per_frame = min(per_frame, num_patches)
    frames = min(int(max_frames), num_patches // unit)
    windows = (num_patches // unit + frames * (v - 1)) // v
    seg_len = min(-(-per_frame // lw) * lw, num_patches)
    return VisionBucket(num_patches, windows, frames, seg_len)


def vision_layout(grid_thw: Any, cfg: Any, bucket: VisionBucket | None = None) -> VisionLayout:
    """Computes the :class:`VisionLayout` (numpy) of ``grid_thw`` (num_images, 3) for ``cfg``.

    ``cfg`` needs ``spatial_merge_size``, ``patch_size`` and ``window_size``. ``bucket`` gives the
    static sizes (from :func:`vision_bucket` or :func:`fixed_bucket`; checked against the grid);
    None means ``vision_bucket(grid_thw, cfg)``.

    Pass the result to the jitted forward as an *argument* (not a closed-over constant), so
    layouts of equal shapes share one compilation.
    """
    grid = _check_grid(grid_thw, cfg)
    p, nw, ns, ls = vision_bucket(grid, cfg, bucket)
    unit = cfg.spatial_merge_size**2
    order, win_lengths = _windows(grid, cfg)
    n = order.size * unit

    patch_index = np.arange(p, dtype=np.int32)
    patch_index[:n] = (order[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    pos_ids = np.zeros((p, 2), np.int32)
    pos_ids[:n] = hf_position_ids(grid, cfg.spatial_merge_size)[patch_index[:n]]

    win_starts = np.concatenate([[0], np.cumsum(win_lengths)[:-1]]).tolist()
    window_rows, window_valid, window_slot = _groups(
        win_starts, win_lengths, nw, window_len(cfg), p, "window"
    )
    # The window permutation never crosses a frame, so frames stay contiguous in window order.
    seg_lengths = _segment_lengths(grid)
    seg_starts = np.concatenate([[0], np.cumsum(seg_lengths)[:-1]]).tolist()
    segment_rows, segment_valid, segment_slot = _groups(
        seg_starts, seg_lengths, ns, ls, p, "segment"
    )

    m = p // unit
    merged_index = np.arange(m, dtype=np.int32)
    merged_index[: order.size] = np.argsort(order)
    merged_valid = np.arange(m) < order.size
    return VisionLayout(
        patch_index=patch_index,
        pos_ids=pos_ids,
        window_rows=window_rows,
        window_valid=window_valid,
        window_slot=window_slot,
        segment_rows=segment_rows,
        segment_valid=segment_valid,
        segment_slot=segment_slot,
        merged_index=merged_index,
        merged_valid=merged_valid,
    )
