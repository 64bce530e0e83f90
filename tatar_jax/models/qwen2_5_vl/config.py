"""Qwen2.5-VL model configuration (frozen dataclasses) and HF ``config.json`` conversion.

Field names of :class:`VisionConfig` and :class:`TextConfig` are the HF ``vision_config`` /
``text_config`` keys, so the vision tower and the decoder read the same attribute names transformers
does. :meth:`Qwen2_5_VLConfig.from_hf_dict` accepts both on-disk layouts:

- nested (transformers >= 5): ``text_config`` / ``vision_config`` sub-dicts, rope settings in
  ``text_config.rope_parameters`` (``rope_theta``, ``mrope_section``);
- flat legacy (what the hub checkpoints ship): text fields at the top level, ``rope_scaling``
  with ``type: mrope`` and ``mrope_section``, ``rope_theta`` at the top level, ``in_chans`` in
  the vision config.

:meth:`Qwen2_5_VLConfig.to_hf_dict` writes the nested layout that transformers 5 loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from tatar_jax.models.layers import ATTENTION_IMPLS

__all__ = [
    "Qwen2_5_VLConfig",
    "TextConfig",
    "VisionConfig",
    "PRESETS",
    "preset",
    "load_config_json",
]

_DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' default when rope_parameters has none


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """HF ``vision_config`` (defaults: the released 3B/7B vision tower)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    hidden_act: str = "silu"
    tokens_per_second: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """HF ``text_config`` of the Qwen2 decoder (defaults: 7B)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = _DEFAULT_MROPE_SECTION
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    """The whole model: decoder (``text``), vision tower (``vision``) and special token ids."""

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    # How attention runs (tatar_jax.models.layers.attention), not architecture: never written to
    # config.json. "auto": cuDNN on NVIDIA GPUs (bf16/fp16), splash on TPU, chunked elsewhere.
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention_impl {self.attention_impl!r}; choose one of "
                f"{list(ATTENTION_IMPLS)}"
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size={self.vision.out_hidden_size} != text hidden_size="
                f"{self.text.hidden_size}"
            )

    # Read by get_rope_index (duck-typed: the data pipeline passes a smaller object).
    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    @property
    def tokens_per_second(self) -> int:
        return self.vision.tokens_per_second

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def replace(self, **changes: Any) -> Qwen2_5_VLConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Qwen2_5_VLConfig:
        """From an HF ``config.json`` dict, nested (transformers 5) or flat legacy layout."""
        d = dict(d)
        mt = d.get("model_type")
        if mt not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json model_type is {mt!r}, expected 'qwen2_5_vl'")
        text_d = dict(d.get("text_config") or {})
        # Flat layout: text fields live at the top level. In the nested layout the top level may
        # still repeat some of them (older transformers 4.5x wrote both); text_config wins.
        merged = {**d, **text_d}
        rope = dict(merged.get("rope_parameters") or merged.get("rope_scaling") or {})
        theta = rope.get("rope_theta", merged.get("rope_theta", TextConfig.rope_theta))
        section = rope.get("mrope_section", _DEFAULT_MROPE_SECTION)
        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings", False))
        tie = bool(tie or text_d.get("tie_word_embeddings", False))
        text_kw = _pick(TextConfig, merged, skip=("rope_theta", "mrope_section"))
        text_kw.pop("tie_word_embeddings", None)
        if merged.get("num_key_value_heads") is None:
            text_kw["num_key_value_heads"] = merged.get(
                "num_attention_heads", TextConfig.num_attention_heads
            )
        text = TextConfig(
            **text_kw,
            rope_theta=float(theta),
            mrope_section=tuple(section),
            tie_word_embeddings=tie,
        )
        vis_d = dict(d.get("vision_config") or {})
        if "in_chans" in vis_d and "in_channels" not in vis_d:
            vis_d["in_channels"] = vis_d["in_chans"]
        vision = VisionConfig(**_pick(VisionConfig, vis_d))
        top = _pick(cls, d, skip=("text", "vision", "attention_impl"))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key not in d and key in text_d:
                top[key] = text_d[key]
        return cls(text=text, vision=vision, **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """Nested transformers-5 ``config.json`` dict (``Qwen2_5_VLConfig(**d)`` loads it)."""
        t = self.text
        text_d = {
            f.name: getattr(t, f.name)
            for f in dataclasses.fields(TextConfig)
            if f.name not in ("rope_theta", "mrope_section", "tie_word_embeddings")
        }
        text_d.update(
            model_type="qwen2_5_vl_text",
            num_key_value_heads=t.num_key_value_heads,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            bos_token_id=self.bos_token_id,
            eos_token_id=_jsonable(self.eos_token_id),
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=t.tie_word_embeddings,
        )
        vis_d = {
            f.name: _jsonable(getattr(self.vision, f.name))
            for f in dataclasses.fields(VisionConfig)
        }
        vis_d["model_type"] = "qwen2_5_vl_vision"
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text_d,
            "vision_config": vis_d,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _jsonable(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings,
        }

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


def _jsonable(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def _pick(cls: type, d: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return {k: d[k] for k in names if k in d and d[k] is not None}


def load_config_json(path: str | os.PathLike[str]) -> Qwen2_5_VLConfig:
    """Reads an HF ``config.json`` (a file, or a directory containing one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    try:
        return Qwen2_5_VLConfig.from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# --- presets (the published Qwen/Qwen2.5-VL-*-Instruct config.json values) ----------------------


def _published(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, v_inter: int, tie: bool
) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=tie,
        ),
        vision=VisionConfig(intermediate_size=v_inter, out_hidden_size=hidden),
    )


def qwen2_5_vl_3b() -> Qwen2_5_VLConfig:
    return _published(2048, 11008, 36, 16, 2, 151936, 3420, tie=True)


def qwen2_5_vl_7b() -> Qwen2_5_VLConfig:
    return _published(3584, 18944, 28, 28, 4, 152064, 3420, tie=False)


def qwen2_5_vl_32b() -> Qwen2_5_VLConfig:
    return _published(5120, 27648, 64, 40, 8, 152064, 3456, tie=False)


def qwen2_5_vl_72b() -> Qwen2_5_VLConfig:
    return _published(8192, 29568, 80, 64, 8, 152064, 3456, tie=False)


# The special-token ids of the random presets (``tiny``, ``embedded``) before
# ``loading.embedded_config`` sets a tokenizer's.
_RANDOM_MODEL_TOKEN_IDS = dict(
    image_token_id=250,
    video_token_id=251,
    vision_start_token_id=248,
    vision_end_token_id=249,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny(*, tie_word_embeddings: bool = False) -> Qwen2_5_VLConfig:
    """A few-hundred-kilobyte model for tests and demos (window attention active on 8x8 grids)."""
    return Qwen2_5_VLConfig(
        text=TextConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            max_position_embeddings=2048,
            tie_word_embeddings=tie_word_embeddings,
        ),
        vision=VisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=(1,),
            out_hidden_size=64,
        ),
        **_RANDOM_MODEL_TOKEN_IDS,
    )


def embedded(
    *,
    hidden: int = 192,
    layers: int = 4,
    vision_hidden: int = 96,
    vision_depth: int = 4,
    head_dim: int = 32,
) -> Qwen2_5_VLConfig:
    """A wider, deeper random model for the embedded tokenizer's few hundred ids
    (``--config.model.preset=embedded``; ``tatar_jax.loading.embedded_config`` sets the
    vocabulary and token ids): the compute the 152k-token lm_head used to take spent on the
    decoder and vision tower (``benchmarks/sweeps/grpo_default.md`` sweep 5). The default run
    uses the ``tiny`` sizes instead: on the synthetic set's warm-up this one ranked held-out IAA
    backwards (sweep 6).
    SwiGLU width 2 x hidden (the tiny preset's ratio), 2 KV heads, Qwen's 2:3:3 M-RoPE split of
    ``head_dim / 2``; vision: 2 x hidden MLP, window attention on 4 x 4-patch windows with full
    attention in the last block."""
    half = head_dim // 2
    t, h = 3 * half // 8, 3 * half // 8
    mrope = (half - t - h, t, h)
    return Qwen2_5_VLConfig(
        text=TextConfig(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // head_dim,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=mrope,
            max_position_embeddings=2048,
        ),
        vision=VisionConfig(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=vision_hidden // head_dim,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=(vision_depth - 1,),
            out_hidden_size=hidden,
        ),
        **_RANDOM_MODEL_TOKEN_IDS,
    )


PRESETS = {
    "3b": qwen2_5_vl_3b,
    "7b": qwen2_5_vl_7b,
    "32b": qwen2_5_vl_32b,
    "72b": qwen2_5_vl_72b,
    "tiny": tiny,
    "embedded": embedded,
}


def preset(name: str) -> Qwen2_5_VLConfig:
    """``"3b" | "7b" | "32b" | "72b" | "tiny" | "embedded"`` → config."""
    key = name.lower().removeprefix("qwen2.5-vl-").removesuffix("-instruct")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key]()
