"""SFT span cross-entropy vs torch ``CrossEntropyLoss(ignore_index=-100)`` on HF-style shifted
labels; padding-side independence (B3); gradient accumulation == full-batch token mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tatar_jax.train import optim, sft_step

V, D = 37, 8


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"emb": jax.random.normal(k1, (V, D)), "head": jax.random.normal(k2, (D, V)) * 0.5}


def _apply(params, batch):
    # Position-independent toy "model": enough to test the loss plumbing and padding sides.
    return jnp.tanh(params["emb"][batch["input_ids"]]), params["head"]


def _loss(params, batch, **kw):
    h, w = _apply(params, batch)
    return sft_step.sft_loss(h, w, batch["input_ids"], batch["loss_mask"], **kw)


def _batch(rng, b=4, length=12, pad_left=True):
    ids = rng.integers(0, V, size=(b, length))
    mask = np.zeros((b, length), np.int32)
    for i in range(b):
        n = rng.integers(length // 2, length + 1)  # real length
        start = length - n if pad_left else 0
        prompt = rng.integers(1, n - 1)
        mask[i, start + prompt : start + n] = 1  # assistant span (content + im_end)
        pad = slice(0, start) if pad_left else slice(n, length)
        ids[i, pad] = 0
    return {"input_ids": jnp.asarray(ids, jnp.int32), "loss_mask": jnp.asarray(mask)}


def _torch_reference(params, batch):
    h, w = _apply(params, batch)
    logits = torch.tensor(np.asarray(h @ w))
    labels = torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    labels[torch.tensor(np.asarray(batch["loss_mask"])) == 0] = -100
    # transformers' ForCausalLMLoss: shift, mean over labels != -100.
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    return loss.item()


@pytest.mark.parametrize("pad_left", [True, False])
def test_matches_torch_cross_entropy(pad_left):
    params = _params()
    batch = _batch(np.random.default_rng(0), pad_left=pad_left)
    loss, m = _loss(params, batch, chunk_size=5)
    np.testing.assert_allclose(loss, _torch_reference(params, batch), rtol=1e-5)
    assert float(m["loss_tokens"]) == float(batch["loss_mask"][:, 1:].sum())


def test_padding_side_does_not_matter():
    """Left- and right-padded copies of the same examples give the same loss (fixes B3)."""
    rng = np.random.default_rng(1)
    left = _batch(rng, pad_left=True)
    ids, mask = np.asarray(left["input_ids"]), np.asarray(left["loss_mask"])
    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for i in range(ids.shape[0]):
        first = np.flatnonzero(ids[i])[0] if ids[i].any() else 0
        n = ids.shape[1] - first
        right_ids[i, :n], right_mask[i, :n] = ids[i, first:], mask[i, first:]
    right = {"input_ids": jnp.asarray(right_ids), "loss_mask": jnp.asarray(right_mask)}
    params = _params()
    a, _ = _loss(params, left)
    b, _ = _loss(params, right)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sequence_mean():
    params = _params()
    batch = _batch(np.random.default_rng(2))
    loss, _ = _loss(params, batch, normalization="sequence_mean")
    nll, mask = sft_step.span_nll(*_apply(params, batch), batch["input_ids"], batch["loss_mask"])
    per_seq = np.asarray(nll).sum(1) / np.asarray(mask).sum(1)
    np.testing.assert_allclose(loss, per_seq.mean(), rtol=1e-6)


# --- the real tiny Qwen2.5-VL vs transformers ---------------------------------------------------


def test_vl_model_loss_and_grads_match_transformers(tmp_path):
    """Span loss on the tiny VL model (images, left padding) == transformers' loss with -100
    labels; lm_head and embedding gradients equal torch's. Also: the frozen-vision mask on the
    real parameter tree, and flop_model.param_counts on it."""
    tm = pytest.importorskip("tiny_models")
    qvl = pytest.importorskip("tatar_jax.models.qwen2_5_vl")
    from flax import nnx

    from tatar_jax.train import flop_model

    hf = tm.tiny_hf_model(seed=0)
    model = qvl.load_hf_checkpoint(tm.save_hf_dir(hf, tmp_path / "tiny"), dtype=jnp.float32)
    batch = tm.make_batch([[5, (1, 8, 8), 12], [3, (1, 4, 8), 7]], seed=1)
    ids = batch["input_ids"]
    loss_mask = np.zeros_like(ids)
    loss_mask[0, -9:] = 1  # assistant span incl. the closing token
    loss_mask[1, -4:] = 1

    labels = np.where(loss_mask > 0, ids, -100)
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    hf.zero_grad()
    out = hf(**inputs, labels=torch.from_numpy(labels))
    out.loss.backward()

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    # Host-side inputs of a jitted forward (what the data pipeline provides): mRoPE positions,
    # the vision layout and the patch rows padded to its budget.
    cfg = model.config
    grid = batch["image_grid_thw"]
    pos, _ = qvl.get_rope_index(ids, grid, batch["attention_mask"], cfg)
    layout = qvl.vision_layout(grid, cfg.vision)
    pv = batch["pixel_values"]
    pv = np.pad(pv, ((0, layout.patch_index.shape[0] - pv.shape[0]), (0, 0)))

    def loss_fn(p, b):
        m = nnx.merge(graphdef, p, rest)
        h, _ = m.hidden_states(
            b["input_ids"],
            jnp.asarray(batch["attention_mask"]),
            jnp.asarray(pv),
            position_ids=jnp.asarray(pos),
            vision_layout=layout,
        )
        w, head_layout = m.lm_head_weight()
        assert head_layout == "dv"
        return sft_step.sft_loss(h, w, b["input_ids"], b["loss_mask"], chunk_size=7)

    jb = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(loss_mask)}
    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, jb), has_aux=True))(params)
    assert abs(float(loss) - out.loss.item()) <= 1e-5, (float(loss), out.loss.item())
    assert float(aux["loss_tokens"]) == 13  # masked tokens that have a predecessor: 9 + 4
    g_head = np.asarray(grads["lm_head"]["kernel"][...])
    np.testing.assert_allclose(g_head, hf.lm_head.weight.grad.numpy().T, atol=1e-5)
    g_emb = np.asarray(grads["language_model"]["embed_tokens"]["embedding"][...])
    t_emb = hf.model.language_model.embed_tokens.weight.grad.numpy()
    np.testing.assert_allclose(g_emb, t_emb, atol=1e-5)

    print(
        f"SFT loss |d|={abs(float(loss) - out.loss.item()):.2e} "
        f"lm_head grad max|d|={np.abs(g_head - hf.lm_head.weight.grad.numpy().T).max():.2e} "
        f"embed grad max|d|={np.abs(g_emb - t_emb).max():.2e}"
    )
    mask = optim.trainable_mask(params, freeze_vision=True)
    pure = nnx.to_pure_dict(params)
    flat_mask = jax.tree.leaves(mask)
    sizes = [x.size for x in jax.tree.leaves(pure)]
    n_vis = sum(x.size for x in jax.tree.leaves(pure["visual"]))
    assert sum(s for s, t in zip(sizes, flat_mask, strict=True) if not t) == n_vis > 0
    pc = flop_model.param_counts(cfg.text, cfg.vision)
    assert pc["vision"] == n_vis and pc["total"] == sum(sizes)
