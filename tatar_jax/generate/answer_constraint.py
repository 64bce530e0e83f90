"""An answer that always parses: a token mask per decode step, from a small state machine over
the tokenizer's tokens (``--constrained_answer`` of ``scripts/eval.py`` / ``scripts/score.py``).

The grammar, over the completion's characters (lower-cased, so ``<ANSWER>`` counts as the parser
counts it; special tokens other than the stop tokens write nothing):

* **free** text until ``</think>`` (or an ``<answer>`` written before it, which the strict parser
  would read first); the stop tokens are masked here (a completion that ends before its answer
  is unparsed);
* after ``</think>``: whitespace, ``<answer>``, whitespace, a plain decimal number in [0, 100]
  (``0``-``100`` with optional ``.digits``: no sign, exponent or leading zero), whitespace,
  ``</answer>``;
* then only a stop token.

Every token is mapped once on the host to its transition from every state
(:func:`build`: a (states, vocab) table, -1 where the token leaves the grammar), and every state
to the fewest tokens that reach the end of ``</answer>``; a token is allowed at a step when it
stays in the grammar *and* the answer can still be closed within the tokens left
(``max_new_tokens``), so the loop never runs out of budget before ``</answer>``. On the device
(:func:`constrained_sample`, inside the jitted decode loop) the state of every row is one int32:
the mask is one gather of the table row, the next state another.

Greedy decoding: where the model's own token is allowed at every step the constrained completion
*is* the unconstrained one (the mask never removes the argmax); the first step where it is not
marks the row ``forced``: what ``n_would_be_unparsed`` counts. Such a row's unconstrained
completion leaves the grammar: no answer (a stop before it, the budget spent), text the grammar
does not allow between ``</think>`` and ``<answer>`` or inside it, or a number outside [0, 100].
Sampling: the draw is from the masked distribution; ``forced`` marks rows where the unmasked draw
(same key) was not allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tatar_jax import answer_format

THINK_CLOSE = answer_format.THINK_CLOSE  # "</think>"
ANSWER_OPEN = answer_format.ANSWER_OPEN  # "<answer>"
ANSWER_CLOSE = answer_format.ANSWER_CLOSE  # "</answer>"
WHITESPACE = frozenset(" \t\n\r")
DIGITS = frozenset("0123456789")
FREE = "free"
DONE = "done"


@struct.dataclass
class AnswerConstraint:
    """The device tables of the grammar (see the module docstring).

    next_state (S, V) int16: the state after each token from each state, -1 = not allowed.
    dist (S,) int32: the fewest tokens from a state to the end of ``</answer>``.
    start: the state of an empty completion; names: the states' names (host only).
    """

    next_state: Any
    dist: Any
    start: int = struct.field(pytree_node=False, default=0)
    names: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @property
    def min_tokens(self) -> int:
        """The fewest new tokens that can hold a whole answer from the start."""
        return int(np.asarray(self.dist)[self.start])


# ---------------------------------------------------------------------------------------------
# The character machine


def _free_step(buf: str, ch: str) -> str:
    """FREE states are named by the matched prefix of ``</think>`` / ``<answer>`` (``""``: none)."""
    cand = buf + ch
    if cand == THINK_CLOSE:
        return "a:"  # after </think>: whitespace, then <answer>
    if cand == ANSWER_OPEN:
        return "n:"  # after <answer>: whitespace, then the number
    if _continues(cand):
        return FREE + ":" + cand
    return FREE + ":" + ("<" if ch == "<" else "")


# The number in [0, 100]: int part "0" | "1".."9" | "10".."99" | "100", then ".digits"
# ("100" only with zeros). States: i0 "0", i1 "1", id "2".."9", i10 "10", i2 two digits
# otherwise, i100 "100"; f. / f after a '.', f0. / f0 after "100.".
_INT_NEXT = {
    "n:": {"0": "i0", "1": "i1", **{d: "id" for d in "23456789"}},
    "i1": {"0": "i10", **{d: "i2" for d in "123456789"}},
    "id": {d: "i2" for d in DIGITS},
    "i10": {"0": "i100"},
    "f.": {d: "f" for d in DIGITS},
    "f": {d: "f" for d in DIGITS},
    "f0.": {"0": "f0"},
    "f0": {"0": "f0"},
}
_NUMBER_END = ("i0", "i1", "id", "i10", "i2", "i100", "f", "f0")


def char_step(state: str, ch: str) -> str | None:
    """The state after character ``ch`` (lower-cased) from ``state``; None: not allowed."""
    if state.startswith(FREE + ":"):
        return _free_step(state[len(FREE) + 1 :], ch)
    if state == DONE:
        return None
    kind, _, buf = state.partition(":")
    if state in ("a:", "n:", "w:") and ch in WHITESPACE:
        return state
    if state == "a:" or kind == "o":  # <answer> after </think>
        cand = (buf if kind == "o" else "") + ch
        if cand == ANSWER_OPEN:
            return "n:"
        return "o:" + cand if ANSWER_OPEN.startswith(cand) else None
    if state in _INT_NEXT and ch in _INT_NEXT[state]:
        return _INT_NEXT[state][ch]
    if state in _NUMBER_END or state == "w:":
        if ch == "." and state in ("i0", "i1", "id", "i10", "i2"):
            return "f."
        if ch == "." and state == "i100":
            return "f0."
        if ch in WHITESPACE:
            return "w:"
        if ch == "<":
            return "c:<"
        return None
    if kind == "c":  # </answer>
        cand = buf + ch
        if cand == ANSWER_CLOSE:
            return DONE
        return "c:" + cand if ANSWER_CLOSE.startswith(cand) else None
    return None


def text_step(state: str, text: str) -> str | None:
    """The state after ``text`` (lower-cased) from ``state``; None when a character leaves the
    grammar. An empty text (a special token) keeps a free state and is not allowed after it."""
    if not text:
        return state if state.startswith(FREE + ":") else None
    for ch in text.lower():
        state = char_step(state, ch)
        if state is None:
            return None
    return state


def all_states() -> list[str]:
    """Every state of the machine, the start (``free:``) first."""
    free = [FREE + ":"] + [FREE + ":" + p[:k] for p in (THINK_CLOSE, ANSWER_OPEN) for k in
                           range(1, len(p))]  # fmt: skip
    free = list(dict.fromkeys(free))
    tags = ["o:" + ANSWER_OPEN[:k] for k in range(1, len(ANSWER_OPEN))]
    close = ["c:" + ANSWER_CLOSE[:k] for k in range(1, len(ANSWER_CLOSE))]
    number = list(dict.fromkeys([*_INT_NEXT, *_NUMBER_END]))
    return free + ["a:", *tags, "n:", *number, "w:", *close, DONE]


# ---------------------------------------------------------------------------------------------
# The token tables


def _continues(text: str) -> bool:
    return THINK_CLOSE.startswith(text) or ANSWER_OPEN.startswith(text)


def _keeps_matching(buf: str, text: str) -> bool:
    """Whether ``buf + text`` is a tag's prefix or begins with a whole tag."""
    x = buf + text
    return _continues(x) or x.startswith(THINK_CLOSE) or x.startswith(ANSWER_OPEN)


def _first_chars(state: str) -> set[str] | None:
    """The characters a token may start with from ``state`` (None: any, a free state)."""
    if state.startswith(FREE + ":"):
        return None
    chars = set(map(chr, range(32, 127))) | WHITESPACE
    return {c for c in chars if char_step(state, c) is not None}


def build(
    token_texts: Sequence[str], stop_ids: Iterable[int], vocab_size: int | None = None
) -> AnswerConstraint:
    """The tables of a vocabulary: ``token_texts[i]`` is token i's text as the completion shows
    it (``""`` for a special token; ids from ``len(token_texts)`` to ``vocab_size`` have none);
    ``stop_ids`` end a completion (allowed only after ``</answer>``)."""
    names = all_states()
    index = {n: i for i, n in enumerate(names)}
    v = int(vocab_size or len(token_texts))
    stops = {int(t) for t in stop_ids}
    texts = [t.lower() for t in token_texts] + [""] * (v - len(token_texts))
    table = np.full((len(names), v), -1, np.int32)
    # Tokens by first character; after </think> only the answer's alphabet can be allowed.
    by_first: dict[str, list[int]] = {}
    answer_first: dict[str, list[int]] = {}
    alphabet = WHITESPACE | DIGITS | set(ANSWER_OPEN + ANSWER_CLOSE + ".")
    for t, text in enumerate(texts):
        if text and t not in stops:
            by_first.setdefault(text[0], []).append(t)
            if alphabet.issuperset(text):
                answer_first.setdefault(text[0], []).append(t)
    empty = [t for t, text in enumerate(texts) if not text and t not in stops]
    root = index[FREE + ":"]
    for t, text in enumerate(texts):  # the free start: most tokens stay there
        if t in stops:
            continue
        nxt = FREE + ":" if "<" not in text else text_step(FREE + ":", text)
        table[root, t] = index[nxt]
    for s, name in enumerate(names):
        if s == root:
            continue
        first = _first_chars(name)
        if first is None:  # a free state: like the start unless the token continues the tag
            buf = name[len(FREE) + 1 :]
            table[s] = table[root]
            table[s, empty] = s
            # A token that breaks the tag leaves the state the start would reach ('<' only opens
            # a tag): only the tokens whose head keeps matching need the walk.
            cont = {c for c in map(chr, range(32, 127)) if _continues(buf + c)}
            cand = [t for c in cont for t in by_first.get(c, ()) if _keeps_matching(buf, texts[t])]
        else:
            cand = [t for c in first for t in answer_first.get(c, ())]
        for t in cand:
            nxt = text_step(name, texts[t])
            table[s, t] = -1 if nxt is None else index[nxt]
    table[index[DONE], sorted(s for s in stops if s < v)] = index[DONE]
    return AnswerConstraint(table.astype(np.int16), _distances(table, index[DONE]), root,
                            tuple(names))  # fmt: skip


def _distances(table: np.ndarray, done: int) -> np.ndarray:
    """(S,) the fewest tokens from each state to ``done`` (a large number where unreachable):
    Bellman-Ford on the state graph (an edge where some token leads from one state to
    another)."""
    big = np.iinfo(np.int32).max // 4
    edges = [np.unique(row[row >= 0]) for row in table]
    dist = np.full(table.shape[0], big, np.int64)
    dist[done] = 0
    for _ in range(table.shape[0] + 1):
        new = dist.copy()
        for s, nxt in enumerate(edges):
            if s != done and nxt.size:
                new[s] = min(new[s], int(dist[nxt].min()) + 1)
        if np.array_equal(new, dist):
            break
        dist = new
    return np.minimum(dist, big).astype(np.int32)


def token_texts(tok: Any) -> list[str]:
    """Each token's text as a decoded completion shows it: special tokens ``""`` (they are
    skipped), partial UTF-8 bytes as the replacement character (never in the grammar)."""
    n = len(tok)
    shown = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
    return list(shown)


@functools.lru_cache(maxsize=4)
def _cached(texts: tuple[str, ...], stops: tuple[int, ...], vocab: int) -> AnswerConstraint:
    return build(texts, stops, vocab)


def for_tokenizer(tok: Any, vocab_size: int | None = None) -> AnswerConstraint:
    """:func:`build` for a :class:`tatar_jax.data.tokenizer.Tokenizer` (stop tokens: its
    ``eos_ids``), cached per vocabulary."""
    texts = tuple(token_texts(tok))
    return _cached(texts, tuple(int(t) for t in tok.eos_ids), int(vocab_size or len(texts)))


def parse_state(cons: AnswerConstraint, token_ids: Sequence[int]) -> str | None:
    """Host check: the state after ``token_ids`` from the start (None: a token not allowed)."""
    table = np.asarray(cons.next_state)
    s = cons.start
    for t in token_ids:
        s = int(table[s, int(t)])
        if s < 0:
            return None
    return cons.names[s]


# ---------------------------------------------------------------------------------------------
# The device step


def allowed_tokens(cons: AnswerConstraint, state: jax.Array, remaining: jax.Array) -> jax.Array:
    """(N, V) bool: tokens that stay in the grammar from ``state`` (N,) and leave a way to close
    the answer within the ``remaining`` (N,) or () tokens after this one."""
    nxt = jnp.take(cons.next_state, state, axis=0).astype(jnp.int32)  # (N, V)
    need = jnp.take(cons.dist, jnp.maximum(nxt, 0))
    return (nxt >= 0) & (need <= jnp.reshape(remaining, (-1, 1)))


def constrained_sample(
    logits: jax.Array,
    keys: jax.Array,
    params: Any,
    cons: AnswerConstraint,
    state: jax.Array,
    remaining: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One constrained decode step: logits (N, V) float32, keys (N,), the rows' ``state`` (N,)
    int32 and the tokens left after this one ``remaining`` () int32 -> tokens (N,), their logps
    (:func:`~tatar_jax.generate.sampling.sample_tokens` of the masked logits), the next states
    (N,) and ``forced`` (N,): the model's own (unmasked, same key) token was not allowed."""
    from tatar_jax.generate.sampling import sample_tokens

    ok = allowed_tokens(cons, state, remaining)
    own, _ = sample_tokens(logits, keys, params)
    forced = ~jnp.take_along_axis(ok, own[:, None], axis=-1)[:, 0]
    tok, lp = sample_tokens(jnp.where(ok, logits, -jnp.inf), keys, params)
    nxt = jnp.take_along_axis(jnp.take(cons.next_state, state, axis=0), tok[:, None], axis=-1)
    return tok, lp, nxt[:, 0].astype(jnp.int32), forced
