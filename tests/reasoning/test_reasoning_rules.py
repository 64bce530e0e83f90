"""Post-processing (spec §5.1/§5.2) and judge rules (spec §5.3, B9) — pure functions."""

from __future__ import annotations

import pytest

from tatar_jax import answer_format
from tatar_jax.reasoning import judge as J
from tatar_jax.reasoning import postprocess as pp
from tatar_jax.reasoning import prompts as P

# --------------------------------------------------------------------------------------------
# post-processing


def test_iqa_first_think_two_sentences_fifty_words():
    reply = (
        "<think>The image is sharp. Noise is low! Colours look natural? Exposure is fine.</think>"
        "\n<answer>72.5</answer>"
    )
    out = pp.postprocess(reply, 72.5, pp.IQA_OPTIONS)
    assert out.reason is None
    assert (
        out.target == "<think>\nThe image is sharp. Noise is low!\n</think>\n<answer>72.5</answer>"
    )


def test_iqa_word_cap_and_sentence_split_need_whitespace():
    words = " ".join(f"w{i}" for i in range(80))
    out = pp.postprocess(f"<think>{words} end.</think><answer>40</answer>", 40, pp.IQA_OPTIONS)
    assert out.think.split() == [f"w{i}" for i in range(50)]
    # "e.g.x" has no whitespace after the dots: not a sentence end
    out = pp.postprocess("<think>Blur e.g.x shows. Two. Three.</think>", 40, pp.IQA_OPTIONS)
    assert out.think == "Blur e.g.x shows. Two."


def test_iqa_no_think_block_uses_cleaned_reply():
    reply = (
        'Slight motion blur softens edges.<tool_call>{"name": "x"}</tool_call> Strong JPEG '
        "blocking in the sky. Third sentence.<answer>55.1</answer> trailing </answer>"
    )
    out = pp.postprocess(reply, 55.1, pp.IQA_OPTIONS)
    assert out.think == "Slight motion blur softens edges. Strong JPEG blocking in the sky."
    assert "tool_call" not in out.target


def test_dangling_answer_cut_by_stop_string_and_stray_tags():
    reply = "<think>Heavy noise in shadows. <|im_end|>Low contrast.</think>\n<answer>31.2"
    out = pp.postprocess(reply, 31.2, pp.IQA_OPTIONS)
    assert (
        out.target
        == "<think>\nHeavy noise in shadows. Low contrast.\n</think>\n<answer>31.2</answer>"
    )
    # unclosed think (max_tokens reached): the rest of the reply is used, answer tail removed
    out = pp.postprocess("<think>Soft focus overall. Mild noise. <answer>3", 31.2, pp.IQA_OPTIONS)
    assert out.think == "Soft focus overall. Mild noise."


@pytest.mark.parametrize(
    "think,score,leaks",
    [
        ("Quality deserves 72.35 points.", 72.35, True),
        ("About 72 overall.", 72.35, True),  # the score rounded to the digits shown
        ("Roughly 72.4 here.", 72.35, True),
        ("Two key issues: blur and noise.", 72.35, False),
        ("Shot at f2.8 with 4K output.", 2.8, False),  # numbers glued to words do not count
        ("Only 7 regions are sharp.", 72.35, False),
    ],
)
def test_score_in_think(think, score, leaks):
    out = pp.postprocess(f"<think>{think}</think><answer>{score}</answer>", score, pp.IQA_OPTIONS)
    assert (out.reason == "score_in_think") == leaks


def test_changed_score_rejected_and_answer_is_given_score():
    out = pp.postprocess("<think>Sharp and clean.</think><answer>80</answer>", 65.0, pp.IQA_OPTIONS)
    assert out.reason == "teacher_changed_score" and out.target is None
    out = pp.postprocess(
        "<think>Sharp and clean.</think><answer>65.00</answer>", 65.0, pp.IQA_OPTIONS
    )
    assert out.target.endswith("<answer>65.0</answer>")


def test_empty_and_short():
    assert pp.postprocess("<think> </think><answer>5</answer>", 5, pp.IQA_OPTIONS).reason == (
        "empty_think"
    )
    opts = pp.PostprocessOptions(min_words=30)
    assert pp.postprocess("<think>Too short.</think>", 5, opts).reason == "too_short"


def test_iaa_keeps_whole_narrative_strips_nested_tags():
    body = " ".join(["word"] * 130) + " <b>bold</b> end."
    reply = f"<think>{body}</think><answer>6.2"
    out = pp.postprocess(reply, 6.2, pp.IAA_OPTIONS)
    assert out.reason is None
    assert pp.word_count(out.think) == 132 and "<b>" not in out.think
    assert out.target.endswith("</think>\n<answer>6.2</answer>")


def test_think_block_first_or_last():
    reply = "<think>internal monologue</think>\n<think>The narrative.</think><answer>5</answer>"
    assert pp.postprocess(reply, 5, pp.IAA_OPTIONS).think == "internal monologue"
    last = pp.PostprocessOptions(think_block="last")
    assert pp.postprocess(reply, 5, last).think == "The narrative."


def test_format_score():
    assert pp.format_score(3.52) == "3.52"
    assert pp.format_score(70.0) == "70.0"
    assert pp.format_score(7) == "7"
    with pytest.raises(ValueError):
        pp.format_score(float("nan"))


# --------------------------------------------------------------------------------------------
# hard rules


@pytest.fixture()
def image(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 fake jpeg")
    return str(p)


def _t(think: str, answer: str = "50") -> str:
    return answer_format.render(think, answer)


def test_b9_begin_end_marker_only_uppercase_tokens(image):
    ok = [
        "Blur at the end of the frame. The beginning of the sky is clean.",
        "End of story: noise. Endless grain, a legend of artefacts.",
    ]
    # ordinary prose passes (the reference rejected both, B9)
    for think in ok:
        rej, _ = J.hard_rules(_t(think), "iqa", 50, image)
        assert rej is None, think
    for think in ("BEGIN Sharp image.", "Sharp image. [END]", "Noise. END_OF_TEXT", "--- END ---"):
        rej, _ = J.hard_rules(_t(think), "iqa", 50, image)
        assert rej == J.Rejection("contamination", "begin_end_marker"), think


@pytest.mark.parametrize(
    "think,reason",
    [
        ("Sharp. <tool_call>x</tool_call>", "contamination"),
        ("Sharp ```code``` here.", "contamination"),
        ("<script>alert(1)</script> sharp.", "contamination"),
        ("<system> sharp image.", "contamination"),
        ("Sharp image.\nassistant: done", "role_prefix"),
    ],
)
def test_iqa_contamination_and_role_prefix(image, think, reason):
    rej, _ = J.hard_rules(_t(think), "iqa", 50, image)
    assert rej is not None and rej.reason == reason


def test_iqa_structure_number_range_image(image):
    assert J.hard_rules(_t("a") + "<answer>1</answer>", "iqa", 50, image)[0].reason == "tag_count"
    assert J.hard_rules(_t("a", "73 points"), "iqa", 50, image)[0].reason == "answer_not_number"
    assert J.hard_rules(_t("a", "73."), "iqa", 50, image)[0].reason == "answer_not_number"
    assert J.hard_rules(_t("a", "+73"), "iqa", 50, image)[0] is None  # strict parser accepts
    rej = J.hard_rules(_t("a", "0.5"), "iqa", 50, image)[0]
    assert rej.reason == "score_out_of_range" and rej.detail.startswith("answer")
    assert J.hard_rules(_t("a", "50"), "iqa", 0.5, image)[0].reason == "score_out_of_range"
    assert J.hard_rules(_t("a"), "iqa", 50, image + ".missing")[0].reason == "image_missing"
    opts = J.RuleOptions(score_range=(0.0, 100.0))
    assert J.hard_rules(_t("a", "0.5"), "iqa", 0.5, image, opts=opts)[0] is None


ALL_ATTRS = {k: "text" for k in P.IAA_ATTRIBUTE_ORDER}


def test_iaa_role_words_anywhere_and_nested_tags(image):
    good = (
        "The palette and lighting feel warm, and the layout is balanced because the framing is "
        "tight; the theme is clear, the mood evokes calm, the execution is refined and the "
        "overall appeal is high."
    )
    rej, checks = J.hard_rules(_t(good, "7.5"), "iaa", 7.5, image, ALL_ATTRS)
    assert rej is None and checks["has_causal_link"]
    eco = good + " The ecosystem: lush."  # "system:" only as a whole word
    assert J.hard_rules(_t(eco, "7.5"), "iaa", 7.5, image, ALL_ATTRS)[0] is None
    bad = good + " As the assistant: I think so."
    assert J.hard_rules(_t(bad, "7.5"), "iaa", 7.5, image, ALL_ATTRS)[0].reason == "contamination"
    nested = good + " <em>wow</em>"
    assert J.hard_rules(_t(nested, "7.5"), "iaa", 7.5, image, ALL_ATTRS)[0].reason == "nested_tag"
    # the IQA-only BEGIN/END and line-start rules do not apply to IAA
    assert J.hard_rules(_t(good + " THE END", "7.5"), "iaa", 7.5, image, ALL_ATTRS)[0] is None


def test_b9_keyword_coverage_word_boundaries():
    cov = J.KeywordCoverage()
    # "outline" must not count as "line"; "lines" (plural) does
    assert "visual_elements" not in cov.touched("A bold outline.")
    assert "visual_elements" in cov.touched("Bold lines lead the eye.")
    assert cov.touched("underscored linear storyline") == []  # no raw substrings
    assert cov.touched("The composition follows the rule  of\nthirds.") == ["composition_structure"]
    # "overall" counts for one aspect only (overall evaluation), not gestalt too
    assert cov.touched("Overall it works.") == ["overall_evaluation"]
    # "so" as a causal connective is a whole word ("also", "resolution" do not count)
    assert not J.has_causal_link("It also has resolution.")
    assert J.has_causal_link("It is dark, so moody.")


def test_keyword_lists_must_be_disjoint():
    with pytest.raises(ValueError, match="(?i)overall"):
        J.KeywordCoverage({"a": ("overall",), "b": ("Overall",)})


def test_iaa_coverage_counts_only_the_records_aspects(image):
    think = (
        "The palette is rich, the composition balanced, the theme clear and the mood calm; "
        "the overall appeal follows."
    )  # touches visual, composition, theme, emotion, overall evaluation = 5
    rej, checks = J.hard_rules(_t(think, "6"), "iaa", 6, image, ALL_ATTRS)
    assert rej is None and checks["num_aspects_touched"] == 5
    three = {k: "t" for k in ("visual_elements", "composition_structure", "overall_gestalt")}
    rej, checks = J.hard_rules(_t(think, "6"), "iaa", 6, image, three)
    assert rej.reason == "coverage" and checks["num_aspects_touched"] == 2


# --------------------------------------------------------------------------------------------
# judge verdicts


def test_parse_judge_json_fenced_and_with_prose():
    text = 'Sure.\n```json\n{"scores": {"visual_fidelity": 4}, "decision": "keep"}\n```'
    assert J.parse_judge_json(text)["decision"] == "keep"
    assert J.parse_judge_json('noise {bad} {"decision": "reject"} tail')["decision"] == "reject"
    with pytest.raises(ValueError):
        J.parse_judge_json("no json here")


@pytest.mark.parametrize(
    "verdict,reason",
    [
        ({"scores": {"visual_fidelity": 3, "score_consistency": 3}, "decision": "keep"}, None),
        ({"scores": {"visual_fidelity": 3, "score_consistency": 3}, "decision": "reject"},
         "judge_reject"),
        ({"scores": {"visual_fidelity": 2, "score_consistency": 5}, "decision": "keep"},
         "judge_low_score"),  # > 2 is required: 2 is not enough
        ({"scores": {"visual_fidelity": 5, "score_consistency": 2}, "decision": "KEEP"},
         "judge_low_score"),
        ({"scores": {"visual_fidelity": 5}, "decision": "keep"}, "judge_missing_score"),
        ({"visual_fidelity": {"score": 4}, "score_consistency": 3, "decision": "keep"}, None),
    ],
)  # fmt: skip
def test_iqa_keep_rule(verdict, reason):
    rej = J.keep_decision(verdict, "iqa")
    assert (rej.reason if rej else None) == reason


def test_iaa_keep_rule_uses_its_own_scores():
    v = {
        "scores": {
            "groundedness_no_fabrication": 3,
            "reasoning_cohesion": 3,
            "attribute_coverage": 0,
        },
        "decision": "keep",
    }
    assert J.keep_decision(v, "iaa") is None
    v["scores"]["reasoning_cohesion"] = 1
    assert J.keep_decision(v, "iaa").reason == "judge_low_score"
