"""The embedded tokenizer: Qwen2.5's byte-level BPE cut to the synthetic corpus."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tatar_jax import answer_format, loading
from tatar_jax.data import embedded_tokenizer as et
from tatar_jax.data import prompts, synthetic
from tatar_jax.data import tokenizer as tk


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    os.environ.setdefault("TATAR_JAX_CACHE", str(tmp_path_factory.mktemp("tokcache")))
    return et.load(), tk.load_tokenizer(None)


def _chats() -> list[str]:
    """Every chat the synthetic data path renders, built here from its public pieces."""
    out = []
    for variant in prompts.PROMPT_VARIANTS:
        for task, targets in synthetic.rationales().items():
            for t in targets:
                for target in (t, answer_format.empty_think(t)):
                    msgs = prompts.build_messages(task, variant, assistant=target)
                    out.append(prompts.render_chat(msgs))
    return out


def test_splits_the_corpus_exactly_as_qwen25(toks):
    small, full = toks
    texts = _chats()
    rng = random.Random(0)
    # Any two-decimal answer on 0-100, as a policy may write it.
    texts += [answer_format.render("x", f"{rng.uniform(0, 100):.2f}") for _ in range(200)]
    texts += ["<answer>100.00</answer>", "<answer>0.00</answer>"]
    for text in texts:
        a, b = small.tok.encode(text).tokens, full.tok.encode(text).tokens
        assert a == b, text[:80]
        assert small.decode(small.encode(text), skip_special_tokens=False) == text


def test_ids_special_tokens_and_size(toks):
    small, full = toks
    n = len(small) - len(tk.QWEN2_5_VL_ADDED_TOKENS)
    assert 300 < n < 2000  # measured 719 base tokens, 741 in all
    for i, (_, content, _) in enumerate(tk.QWEN2_5_VL_ADDED_TOKENS):
        assert small.tok.token_to_id(content) == n + i
    assert small.eos_ids == (n + 2, n) and small.image_pad_id == n + 12
    # Single bytes first, in Qwen2.5's rank order: the rank of a kept token orders its new id.
    vocab = small.tok.get_vocab(with_added_tokens=False)
    full_vocab = full.tok.get_vocab(with_added_tokens=False)
    ordered = sorted(vocab, key=vocab.__getitem__)
    assert [full_vocab[t] for t in ordered] == sorted(full_vocab[t] for t in ordered)
    assert [full_vocab[t] for t in ordered[:256]] == list(range(256))
    arch = loading.embedded_config(small, "embedded")
    assert arch.text.vocab_size == loading.embedded_vocab_size(len(small)) < 2048
    assert arch.image_token_id == small.image_pad_id and arch.eos_token_id == small.im_end_id


def test_other_text_still_encodes(toks):
    small, _ = toks
    for text in ("Hello world, 日本語の文章 é ß \t\n  🙂", "A conversation about JPEG artefacts."):
        ids = small.encode(text)
        assert max(ids) < len(small) - len(tk.QWEN2_5_VL_ADDED_TOKENS)
        assert small.decode(ids) == text


def test_transformers_reads_the_folder_as_we_do(toks):
    transformers = pytest.importorskip("transformers")
    small, _ = toks
    hf = transformers.AutoTokenizer.from_pretrained(et.tokenizer_dir())
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert hf.convert_tokens_to_ids("<|im_end|>") == small.im_end_id
    for text in _chats()[::17]:
        assert hf(text)["input_ids"] == small.encode(text)
        assert hf.decode(small.encode(text)) == text


def test_build_is_deterministic_across_processes(tmp_path):
    """Two fresh interpreters (different hash seeds) build byte-identical tokenizer.json files."""
    code = "from tatar_jax.data import embedded_tokenizer as e; print(e.build().to_str())"
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TATAR_JAX_CACHE": str(tmp_path / seed)}
        r = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert len(json.loads(outs[0])["model"]["vocab"]) > 256
