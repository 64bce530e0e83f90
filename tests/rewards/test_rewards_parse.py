"""Answer parsers and the completion feature builder (spec §4, §8): examples, fuzzing."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tatar_jax import rewards

STRICT_CASES = [
    ("<answer>73.42</answer>", 73.42),
    ("<think>\nfine\n</think>\n<answer>73.42</answer>", 73.42),
    ("<answer>73.42 points</answer>", None),
    ("<answer>score: 73</answer>", None),
    ("<answer>.5</answer>", None),
    ("<answer>73.</answer>", None),
    ("<answer>70-80</answer>", None),
    ("<answer>+73</answer>", 73.0),
    ("<answer>-5</answer>", -5.0),
    ("<answer>7.3e1</answer>", 73.0),
    ("<answer>7.3E+1</answer>", 73.0),
    ("<answer>  \n 42 \t</answer>", 42.0),
    ("<answer>```\n42\n```</answer>", 42.0),
    ("<answer>```text\n42.5\n```</answer>", 42.5),
    ("<answer>```json\n42\n```</answer>", None),  # only a plain / `text` fence is stripped
    ("<ANSWER>12</Answer>", 12.0),  # case-insensitive tags
    ("<answer>1</answer><answer>2</answer>", 1.0),  # first block
    ("<answer>x</answer><answer>2</answer>", None),  # the first block decides
    ("<answer>\n\n</answer>", None),
    ("<answer>42", None),  # unterminated
    ("42", None),
    ("", None),
    ("<answer>4 2</answer>", None),
    ("<answer>42%</answer>", None),
    ("<answer>1,000</answer>", None),
    ("before <answer>55</answer> after, <think> anywhere", 55.0),  # think never checked
    ("<answer>1e999</answer>", math.inf),  # a float; rewards clip to 100
    ("<answer>-0</answer>", 0.0),
]


@pytest.mark.parametrize("text,want", STRICT_CASES)
def test_strict_parser_spec_examples(text, want):
    got = rewards.parse_answer(text)
    if want is None:
        assert got is None
    else:
        assert got == want


LENIENT_CASES = [
    ("<answer>about 73 points</answer>", 73.0),
    ("<answer>1</answer> then <answer>2.5</answer>", 2.5),  # last block
    ('<answer>```json\n{"rating": 64.5}\n```</answer>', 64.5),
    ('<answer>{"rating": "7.5/10"}</answer>', 7.5),
    ("<answer>.5</answer>", 0.5),
    ("<answer>none</answer>", None),
    ("no tags 73", None),
]


@pytest.mark.parametrize("text,want", LENIENT_CASES)
def test_lenient_parser(text, want):
    assert rewards.parse_answer_lenient(text) == want


@pytest.mark.parametrize(
    "v,task,want",
    [
        (0.5, "iqa", 50.0),
        (0.5, "iaa", 50.0),
        (4.5, "iqa", 87.5),  # B2: non-monotone
        (5.01, "iqa", 5.01),
        (7.3, "iaa", 73.0),
        (10.5, "iaa", 10.5),
        (150.0, "iqa", 100.0),
        (-3.0, "iaa", 0.0),
        (None, "iqa", None),
    ],
)
def test_reference_rescale(v, task, want):
    assert rewards.reference_rescale_prediction(v, task) == want


def test_reference_rescale_bad_task():
    with pytest.raises(ValueError, match="task"):
        rewards.reference_rescale_prediction(1.0, "vqa")


def naive_strict(text: str) -> float | None:
    """The spec's steps with the obvious regex (quadratic worst case, fine for short strings)."""
    m = re.search(r"<answer>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL)
    if not m:
        return None
    s = m.group(1).strip()
    s = re.sub(r"^```(?:text)?", "", s, count=1, flags=re.IGNORECASE)
    s = re.sub(r"```$", "", s, count=1)
    toks = re.findall(r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", s)
    if len(toks) != 1 or s.replace(toks[0], "", 1).strip():
        return None
    try:
        return float(toks[0])
    except ValueError:
        return None


PIECES = [
    "<answer>", "</answer>", "<ANSWER>", "</Answer>", "<answer", "answer>", "<think>", "</think>",
    "```", "```text", "```json", "{", "}", '"rating"', ":", "7", "3", ".", "42", "0", "-", "+",
    "e", "E", "e-5", "1e999", " ", "\n", "\t", "\u00a0", "\u3000", "٣", "７", "ſ", "K", "nan",
    "inf", "points", "score", "\x00", "\ud7ff", "😀", "é", "\r\n", "<", ">", "/", "\\",
]  # fmt: skip


def _adversarial(rng: random.Random) -> str:
    mode = rng.random()
    if mode < 0.6:
        return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25)))
    if mode < 0.8:
        return "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 40)))
    if mode < 0.9:
        inner = "".join(rng.choice(PIECES[14:]) for _ in range(rng.randint(0, 6)))
    else:  # near-valid numbers: mostly accepted, some one edit away from rejection
        inner = (
            rng.choice(["", " ", "\n", "```", "```text\n"])
            + rng.choice(["", "+", "-"])
            + str(rng.randint(0, 10 ** rng.randint(1, 4)))
            + rng.choice(["", f".{rng.randint(0, 99)}", "."])
            + rng.choice(["", "", f"e{rng.randint(-3, 3)}", "e", "E+1"])
            + rng.choice(["", " ", "\n```", " pts"])
        )
    return f"<think>{' w' * rng.randint(0, 140)}</think><answer>{inner}</answer>"


def test_fuzz_parsers_and_features_seeded():
    rng = random.Random(1234)
    texts = [_adversarial(rng) for _ in range(12_000)]
    texts += ["<answer>" * 2000 + "1", "<answer>" + "9" * 5000 + "</answer>"]
    parsed_count = 0
    for t in texts:
        v = rewards.parse_answer(t)
        assert v == naive_strict(t), repr(t)
        assert v is None or isinstance(v, float) and not math.isnan(v)
        parsed_count += v is not None
        lv = rewards.parse_answer_lenient(t)
        assert lv is None or math.isfinite(lv)
        for task in ("iqa", "iaa"):
            rv = rewards.reference_rescale_prediction(lv, task)
            assert rv is None or 0.0 <= rv <= 100.0
    assert parsed_count > 500  # the generator does reach the accepting branch
    for parser in ("strict", "lenient"):
        f = rewards.completion_features(texts, parser=parser)
        for arr in f.as_dict().values():
            assert arr.shape == (len(texts),) and np.all(np.isfinite(arr))
        assert np.all((f.prediction >= 0) & (f.prediction <= 100))
        assert not np.any(f.prediction[~f.parsed])


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=30).map("".join))
def test_fuzz_hypothesis(text):
    v = rewards.parse_answer(text)
    assert v == naive_strict(text)
    assert v is None or not math.isnan(v)
    f = rewards.completion_features([text, f"<answer>{text}</answer>"])
    assert all(np.all(np.isfinite(a)) for a in f.as_dict().values())


def test_features_values():
    texts = [
        "<think>\nsharp image, mild noise\n</think>\n<answer>73.42</answer>",
        "<answer>150</answer>",
        "<answer>-3</answer>",
        "<think>unclosed reasoning here <answer>x</answer>",
        "no answer at all",
        "",
        None,
    ]
    f = rewards.completion_features(texts)
    np.testing.assert_allclose(f.prediction, [73.42, 100.0, 0.0, 0, 0, 0, 0], rtol=1e-7)
    np.testing.assert_array_equal(f.parsed, [1, 1, 1, 0, 0, 0, 0])
    # Whole completion, whitespace-separated (tags count: spec §8).
    np.testing.assert_array_equal(f.num_words, [len(t.split()) if t else 0 for t in texts])
    np.testing.assert_array_equal(f.think_len, [4, 0, 0, 3, 0, 0, 0])
    np.testing.assert_array_equal(f.has_think, [1, 0, 0, 1, 0, 0, 0])
    # A token counter (no model needed) and precomputed counts.
    f2 = rewards.completion_features(texts, count_tokens=len)
    assert f2.think_len[0] == len("\nsharp image, mild noise\n")
    f3 = rewards.completion_features(texts, think_token_counts=list(range(7)))
    np.testing.assert_array_equal(f3.think_len, [0, 1, 2, 3, 4, 5, 0])
    with pytest.raises(ValueError, match="think_token_counts"):
        rewards.completion_features(texts, think_token_counts=[1])
    with pytest.raises(ValueError, match="parser"):
        rewards.completion_features(texts, parser="fuzzy")


def test_features_with_real_tokenizer_counter():
    from tatar_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    text = "<think>\nThe image is sharp with slight noise.\n</think>\n<answer>61.00</answer>"
    f = rewards.completion_features([text], count_tokens=lambda s: len(tok.encode(s)))
    assert f.think_len[0] == len(tok.encode("\nThe image is sharp with slight noise.\n")) > 5
