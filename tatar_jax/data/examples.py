"""Model inputs for each stage, one example at a time, and their collation into bucketed batches.

An *example* is a dict of unpadded numpy arrays plus metadata, built on the host (in a grain
worker). A *batch* is a frozen :class:`~tatar_jax.data.batch.Batch` of padded arrays whose shapes
come from a few buckets, so that jit sees few distinct shapes, made by :func:`collate`.

Example keys (``L`` tokens, ``P`` patches of the image, ``N = P / merge**2`` image tokens):

=================  ================  =======================================================
key                shape / dtype     meaning
=================  ================  =======================================================
input_ids          (L,) int32        chat-rendered prompt [+ SFT target], image expanded
position_ids       (3, L) int32      3D mRoPE positions (temporal, height, width)
rope_delta         () int32          mRoPE delta (``get_rope_index`` of the unpadded row)
pixel_values       (P, 1176) f32     patches of the image (``image.preprocess_image``)
grid_thw           (3,) int32        patch grid of the image
label_mask         (L,) int32        SFT only: 1 on assistant content and its ``<|im_end|>``
task_id            () int32          0 = IQA, 1 = IAA
gt_100             () float32        ground truth on 0-100
row_id             () int64          row of the record in its manifest
dataset, image_path  str
=================  ================  =======================================================

SFT labels come from explicit character spans of the rendered conversation (the assistant
content and the closing ``<|im_end|>``), mapped to tokens through the tokenizer's offsets; they
never depend on padding (fixes B3) and always include end-of-turn (fixes B4).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tatar_jax import answer_format
from tatar_jax.data import prompts
from tatar_jax.data.batch import Batch, RowMeta, vision_inputs
from tatar_jax.data.tokenizer import Tokenizer

PATCH_DIM = 1176  # 3 channels x 2 (temporal) x 14 x 14

RopeIndexFn = Callable[..., tuple[np.ndarray, np.ndarray]]


class ExampleError(ValueError):
    """An example that cannot be built; the message names the record."""


# --------------------------------------------------------------------------------------------
# Positions


def _default_rope_index_fn() -> RopeIndexFn:
    # Imported lazily: the data path only needs this one host-side helper from the model package.
    from tatar_jax.models.qwen2_5_vl.rope import get_rope_index

    return get_rope_index


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """The fields of the model config that ``get_rope_index`` reads (token ids, merge size)."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    spatial_merge_size: int = 2
    tokens_per_second: int = 2

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, spatial_merge_size: int = 2) -> RopeConfig:
        return cls(
            image_token_id=tok.image_pad_id,
            video_token_id=tok.video_pad_id,
            vision_start_token_id=tok.vision_start_id,
            spatial_merge_size=spatial_merge_size,
        )


def rope_positions(
    input_ids: np.ndarray,
    grid_thw: np.ndarray,
    rope_cfg: Any,
    rope_index_fn: RopeIndexFn | None = None,
) -> tuple[np.ndarray, int]:
    """3D positions (3, L) int32 and the delta of one unpadded row, via ``get_rope_index``."""
    fn = rope_index_fn or _default_rope_index_fn()
    ids = np.asarray(input_ids, np.int64)[None]
    pos, delta = fn(ids, np.asarray(grid_thw, np.int64)[None], np.ones_like(ids), rope_cfg)
    return np.asarray(pos)[:, 0].astype(np.int32), int(np.asarray(delta).reshape(-1)[0])


# --------------------------------------------------------------------------------------------
# Targets


def rewrite_answer(target: str, gt_100: float) -> str:
    """Every ``<answer>…</answer>`` set to ``gt_100`` with two decimals; appended if none."""
    return answer_format.replace_answers(target, answer_format.score_text(gt_100))


def drop_think_draw(
    seed: int, epoch: int, row_id: int, task: str, p: float, dataset: str = "", visit: int = 0
) -> bool:
    """Whether thought dropout fires for (seed, epoch, dataset, task, row, visit).

    Reproducible (a pure function of its arguments, whatever the worker/batch layout) and
    independent across rows, epochs, datasets and repeated visits within an epoch.
    """
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    key = [
        int(seed) & 0xFFFFFFFF,
        int(epoch),
        prompts.TASK_IDS[task],
        int(row_id) & 0xFFFFFFFFFFFF,
        zlib.crc32(dataset.encode()),
        int(visit),
        0x7A7A,
    ]
    return bool(np.random.default_rng(key).random() < p)


# --------------------------------------------------------------------------------------------
# Examples


def _check_image(pixel_values: np.ndarray, grid_thw: Sequence[int], merge: int, where: str):
    pv = np.asarray(pixel_values, np.float32)
    thw = np.asarray(grid_thw, np.int32).reshape(3)
    if pv.ndim != 2 or pv.shape[1] != PATCH_DIM or pv.shape[0] != int(np.prod(thw)):
        raise ExampleError(
            f"{where}: pixel_values {pv.shape} do not match grid_thw {tuple(thw)} "
            f"(expected ({int(np.prod(thw))}, {PATCH_DIM}))"
        )
    return pv, thw, prompts.num_image_tokens(thw, merge)


def _expand_ids(
    ids: list[int], image_pad_id: int, n_image: int, where: str
) -> tuple[np.ndarray, int]:
    hits = [i for i, t in enumerate(ids) if t == image_pad_id]
    if len(hits) != 1:
        raise ExampleError(f"{where}: rendered prompt has {len(hits)} image placeholders, need 1")
    at = hits[0]
    out = np.empty(len(ids) - 1 + n_image, np.int32)
    out[:at] = ids[:at]
    out[at : at + n_image] = image_pad_id
    out[at + n_image :] = ids[at + 1 :]
    return out, at


def _meta(task: str, gt_100: float, dataset: str, image_path: str, row_id: int) -> dict:
    if task not in prompts.TASK_IDS:
        raise ExampleError(f"{dataset}:{row_id}: unknown task {task!r}")
    if not math.isfinite(gt_100):
        raise ExampleError(f"{dataset}:{row_id} ({image_path}): gt_100 is {gt_100}")
    return {
        "task_id": np.int32(prompts.TASK_IDS[task]),
        "gt_100": np.float32(gt_100),
        "row_id": np.int64(row_id),
        "dataset": str(dataset),
        "image_path": str(image_path),
    }


def _model_inputs(
    ids: np.ndarray,
    pv: np.ndarray,
    thw: np.ndarray,
    tok: Tokenizer,
    merge_size: int,
    rope_cfg: Any,
    rope_index_fn: RopeIndexFn | None,
) -> dict[str, Any]:
    """The model-input keys of an example: ``input_ids`` (L,) with the image expanded, its 3D
    ``position_ids`` (3, L) and ``rope_delta`` (), ``pixel_values`` (P, 1176), ``grid_thw`` (3,).
    """
    rope_cfg = rope_cfg or RopeConfig.from_tokenizer(tok, merge_size)
    pos, delta = rope_positions(ids, thw, rope_cfg, rope_index_fn)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "rope_delta": np.int32(delta),
        "pixel_values": pv,
        "grid_thw": thw,
    }


def make_prompt_example(
    tok: Tokenizer,
    pixel_values: np.ndarray,
    grid_thw: Sequence[int],
    task: str,
    *,
    gt_100: float = float("nan"),
    dataset: str = "",
    image_path: str = "",
    row_id: int = -1,
    variant: str = "train",
    chat_template: str | None = None,
    rope_cfg: Any = None,
    rope_index_fn: RopeIndexFn | None = None,
    merge_size: int = 2,
) -> dict[str, Any]:
    """GRPO / evaluation example: system + user(image, task) + the assistant generation prompt.

    ``gt_100`` may be NaN only for unlabeled scoring (it is checked finite when given).
    """
    where = f"{dataset}:{row_id} ({image_path})"
    pv, thw, n_img = _check_image(pixel_values, grid_thw, merge_size, where)
    text = prompts.render_chat(
        prompts.build_messages(task, variant), chat_template, add_generation_prompt=True
    )
    ids, _ = _expand_ids(tok.encode_cached(text), tok.image_pad_id, n_img, where)
    ex = _model_inputs(ids, pv, thw, tok, merge_size, rope_cfg, rope_index_fn)
    if math.isnan(gt_100):
        ex.update(_meta(task, 0.0, dataset, image_path, row_id))
        ex["gt_100"] = np.float32(np.nan)
    else:
        ex.update(_meta(task, gt_100, dataset, image_path, row_id))
    return ex


def assistant_span(
    tok: Tokenizer, task: str, target: str, variant: str, chat_template: str | None, where: str
) -> tuple[list[int], np.ndarray]:
    """Token ids of the full SFT conversation and the mask of its trained tokens.

    The trained span is found in characters: the prompt rendering (with generation prompt) must
    be a prefix of the full rendering, followed by exactly the target and ``<|im_end|>``. Tokens
    inside [content start, end of ``<|im_end|>``) are trained; a token crossing either edge is an
    error (the span would not be explicit).
    """
    prompt_text = prompts.render_chat(
        prompts.build_messages(task, variant), chat_template, add_generation_prompt=True
    )
    full = prompts.render_chat(
        prompts.build_messages(task, variant, assistant=target), chat_template, False
    )
    c0 = len(prompt_text)
    c1 = c0 + len(target)
    c2 = c1 + len(prompts.IM_END)
    if not full.startswith(prompt_text) or full[c0:c1] != target or full[c1:c2] != prompts.IM_END:
        raise ExampleError(
            f"{where}: chat template does not render prompt + target + <|im_end|> contiguously; "
            "cannot place the SFT label span"
        )
    ids, offsets = tok.encode_with_offsets(full)
    mask = np.zeros(len(ids), np.int32)
    for i, (s, e) in enumerate(offsets):
        if s < c0 < e or s < c2 < e:
            raise ExampleError(f"{where}: token {i} crosses the assistant span boundary")
        if s >= c0 and e <= c2 and e > s:
            mask[i] = 1
    if mask.sum() == 0 or ids[int(np.nonzero(mask)[0][-1])] != tok.im_end_id:
        raise ExampleError(f"{where}: the trained span does not end with <|im_end|>")
    return ids, mask


def make_sft_example(
    tok: Tokenizer,
    pixel_values: np.ndarray,
    grid_thw: Sequence[int],
    task: str,
    target: str,
    *,
    gt_100: float,
    dataset: str = "",
    image_path: str = "",
    row_id: int = -1,
    variant: str = "train",
    chat_template: str | None = None,
    p_drop_think: Mapping[str, float] | None = None,
    seed: int = 0,
    epoch: int = 0,
    visit: int = 0,
    rope_cfg: Any = None,
    rope_index_fn: RopeIndexFn | None = None,
    merge_size: int = 2,
) -> dict[str, Any]:
    """SFT example: prompt + ``target`` (answer rewritten to ``gt_100``; thought maybe dropped).

    Adds ``label_mask`` (L,) int32 and ``think_dropped`` () bool to the prompt example's keys.
    """
    where = f"{dataset}:{row_id} ({image_path})"
    meta = _meta(task, gt_100, dataset, image_path, row_id)
    pv, thw, n_img = _check_image(pixel_values, grid_thw, merge_size, where)
    if not isinstance(target, str) or not target.strip():
        raise ExampleError(f"{where}: empty SFT target")
    text = rewrite_answer(target, float(gt_100))
    p = float((p_drop_think or {}).get(task, 0.0))
    dropped = drop_think_draw(seed, epoch, row_id, task, p, dataset=dataset, visit=visit)
    if dropped:
        text = answer_format.empty_think(text)
    ids, mask = assistant_span(tok, task, text, variant, chat_template, where)
    ids_x, at = _expand_ids(ids, tok.image_pad_id, n_img, where)
    mask_x = np.concatenate([mask[:at], np.zeros(n_img, np.int32), mask[at + 1 :]])
    ex = _model_inputs(ids_x, pv, thw, tok, merge_size, rope_cfg, rope_index_fn)
    ex["label_mask"] = mask_x
    ex["think_dropped"] = np.bool_(dropped)
    ex.update(meta)
    return ex


# --------------------------------------------------------------------------------------------
# Buckets and collation


def default_patch_buckets(n: int, minimum: int = 64) -> int:
    """Smallest m * 2**k >= n with m in {4, 5, 6, 7}: at most ~25 % padding, 4 shapes/octave."""
    n = max(int(n), minimum)
    k = max(0, n.bit_length() - 3)
    for scale in (k, k + 1):
        for m in (4, 5, 6, 7):
            if m << scale >= n:
                return m << scale
    raise AssertionError("unreachable")


def bucket_size(n: int, buckets: Sequence[int] | None, what: str) -> int:
    """The smallest bucket >= n; ``None`` buckets use :func:`default_patch_buckets`."""
    if buckets is None or len(buckets) == 0:
        return default_patch_buckets(n)
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ExampleError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


def collate(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_id: int,
    seq_buckets: Sequence[int] | None,
    patch_buckets: Sequence[int] | None = None,
    padding_side: str = "left",
    batch_size: int | None = None,
    vision_config: Any = None,
) -> Batch:
    """Pad examples into one :class:`~tatar_jax.data.batch.Batch` (numpy), shapes taken from
    buckets, with its layout: positions and rope deltas of the examples, the patch bucket and,
    given the model's ``vision_config``, the vision layout of that bucket.

    ``batch_size`` > len(examples) appends dummy rows (copies of the last example) flagged
    ``valid = False`` so the final evaluation batch keeps the static batch shape; examples may
    carry ``valid = False`` themselves (skipped records, eval fillers) and their ``epoch``.
    Invalid rows get no SFT labels. Shapes: :mod:`tatar_jax.data.batch`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    exs = list(examples)
    valid = [bool(e.get("valid", True)) for e in exs]
    if batch_size is not None:
        if len(exs) > batch_size:
            raise ValueError(f"{len(exs)} examples for batch_size {batch_size}")
        valid += [False] * (batch_size - len(exs))
        exs += [exs[-1]] * (batch_size - len(exs))
    b = len(exs)
    lens = [int(e["input_ids"].shape[0]) for e in exs]
    seq_len = bucket_size(max(lens), seq_buckets, "sequence length")
    n_patch = [int(e["pixel_values"].shape[0]) for e in exs]
    tot = sum(n_patch)
    q = bucket_size(tot, patch_buckets, "patch count")
    sft = "label_mask" in exs[0]

    input_ids = np.full((b, seq_len), pad_id, np.int32)
    attn = np.zeros((b, seq_len), np.int32)
    pos = np.zeros((3, b, seq_len), np.int32)
    label_mask = np.zeros((b, seq_len), np.int32) if sft else None
    for r, (e, n) in enumerate(zip(exs, lens, strict=True)):
        sl = slice(seq_len - n, seq_len) if padding_side == "left" else slice(0, n)
        input_ids[r, sl] = e["input_ids"]
        attn[r, sl] = 1
        pos[:, r, sl] = e["position_ids"]
        if sft:
            label_mask[r, sl] = e["label_mask"]
    pixel_values = np.zeros((q, PATCH_DIM), np.float32)
    pixel_values[:tot] = np.concatenate([e["pixel_values"] for e in exs], axis=0)
    grid = np.stack([e["grid_thw"] for e in exs]).astype(np.int32)
    if sft:
        label_mask *= np.asarray(valid, np.int32)[:, None]  # padding rows train nothing
    meta = RowMeta(
        task_id=np.array([e["task_id"] for e in exs], np.int32),
        gt_100=np.array([e["gt_100"] for e in exs], np.float32),
        row_id=np.array([e["row_id"] for e in exs], np.int64),
        valid=np.array(valid, bool),
        epoch=np.array([e.get("epoch", 0) for e in exs], np.int32),
        think_dropped=np.array([bool(e["think_dropped"]) for e in exs]) if sft else None,
        dataset=tuple(str(e["dataset"]) for e in exs),
        image_path=tuple(str(e["image_path"]) for e in exs),
    )
    return Batch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=pos,
        rope_deltas=np.array([[int(e["rope_delta"])] for e in exs], np.int32),
        vision=vision_inputs(pixel_values, grid, vision_config),
        image_grid_thw=grid,
        meta=meta,
        label_mask=label_mask,
        num_patches=tot,
        padding_side=padding_side,
        vision_config=vision_config,
    )
