"""The completion format in one module: writing, the think span, teacher-target reading.

The strict and lenient parsers' own cases and fuzzing live in tests/test_rewards_parse.py (through
their public names in ``tatar_jax.rewards``, which are these functions).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tatar_jax import answer_format as af
from tatar_jax import rewards
from tatar_jax.data import prompts


def test_rewards_exports_the_parsers():
    assert rewards.parse_answer is af.parse_answer
    assert rewards.parse_answer_lenient is af.parse_answer_lenient


def test_render_is_the_spec_target():
    assert af.render("fine", "73.42") == "<think>\nfine\n</think>\n<answer>73.42</answer>"
    assert af.render_answer(af.score_text(7.125)) == "<answer>7.12</answer>"
    assert af.TAGS == ("<think>", "</think>", "<answer>", "</answer>")
    assert af.EMPTY_THINK == "<think>\n\n</think>"
    assert af.parse_answer(af.render("x", af.score_text(99.999))) == 100.0


def test_replace_answers_any_case_or_appended():
    assert af.replace_answers("<answer>1</answer> <Answer>\n2\n</Answer>", "5") == (
        "<answer>5</answer> <answer>5</answer>"
    )
    assert af.replace_answers("<think>x</think>", "5") == "<think>x</think>\n<answer>5</answer>"


def test_empty_think():
    assert af.empty_think("<think>\nlong\nthought\n</think>\n<answer>1</answer>") == (
        "<think>\n\n</think>\n<answer>1</answer>"
    )
    # Exact-case tags only, as written by the data path.
    assert af.empty_think("<THINK>a</THINK>") == "<THINK>a</THINK>"


@pytest.mark.parametrize(
    "text,want",
    [
        ("<think>\nsharp\n</think>\n<answer>73</answer>", "\nsharp\n"),
        ("<THINK>a</Think><answer>1</answer>", "a"),  # any case
        ("<think>unclosed <answer>x</answer>", "unclosed "),  # to <answer> without </think>
        ("<think>runs to the end", "runs to the end"),
        ("<think>a<answer>1</answer>b</think>", "a<answer>1</answer>b"),  # </think> wins
        ("no think <answer>1</answer>", ""),
    ],
)
def test_think_text(text, want):
    assert af.think_text(text) == want
    assert af.has_think(text) == ("<think>" in text.lower())


def test_split_target_exact_case():
    assert af.split_target("<think> a </think>\n<answer> 5 </answer>") == ("a", "5")
    assert af.split_target("<THINK>a</THINK><answer>5</answer>") == ("", "5")


def test_get_parser():
    assert af.get_parser("strict") is af.parse_answer
    assert af.get_parser("lenient") is af.parse_answer_lenient
    fn = lambda _: 1.0
    assert af.get_parser(fn) is fn
    with pytest.raises(ValueError, match="parser"):
        af.get_parser("fuzzy")


# The judge's former number rule, kept here as the oracle of parse_number.
_JUDGE_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*$")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-.eE \n\ta%٣")), max_size=12))
def test_parse_number_is_one_strict_token(text):
    m = _JUDGE_NUMBER.match(text)
    assert af.parse_number(text) == (float(m.group(1)) if m else None)


def test_prompts_name_the_format_tags():
    p = prompts.get_prompts("train")
    assert "<think> </think> tags" in p.system and "<answer> </answer> tags" in p.system
    for text in (p.iqa, p.iaa):
        assert text.endswith(f"for example {af.render_answer('73.42')}.")
