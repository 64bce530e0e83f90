"""The answer constraint (``tatar_jax.generate.answer_constraint``): its token tables against a
character-by-character walk, the masked decode step driven by scripted logits (a model whose
greedy completion is a given text), and the sampler's decode loop with a tiny random model:
constrained answers always parse, and where the model's own answer would have parsed (in the
grammar) the constrained completion is the unconstrained one.

Both the Qwen tokenizer (offline rebuild) and the embedded small tokenizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tatar_jax import answer_format
from tatar_jax.generate import SamplingParams
from tatar_jax.generate import answer_constraint as ac


@pytest.fixture(scope="module", params=["qwen", "embedded"])
def tok(request):
    from tatar_jax.data import embedded_tokenizer
    from tatar_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None) if request.param == "qwen" else embedded_tokenizer.load()


@pytest.fixture(scope="module")
def cons(tok):
    return ac.for_tokenizer(tok)


def _in_range(text):
    v = answer_format.parse_answer(text)
    return v is not None and 0.0 <= v <= 100.0


@pytest.mark.parametrize(
    "text,end",
    [
        ("<think>ok</think>\n<answer>73.42</answer>", "done"),
        ("<think>a</think><answer>100.00</answer>", "done"),
        ("<answer> 7 </answer>", "done"),  # an answer without a think block is read first
        ("<THINK>x</THINK><ANSWER>55</ANSWER>", "done"),  # the parser's tags are any case
        ("<think>a</think>\n\n<answer>\n 0.5\n</answer>", "done"),
        ("<think>a</think><answer>101</answer>", None),  # outside 0-100
        ("<think>a</think><answer>100.5</answer>", None),
        ("<think>a</think><answer>-3</answer>", None),  # no sign
        ("<think>a</think><answer>abc</answer>", None),
        ("<think>x</think> so <answer>5</answer>", None),  # text between the tags
        ("<think>still thinking", "free:"),
        ("<think>a</think", "free:</think"),
        ("<think>a</think><answer>42", "i2"),
    ],
)
def test_token_walk_follows_the_grammar(tok, cons, text, end):
    assert ac.parse_state(cons, tok.encode(text)) == end


def test_tables_equal_the_character_walk(tok, cons):
    """Every (state, token) entry of a sample equals text_step on the token's text (stop tokens
    only after </answer>); the distances are the fewest tokens to close the answer."""
    texts = ac.token_texts(tok)
    table = np.asarray(cons.next_state)
    rng = np.random.default_rng(0)
    ascii_ids = [i for i, t in enumerate(texts) if t and t.lower()[0] in "<>/ \n0123456789.atn"]
    ids = sorted(set(rng.choice(len(texts), min(len(texts), 1500), replace=False)) | set(
        rng.choice(ascii_ids, min(len(ascii_ids), 1500), replace=False)))  # fmt: skip
    for s, name in enumerate(cons.names):
        for t in ids:
            if t in tok.eos_ids:
                want = "done" if name == "done" else None
            else:
                want = ac.text_step(name, texts[t])
            got = cons.names[table[s, t]] if table[s, t] >= 0 else None
            assert got == want, (name, texts[t])
    dist = dict(zip(cons.names, np.asarray(cons.dist).tolist(), strict=True))
    assert dist["done"] == 0 and dist["c:</answer"] == 1  # ">"
    shortest = tok.encode("<answer>0</answer>")
    assert ac.parse_state(cons, shortest) == "done" and cons.min_tokens <= len(shortest)


def _scripted_decode(cons, tok, script, budget, temperature=0.0, seed=0):
    """Greedy decoding of a 'model' that writes ``script`` (token ids, ending in a stop token)
    while the completion follows it, and noise after a divergence: the masked step of the
    decode loop applied step by step. Returns (tokens, forced)."""
    params = SamplingParams(max_new_tokens=budget, temperature=temperature,
                            stop_token_ids=tuple(tok.eos_ids))  # fmt: skip
    v = np.shape(cons.next_state)[1]
    step = jax.jit(lambda lg, k, st, left: ac.constrained_sample(lg, k, params, cons, st, left))
    noise = np.random.default_rng(1)
    state = jnp.full((1,), cons.start, jnp.int32)
    out, forced = [], False
    for i in range(budget):
        logits = noise.normal(size=(1, v)).astype(np.float32)
        if out == list(script[: len(out)]) and i < len(script):
            logits[0, script[i]] = 50.0
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), i), 1)
        t, _, state, f = step(jnp.asarray(logits), keys, state, jnp.int32(budget - 1 - i))
        out.append(int(t[0]))
        forced |= bool(f[0])
        if out[-1] in tok.eos_ids:
            break
    return out, forced


@pytest.mark.parametrize(
    "script,in_grammar",
    [
        ("<think>sharp, low noise</think>\n<answer>73.42</answer>", True),
        ("<ANSWER>55</ANSWER>", True),
        ("<think>a</think><answer>100</answer>", True),
        ("<think>blurry", False),  # stops before any answer
        ("<think>x</think><answer>about 7</answer>", False),
        ("<think>x</think><answer>150</answer>", False),  # parses, outside 0-100
        ("<think>x</think> so <answer>5</answer>", False),  # parses, not in the grammar
        ("<think>" + "very long reasoning " * 12, False),  # the budget runs out first
    ],
)
def test_constrained_step_parses_and_keeps_the_models_answer(tok, cons, script, in_grammar):
    ids = tok.encode(script) + [tok.im_end_id]
    budget = 40
    out, forced = _scripted_decode(cons, tok, ids, budget)
    text = tok.decode(out, skip_special_tokens=True)
    assert _in_range(text) and len(out) <= budget
    if in_grammar:
        assert out == ids and not forced  # the model's own completion, untouched
        assert answer_format.parse_answer(text) == answer_format.parse_answer(script)
    else:
        assert forced and out != ids


def test_sampled_constrained_steps_parse(tok, cons):
    ids = tok.encode("<think>hmm") + [tok.im_end_id]
    for seed in range(3):
        out, _ = _scripted_decode(cons, tok, ids, 30, temperature=1.0, seed=seed)
        assert _in_range(tok.decode(out, skip_special_tokens=True))


def test_sampler_decode_loop_with_a_tiny_model(tok):
    """The real decode loop (prefill + while_loop) with a tiny random model: every constrained
    completion parses inside 0-100; a row the constraint never overrode is the unconstrained
    greedy row token for token, a forced row differs from it, and at the first difference the
    unconstrained token is one the grammar does not allow there."""
    import tiny_models
    from flax import nnx

    from tatar_jax.generate import Sampler
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_models.tiny_config_for(tok)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), init_std=0.08)
    cons = ac.for_tokenizer(tok, cfg.text.vocab_size)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 200, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(max_new_tokens=24, stop_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
    free = Sampler(model, SamplingParams(**kw))
    fixed = Sampler(model, SamplingParams(**kw), constraint=cons)
    a = free.generate(ids, mask)
    b = fixed.generate(ids, mask)
    forced = np.asarray(fixed.last_forced)
    ta, tb = np.asarray(a.tokens), np.asarray(b.tokens)
    ma, mb = np.asarray(a.mask), np.asarray(b.mask)
    table, dist = np.asarray(cons.next_state), np.asarray(cons.dist)
    for r in range(4):
        text = tok.decode(tb[r][mb[r]].tolist(), skip_special_tokens=True)
        assert _in_range(text), text
        own = ta[r][ma[r]].tolist()
        if not forced[r]:
            assert own == tb[r][mb[r]].tolist()
            continue
        k = next(i for i, (x, y) in enumerate(zip(own, tb[r].tolist(), strict=False)) if x != y)
        state = cons.start
        for t in own[:k]:
            state = int(table[state, t])
        nxt = int(table[state, own[k]])
        assert nxt < 0 or dist[nxt] > 24 - 1 - k  # not allowed at that step
    assert forced.any()  # a random model does not write the answer format by itself

    k4 = Sampler(model, SamplingParams(**kw, num_samples=3, temperature=1.0, top_k=20),
                 constraint=cons)  # fmt: skip
    out = k4.generate(ids, mask, rng=jax.random.key(3))
    tk, mk = np.asarray(out.tokens), np.asarray(out.mask)
    texts = [tok.decode(tk[r][mk[r]].tolist(), skip_special_tokens=True) for r in range(12)]
    assert all(_in_range(t) for t in texts) and len(set(texts)) > 1


def test_sampler_refuses_a_budget_too_small(tok):
    import tiny_models
    from flax import nnx

    from tatar_jax.generate import Sampler
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_models.tiny_config_for(tok)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    cons = ac.for_tokenizer(tok, cfg.text.vocab_size)
    with pytest.raises(ValueError, match="cannot hold a constrained answer"):
        Sampler(model, SamplingParams(max_new_tokens=cons.min_tokens - 1), constraint=cons)
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(model, SamplingParams(), constraint=ac.for_tokenizer(tok, len(tok) + 5))


def test_constrained_sampler_on_a_mesh_equals_one_device(tok):
    """Data parallel (the batch, the cache and the constraint's rows split over 2 devices, its
    tables replicated): the same tokens and forced rows as on one device."""
    import tiny_models
    from flax import nnx

    from tatar_jax import sharding
    from tatar_jax.generate import Sampler
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_models.tiny_config_for(tok)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(1), init_std=0.08)
    cons = ac.for_tokenizer(tok, cfg.text.vocab_size)
    ids = np.random.default_rng(2).integers(10, 200, (3, 9)).astype(np.int32)
    params = SamplingParams(max_new_tokens=16, num_samples=2, temperature=1.0, top_k=20,
                            stop_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)  # fmt: skip
    one = Sampler(model, params, constraint=cons)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    two = Sampler(model, params, constraint=cons, mesh=mesh)
    a = one.generate(ids, None, rng=jax.random.key(4))
    b = two.generate(ids, None, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(
        np.asarray(one.last_forced), np.asarray(b_forced := two.last_forced)
    )
    assert b_forced.shape == (6,)
