"""The embedded model's tokenizer: the Qwen2.5 tokenizer cut down to the synthetic corpus.

The embedded random model (no ``model.hf_dir``) trains on the synthetic set only, whose prompts
and rationales use about a thousand of Qwen2.5's 151,665 tokens. With the full vocabulary its
lm_head (2 x D x 151,936 FLOPs per token) costs about a hundred times its decoder; with this one
it costs a fraction of it, and the freed compute goes into the model (``qvl.preset("embedded")``).

What it is: Qwen2.5's byte-level BPE restricted to a closed subset of its tokens, renumbered in
rank order (ids 0..n-1), then the same 22 added tokens (``<|endoftext|>`` ... ``<|file_sep|>``)
at ids n..n+21. The subset is the 256 single bytes, every token the corpus encodes to under the
full tokenizer, and, recursively, both halves of each kept token's merge
(:func:`tatar_jax.data.tokenizer.true_merge`). A BPE merge sequence only builds tokens out of
those halves, so the cut-down tokenizer splits every corpus text into exactly the tokens the full
one does (checked at build time, and by the tests), and any other text still encodes (into
shorter pieces, down to single bytes). Same pre-tokeniser (single digits), normaliser, decoder,
special tokens and chat template: prompts, the answer format, the parser and the sequence
lengths are those of a real Qwen2.5-VL run. Chosen over a new word-level / trained BPE model for
that reason, and because it is deterministic by construction (no trainer heuristics; it depends
only on the shipped Qwen rank file and the corpus text).

The corpus (:func:`corpus`): every prompt variant's full chat (system, user turn with the image
tokens, assistant turn) around every synthetic rationale and its thought-dropped form, and the
generation prompt. The folder (``tokenizer.json`` + ``tokenizer_config.json``) is built on first
use into ``$TATAR_JAX_CACHE`` (see :mod:`tatar_jax.data.tokenizer`) under a name keyed by the
Qwen rank file, the corpus and :data:`BUILD_VERSION`, so a changed corpus gets a new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import tokenizers

from tatar_jax import answer_format
from tatar_jax.data import prompts, synthetic
from tatar_jax.data import tokenizer as tok_mod

BUILD_VERSION = "1"  # bump when the recipe changes
# tokenizer_config.json's model_max_length (Qwen2.5-VL's own tokenizer_config value).
MODEL_MAX_LENGTH = 131_072


def corpus() -> list[str]:
    """The texts the embedded tokenizer must split as Qwen2.5 does, in a fixed order."""
    texts = []
    for variant in prompts.PROMPT_VARIANTS:
        for task, targets in synthetic.rationales().items():
            dropped = [answer_format.empty_think(t) for t in targets]
            for target in targets + dropped:
                msgs = prompts.build_messages(task, variant, assistant=target)
                texts.append(prompts.render_chat(msgs))
            texts.append(prompts.render_chat(prompts.build_messages(task, variant), None, True))
    # The built-in template's default system turn, and every digit of a 0-100 answer.
    texts.append(prompts.render_chat([{"role": "user", "content": "0123456789 100.00"}]))
    return texts


def _subset_ranks(full: tokenizers.Tokenizer, ranks: dict[bytes, int], texts: list[str]):
    """{token bytes: new id} of the closed subset (see the module docstring)."""
    by_id = {r: t for t, r in ranks.items()}
    keep = {bytes([b]) for b in range(256)}
    for enc in full.encode_batch(texts, add_special_tokens=False):
        keep.update(by_id[i] for i in enc.ids if i < len(by_id))
    todo = [t for t in keep if len(t) > 1]
    while todo:
        t = todo.pop()
        for half in tok_mod.true_merge(ranks, t, ranks[t]):
            if half not in keep:
                keep.add(half)
                todo.append(half)
    return {t: i for i, t in enumerate(sorted(keep, key=ranks.__getitem__))}


def build() -> tokenizers.Tokenizer:
    """The embedded tokenizer (no cache); raises if it splits a corpus text differently from
    the full Qwen2.5 tokenizer."""
    full = tok_mod.default_tokenizer_json()
    ranks = tok_mod.load_ranks(tok_mod.qwen_tiktoken_path())
    texts = corpus()
    sub = _subset_ranks(full, ranks, texts)
    added = [(c, sp) for _, c, sp in tok_mod.QWEN2_5_VL_ADDED_TOKENS]
    tok = tok_mod.assemble_byte_level_bpe(sub, added)
    for text, a, b in zip(
        texts,
        full.encode_batch(texts, add_special_tokens=False),
        tok.encode_batch(texts, add_special_tokens=False),
        strict=True,
    ):
        if a.tokens != b.tokens:
            raise AssertionError(f"the embedded tokenizer splits {text[:60]!r}... differently")
    return tok


def _digest() -> str:
    h = hashlib.sha256(tok_mod.qwen_tiktoken_path().read_bytes())
    h.update(json.dumps([BUILD_VERSION, corpus()]).encode())
    return h.hexdigest()[:16]


_MEMO: dict[str, str] = {}


def tokenizer_dir() -> str:
    """The folder of the embedded tokenizer (``tokenizer.json``, ``tokenizer_config.json``),
    built on first use (a few seconds) into the cache; a temporary folder when the cache is not
    writable."""
    digest = _digest()
    if digest in _MEMO and (pathlib.Path(_MEMO[digest]) / "tokenizer.json").is_file():
        return _MEMO[digest]
    folder = tok_mod.cache_dir() / f"embedded_tokenizer_{digest}"
    if not (folder / "tokenizer_config.json").is_file():
        tok = build()
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, suffix=".tmp"))
            tok_mod.save_tokenizer_folder(tok, tmp, MODEL_MAX_LENGTH)
            os.chmod(tmp, 0o755)
            try:
                os.replace(tmp, folder)  # atomic: a concurrent builder never sees half of it
            except OSError:  # another process got there first (a non-empty folder)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # read-only cache: a private temporary copy
            folder = pathlib.Path(tempfile.mkdtemp(prefix="tatar_embedded_tokenizer_"))
            tok_mod.save_tokenizer_folder(tok, folder, MODEL_MAX_LENGTH)
    _MEMO[digest] = str(folder)
    return str(folder)


def load() -> tok_mod.Tokenizer:
    """The embedded tokenizer, as :func:`tatar_jax.data.tokenizer.load_tokenizer` gives it."""
    return tok_mod.load_tokenizer(tokenizer_dir())
