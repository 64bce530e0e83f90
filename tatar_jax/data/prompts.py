"""Prompts (spec §3) and the Qwen2.5-VL chat rendering with the image expanded to its tokens.

Wording is ours, written to the intent the spec records: a system turn that allows an optional
``<think>`` block before a mandatory ``<answer>`` holding one float; an IQA task text (quality,
0-100, two decimals, "you may answer briefly"); an IAA task text (aesthetics, 0-100, two decimals,
the aspects to weigh, no "briefly" sentence). The only prompt-side task conditioning is the TASK
line and that sentence, as in the reference.

Variants (D7): ``"train"`` is the default for SFT, GRPO *and* evaluation, so a model is evaluated
on the words it was trained on. ``"reference_eval"`` reproduces the reference evaluation's two
changes ("brief or empty" in the system turn, "answer directly" for IQA) for comparisons.

Rendering: :func:`render_chat` writes the Qwen2-VL/Qwen2.5-VL chat format in Python, or, when a
checkpoint carries its own Jinja chat template, renders that template exactly as transformers'
``apply_chat_template`` does (same function). The image placeholder is one ``<|image_pad|>``;
:func:`expand_image_pads` repeats it to ``grid_t*grid_h*grid_w / merge**2`` copies, as
transformers' Qwen2.5-VL processor does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tatar_jax import answer_format

TASKS: tuple[str, str] = ("iqa", "iaa")
TASK_IDS: dict[str, int] = {"iqa": 0, "iaa": 1}


def task_names(task_ids: Any) -> np.ndarray:
    """Task names ("iqa" / "iaa") of an array of ``TASK_IDS`` values: the one id -> name map."""
    names = np.array(TASKS)
    ids = np.asarray(task_ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
        raise ValueError(f"task ids {sorted(set(ids.tolist()))} outside {TASK_IDS}")
    return names[ids]

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The templates name the tags through answer_format (_TAG_FIELDS) so that the words the model
# reads and the format it is parsed with cannot drift apart.
_SYSTEM = (
    "A conversation between User and Assistant. The User gives an image and a rating task; the "
    "Assistant rates the image. The Assistant may first reason about the image inside "
    "{think_open} {think_close} tags; this reasoning is optional and may be {length}. The final "
    "answer must be inside {answer_open} {answer_close} tags and contain only a single "
    "floating-point number, with no other text. If {think_open} is used, it must come before "
    "{answer_open}."
)
_IQA = (
    "TASK: Image Quality Assessment (IQA).\n"
    "Rate the overall technical quality of this image as a floating-point number between 0 and "
    "100, rounded to two decimal places, where 0 means very poor quality and 100 means excellent "
    "quality. {brief} Put only the number inside {answer_open} {answer_close}, for example "
    "{example}."
)
_IAA = (
    "TASK: Image Aesthetic Assessment (IAA).\n"
    "Rate the overall aesthetic quality of this image as a floating-point number between 0 and "
    "100, rounded to two decimal places, where 0 means very poor aesthetics and 100 means "
    "excellent aesthetics. Consider composition, lighting, color harmony, subject presentation, "
    "balance, style and emotional impact. Put only the number inside {answer_open} "
    "{answer_close}, for example {example}."
)
_TAG_FIELDS = {
    "think_open": answer_format.THINK_OPEN,
    "think_close": answer_format.THINK_CLOSE,
    "answer_open": answer_format.ANSWER_OPEN,
    "answer_close": answer_format.ANSWER_CLOSE,
    "example": answer_format.render_answer("73.42"),
}
_VARIANTS: dict[str, dict[str, str]] = {
    "train": {
        "length": "brief or detailed",
        "brief": "You may answer briefly, without detailed reasoning.",
    },
    "reference_eval": {
        "length": "brief or empty",
        "brief": "You may answer directly, without detailed reasoning.",
    },
}
PROMPT_VARIANTS: tuple[str, ...] = tuple(_VARIANTS)


@dataclass(frozen=True)
class PromptSet:
    """The three texts of one wording variant."""

    system: str
    iqa: str
    iaa: str

    def task_text(self, task: str) -> str:
        if task not in TASK_IDS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return self.iqa if task == "iqa" else self.iaa


def get_prompts(variant: str = "train") -> PromptSet:
    """The system/IQA/IAA prompts of ``variant`` (``"train"`` or ``"reference_eval"``)."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; expected one of {PROMPT_VARIANTS}")
    v = _VARIANTS[variant]
    return PromptSet(
        system=_SYSTEM.format(length=v["length"], **_TAG_FIELDS),
        iqa=_IQA.format(brief=v["brief"], **_TAG_FIELDS),
        iaa=_IAA.format(**_TAG_FIELDS),
    )


def build_messages(
    task: str, variant: str = "train", assistant: str | None = None
) -> list[dict[str, Any]]:
    """HF-style messages: system, user (image first, then the task text)[, assistant].

    The image entry is ``{"type": "image"}`` (no payload: rendering only needs its position).
    """
    p = get_prompts(variant)
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": p.system},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": p.task_text(task)}],
        },
    ]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def _render_builtin(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    """Python transcription of the Qwen2-VL / Qwen2.5-VL ``chat_template`` (no vision ids)."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n")
        out.append(f"{IM_START}{m['role']}\n")
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            for part in content:
                kind = part.get("type")
                if kind == "image" or "image" in part or "image_url" in part:
                    out.append(f"{VISION_START}{IMAGE_PAD}{VISION_END}")
                elif kind == "video" or "video" in part:
                    out.append(f"{VISION_START}<|video_pad|>{VISION_END}")
                elif "text" in part:
                    out.append(part["text"])
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """Render ``messages`` to text with one ``<|image_pad|>`` per image.

    ``chat_template=None`` uses the built-in Qwen2.5-VL format; a Jinja template string (from a
    checkpoint) is rendered by transformers' own renderer, so the text equals
    ``apply_chat_template(messages, tokenize=False)`` for that template.
    """
    if chat_template is None:
        return _render_builtin(messages, add_generation_prompt)
    # Lazy: transformers is heavy and only needed for checkpoint-supplied templates.
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)],
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]


def num_image_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Placeholder tokens for one image: ``t*h*w / merge_size**2`` (patches after 2x2 merging)."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {t, h, w} is not divisible by merge_size={merge_size}")
    return t * h * w // (merge_size * merge_size)


def expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Replace the i-th ``<|image_pad|>`` with ``counts[i]`` copies (what the HF processor does)."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"text has {len(pieces) - 1} image placeholders, got {len(counts)} counts")
    out = [pieces[0]]
    for n, rest in zip(counts, pieces[1:], strict=True):
        out.append(IMAGE_PAD * int(n))
        out.append(rest)
    return "".join(out)
