"""A complete Hugging Face directory of a model: the weights and configs
(:func:`~tatar_jax.models.qwen2_5_vl.hf_checkpoint.save_hf_checkpoint`) plus the tokenizer files,
the chat template and the image processor config, so that transformers' ``AutoProcessor`` /
``from_pretrained`` and ``scripts/eval.py --hf_dir`` load it as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tatar_jax.data import jsonl
from tatar_jax.models.qwen2_5_vl.hf_checkpoint import save_hf_checkpoint
from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

__all__ = ["TOKENIZER_FILES", "export_hf"]


# The Qwen2.5-VL chat format (what tatar_jax.data.prompts renders without a template) as the
# Jinja template transformers' apply_chat_template reads from an export.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Files of a tokenizer folder an export carries over (what save_pretrained writes).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json",
)  # fmt: skip


def _rebuilt_tokenizer_files(out_dir: str, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` of the offline Qwen2.5 rebuild
    (:func:`tatar_jax.data.tokenizer.default_tokenizer_json`)."""
    from tatar_jax.data import tokenizer as tok_mod

    tok_mod.save_tokenizer_folder(tok_mod.default_tokenizer_json(), out_dir, model_max_length)


def _has_chat_template(folder: str) -> bool:
    if any(
        os.path.isfile(os.path.join(folder, f))
        for f in ("chat_template.jinja", "chat_template.json")
    ):
        return True
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        return "chat_template" in json.load(f)


def export_hf(
    model: Qwen2_5_VLForConditionalGeneration,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
) -> list[str]:
    """A complete HF directory: what :func:`save_hf_checkpoint` writes (weights, ``config.json``,
    ``generation_config.json``) plus the tokenizer, its chat template and
    ``preprocessor_config.json``, so that ``scripts/eval.py --hf_dir`` and transformers'
    ``AutoProcessor`` / ``from_pretrained`` load it as it is.

    ``tokenizer_dir``: the run's tokenizer folder (its files are copied; it must hold a
    ``tokenizer.json``); None = the offline Qwen2.5 rebuild the run used. Where the folder has
    no chat template / image processor config, the Qwen2.5-VL ones are written
    (``min_pixels`` / ``max_pixels``: the image processor's pixel budget, default spec §3's).
    Returns the written safetensors file names.
    """
    from tatar_jax.data import image as image_mod

    out = os.fspath(out_dir)
    if tokenizer_dir is not None and not os.path.isfile(
        os.path.join(tokenizer_dir, "tokenizer.json")
    ):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to export with the weights")
    names = save_hf_checkpoint(model, out, max_shard_size=max_shard_size, dtype=dtype)
    if tokenizer_dir is None:
        max_len = model.config.text.max_position_embeddings
        _rebuilt_tokenizer_files(out, max_len)
    else:
        for fname in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, fname)
            if os.path.isfile(src):
                with open(src, "rb") as fi, open(os.path.join(out, fname), "wb") as fo:
                    fo.write(fi.read())
    if not _has_chat_template(out):
        with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(_CHAT_TEMPLATE)
    if not os.path.isfile(os.path.join(out, "preprocessor_config.json")):
        budget = {
            "min_pixels": image_mod.MIN_PIXELS if min_pixels is None else int(min_pixels),
            "max_pixels": image_mod.MAX_PIXELS if max_pixels is None else int(max_pixels),
        }
        cfg = image_mod.hf_preprocessor_config(**budget)
        jsonl.write_json(os.path.join(out, "preprocessor_config.json"), cfg, indent=2)
    return names
