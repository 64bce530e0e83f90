"""The completion format ``<think>…</think><answer>…</answer>`` (spec §3, §4): written and read
here only.

Writing (SFT targets, synthetic rationales, prompts): :func:`render` gives the canonical target
``<think>\\n{think}\\n</think>\\n<answer>{answer}</answer>``; :func:`render_answer`,
:func:`score_text` (a 0-100 score with two decimals, as the prompts ask), :data:`EMPTY_THINK` (the
empty thought of thought dropout, spec D1), :func:`replace_answers` and :func:`empty_think` edit
an existing target.

Reading model completions (tags in any case; nothing here raises on a ``str``):
:func:`parse_answer` (the strict training parser, spec §4), :func:`parse_answer_lenient` (the
reference evaluation parser), :func:`get_parser` (either by name), :func:`has_think` and
:func:`think_text` (the first think block, as counted for think length).

Reading teacher targets (tags exactly as written): :func:`split_target` and :func:`parse_number`
(one strict number, spec §4 step 3).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "ANSWER_TAG",
    "EMPTY_THINK",
    "PARSERS",
    "TAGS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "THINK_TAG",
    "empty_think",
    "get_parser",
    "has_think",
    "parse_answer",
    "parse_answer_lenient",
    "parse_number",
    "render",
    "render_answer",
    "replace_answers",
    "score_text",
    "split_target",
    "think_text",
]

THINK_TAG = "think"
ANSWER_TAG = "answer"
THINK_OPEN = f"<{THINK_TAG}>"
THINK_CLOSE = f"</{THINK_TAG}>"
ANSWER_OPEN = f"<{ANSWER_TAG}>"
ANSWER_CLOSE = f"</{ANSWER_TAG}>"
TAGS: tuple[str, str, str, str] = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}"

_THINK_OPEN_RE = re.compile(re.escape(THINK_OPEN), re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(re.escape(THINK_CLOSE), re.IGNORECASE)
_ANSWER_OPEN_RE = re.compile(re.escape(ANSWER_OPEN), re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(re.escape(ANSWER_CLOSE), re.IGNORECASE)
_ANY_CASE_ANSWER_RE = re.compile(
    f"{re.escape(ANSWER_OPEN)}(.*?){re.escape(ANSWER_CLOSE)}", re.DOTALL | re.IGNORECASE
)
# Exact-case blocks: targets are written by us or checked tag by tag (judge tag_count).
_THINK_RE = re.compile(f"{re.escape(THINK_OPEN)}(.*?){re.escape(THINK_CLOSE)}", re.DOTALL)
_ANSWER_RE = re.compile(f"{re.escape(ANSWER_OPEN)}(.*?){re.escape(ANSWER_CLOSE)}", re.DOTALL)

# Spec §4 step 3: optional sign, digits, optional .digits, optional exponent e±digits.
_STRICT_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LEADING_FENCE = re.compile(r"^```(?:text)?", re.IGNORECASE)
_TRAILING_FENCE = re.compile(r"```$")
_LENIENT_FENCE_OPEN = re.compile(r"^```(?:json)?", re.IGNORECASE)
_LENIENT_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


# --------------------------------------------------------------------------------------------
# Writing


def render_answer(answer: str) -> str:
    """``<answer>{answer}</answer>``; ``answer`` is the number already written as text."""
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def render(think: str, answer: str) -> str:
    """The canonical target ``<think>\\n{think}\\n</think>\\n<answer>{answer}</answer>``."""
    return f"{THINK_OPEN}\n{think}\n{THINK_CLOSE}\n{render_answer(answer)}"


def score_text(score_100: float) -> str:
    """A 0-100 score as the prompts ask for it: two decimals (``7.125`` -> ``"7.12"``)."""
    return f"{score_100:.2f}"


def replace_answers(target: str, answer: str) -> str:
    """Every ``<answer>…</answer>`` (any case) set to ``render_answer(answer)``; appended on a
    new line if there is none."""
    block = render_answer(answer)
    if _ANY_CASE_ANSWER_RE.search(target):
        return _ANY_CASE_ANSWER_RE.sub(lambda _: block, target)
    return f"{target}\n{block}"


def empty_think(target: str) -> str:
    """The target with each ``<think>…</think>`` replaced by :data:`EMPTY_THINK` (spec D1)."""
    return _THINK_RE.sub(lambda _: EMPTY_THINK, target)


# --------------------------------------------------------------------------------------------
# Reading model completions


def _first_answer_block(text: str) -> str | None:
    """Content of the first ``<answer>(.*?)</answer>`` (case-insensitive, dot-all).

    Equivalent to ``re.search(r"<answer>(.*?)</answer>", text, re.I | re.S)`` but linear time: if
    the first opening tag has no closing tag after it, no later opening tag has one either.
    """
    m = _ANSWER_OPEN_RE.search(text)
    if m is None:
        return None
    c = _ANSWER_CLOSE_RE.search(text, m.end())
    if c is None:
        return None
    return text[m.end() : c.start()]


def _to_float(token: str) -> float | None:
    try:
        return float(token)
    except (ValueError, OverflowError):  # non-ASCII digits float() does not know
        return None


def parse_number(text: str) -> float | None:
    """``text`` as exactly one strict number token (spec §4 step 3) and nothing but whitespace
    besides it, else ``None``. ``"73.42"``, ``" +7.3e1 "`` -> a float; ``".5"``, ``"73."``,
    ``"70-80"``, ``"73 points"`` -> ``None``."""
    tokens = _STRICT_NUMBER.findall(text)
    if len(tokens) != 1:
        return None
    rest = text.replace(tokens[0], "", 1)
    if rest.strip():
        return None
    return _to_float(tokens[0])


def parse_answer(text: str) -> float | None:
    """Strict training/reward parser (spec §4). Returns the number or ``None``.

    First ``<answer>…</answer>`` block; surrounding whitespace and a leading (```` ``` ```` or
    ```` ```text ````) / trailing code fence stripped; exactly one number token
    ``[+-]?\\d+(\\.\\d+)?([eE][+-]?\\d+)?`` and nothing but whitespace besides it. ``"73.42
    points"``, ``"score: 73"``, ``".5"``, ``"73."``, ``"70-80"`` → ``None``; ``"+73"``, ``"-5"``,
    ``"7.3e1"`` → a float. The value is not clipped here (rewards clip to [0, 100]); a huge
    exponent gives ``inf``, never NaN. Never raises for a ``str``.
    """
    if not isinstance(text, str):
        return None
    block = _first_answer_block(text)
    if block is None:
        return None
    s = block.strip()
    s = _LEADING_FENCE.sub("", s, count=1)
    s = _TRAILING_FENCE.sub("", s, count=1)
    return parse_number(s)


def _finite_number(text: str) -> float | None:
    """The first number-like substring of ``text`` if it is a finite float."""
    m = _LENIENT_NUMBER.search(text)
    value = _to_float(m.group(0)) if m else None
    return value if value is not None and math.isfinite(value) else None


def parse_answer_lenient(text: str) -> float | None:
    """The reference *evaluation* parser (spec §4), for reference-compatible evaluation only.

    Last ``<answer>…</answer>`` block; code fences (optionally ```` ```json ````) stripped; a JSON
    object's ``rating`` if the content is one; else the first number-like substring anywhere in
    the block ("about 73 points" → 73). No rescaling here: apply
    :func:`tatar_jax.rewards.reference_rescale_prediction` explicitly to reproduce bug B2. Never
    raises.
    """
    if not isinstance(text, str):
        return None
    blocks = _ANY_CASE_ANSWER_RE.findall(text)
    if not blocks:
        return None
    s = blocks[-1].strip()
    s = _LENIENT_FENCE_OPEN.sub("", s, count=1)
    s = _TRAILING_FENCE.sub("", s, count=1).strip()
    try:
        obj = json.loads(s)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict) and "rating" in obj:
        rating = obj["rating"]
        if isinstance(rating, (int, float)) and not isinstance(rating, bool):
            value = float(rating)
            return value if math.isfinite(value) else None
        if isinstance(rating, str):
            return _finite_number(rating)
    return _finite_number(s)


def out_of_scale(value: float | None) -> bool:
    """Whether a parsed answer lies outside the 0-100 scale the prompts ask for (``inf``
    included; None, an unparsed answer, is not "out of scale"). Evaluation reports such answers
    (counted, shown with the value) instead of silently clipping them."""
    return value is not None and not 0.0 <= value <= 100.0


PARSERS: dict[str, Callable[[str], float | None]] = {
    "strict": parse_answer,
    "lenient": parse_answer_lenient,
}


def get_parser(parser: str | Callable[[str], float | None]) -> Callable[[str], float | None]:
    """``"strict"`` (spec §4), ``"lenient"`` (reference evaluation) or a callable, as given."""
    if isinstance(parser, str) and parser in PARSERS:
        return PARSERS[parser]
    if callable(parser):
        return parser
    raise ValueError(f"parser must be 'strict', 'lenient' or a callable, got {parser!r}")


def has_think(text: str) -> bool:
    """Whether a ``<think>`` tag (any case) is present."""
    return _THINK_OPEN_RE.search(text) is not None


def think_text(text: str) -> str:
    """Text of the first ``<think>`` block: up to ``</think>``, else up to ``<answer>`` / end;
    ``""`` without a ``<think>`` tag. Tags in any case; not stripped."""
    m = _THINK_OPEN_RE.search(text)
    if m is None:
        return ""
    c = _THINK_CLOSE_RE.search(text, m.end())
    if c is None:
        c = _ANSWER_OPEN_RE.search(text, m.end())
    return text[m.end() : c.start()] if c is not None else text[m.end() :]


# --------------------------------------------------------------------------------------------
# Reading teacher targets


def split_target(target: str) -> tuple[str, str]:
    """(think, answer) contents, stripped, of the first exact-case ``<think>…</think>`` and
    ``<answer>…</answer>`` blocks; ``""`` for a missing one. Meant for a well-formed target
    (each tag exactly once)."""
    t, a = _THINK_RE.search(target), _ANSWER_RE.search(target)
    return (t.group(1).strip() if t else ""), (a.group(1).strip() if a else "")
