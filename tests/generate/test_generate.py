"""Rollout engine (tatar_jax.generate) against transformers and scipy.

- greedy tokens equal transformers' ``generate(do_sample=False)`` (text, one image, a left-padded
  batch of two images of different sizes; 24 new tokens) on a tiny random fp32 model;
- returned log-probs equal a full forward pass's log-softmax at the chosen tokens;
- sampled next-token frequencies match softmax(logits / T) (scipy chi-square), at the first step
  and at the second (the marginal over the first token), with top-k / top-p filters equal to
  transformers' warpers;
- stop tokens, padding after them, G samples per prompt, compile counts, weight swaps.
Measured numbers are printed with ``-s``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
import torch
from flax import nnx
from scipy import stats
from transformers.generation import logits_process as hf_lp

from tatar_jax import generate
from tatar_jax.models import qwen2_5_vl as qvl

NEW = 24
STOP = (tm.TEXT_KW["eos_token_id"],)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tm.tiny_hf_model(seed=0)
    path = tm.save_hf_dir(hf, tmp_path_factory.mktemp("hf") / "tiny")
    return hf, qvl.load_hf_checkpoint(path, dtype=jnp.float32)


def _hf_greedy(hf, batch, new, stop=STOP):
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    if "image_grid_thw" not in inputs:
        inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=new,
            eos_token_id=list(stop) if stop else None,
            pad_token_id=tm.PAD_ID,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seq = out.sequences[:, batch["input_ids"].shape[1] :].numpy()
    scores = torch.stack(out.scores, 1).numpy()  # (B, steps, V)
    top2 = np.sort(scores, -1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    seq = np.pad(seq, ((0, 0), (0, new - seq.shape[1])), constant_values=tm.PAD_ID)
    return seq, margin


def _full_logits(model, batch, tokens, mask):
    """Logits of the prompt + generated tokens in one forward (B*G rows repeated per sample)."""
    g = tokens.shape[0] // batch["input_ids"].shape[0]
    ids = np.concatenate([np.repeat(batch["input_ids"], g, 0), tokens], 1)
    am = np.concatenate([np.repeat(batch["attention_mask"], g, 0), mask.astype(np.int64)], 1)
    pv, thw = batch.get("pixel_values"), batch.get("image_grid_thw")
    if thw is not None and g > 1:
        # repeat each prompt's images g times, prompt-major (the rows are prompt-major)
        sizes = np.prod(thw, -1)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        per_row, k = [], 0
        for row in batch["input_ids"]:
            n_img = int((row == tm.VISION_START_ID).sum())
            per_row.append(list(range(k, k + n_img)))
            k += n_img
        order = [i for imgs in per_row for _ in range(g) for i in imgs]
        pv = np.concatenate([pv[starts[i] : starts[i + 1]] for i in order])
        thw = thw[order]
    logits = np.asarray(model(ids, am, pv, thw), np.float64)
    plen = batch["input_ids"].shape[1]
    return logits[:, plen - 1 : -1]  # logits that predicted each generated token


GREEDY_CASES = {
    "text_only": [[9]],
    "one_image": [[3, (1, 8, 8), 4]],
    "two_images_left_padded": [[2, (1, 4, 8), 3], [1, (1, 8, 12), 5]],
}


@pytest.mark.parametrize("name", sorted(GREEDY_CASES))
def test_greedy_equals_transformers_generate(pair, name):
    hf, model = pair
    batch = tm.make_batch(GREEDY_CASES[name], seed=11)
    ref, margin = _hf_greedy(hf, batch, NEW)
    g = 2 if name == "two_images_left_padded" else 1  # also: G copies of one prefilled cache
    out = generate.generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        max_new_tokens=NEW,
        num_samples=g,
        temperature=0.0,
        stop_token_ids=STOP,
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens.shape == (len(ref) * g, NEW) and tokens.dtype == np.int32
    print(f"[generate] greedy {name}: min top-2 logit margin along the HF path {margin:.3f}")
    np.testing.assert_array_equal(tokens, np.repeat(ref, g, 0))
    assert len(np.unique(ref)) > 3  # not a degenerate repetition of one token
    # log-probs of the greedy tokens == full forward's log-softmax at them
    lp = _full_logits(model, batch, tokens, mask)
    want = np.take_along_axis(jax.nn.log_softmax(lp, -1), tokens[..., None], -1)[..., 0]
    d = float(np.abs(np.where(mask, want - np.asarray(out.logps), 0)).max())
    print(f"[generate] greedy {name}: max|Δ logp| vs full forward {d:.2e}")
    assert d <= 1e-4


def test_sampled_logps_equal_full_forward(pair):
    """Default ``logprobs="tempered"``: log_softmax(logits / T) of the full forward pass."""
    _, model = pair
    batch = tm.make_batch(GREEDY_CASES["two_images_left_padded"], seed=3)
    temp, top_k, top_p = 0.8, 40, 0.9
    out = generate.generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        max_new_tokens=NEW,
        num_samples=2,
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=STOP,
        rng=jax.random.key(5),
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    lp = _full_logits(model, batch, tokens, mask)
    want = np.take_along_axis(jax.nn.log_softmax(lp / temp, -1), tokens[..., None], -1)[..., 0]
    d = float(np.abs(np.where(mask, want - np.asarray(out.logps), 0)).max())
    print(f"[generate] sampled logps (tempered) max|Δ| vs full forward {d:.2e}")
    assert d <= 1e-4
    # every sampled token survived transformers' top-k / top-p filters at its step
    x = torch.from_numpy((lp / temp).astype(np.float32)).reshape(-1, lp.shape[-1])
    x = hf_lp.TopPLogitsWarper(top_p)(None, hf_lp.TopKLogitsWarper(top_k)(None, x))
    kept = np.take_along_axis(x.numpy().reshape(lp.shape), tokens[..., None], -1)[..., 0]
    assert np.isfinite(kept[mask]).all()
    # the two samples of a prompt differ (independent keys per sample)
    assert not np.array_equal(tokens[0], tokens[1]) and not np.array_equal(tokens[2], tokens[3])


def test_policy_and_raw_logps_equal_transformers_warpers():
    """``logprobs="policy"``: log-prob under the filtered, renormalised distribution (HF
    warpers); ``"raw"``: the untempered model; greedy "tempered" uses T = 1."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(3 * rng.standard_normal((64, 200)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 64)
    x = torch.from_numpy(np.asarray(logits))
    for mode in ("policy", "raw", "tempered"):
        params = generate.SamplingParams(temperature=1.3, top_k=30, top_p=0.8, logprobs=mode)
        tok, lp = jax.jit(lambda z, k, p=params: generate.sample_tokens(z, k, p))(logits, keys)
        if mode == "policy":
            ref = hf_lp.TemperatureLogitsWarper(1.3)(None, x)
            ref = hf_lp.TopPLogitsWarper(0.8)(None, hf_lp.TopKLogitsWarper(30)(None, ref))
        else:
            ref = x / (1.3 if mode == "tempered" else 1.0)
        want = torch.log_softmax(ref, -1).gather(
            -1, torch.from_numpy(np.asarray(tok)).long()[:, None]
        )
        np.testing.assert_allclose(np.asarray(lp), want[:, 0].numpy(), atol=1e-5)
    tok, lp = generate.sample_tokens(logits, keys, generate.SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(logits).argmax(-1))
    np.testing.assert_allclose(
        np.asarray(lp), np.asarray(jax.nn.log_softmax(logits)).max(-1), atol=1e-6
    )


@pytest.mark.parametrize("temp,top_k,top_p", [(0.7, 0, 0.9), (1.3, 20, 0.8), (0.5, 3, 1.0)])
def test_warp_logits_equal_transformers_warpers(temp, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((6, 300))).astype(np.float32)
    logits[0, :5] = logits[0, 5]  # ties at a threshold are kept by both
    warp = jax.jit(lambda z: generate.warp_logits(z, temp, top_k, top_p))
    ours = np.asarray(warp(jnp.asarray(logits)))
    x = torch.from_numpy(logits)
    x = hf_lp.TemperatureLogitsWarper(temp)(None, x)
    if top_k:
        x = hf_lp.TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = hf_lp.TopPLogitsWarper(top_p)(None, x)
    ref = x.numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
    assert (~np.isinf(ours)).sum(-1).min() >= 1


def _chi2(counts, probs, min_expected=5.0):
    """Chi-square goodness of fit; cells with small expected counts pooled into one."""
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    if e[-1] == 0:
        assert obs[-1] == 0, "a token with probability 0 was sampled"
        obs, e = obs[:-1], e[:-1]
    return stats.chisquare(obs, e * obs.sum() / e.sum())


def test_sampling_distribution_chi_square(pair):
    """T = 0.7 (honoured, unlike the reference's B11): first-token frequencies vs softmax(z/T),
    second-token frequencies vs sum_t1 p(t1) p(t2 | t1), 4000 samples of one prompt."""
    _, model = pair
    batch = tm.make_batch([[7]], seed=21)
    temp, n = 0.7, 4000
    out = generate.generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        max_new_tokens=2,
        num_samples=n,
        temperature=temp,
        stop_token_ids=(),
        rng=jax.random.key(123),
    )
    tokens = np.asarray(out.tokens)
    v = model.config.text.vocab_size
    z0 = np.asarray(model(batch["input_ids"], batch["attention_mask"]), np.float64)[0, -1]
    p0 = np.asarray(jax.nn.softmax(z0 / temp))
    r0 = _chi2(np.bincount(tokens[:, 0], minlength=v), p0)
    ids = np.concatenate([np.repeat(batch["input_ids"], v, 0), np.arange(v)[:, None]], 1)
    z1 = np.asarray(model(ids, np.ones_like(ids)), np.float64)[:, -1]
    p1 = (p0[:, None] * np.asarray(jax.nn.softmax(z1 / temp, -1))).sum(0)
    r1 = _chi2(np.bincount(tokens[:, 1], minlength=v), p1)
    # the same test rejects the untempered distribution (the test has power)
    wrong = _chi2(np.bincount(tokens[:, 0], minlength=v), np.asarray(jax.nn.softmax(z0)))
    print(
        f"[generate] chi-square p: step 0 {r0.pvalue:.3f}, step 1 {r1.pvalue:.3f}; "
        f"vs T=1 {wrong.pvalue:.1e}"
    )
    assert r0.pvalue > 1e-3 and r1.pvalue > 1e-3
    assert wrong.pvalue < 1e-6


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (20, 0.5)])
def test_top_k_top_p_sampling_chi_square(pair, top_k, top_p):
    """sample_tokens (the engine's sampler) on the tiny model's next-token logits: nothing
    outside transformers' kept set, frequencies = the renormalised kept distribution."""
    _, model = pair
    batch = tm.make_batch([[7]], seed=21)
    n = 3000
    z = np.asarray(model(batch["input_ids"], batch["attention_mask"]), np.float32)[:, -1]
    params = generate.SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    keys = jax.random.split(jax.random.key(7), n)
    draw = jax.jit(lambda z, k: generate.sample_tokens(z, k, params)[0])
    tokens = np.asarray(draw(jnp.broadcast_to(jnp.asarray(z), (n, z.shape[-1])), keys))
    x = torch.from_numpy(z)
    x = hf_lp.TopKLogitsWarper(top_k)(None, x) if top_k else x
    x = hf_lp.TopPLogitsWarper(top_p)(None, x) if top_p < 1 else x
    p = torch.softmax(x.double(), -1)[0].numpy()
    counts = np.bincount(tokens, minlength=p.size)
    assert counts[p == 0].sum() == 0  # nothing outside the kept set
    kept = int((p > 0).sum())
    res = _chi2(counts, p)
    print(f"[generate] top_k={top_k} top_p={top_p}: {kept} kept, chi-square p {res.pvalue:.3f}")
    assert 1 < kept < p.size and res.pvalue > 1e-3


def test_stop_tokens_mask_and_padding(pair):
    """Stop ids met mid-way: the mask runs up to and including the first one, padding and logp 0
    after, and the loop leaves once every row has stopped. The free-running reference is
    transformers' greedy decode without stops."""
    hf, model = pair
    batch = tm.make_batch([[6], [2, (1, 4, 4), 2]], seed=4)
    free_t, _ = _hf_greedy(hf, batch, 12, stop=())
    # each row's first token (from column 2 on) not emitted before by it becomes a stop id
    cols = [next(j for j in range(2, 12) if free_t[r, j] not in free_t[r, :j]) for r in (0, 1)]
    stops = tuple(int(free_t[r, c]) for r, c in enumerate(cols))
    sampler = generate.Sampler(
        model,
        generate.SamplingParams(
            max_new_tokens=12, temperature=0.0, pad_token_id=-1, stop_token_ids=stops + (10**6,)
        ),
    )
    out = sampler(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]
    )
    tokens, mask, logps = (np.asarray(x) for x in out)
    ends = []
    for r in range(2):
        hits = np.nonzero(np.isin(free_t[r], stops))[0]
        ends.append(int(hits[0]) + 1)
        end = ends[-1]
        assert end <= cols[r] + 1
        np.testing.assert_array_equal(mask[r], np.arange(12) < end)
        np.testing.assert_array_equal(tokens[r, :end], free_t[r, :end])
        assert (tokens[r, end:] == -1).all() and (logps[r, end:] == 0).all()
        assert (logps[r, :end] < 0).all()
    # the loop left once both rows had stopped
    assert int(sampler.last_num_steps) == max(ends) < 12, (ends, sampler.last_num_steps)


def test_compilations_bounded_and_weight_swap(pair):
    """Varied prompts and image sizes inside a bucket reuse the programs; new weights too."""
    hf, model = pair
    sampler = generate.Sampler(
        model,
        generate.SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=STOP),
        prompt_multiple=64,
    )
    rows = [
        [[2, (1, 4, 8), 3], [1, (1, 4, 4), 5]],
        [[5, (1, 8, 4), 1], [3, (1, 4, 6), 9]],
        [[9], [4]],
        [[20], [13]],
    ]
    outs = []
    for k, spec in enumerate(rows):
        b = tm.make_batch(spec, seed=k)
        outs.append(
            sampler(
                b["input_ids"], b["attention_mask"], b.get("pixel_values"), b.get("image_grid_thw")
            )
        )
    counts = dict(sampler.trace_counts)
    print(f"[generate] traces over {len(rows)} varied batches: {counts}")
    # one prefill program with images (one patch bucket), one text-only, one decode program
    assert counts == {"prefill": 2, "decode": 1}
    # swap in other weights: no new trace, results equal a fresh engine on the new model
    other = qvl.Qwen2_5_VLForConditionalGeneration(model.config, rngs=nnx.Rngs(3), init_std=0.08)
    b = tm.make_batch(rows[0], seed=0)
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    swapped = sampler(*args, state=nnx.state(other))
    assert dict(sampler.trace_counts) == counts
    tokens = np.asarray(swapped.tokens)
    assert not np.array_equal(tokens, np.asarray(outs[0].tokens))
    # greedy under the new weights: every token is the argmax of `other`'s full forward pass
    mask = np.asarray(swapped.mask)
    lp = _full_logits(other, b, tokens, mask)
    np.testing.assert_array_equal(tokens[mask], lp.argmax(-1)[mask])


def test_rng_determinism_and_bad_input(pair):
    _, model = pair
    b = tm.make_batch([[8], [3]], seed=2)
    kw = dict(max_new_tokens=5, num_samples=2, temperature=1.0, stop_token_ids=())
    a1 = generate.generate(model, b["input_ids"], b["attention_mask"], rng=jax.random.key(1), **kw)
    a2 = generate.generate(
        model, b["input_ids"], b["attention_mask"], rng=jax.random.PRNGKey(1), **kw
    )
    a3 = generate.generate(model, b["input_ids"], b["attention_mask"], rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a1.tokens), np.asarray(a2.tokens))
    assert not np.array_equal(np.asarray(a1.tokens), np.asarray(a3.tokens))
    right_padded = b["input_ids"][:, ::-1], b["attention_mask"][:, ::-1]
    with pytest.raises(ValueError, match="left-padded"):
        generate.generate(model, *right_padded, **kw)
    with pytest.raises(ValueError, match="temperature"):
        generate.generate(model, b["input_ids"], b["attention_mask"], temperature=-1.0)
    img = tm.make_batch([[2, (1, 4, 4), 2]], seed=0)
    with pytest.raises(ValueError, match="image tokens"):
        generate.generate(model, img["input_ids"], img["attention_mask"])


def test_sampler_lower_gives_the_programs_generate_runs(pair):
    """Sampler.lower's (prefill, decode), compiled and run by hand, give generate's output."""
    _, model = pair
    sampler = generate.Sampler(
        model, generate.SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=STOP)
    )
    b = tm.make_batch([[2, (1, 4, 8), 3], [1, (1, 4, 4), 5]], seed=0)
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
    ref = sampler(*args)
    inputs, key = sampler.prepare(*args).arrays(), jax.random.key(0)
    prefill, decode = sampler.lower(sampler.state, *inputs, key)
    carry = prefill.compile()(sampler.state, *inputs, key)
    out, _, _ = decode.compile()(sampler.state, carry)
    for got, want in zip(out, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_completions_masked_tokens_without_specials():
    """Each row: the masked tokens (through the stop token), special tokens skipped; a global
    array sharded over devices decodes the same."""
    from tatar_jax.data import tokenizer

    tok = tokenizer.load_tokenizer(None)
    rows = [tok.encode("a sharp photo"), tok.encode("<answer>7</answer>")]
    after = tok.encode(" never shown")
    width = max(map(len, rows)) + 1 + len(after)
    tokens = np.full((2, width), tok.pad_id, np.int32)
    mask = np.zeros((2, width), bool)
    for k, ids in enumerate(rows):
        full = [*ids, tok.im_end_id, *after]
        tokens[k, : len(full)] = full
        mask[k, : len(ids) + 1] = True
    out = generate.GenerateOutput(tokens, mask, np.zeros(tokens.shape, np.float32))
    want = ["a sharp photo", "<answer>7</answer>"]
    assert generate.decode_completions(tok, out) == want
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    rows_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    sharded = generate.GenerateOutput(*(jax.device_put(x, rows_sh) for x in out))
    assert generate.decode_completions(tok, sharded) == want


def test_decode_attention_equals_attention_over_repeated_prompt_cache():
    """One prompt KV shared by G samples + per-sample generated slots, two softmaxes merged by
    their log-sum-exp == the full-slot attention of the repeated cache (left padding, unwritten
    generation slots)."""
    from tatar_jax.models.qwen2_5_vl import language

    rng = np.random.default_rng(0)
    b, g, p, s, h, kvh, hd = 2, 3, 7, 5, 4, 2, 8
    n = b * g
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, pk, pv, gk, gv = (
        f(n, 1, h, hd),
        f(b, p, kvh, hd),
        f(b, p, kvh, hd),
        f(n, s, kvh, hd),
        f(n, s, kvh, hd),
    )
    pvalid = np.ones((b, p), bool)
    pvalid[0, :3] = False  # left padding of prompt 0
    index = 2  # generated slots 0..2 written, 3..4 not yet
    gvalid = jnp.arange(s) <= index
    out = language.decode_attention(q, pk, pv, jnp.asarray(pvalid), gk, gv, gvalid)
    # reference: repeat the prompt cache G times, concatenate, one masked softmax
    k = jnp.concatenate([jnp.repeat(pk, g, 0), gk], axis=1)
    v = jnp.concatenate([jnp.repeat(pv, g, 0), gv], axis=1)
    valid = jnp.concatenate([jnp.repeat(jnp.asarray(pvalid), g, 0), jnp.ones((n, s), bool)], 1)
    ref = language.attention(q, k, v, jnp.asarray([p + index]), valid)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)


def test_sample_cache_holds_one_prompt_copy(pair):
    """The decode carry: prompt KV for B prompts, max_new_tokens slots for B*G samples."""
    _, model = pair
    params = generate.SamplingParams(max_new_tokens=5, num_samples=4, stop_token_ids=STOP)
    sampler = generate.Sampler(model, params, prompt_multiple=16)
    b = tm.make_batch([[3], [9]], seed=0)
    args = sampler.prepare(b["input_ids"], b["attention_mask"]).arrays()
    carry = jax.eval_shape(sampler._prefill_fn, sampler.state, *args, jax.random.key(0))
    t = model.config.text
    kv = (t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    assert carry.cache.prompt_k.shape == (kv[0], 2, 16, *kv[1:])
    assert carry.cache.gen_k.shape == (kv[0], 8, 5, *kv[1:])
    assert carry.prompt_mask.shape == (2, 16)
