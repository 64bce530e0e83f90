"""Full-model parity with transformers' ``Qwen2_5_VLForConditionalGeneration`` (torch, fp32).

Tiny random models from ``tests/tiny_models.py`` (never downloaded). The tiny vision tower has
windows of 4x4 patches (images here are 4x8 .. 8x12 patches, so window attention really
restricts attention) and block 1 of 3 uses full attention. Logits are compared on non-padding
positions; the budget is max |Δ| <= 1e-4 (measured values are printed with ``-s``).

Every attention implementation that runs on CPU is compared: ``xla`` (float32 scores), ``chunked``
(with blocks of 16 queries x 8 keys in this module, so the 40-token rows and the vision frames
span several blocks) and ``splash_interpret`` (the TPU splash kernel in the Pallas interpreter).
The default ``auto`` resolves to ``chunked`` here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
import torch
from flax import nnx

from tatar_jax.models import layers
from tatar_jax.models import qwen2_5_vl as qvl

TOL = 1e-4
LEN = 40  # every batch is left-padded to this length: equal shapes share compilations
IMPLS = ("xla", "chunked")  # + splash_interpret in its own (slower) test


@pytest.fixture(scope="module", autouse=True)
def small_attention_blocks():
    """Several "chunked" blocks per row; compiled programs of other block sizes are dropped."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layers, "CHUNK_Q", 16)
        mp.setattr(layers, "CHUNK_K", 8)
        jax.clear_caches()
        yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = tm.tiny_hf_model(seed=0)
    return hf, tm.save_hf_dir(hf, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def pair(hf_dir):
    hf, path = hf_dir
    return hf, qvl.load_hf_checkpoint(path, dtype=jnp.float32)


@pytest.fixture(scope="module", params=IMPLS)
def impl_pair(request, hf_dir):
    hf, path = hf_dir
    model = qvl.load_hf_checkpoint(path, dtype=jnp.float32, attention_impl=request.param)
    assert model.language_model.attention_impl == request.param
    return hf, model


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    hf = tm.tiny_hf_model(tm.tiny_hf_config(tie_word_embeddings=True), seed=1)
    path = tm.save_hf_dir(hf, tmp_path_factory.mktemp("hf") / "tied")
    return hf, qvl.load_hf_checkpoint(path, dtype=jnp.float32)


def _text_positions_hf(hf, batch):
    """transformers' own 3D positions for a text-only batch (what generate uses)."""
    pos, _ = hf.model.get_rope_index(
        torch.from_numpy(batch["input_ids"]),
        mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
        attention_mask=torch.from_numpy(batch["attention_mask"]),
    )
    return pos


def _ours(model, batch):
    return np.asarray(
        model(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch.get("image_grid_thw"),
        )
    )


def _max_diff(ref, ours, batch):
    valid = batch["attention_mask"].astype(bool)
    return float(np.abs(ref - ours)[valid].max())


def _two_image_logits_diff(hf, model, seed: int) -> float:
    """max |Δ logits| (valid positions) on two images of different grids, left-padded."""
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=seed, length=LEN)
    return _max_diff(tm.hf_logits(hf, batch), _ours(model, batch), batch)


CASES = {
    "text_only_left_padded": [[11], [6], [3]],
    "one_image_window_attention": [[3, (1, 8, 8), 4]],
    "two_images_different_grids_left_padded": [[2, (1, 4, 8), 3], [1, (1, 8, 12), 5], [4]],
    "two_images_in_one_row": [[2, (1, 8, 4), 1, (1, 4, 12), 2], [3, (1, 4, 4), 1]],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(impl_pair, name):
    hf, model = impl_pair
    batch = tm.make_batch(CASES[name], seed=7, length=LEN)
    kw = {} if "image_grid_thw" in batch else {"position_ids": _text_positions_hf(hf, batch)}
    ref = tm.hf_logits(hf, batch, **kw)
    ours = _ours(model, batch)
    assert ours.shape == ref.shape
    diff = _max_diff(ref, ours, batch)
    impl = model.language_model.attention_impl
    print(
        f"[parity] {impl} {name}: max|Δ logits| = {diff:.2e} (max |logit| {np.abs(ref).max():.2f})"
    )
    assert diff <= TOL
    # logits are not degenerate: greedy tokens are not all tied / identical
    assert len(np.unique(ref.argmax(-1)[batch["attention_mask"].astype(bool)])) > 1


def test_splash_kernel_interpreted_matches_transformers(hf_dir):
    """The TPU splash path (segment-id padding, 128-padded blocks and lanes, GQA, non-causal
    vision groups) in the Pallas interpreter: images of two sizes, window and full-attention
    blocks, left padding."""
    hf, path = hf_dir
    model = qvl.load_hf_checkpoint(path, dtype=jnp.float32, attention_impl="splash_interpret")
    diff = _two_image_logits_diff(hf, model, seed=9)
    print(f"[parity] splash_interpret: max|Δ logits| = {diff:.2e}")
    assert diff <= TOL


def test_chunked_gradients_equal_xla(hf_dir):
    """d(logits on valid positions · w)/d(params) of the whole model (decoder and vision tower)."""
    _, path = hf_dir
    models = {i: qvl.load_hf_checkpoint(path, attention_impl=i) for i in ("xla", "chunked")}
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=10, length=LEN)
    cfg = models["xla"].config
    grid = batch["image_grid_thw"]
    pos, _ = qvl.get_rope_index(batch["input_ids"], grid, batch["attention_mask"], cfg)
    layout = qvl.vision_layout(grid, cfg.vision)
    pv = np.zeros((layout.patch_index.shape[0], batch["pixel_values"].shape[1]), np.float32)
    pv[: len(batch["pixel_values"])] = batch["pixel_values"]
    mask = batch["attention_mask"]
    w = np.random.default_rng(0).normal(size=(*mask.shape, cfg.text.vocab_size)) * mask[..., None]

    def loss(m):
        logits = m(batch["input_ids"], mask, pv, position_ids=pos, vision_layout=layout)
        return (logits * w).sum()

    grads = {i: nnx.state(nnx.grad(loss)(m), nnx.Param) for i, m in models.items()}
    flat = {i: dict(nnx.to_flat_state(g)) for i, g in grads.items()}
    worst = 0.0
    for path_, ref in flat["xla"].items():
        a, b = np.asarray(flat["chunked"][path_][...]), np.asarray(ref[...])
        worst = max(worst, float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6)))
    vis = np.asarray(flat["xla"][("visual", "blocks", "attn", "qkv", "kernel")][...])
    assert np.abs(vis).max() > 0  # the vision tower's attention is in the gradient
    print(f"[parity] chunked vs xla parameter gradients: max relative Δ {worst:.2e}")
    assert worst <= 1e-4


def test_tied_embeddings_match_transformers(tied_pair):
    hf, model = tied_pair
    assert model.lm_head is None and model.lm_head_weight()[1] == "vd"
    diff = _two_image_logits_diff(hf, model, seed=2)
    print(f"[parity] tied embeddings: max|Δ logits| = {diff:.2e}")
    assert diff <= TOL


def test_stages_match_transformers(pair):
    """Per stage: vision features, merged input embeddings, final hidden states."""
    hf, model = pair
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=3, length=LEN)
    pv, grid = torch.from_numpy(batch["pixel_values"]), torch.from_numpy(batch["image_grid_thw"])
    with torch.no_grad():
        ref_feats = torch.cat(hf.model.get_image_features(pv, grid).pooler_output).numpy()
        out = hf.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        ref_hidden = out.last_hidden_state.numpy()
    feats = np.asarray(model.visual.embed_images(batch["pixel_values"], batch["image_grid_thw"]))
    d_feat = float(np.abs(feats - ref_feats).max())
    hidden, _ = model.hidden_states(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"]
    )
    d_hidden = _max_diff(ref_hidden, np.asarray(hidden), batch)
    print(f"[parity] vision features {d_feat:.2e}, final hidden states {d_hidden:.2e}")
    assert d_feat <= TOL and d_hidden <= TOL


def test_text_decoder_hidden_states_match_transformers(pair):
    hf, model = pair
    batch = tm.make_batch(CASES["text_only_left_padded"], seed=4, length=LEN)
    with torch.no_grad():
        ref = hf.model.language_model(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            position_ids=_text_positions_hf(hf, batch),
        ).last_hidden_state.numpy()
    hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    diff = _max_diff(ref, np.asarray(hidden), batch)
    print(f"[parity] text decoder hidden states: {diff:.2e}")
    assert diff <= TOL


def test_jit_with_precomputed_positions_and_layout(pair):
    """The training/rollout path: positions and vision layout from the host, forward under jit."""
    _, model = pair
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=5, length=LEN)
    cfg = model.config
    pos, _ = qvl.get_rope_index(
        batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"], cfg
    )
    grid = batch["image_grid_thw"]
    layout = qvl.vision_layout(grid, cfg.vision, qvl.vision_bucket(grid, cfg.vision, 512))
    pv = np.zeros((512, batch["pixel_values"].shape[1]), np.float32)
    pv[: len(batch["pixel_values"])] = batch["pixel_values"]

    @nnx.jit
    def fwd(m, ids, mask, pv, pos, layout):
        return m(ids, mask, pv, position_ids=pos, vision_layout=layout)

    got = np.asarray(fwd(model, batch["input_ids"], batch["attention_mask"], pv, pos, layout))
    want = _ours(model, batch)
    diff = _max_diff(want, got, batch)
    assert diff <= 1e-5, diff


def test_kv_cache_prefill_then_decode_equals_full_forward(pair):
    _, model = pair
    cfg = model.config
    steps = 3
    rows = CASES["two_images_different_grids_left_padded"]
    batch = tm.make_batch(rows, seed=6, length=LEN - steps)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    b = ids.shape[0]
    new = np.random.default_rng(0).integers(3, 240, size=(b, steps))
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    full = np.asarray(model(full_ids, full_mask, batch["pixel_values"], grid))

    prompt_len, max_len = ids.shape[1], ids.shape[1] + steps + 2
    pos, delta = qvl.get_rope_index(ids, grid, mask, cfg)
    layout = qvl.vision_layout(grid, cfg.vision)
    pv = np.zeros((layout.patch_index.shape[0], batch["pixel_values"].shape[1]), np.float32)
    pv[: len(batch["pixel_values"])] = batch["pixel_values"]
    cache = model.init_cache(b, max_len)
    cache_mask = np.zeros((b, max_len), np.int32)
    cache_mask[:, :prompt_len] = mask
    logits, cache = model.forward_with_cache(ids, pos, cache, cache_mask, pv, layout)
    d = [_max_diff(full[:, :prompt_len], np.asarray(logits), batch)]
    step = nnx.jit(lambda m, t, p, c, cm: m.forward_with_cache(t, p, c, cm))
    for s in range(steps):
        cache_mask[:, prompt_len + s] = 1
        p = qvl.decode_position_ids(jnp.asarray(mask.sum(-1) + s), delta)
        logits, cache = step(model, new[:, s : s + 1], p, cache, cache_mask)
        d.append(float(np.abs(np.asarray(logits)[:, 0] - full[:, prompt_len + s]).max()))
    assert int(cache.index) == prompt_len + steps
    assert max(d) <= TOL, d


def test_bf16_forward_close_to_fp32(tmp_path):
    hf = tm.tiny_hf_model(seed=0)
    path = tm.save_hf_dir(hf, tmp_path / "tiny")
    m32 = qvl.load_hf_checkpoint(path, dtype=jnp.float32)
    m16 = qvl.load_hf_checkpoint(path, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=8, length=LEN)
    l32, l16 = _ours(m32, batch), _ours(m16, batch)
    assert l16.dtype == jnp.bfloat16
    valid = batch["attention_mask"].astype(bool)
    diff = float(np.abs(l32 - l16.astype(np.float32))[valid].max())
    scale = float(np.abs(l32[valid]).max())
    agree = float((l32.argmax(-1) == l16.astype(np.float32).argmax(-1))[valid].mean())
    print(
        f"[parity] bf16 vs fp32: max|Δ| {diff:.3f} (max |logit| {scale:.2f}), argmax agree {agree}"
    )
    assert np.isfinite(l16.astype(np.float32)).all()
    assert diff <= 0.05 * scale + 0.05


def test_greedy_decode_matches_transformers_generate(pair):
    """Prefill + cached single-token decode (positions from the rope delta) picks the same
    greedy tokens as transformers' ``generate`` on a left-padded batch with images."""
    hf, model = pair
    steps = 4
    batch = tm.make_batch(CASES["two_images_different_grids_left_padded"], seed=9, length=LEN)
    with torch.no_grad():
        out = hf.generate(
            **{k: torch.from_numpy(v) for k, v in batch.items()},
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=tm.PAD_ID,
            eos_token_id=None,
        )
    ref = out[:, LEN:].numpy()
    cfg = model.config
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    pos, delta = qvl.get_rope_index(ids, grid, mask, cfg)
    layout = qvl.vision_layout(grid, cfg.vision)
    pv = np.zeros((layout.patch_index.shape[0], batch["pixel_values"].shape[1]), np.float32)
    pv[: len(batch["pixel_values"])] = batch["pixel_values"]
    b = ids.shape[0]
    cache = model.init_cache(b, LEN + steps)
    cache_mask = np.zeros((b, LEN + steps), np.int32)
    cache_mask[:, :LEN] = mask
    logits, cache = model.forward_with_cache(ids, pos, cache, cache_mask, pv, layout)
    tokens = [np.asarray(logits[:, -1]).argmax(-1)]
    step = nnx.jit(lambda m, t, p, c, cm: m.forward_with_cache(t, p, c, cm))
    for s in range(steps - 1):
        cache_mask[:, LEN + s] = 1
        p = qvl.decode_position_ids(jnp.asarray(mask.sum(-1) + s), delta)
        logits, cache = step(model, tokens[-1][:, None], p, cache, cache_mask)
        tokens.append(np.asarray(logits[:, 0]).argmax(-1))
    np.testing.assert_array_equal(np.stack(tokens, axis=1), ref)


def test_remat_policies_keep_gradients(pair):
    _, model = pair
    batch = tm.make_batch(CASES["text_only_left_padded"], seed=10, length=16)
    ids = jnp.asarray(batch["input_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    pos = jnp.asarray(qvl.text_position_ids(batch["attention_mask"]))

    def grads(policy):
        graphdef, state = nnx.split(model)
        m = nnx.merge(graphdef, state)
        m.language_model.remat = policy

        def loss(m):
            h, _ = m.hidden_states(ids, mask, position_ids=pos)
            return jnp.sum(m.logits_from_hidden(h) ** 2)

        return nnx.jit(nnx.grad(loss))(m)

    ref = jax.tree.leaves(grads(None))
    for policy in ("dots_saveable",):
        for a, b in zip(ref, jax.tree.leaves(grads(policy)), strict=True):
            scale = float(np.abs(np.asarray(a)).max())
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
