"""Tiny random transformers Qwen2.5-VL models for tests (torch, CPU, never downloaded).

Reusable by every test that needs an HF reference:

- :func:`tiny_hf_config` — a transformers ``Qwen2_5_VLConfig`` (eager attention) built from
  ``tatar_jax.models.qwen2_5_vl.config.tiny().to_hf_dict()``: 2 decoder layers (GQA 4/2 heads,
  head_dim 16, mrope_section (2, 3, 3)), 3 vision blocks (block 1 full attention, windows of 4x4
  patches).
- :func:`tiny_hf_model` — a seeded random ``Qwen2_5_VLForConditionalGeneration`` with weights
  of std ``std`` (default 0.08, so logits are spread out and greedy tokens are not ties) and norm
  scales around 1 (so a mis-mapped norm shows).
- :func:`save_hf_dir` — writes it as an HF directory: tensor names in the hub layout
  (``model.layers.*`` / ``visual.*``) or the transformers-5 in-memory layout
  (``model.language_model.*`` / ``model.visual.*``), nested or flat (legacy hub) config.json,
  optionally sharded.
- :func:`tiny_hf_dir` — both in one call: ``hf, path = tiny_hf_dir(tmp_path / "m")``, then
  ``qvl.load_hf_checkpoint(path)`` gives the equal JAX model.
- :func:`make_batch` — left-padded ``input_ids`` / ``attention_mask`` with image placeholder runs,
  ``pixel_values`` and ``image_grid_thw`` exactly as the HF processor lays them out, plus
  ``mm_token_type_ids`` for the HF forward.
- :func:`prompt_batch` / :func:`grpo_step_inputs` — a :func:`make_batch` batch as a training step
  receives it (int32, M-RoPE positions, padded pixels) and the GRPO update's inputs built on it.
- :func:`jax_logits` / :func:`masked_max_diff` — our model's logits on such a batch and their
  largest difference over the real positions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tatar_jax.models.qwen2_5_vl.config import tiny

_TINY = tiny()
IMAGE_TOKEN_ID = _TINY.image_token_id
VIDEO_TOKEN_ID = _TINY.video_token_id
VISION_START_ID = _TINY.vision_start_token_id
VISION_END_ID = _TINY.vision_end_token_id
PAD_ID = _TINY.pad_token_id
TEXT_ID_RANGE = (3, VISION_START_ID)  # ordinary text tokens are drawn from here

# The HF config.json of the tiny preset; tie_word_embeddings is tiny_hf_config's argument.
_TINY_HF = _TINY.to_hf_dict()
TEXT_KW = {
    k: v
    for k, v in _TINY_HF["text_config"].items()
    if k not in ("model_type", "tie_word_embeddings")
}
VISION_KW = {k: v for k, v in _TINY_HF["vision_config"].items() if k != "model_type"}


def tiny_hf_config(tie_word_embeddings: bool = False, **text_overrides: Any) -> Qwen2_5_VLConfig:
    """transformers config of the tiny model (eager attention, fp32)."""
    text = {**TEXT_KW, **text_overrides}
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION_KW),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=tie_word_embeddings,
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return cfg


def tiny_hf_model(
    config: Qwen2_5_VLConfig | None = None, seed: int = 0, std: float = 0.08
) -> Qwen2_5_VLForConditionalGeneration:
    """Seeded random fp32 model in eval mode; every parameter (biases, norms too) is random."""
    config = config or tiny_hf_config()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval().float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def _legacy_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    return name


def legacy_config_dict(config: Qwen2_5_VLConfig) -> dict[str, Any]:
    """The flat config.json layout of the hub checkpoints (transformers 4.x era)."""
    t = config.text_config
    rope = dict(t.rope_parameters)
    vision = {k: v for k, v in VISION_KW.items() if k != "in_channels"}
    vision["in_chans"] = VISION_KW["in_channels"]
    vision["model_type"] = "qwen2_5_vl"
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": t.hidden_act,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(rope["mrope_section"])},
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": t.num_hidden_layers,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": config.vision_end_token_id,
        "vision_token_id": 247,
        "torch_dtype": "float32",
        "vision_config": vision,
    }


def save_hf_dir(
    model: Qwen2_5_VLForConditionalGeneration,
    path: str | os.PathLike[str],
    names: str = "legacy",
    config_layout: str = "nested",
    shards: int = 1,
) -> str:
    """Saves ``model`` as an HF directory (safetensors via torch, tests only).

    names: "legacy" (``model.layers.*`` / ``visual.*``, what the hub and ``save_pretrained``
    write) or "v5" (``model.language_model.*`` / ``model.visual.*``, the in-memory names of
    transformers 5). config_layout: "nested" (``config.save_pretrained``) or "flat" (the hub's
    legacy config.json). shards > 1 splits the tensors over that many files plus an index.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if names not in ("legacy", "v5") or config_layout not in ("nested", "flat"):
        raise ValueError((names, config_layout))
    state = {
        (_legacy_name(k) if names == "legacy" else k): v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if not (model.config.tie_word_embeddings and k == "lm_head.weight")
    }
    ordered = sorted(state)
    parts = [list(p) for p in np.array_split(np.asarray(ordered, dtype=object), shards)]
    if shards == 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, part in enumerate(parts):
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, os.path.join(path, fname), {"format": "pt"})
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if config_layout == "nested":
        model.config.save_pretrained(path)
    else:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(legacy_config_dict(model.config), f, indent=2)
    return path


def tiny_hf_dir(
    path: str | os.PathLike[str], seed: int = 0, tie_word_embeddings: bool = False, **save_kw: Any
) -> tuple[Qwen2_5_VLForConditionalGeneration, str]:
    """A seeded tiny HF model and the directory it was saved to (``save_hf_dir`` options)."""
    model = tiny_hf_model(tiny_hf_config(tie_word_embeddings=tie_word_embeddings), seed=seed)
    return model, save_hf_dir(model, path, **save_kw)


def image_tokens(thw: tuple[int, int, int], merge: int = 2) -> int:
    t, h, w = thw
    return t * h * w // merge**2


def make_batch(
    rows: list[list[Any]],
    seed: int = 0,
    patch_dim: int = 3 * 2 * 14 * 14,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-padded batch from row specs.

    A row spec is a list of items: an int ``n`` (n random text tokens) or a tuple ``(t, h, w)``
    (an image: vision_start, t*h*w/4 image tokens, vision_end). Returns numpy ``input_ids`` (B, L)
    int64, ``attention_mask`` (B, L) int64, ``mm_token_type_ids`` (B, L), and when any image is
    present ``pixel_values`` (N, patch_dim) float32 and ``image_grid_thw`` (num_images, 3) int64.
    ``length`` left-pads every row to that length (equal shapes share compilations).
    """
    rng = np.random.default_rng(seed)
    seqs, grids = [], []
    for spec in rows:
        seq: list[int] = []
        for item in spec:
            if isinstance(item, int):
                seq += rng.integers(*TEXT_ID_RANGE, size=item).tolist()
            else:
                grids.append(tuple(item))
                seq += [VISION_START_ID] + [IMAGE_TOKEN_ID] * image_tokens(item) + [VISION_END_ID]
        seqs.append(seq)
    longest = max(len(s) for s in seqs)
    if length is not None and length < longest:
        raise ValueError(f"length={length} < longest row ({longest} tokens)")
    length = length or longest
    ids = np.full((len(seqs), length), PAD_ID, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for i, s in enumerate(seqs):
        ids[i, length - len(s) :] = s
        mask[i, length - len(s) :] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).astype(np.int64),
    }
    if grids:
        thw = np.asarray(grids, np.int64)
        n = int(np.prod(thw, axis=-1).sum())
        out["pixel_values"] = rng.standard_normal((n, patch_dim)).astype(np.float32)
        out["image_grid_thw"] = thw
    return out


def hf_logits(model: Qwen2_5_VLForConditionalGeneration, batch: dict[str, np.ndarray], **kw):
    """transformers forward on a :func:`make_batch` batch → numpy logits (B, L, V)."""
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    if "image_grid_thw" not in inputs:
        inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        return model(**inputs, **kw).logits.float().numpy()


def tiny_config_for(tok: Any) -> Any:
    """Our tiny config (tied embeddings) with the real tokenizer's vocabulary and special ids."""
    import dataclasses

    base = tiny(tie_word_embeddings=True)
    return dataclasses.replace(
        base,
        text=dataclasses.replace(base.text, vocab_size=len(tok)),
        image_token_id=tok.image_pad_id,
        video_token_id=tok.video_pad_id,
        vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id,
        bos_token_id=None,
        eos_token_id=tok.im_end_id,
        pad_token_id=tok.pad_id,
    )


# Two left-padded prompts with images of different sizes (4x4 and 4x8 patches).
PROMPT_ROWS = ([3, (1, 4, 4), 5], [2, (1, 4, 8), 3])


def prompt_batch(
    cfg: Any,
    rows: Any = PROMPT_ROWS,
    seed: int = 3,
    patch_bucket: int | None = None,
) -> Any:
    """A :func:`make_batch` batch as the pipeline hands prompts to a training step (``cfg``: the
    JAX model's config): a ``tatar_jax.data.batch.Batch`` with int32 ``input_ids`` /
    ``attention_mask`` / ``image_grid_thw``, M-RoPE ``position_ids`` (3, B, L) and
    ``rope_deltas`` (B, 1), float32 ``pixel_values`` zero-padded to ``patch_bucket`` rows when
    given, their vision layout for ``cfg.vision``; every row a valid IQA row."""
    from tatar_jax.data.batch import Batch, RowMeta, vision_inputs
    from tatar_jax.models import qwen2_5_vl as qvl

    b = make_batch([list(r) for r in rows], seed=seed)
    ids = b["input_ids"].astype(np.int32)
    mask = b["attention_mask"].astype(np.int32)
    grid = b["image_grid_thw"].astype(np.int32)
    pos, deltas = qvl.get_rope_index(ids, grid, mask, cfg)
    pv = b["pixel_values"].astype(np.float32)
    n = len(pv)
    if patch_bucket is not None:
        pv = np.concatenate([pv, np.zeros((patch_bucket - n, pv.shape[1]), pv.dtype)])
    r = len(ids)
    meta = RowMeta(
        task_id=np.zeros(r, np.int32), gt_100=np.full(r, 50.0, np.float32),
        row_id=np.arange(r, dtype=np.int64), valid=np.ones(r, bool), epoch=np.zeros(r, np.int32),
    )  # fmt: skip
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=np.asarray(pos, np.int32),
        rope_deltas=np.asarray(deltas, np.int32).reshape(-1, 1),
        vision=vision_inputs(pv, grid, cfg.vision),
        image_grid_thw=grid,
        meta=meta,
        num_patches=n,
        vision_config=cfg.vision,
    )


def grpo_step_inputs(
    cfg: Any,
    batch: Any,
    tokens: np.ndarray,
    cmask: np.ndarray,
    advantages: np.ndarray,
    g: int,
    *,
    task_id: Any = None,
    num_micro: int = 1,
    pack_buckets: int = 0,
) -> Any:
    """The GRPO update's inputs (``inputs.GrpoBatch``) as the scorer hands them over: every
    prompt of ``batch`` repeated for its ``g`` completions ``tokens`` (B*g, T) with ``cmask``
    (bool) as the counted mask, per-completion ``advantages``, the batch's vision inputs;
    ``task_id`` (B,) per prompt (default all IQA)."""
    from tatar_jax import generate
    from tatar_jax.train import inputs as step_inputs

    b = batch.num_rows
    tid = np.zeros(b, np.int32) if task_id is None else np.asarray(task_id, np.int32)
    return step_inputs.grpo_batch(
        generate.prompt_batch(batch, cfg), tid, tokens, cmask, cmask.astype(np.float32),
        advantages, cfg.image_token_id, num_micro=num_micro, pack_buckets=pack_buckets,
    )  # fmt: skip


def jax_logits(model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The JAX model's logits on a :func:`make_batch` batch (ids, mask, pixels, grid)."""
    return np.asarray(
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["image_grid_thw"],
        )
    )


def masked_max_diff(a: np.ndarray, b: np.ndarray, batch: dict[str, np.ndarray]) -> float:
    """max |a - b| over the batch's real (attention-mask) positions."""
    return float(np.abs(a - b)[batch["attention_mask"].astype(bool)].max())
