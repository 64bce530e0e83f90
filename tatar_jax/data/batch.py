"""The pipeline's batch: one frozen, typed value holding its whole host-side layout.

A :class:`Batch` is made once, where the batch is made (``examples.collate``; the multi-process
merge ``multihost.global_batch`` makes the global one), and consumed as it is: the sampler takes
its ids, mask, mRoPE positions, rope deltas and vision inputs (``generate.prompt_batch`` only
regroups the same objects), the GRPO update takes the rollout's prompts as they are, the SFT
update (``train.inputs.sft_batch``) and evaluation read the same fields. Nothing downstream
strips its padding, re-buckets its patches or recomputes its positions.

Shapes (``B`` rows, ``L`` the sequence bucket, ``Q`` the patch bucket, ``I = B`` images):

=================  ====================  ===================================================
field              shape / dtype         meaning
=================  ====================  ===================================================
input_ids          (B, L) int32          padded with the tokenizer's pad id
attention_mask     (B, L) int32          1 on real tokens
position_ids       (3, B, L) int32       mRoPE positions (t, h, w) of each row, 0 on padding
rope_deltas        (B, 1) int32          mRoPE delta of each row (``get_rope_index``)
vision             :class:`Vision`       ``pixel_values`` (Q, 1176) f32: the rows' patches in
                                         row order, then zeros; ``layout`` for Q (None when
                                         the batch was made without a vision config)
image_grid_thw     (I, 3) int32          patch grid of each row's image
label_mask         (B, L) int32 | None   SFT: 1 on trained tokens (0 on invalid rows)
meta               :class:`RowMeta`      per-row labels, provenance and validity
num_patches        int (static)          real patches at the front of ``pixel_values``
padding_side       str (static)          "left" (generation) or "right" (SFT)
vision_config      static                the vision config the layout was made for
stats              :class:`ReadStats`    (static) the pipeline's skip counters
process_rows       (start, stop) static  this host's rows of a global batch (None: one host)
=================  ====================  ===================================================

``label_mask[b, i] = 1`` means token ``input_ids[b, i]`` is a target: it is predicted from the
logits at ``i - 1`` (the loss shifts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from flax import struct

if TYPE_CHECKING:
    from tatar_jax.models.qwen2_5_vl.vision_layout import VisionLayout

IGNORE_INDEX = -100


@struct.dataclass
class Vision:
    """A batch's images: ``pixel_values`` (Q, patch_dim) padded to the patch bucket Q and their
    ``layout`` (:class:`VisionLayout` of Q, computed once where the batch is made)."""

    pixel_values: Any
    layout: VisionLayout | None

    def cast(self, dtype: Any) -> Vision:
        """Pixels in ``dtype`` on the host, before they travel (half the bytes in bfloat16). The
        vision tower casts them to the compute dtype first thing: its output does not change."""
        pv = self.pixel_values
        if np.dtype(pv.dtype) == np.dtype(dtype):
            return self
        return self.replace(pixel_values=np.asarray(pv).astype(dtype))


def vision_inputs(pixel_values: np.ndarray, grid_thw: np.ndarray, vision_cfg: Any) -> Vision:
    """The patches (``pixel_values`` (Q, patch_dim), already padded to their patch bucket Q) and
    a fixed layout for Q and the batch's image count (one compilation per Q); ``vision_cfg``
    None: no layout."""
    # Imported here: grain's worker processes load this module and need no model code.
    from tatar_jax.models.qwen2_5_vl.vision_layout import fixed_bucket, vision_layout

    grid = np.asarray(grid_thw)
    if vision_cfg is None:
        return Vision(pixel_values=pixel_values, layout=None)
    q = np.shape(pixel_values)[0]
    bucket = fixed_bucket(vision_cfg, q, max_frames=max(int(grid.shape[0]), 1))
    return Vision(pixel_values=pixel_values, layout=vision_layout(grid, vision_cfg, bucket))


@struct.dataclass
class RowMeta:
    """Per-row labels and provenance (``B`` rows). ``valid`` is the one row-validity field:
    False on padding rows (a final evaluation batch, a host whose records ran out) and on
    evaluation fillers; such rows get no SFT labels, no GRPO loss or reward statistics."""

    task_id: Any  # (B,) int32, prompts.TASK_IDS
    gt_100: Any  # (B,) float32, NaN when unlabeled (scoring)
    row_id: Any  # (B,) int64, the record's manifest row
    valid: Any  # (B,) bool
    epoch: Any  # (B,) int32, the epoch each row was read in
    think_dropped: Any = None  # (B,) bool, SFT: thought dropout fired
    # Host-only strings. In a global batch of several processes they are this host's rows
    # (``Batch.process_rows``), not the global batch's.
    dataset: tuple[str, ...] = struct.field(pytree_node=False, default=())
    image_path: tuple[str, ...] = struct.field(pytree_node=False, default=())


class SkippedRead(NamedTuple):
    """A record this batch skipped (``bad_record="skip"``): where, why, its global slot."""

    where: str
    reason: str
    slot: int


class ReadStats(NamedTuple):
    """The pipeline's skip counters as of a batch (this host's)."""

    num_skipped: int = 0  # failed reads so far, repeats included
    num_skipped_rows: int = 0  # manifest rows the loaders rejected
    skipped_by_dataset: tuple[tuple[str, int], ...] = ()  # distinct records per dataset
    skipped: tuple[SkippedRead, ...] = ()  # this batch's
    batch_index: int = -1  # batches this iterator yielded before this one


@struct.dataclass
class Batch:
    """One pipeline batch with its layout (module docstring: fields and shapes)."""

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    rope_deltas: Any
    vision: Vision
    image_grid_thw: Any
    meta: RowMeta
    label_mask: Any = None
    num_patches: int = struct.field(pytree_node=False, default=0)
    padding_side: str = struct.field(pytree_node=False, default="left")
    vision_config: Any = struct.field(pytree_node=False, default=None)
    stats: ReadStats = struct.field(pytree_node=False, default=ReadStats())
    process_rows: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.input_ids)[0])

    @property
    def labels(self) -> np.ndarray | None:
        """(B, L) int32 HF-style labels: ``input_ids`` on ``label_mask``, -100 elsewhere (SFT)."""
        if self.label_mask is None:
            return None
        return np.where(self.label_mask == 1, self.input_ids, IGNORE_INDEX).astype(np.int32)

    def layout_for(self, vision_cfg: Any) -> Vision:
        """``vision`` after checking that its layout was made for ``vision_cfg`` (the model's):
        a batch made without one, or for another geometry, is an error, never re-laid out."""
        if self.vision.layout is None or self.vision_config is None:
            raise ValueError(
                "this batch has no vision layout: make the pipeline with "
                "PipelineOptions(vision=<the model config's vision>) (collate(vision_config=...))"
            )
        if _geometry(self.vision_config) != _geometry(vision_cfg):
            raise ValueError(
                f"the batch's vision layout was made for (patch, merge, window) "
                f"{_geometry(self.vision_config)}, the model has {_geometry(vision_cfg)}"
            )
        return self.vision


def _geometry(vision_cfg: Any) -> tuple[int, int, int]:
    """What a vision layout depends on."""
    return (vision_cfg.patch_size, vision_cfg.spatial_merge_size, vision_cfg.window_size)
