"""Teacher and judge prompt texts (spec §5.1-§5.3). Wording is ours; the intent is the spec's.

Every text is a template filled with :meth:`str.format`; the defaults below are what
``configs/reasoning.py`` uses, and any of them can be replaced from the config (a different
wording, another language) without touching code.

Placeholders:

* IQA teacher user text: ``{score}`` (the ground truth as given in the record), ``{min_words}``,
  ``{max_words}``, ``{num_sentences}``.
* IAA teacher user text: ``{attributes}`` (the annotations, one ``- Name: text`` line each, in
  the configured order), ``{score}``, ``{target_words}``, ``{low_score}``.
* Judge user texts: ``{gt_score}``, ``{answer}``, ``{think}``; IAA also ``{attributes}`` and
  ``{local_checks}``.

The IQA user text deliberately shows no filled-in ``<answer>`` example (the reference's reason:
a literal ``<answer>{score}</answer>`` in the prompt gets echoed into the reasoning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# ArtiMuse attribute names (as they appear in the annotation questions) -> record keys (spec §5.2).
ATTRIBUTE_KEYS: dict[str, str] = {
    "Composition & Structure": "composition_structure",
    "Visual Elements": "visual_elements",
    "Technical Execution": "technical_execution",
    "Originality & Creativity": "originality_creativity",
    "Theme & Communication": "theme_communication",
    "Emotion & Viewer Response": "emotion_viewer_response",
    "Overall Gestalt": "overall_gestalt",
    "Overall Evaluation": "overall_evaluation",
}
ATTRIBUTE_NAMES: dict[str, str] = {v: k for k, v in ATTRIBUTE_KEYS.items()}

# The fixed order in which the IAA teacher is asked to reason (spec §5.2).
IAA_ATTRIBUTE_ORDER: tuple[str, ...] = (
    "visual_elements",
    "composition_structure",
    "overall_gestalt",
    "technical_execution",
    "theme_communication",
    "emotion_viewer_response",
    "originality_creativity",
    "overall_evaluation",
)

IQA_TEACHER_SYSTEM = (
    "You are an expert in technical image quality assessment. You will see an image and the "
    "mean opinion score (MOS) that human raters gave to its technical quality. Reply with exactly "
    "two blocks: first <think> ... </think> holding a short technical description of the image "
    "quality, then <answer> ... </answer> holding exactly the MOS you were given. Talk only about "
    "technical quality (sharpness, blur, noise, compression artefacts, exposure, colour cast and "
    "the like), never about aesthetics or content. Mention only what is actually visible; invent "
    "nothing. Never change the score, and never write the score or any other number inside the "
    "<think> block."
)

IQA_TEACHER_USER = (
    "Ground-truth MOS: {score}\n"
    "Write a short description that explains why the image deserves this MOS: exactly "
    "{num_sentences} sentences, {min_words} to {max_words} words in total, naming the one or two "
    "quality factors that matter most (for example sharpness or blur, noise, compression "
    "artefacts, exposure, colour cast). Do not put the MOS or any number in the description. "
    "Output the two blocks only: the description inside <think> </think>, then the MOS inside "
    "<answer> </answer>."
)

IAA_TEACHER_SYSTEM = (
    "You are a professional in visual aesthetics writing reasoning examples for training a "
    "model. You receive expert annotations of an image's aesthetic attributes and the image's "
    "final aesthetic score. Reply with exactly two blocks: <think> ... </think> with your expert "
    "reasoning, then <answer> ... </answer> holding only the given score. Reason step by step "
    "through the annotations, but add no visual detail that they do not support. Do not copy any "
    "sentence of more than 15 words from the annotations. Never change the score, and never "
    "write the score inside the reasoning."
)

IAA_TEACHER_USER = (
    "Expert annotations, in the order to reason through them:\n"
    "{attributes}\n\n"
    "Final aesthetic score (keep it unchanged): {score}\n\n"
    "Requirements for the reasoning inside <think>:\n"
    "- about {target_words} words, written as one coherent narrative;\n"
    "- no 'Step 1/2/3' labels and no numbered steps;\n"
    "- go through the attributes in the order given above;\n"
    "- paraphrase the annotations instead of copying them;\n"
    "- stay consistent with the score (a score below {low_score} means clearly low aesthetic "
    "quality);\n"
    "- add no visual details that the annotations do not support.\n"
    "Then put the score, unchanged, inside <answer> </answer>."
)

IQA_JUDGE_SYSTEM = (
    "You are a strict and conservative auditor of training data for image quality assessment "
    "(IQA). You check whether a short technical rationale truly describes the image and supports "
    "its score. Reply with one JSON object and nothing else."
)

IQA_JUDGE_USER = (
    "Audit this IQA training sample against the image.\n"
    "gt_score: {gt_score}\n"
    "predicted_score: {answer}\n"
    "rationale (think text):\n<<<\n{think}\n>>>\n\n"
    "Give each criterion an integer from 0 (very bad) to 5 (perfect), with short evidence:\n"
    "- visual_fidelity: are the described artefacts or qualities really visible in the image?\n"
    "- technical_rigor: is the IQA terminology used correctly?\n"
    "- score_consistency: does the rationale support the size and direction of the score?\n"
    "Reject samples with hallucinated defects or generic boilerplate; strongly prefer reject "
    "when visual_fidelity <= 2 or score_consistency <= 2.\n"
    "Return exactly this JSON shape:\n"
    '{{"scores": {{"visual_fidelity": 0, "technical_rigor": 0, "score_consistency": 0}}, '
    '"evidence": {{"visual_fidelity": "", "technical_rigor": "", "score_consistency": ""}}, '
    '"decision": "keep" or "reject", "overall_confidence": 0-100, '
    '"major_issues": [] (non-empty when rejecting), "minor_notes": [], "debug": {{}}}}'
)

IAA_JUDGE_SYSTEM = (
    "You are a strict auditor of training data for image aesthetic assessment (IAA). You check "
    "whether an aesthetic narrative is grounded in the image and its expert annotations and "
    "derives the score smoothly. Reply with one JSON object and nothing else."
)

IAA_JUDGE_USER = (
    "Audit this IAA training sample against the image and the expert annotations.\n"
    "gt_score: {gt_score}\n"
    "predicted_score: {answer}\n"
    "expert annotations:\n{attributes}\n\n"
    "local checks: {local_checks}\n\n"
    "narrative (think text):\n<<<\n{think}\n>>>\n\n"
    "Expectations: (1) it covers about five or more aesthetic aspects; (2) it neither fabricates "
    "nor contradicts the annotations; (3) it does not merely parrot them but links attributes "
    "causally; (4) it moves smoothly from description to what the attributes imply to the score.\n"
    "Give each criterion an integer from 0 (very bad) to 5 (perfect).\n"
    "Return exactly this JSON shape:\n"
    '{{"scores": {{"attribute_coverage": 0, "groundedness_no_fabrication": 0, '
    '"reasoning_cohesion": 0, "score_derivation_smoothness": 0}}, '
    '"decision": "keep" or "reject", "notes": ""}}'
)


def format_attributes(
    attributes: Mapping[str, str],
    order: Sequence[str] = IAA_ATTRIBUTE_ORDER,
    max_chars: int = 0,
) -> str:
    """``- Name: text`` lines for the attributes present, in ``order``; ``max_chars`` > 0 truncates
    each text (the judge sees at most 1,200 characters per attribute, spec §5.3)."""
    lines = []
    for key in order:
        text = attributes.get(key)
        if not text or not str(text).strip():
            continue
        text = " ".join(str(text).split())
        if max_chars > 0 and len(text) > max_chars:
            text = text[:max_chars] + " …"
        lines.append(f"- {ATTRIBUTE_NAMES.get(key, key)}: {text}")
    return "\n".join(lines)
