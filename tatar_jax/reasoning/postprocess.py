"""Teacher reply -> SFT target text (spec §5.1, §5.2). Pure string functions, no I/O.

The target is always ``<think>\\n{reasoning}\\n</think>\\n<answer>{score}</answer>``
(:func:`tatar_jax.answer_format.render`) with the score written exactly as the record gives it
(:func:`format_score`). The SFT data path rewrites the answer to the 0-100 ground truth anyway
(spec §6.1); the given score is kept here so that the judge sees what the teacher was asked to
explain.

IQA (fast track, spec §5.1), in order:
  1. the first complete ``<think>…</think>`` block; without one, the whole reply;
  2. remove think tags, complete ``<answer>…</answer>`` blocks, a dangling ``<answer…`` up to the
     end (the stop string cut the closing tag), stray ``</answer>``, tool-/function-call blocks
     and tags;
  3. collapse whitespace; keep the first ``max_sentences`` sentences (a sentence ends at ``.``,
     ``!`` or ``?`` followed by whitespace);
  4. keep the first ``max_words`` words (the spec's 30-word minimum is not enforced, as in the
     reference; ``min_words`` > 0 turns it into a rejection).

IAA (slow track, spec §5.2): the same extraction and cleaning, no sentence/word cut by default.

Rejections (returned as a reason, never silently fixed): empty reasoning, the score inside the
reasoning (the prompt forbids it), the teacher's own ``<answer>`` differing from the given score,
fewer than ``min_words`` words.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from tatar_jax import answer_format
from tatar_jax.answer_format import ANSWER_TAG, THINK_TAG

_NUM_TOKEN_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w]|\.\d)")

# Teacher replies: the format's tags in any case, with blanks allowed before the ">".
_THINK_BLOCK_RE = re.compile(rf"<{THINK_TAG}\s*>(.*?)</{THINK_TAG}\s*>", re.DOTALL | re.IGNORECASE)
_THINK_TAG_RE = re.compile(rf"</?{THINK_TAG}\s*>", re.IGNORECASE)
_ANSWER_BLOCK_RE = re.compile(rf"<{ANSWER_TAG}\s*>.*?</{ANSWER_TAG}\s*>", re.DOTALL | re.IGNORECASE)
_DANGLING_ANSWER_RE = re.compile(rf"<{ANSWER_TAG}\b.*\Z", re.DOTALL | re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(rf"</{ANSWER_TAG}\s*>", re.IGNORECASE)
# The content of the last <answer> block; a block cut by the stop string runs to the end.
_LAST_ANSWER_RE = re.compile(
    rf"<{ANSWER_TAG}\s*>(.*?)(?:</{ANSWER_TAG}\s*>|\Z)", re.DOTALL | re.IGNORECASE
)
# Tool / function-call blocks and stray tags, in the XML style (<tool_call>…</tool_call>) and the
# special-token style (<|tool_call|>, <|tool▁calls▁begin|> …) that chat models leak.
_TOOL_BLOCK_RE = re.compile(
    r"<(tool_call|function_call|tool_calls|function|tool)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TOOL_TAG_RE = re.compile(
    r"</?(?:tool_call|function_call|tool_calls|function|tool|tool_response)\b[^>]*>"
    r"|<\|[^|>]*(?:tool|function)[^|>]*\|>"
    r"|<｜[^｜>]*(?:tool|function)[^｜>]*｜>",
    re.IGNORECASE,
)
# Any other leftover tag-like token (spec §5.2 "strip nested tags").
_ANY_TAG_RE = re.compile(r"</?[A-Za-z_][\w:-]*(?:\s[^<>]*)?/?>|<\|[^<>|]*\|>")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


def format_score(score: float | int | str) -> str:
    """The score as the record gives it: ints stay ints, floats use the shortest round-trip form
    (``3.52`` -> ``"3.52"``, ``70.0`` -> ``"70.0"``), strings are stripped."""
    if isinstance(score, bool):
        raise TypeError("score must be a number, got a bool")
    if isinstance(score, int):
        return str(score)
    if isinstance(score, float):
        if not math.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        return repr(score)
    return str(score).strip()


def strip_tool_calls(text: str) -> str:
    return _TOOL_TAG_RE.sub(" ", _TOOL_BLOCK_RE.sub(" ", text))


def extract_reasoning(reply: str, which: str = "first") -> str:
    """Steps 1-2: the first (or ``which="last"``) complete think block, else the reply minus
    answers and tags. ("last" suits reasoning models that print their own ``<think>`` monologue
    before the requested block, when the server does not split it off.)"""
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    blocks = _THINK_BLOCK_RE.findall(reply)
    text = (blocks[0] if which == "first" else blocks[-1]) if blocks else reply
    text = _ANSWER_BLOCK_RE.sub(" ", text)
    text = _DANGLING_ANSWER_RE.sub(" ", text)
    text = _ANSWER_CLOSE_RE.sub(" ", text)
    text = _THINK_TAG_RE.sub(" ", text)
    return strip_tool_calls(text)


def strip_tags(text: str) -> str:
    """Remove every remaining tag-like token (``<b>``, ``<|im_end|>``, ``</foo>``)."""
    return _ANY_TAG_RE.sub(" ", text)


def collapse_ws(text: str) -> str:
    return " ".join(text.split())


def first_sentences(text: str, n: int) -> str:
    """The first ``n`` sentences (split after ``.``/``!``/``?`` + whitespace); ``n`` <= 0: all."""
    if n <= 0:
        return text
    return " ".join(_SENTENCE_END_RE.split(text)[:n])


def first_words(text: str, n: int) -> str:
    """The first ``n`` whitespace-separated words; ``n`` <= 0: all."""
    if n <= 0:
        return text
    return " ".join(text.split()[:n])


def word_count(text: str) -> int:
    return len(text.split())


def last_answer(reply: str) -> str | None:
    """Content of the last ``<answer>`` block (a block cut by the stop string counts)."""
    found = _LAST_ANSWER_RE.findall(reply)
    return found[-1].strip() if found else None


def _decimals(token: str) -> int:
    return len(token.split(".", 1)[1]) if "." in token else 0


def mentions_score(text: str, score: float) -> bool:
    """Whether ``text`` contains a number that *is* the score at the number's own precision.

    ``72.35`` is mentioned by "72.35", "72.4" or "72" (each is the score rounded to the digits it
    shows) but not by "7" or "2 sentences". Numbers glued to words ("4K", "f2.8") do not count.
    """
    for token in _NUM_TOKEN_RE.findall(text):
        value = float(token)
        half_ulp = 0.5 * 10.0 ** (-_decimals(token))
        if abs(value - score) <= half_ulp + 1e-9:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class PostprocessOptions:
    """Per-task post-processing knobs (``configs/reasoning.py``: ``iqa``/``iaa`` blocks)."""

    max_sentences: int = 0  # 0 = keep all
    max_words: int = 0  # 0 = no cut
    min_words: int = 0  # > 0: fewer words -> reject
    reject_score_in_think: bool = True
    reject_changed_score: bool = True  # teacher's own <answer> differs from the given score
    score_tolerance: float = 1e-6
    think_block: str = "first"  # which complete <think> block to use: "first" (spec) | "last"

    @classmethod
    def from_config(cls, block: Any) -> PostprocessOptions:
        """The options a ``configs/reasoning.py`` task block (``iqa`` / ``iaa``) sets: every
        field but ``score_tolerance``, each as the type of the field's default."""
        fields = [f for f in dataclasses.fields(cls) if f.name != "score_tolerance"]
        return cls(**{f.name: type(f.default)(block[f.name]) for f in fields})


IQA_OPTIONS = PostprocessOptions(max_sentences=2, max_words=50)
IAA_OPTIONS = PostprocessOptions()


@dataclasses.dataclass(frozen=True)
class Processed:
    """A post-processed reply: the target, or the reason it was rejected (``target`` is None)."""

    target: str | None
    think: str
    reason: str | None = None
    detail: str = ""


def postprocess(reply: str, score: float | int | str, opts: PostprocessOptions) -> Processed:
    """Reply -> target (see the module docstring); ``score`` is the record's ground truth."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a string, got {type(reply).__name__}")
    answer_text = format_score(score)
    score_value = float(answer_text)
    think = collapse_ws(strip_tags(extract_reasoning(reply, opts.think_block)))
    think = first_words(first_sentences(think, opts.max_sentences), opts.max_words)
    if not think:
        return Processed(None, think, "empty_think", "no reasoning text left after cleaning")
    if opts.min_words > 0 and word_count(think) < opts.min_words:
        return Processed(None, think, "too_short", f"{word_count(think)} < {opts.min_words} words")
    if opts.reject_score_in_think and mentions_score(think, score_value):
        return Processed(None, think, "score_in_think", f"the score {answer_text} is in the think")
    if opts.reject_changed_score:
        # The teacher's own answer is replaced by the given score; a *different* number there
        # means the reasoning may argue for another score, so the sample is rejected.
        given = last_answer(reply)
        numbers = [float(t) for t in _NUM_TOKEN_RE.findall(given or "")]
        if numbers and all(abs(v - score_value) > opts.score_tolerance for v in numbers):
            return Processed(
                None, think, "teacher_changed_score", f"{given[:40]!r} != {answer_text}"
            )
    return Processed(answer_format.render(think, answer_text), think)
