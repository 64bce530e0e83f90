"""The judge stage (spec §5.3): hard rules, keyword coverage, the LLM judge's JSON and keep rules.

All functions here are pure; the HTTP call lives in :mod:`~tatar_jax.reasoning.teachers` and the
wiring in :mod:`~tatar_jax.reasoning.build`. A rule returns ``None`` (pass) or a
:class:`Rejection` with a short stable ``reason`` code (summaries group by it) and a ``detail``.

Hard rules, in order (``task`` selects the variant):

=======================  =====  =====  ============================================================
rule (reason code)        IQA    IAA   what
=======================  =====  =====  ============================================================
contamination             yes    yes   tool-call tags, code fences, ``<script``; IQA also
                                       ``<system>``/``<assistant>`` tags and BEGIN/END *markers*;
                                       IAA also ``system:``/``assistant:``/``developer:`` anywhere
role_prefix               yes    --    ``system:``/``assistant:``/``developer:`` at a line start
tag_count                 yes    yes   each of ``<think>``, ``</think>``, ``<answer>``,
                                       ``</answer>`` exactly once
answer_not_number         yes    yes   the answer is one strict number (spec §4)
nested_tag                --     yes   no tag inside the think or the answer
score_out_of_range        yes    yes   gt and answer in ``score_range`` (default [1, 100])
image_missing             yes    yes   the image file exists (the judge must see it)
coverage                  --     yes   >= ``min_aspects`` attributes touched (keyword rule below)
=======================  =====  =====  ============================================================

B9, fixed:

* BEGIN/END. The reference rejects the whole words "begin"/"end" in any case, so "at the end of
  the frame" kills a good rationale. The intent is to catch template markers (``BEGIN``,
  ``[END]``, ``END_OF_TEXT``, ``--- END OUTPUT ---``). Our rule: the upper-case tokens ``BEGIN``
  or ``END`` not glued to other letters/digits on the left nor to lower-case letters/digits on the
  right, matched **case-sensitively** (``(?<![A-Za-z0-9])(?:BEGIN|END)(?![a-z0-9])``). "end",
  "End of", "beginning", "endless", "legend" all pass.
* Keyword coverage. Keywords match as **whole words** (``\\b`` on both sides, case-insensitive),
  multi-word keywords with any whitespace between their words, and a keyword also matches its
  plural (``s``/``es``): "line" matches "lines" but not "outline" or "linear". **One keyword
  counts for one aspect**: the keyword lists must be disjoint (checked; a keyword listed under
  two aspects is a configuration error). The spec lists "overall" under both gestalt and overall
  evaluation; by default it belongs to overall evaluation only. The aspects counted are the
  record's non-empty attribute keys (all eight when the record carries none).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tatar_jax import answer_format
from tatar_jax.answer_format import split_target
from tatar_jax.reasoning import postprocess as pp

# Spec §5.3 keyword lists (IAA coverage), keyed by the attribute they stand for. "overall" is
# only under overall_evaluation (B9: one keyword counts for one aspect).
DEFAULT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "emotion_viewer_response": (
        "emotion", "emotional", "mood", "feeling", "evoke", "impact", "resonance", "viewer",
    ),
    "composition_structure": (
        "composition", "layout", "balance", "symmetry", "framing", "alignment", "spacing",
        "rule of thirds", "structure",
    ),
    "originality_creativity": (
        "original", "originality", "creative", "creativity", "novel", "unique", "generic",
        "derivative", "innovative",
    ),
    "visual_elements": (
        "color", "palette", "contrast", "saturation", "shape", "line", "texture", "space", "depth",
        "lighting", "shadow",
    ),
    "overall_gestalt": ("gestalt", "cohesive", "coherence", "harmony", "unity", "holistic"),
    "technical_execution": (
        "technical", "execution", "polish", "refined", "resolution", "artifact", "edges",
        "blending", "rendering", "clarity",
    ),
    "theme_communication": (
        "theme", "story", "narrative", "message", "communication", "concept", "context",
        "cultural",
    ),
    "overall_evaluation": (
        "overall", "aesthetic", "appeal", "quality", "evaluation", "rating", "score",
    ),
}  # fmt: skip

DEFAULT_CAUSAL_CONNECTIVES: tuple[str, ...] = (
    "because", "due to", "therefore", "thus", "so", "as a result", "which makes", "leading to",
    "hence",
)  # fmt: skip

DEFAULT_KEEP_RULES: dict[str, dict[str, float]] = {
    "iqa": {"visual_fidelity": 2, "score_consistency": 2},
    "iaa": {"groundedness_no_fabrication": 2, "reasoning_cohesion": 2},
}

_FENCE = "```"
_TOOL_MARK_RE = re.compile(
    r"</?(?:tool_call|function_call|tool_calls|tool_response)\b|<\|[^|>]*(?:tool|function)",
    re.IGNORECASE,
)
_SCRIPT_RE = re.compile(r"<script", re.IGNORECASE)
_ROLE_TAG_RE = re.compile(r"</?(?:system|assistant)\s*>", re.IGNORECASE)
_BEGIN_END_RE = re.compile(r"(?<![A-Za-z0-9])(?:BEGIN|END)(?![a-z0-9])")
_ROLE_PREFIX_LINE_RE = re.compile(r"^\s*(?:system|assistant|developer)\s*:", re.IGNORECASE | re.M)
_ROLE_WORD_RE = re.compile(r"\b(?:system|assistant|developer):", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z_|][^<>]*>")


@dataclasses.dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str = ""


# --------------------------------------------------------------------------------------------
# Keyword coverage


def keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Whole-word, case-insensitive, whitespace-tolerant pattern; the last word may be plural."""
    words = keyword.strip().split()
    if not words:
        raise ValueError("empty keyword")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"\b{body}(?:s|es)?\b", re.IGNORECASE)


def check_keywords_disjoint(keywords: Mapping[str, Sequence[str]]) -> None:
    seen: dict[str, str] = {}
    for aspect, words in keywords.items():
        for w in words:
            key = " ".join(w.lower().split())
            if key in seen and seen[key] != aspect:
                raise ValueError(
                    f"keyword {w!r} is listed under both {seen[key]!r} and {aspect!r}; one "
                    "keyword may count for one aspect only"
                )
            seen[key] = aspect


class KeywordCoverage:
    """Which aspects a text touches (module docstring: whole words, one aspect per keyword)."""

    def __init__(self, keywords: Mapping[str, Sequence[str]] = DEFAULT_KEYWORDS) -> None:
        check_keywords_disjoint(keywords)
        self._patterns = {a: [keyword_pattern(w) for w in ws] for a, ws in keywords.items()}

    @property
    def aspects(self) -> tuple[str, ...]:
        return tuple(self._patterns)

    def touched(self, text: str, aspects: Iterable[str] | None = None) -> list[str]:
        """The aspects among ``aspects`` (default all) that ``text`` hits, in list order."""
        wanted = set(self._patterns) if aspects is None else set(aspects)
        return [
            a
            for a, pats in self._patterns.items()
            if a in wanted and any(p.search(text) for p in pats)
        ]


def has_causal_link(text: str, connectives: Sequence[str] = DEFAULT_CAUSAL_CONNECTIVES) -> bool:
    """The spec's hint for the judge: does the text contain a causal connective (whole words)?"""
    return any(
        re.search(r"\b" + r"\s+".join(map(re.escape, c.split())) + r"\b", text, re.IGNORECASE)
        for c in connectives
    )


# --------------------------------------------------------------------------------------------
# Hard rules


@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """Hard-rule knobs (``configs/reasoning.py``: ``rules``)."""

    score_range: tuple[float, float] = (1.0, 100.0)  # spec §5.3, on the scale the record gives
    check_image_exists: bool = True
    min_aspects: int = 5  # IAA coverage threshold
    keywords: Mapping[str, Sequence[str]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_KEYWORDS)
    )
    causal_connectives: Sequence[str] = DEFAULT_CAUSAL_CONNECTIVES


def _contamination(target: str, task: str) -> Rejection | None:
    checks: list[tuple[str, re.Pattern[str] | str]] = [
        ("tool_call", _TOOL_MARK_RE),
        ("code_fence", _FENCE),
        ("script", _SCRIPT_RE),
    ]
    if task == "iqa":
        checks += [("role_tag", _ROLE_TAG_RE), ("begin_end_marker", _BEGIN_END_RE)]
    else:
        checks += [("role_word", _ROLE_WORD_RE)]
    for name, pat in checks:
        hit = (pat in target) if isinstance(pat, str) else pat.search(target)
        if hit:
            return Rejection("contamination", name)
    return None


def hard_rules(
    target: str,
    task: str,
    gt_score: float,
    image_path: str | None,
    attributes: Mapping[str, str] | None = None,
    opts: RuleOptions | None = None,
    coverage: KeywordCoverage | None = None,
) -> tuple[Rejection | None, dict[str, Any]]:
    """Apply the task's hard rules to a target. Returns (first failure or None, local checks).

    ``local checks`` (IAA: touched aspects, causal hint) are also handed to the LLM judge.
    """
    if task not in ("iqa", "iaa"):
        raise ValueError(f"task must be 'iqa' or 'iaa', got {task!r}")
    opts = opts or RuleOptions()
    checks: dict[str, Any] = {}
    rej = _contamination(target, task)
    if rej:
        return rej, checks
    if task == "iqa" and _ROLE_PREFIX_LINE_RE.search(target):
        return Rejection("role_prefix"), checks
    counts = {t: target.count(t) for t in answer_format.TAGS}
    if any(c != 1 for c in counts.values()):
        return Rejection("tag_count", json.dumps(counts)), checks
    think, answer = split_target(target)
    value = answer_format.parse_number(answer)
    if value is None:
        return Rejection("answer_not_number", repr(answer[:40])), checks
    if task == "iaa" and (_TAG_RE.search(think) or _TAG_RE.search(answer)):
        return Rejection("nested_tag"), checks
    lo, hi = opts.score_range
    for name, v in (("gt", float(gt_score)), ("answer", value)):
        if not lo <= v <= hi:
            return Rejection("score_out_of_range", f"{name} {v} not in [{lo}, {hi}]"), checks
    if opts.check_image_exists and (not image_path or not os.path.isfile(image_path)):
        return Rejection("image_missing", str(image_path)), checks
    if task == "iaa":
        coverage = coverage or KeywordCoverage(opts.keywords)
        present = [k for k, v in (attributes or {}).items() if v and str(v).strip()]
        aspects = [a for a in present if a in coverage.aspects] or list(coverage.aspects)
        touched = coverage.touched(think, aspects)
        checks = {
            "aspects_touched": touched,
            "num_aspects_touched": len(touched),
            "num_aspects": len(aspects),
            "has_causal_link": has_causal_link(think, opts.causal_connectives),
            "num_words": pp.word_count(think),
        }
        if len(touched) < opts.min_aspects:
            return Rejection("coverage", f"{len(touched)} < {opts.min_aspects} aspects"), checks
    return None, checks


# --------------------------------------------------------------------------------------------
# LLM judge verdicts


def parse_judge_json(text: str) -> dict[str, Any]:
    """The first JSON object in the judge's reply (code fences and surrounding prose tolerated).

    Raises ValueError when there is none.
    """
    s = text.strip()
    s = re.sub(r"^```(?:json)?\s*", "", s, flags=re.IGNORECASE)
    s = re.sub(r"\s*```\s*$", "", s)
    decoder = json.JSONDecoder()
    start = s.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(s, start)
        except json.JSONDecodeError:
            start = s.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj
        start = s.find("{", start + 1)
    raise ValueError(f"no JSON object in judge reply {text[:80]!r}")


def judge_scores(verdict: Mapping[str, Any]) -> dict[str, float]:
    """Numeric scores from ``verdict["scores"]`` (or top level); non-numbers are left out."""
    src = verdict.get("scores")
    if not isinstance(src, Mapping):
        src = verdict
    out = {}
    for k, v in src.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
        elif isinstance(v, Mapping) and isinstance(v.get("score"), (int, float)):
            out[str(k)] = float(v["score"])  # {"visual_fidelity": {"score": 4, "evidence": ..}}
    return out


def keep_decision(
    verdict: Mapping[str, Any],
    task: str,
    keep_rules: Mapping[str, Mapping[str, float]] = DEFAULT_KEEP_RULES,
    require_keep_decision: bool = True,
) -> Rejection | None:
    """Spec §5.3 keep rule: decision == "keep" and every listed score > its threshold."""
    decision = str(verdict.get("decision", "")).strip().lower()
    if require_keep_decision and decision != "keep":
        return Rejection("judge_reject", f"decision {decision or '<missing>'!r}")
    scores = judge_scores(verdict)
    for name, threshold in keep_rules.get(task, {}).items():
        if name not in scores:
            return Rejection("judge_missing_score", name)
        if not scores[name] > threshold:
            return Rejection("judge_low_score", f"{name} = {scores[name]:g} <= {threshold:g}")
    return None
