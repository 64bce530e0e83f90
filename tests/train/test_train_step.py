"""The jitted training steps against separately computed references (tiny random model, CPU).

GRPO reference: one sequence at a time, the *unpadded* prompt + completion through the model's
own forward (HF-equivalent mRoPE positions from ``get_rope_index`` on the concatenated sequence,
the vision tower on that row's image alone), a full ``log_softmax`` over the vocabulary, and the
spec §7.3 per-token formula written out; mean over tokens, then over sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import grpo, sharding
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import grpo_step, optim, sft_step
from tatar_jax.train import inputs as step_inputs

G = 2  # completions per prompt in the reference tests (8 rows for the mesh test)
T = 6


def _model(seed=0):
    return qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(seed)
    )


def _prompt_batch(cfg):
    """Two left-padded prompts with images of different sizes, as the pipeline lays them out."""
    q = 64  # patch bucket
    batch = tm.prompt_batch(cfg, patch_bucket=q)
    pv = tm.prompt_batch(cfg).vision.pixel_values  # the real patches
    meta = batch.meta.replace(
        valid=np.array([True, True]),
        task_id=np.array([0, 1], np.int32),
        gt_100=np.array([40.0, 70.0], np.float32),
    )
    return batch.replace(meta=meta), pv


def _grpo_inputs(cfg, seed=0, g=G):
    batch, pv_real = _prompt_batch(cfg)
    rng = np.random.default_rng(seed)
    n = 2 * g
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, size=n)
    lengths[0] = T
    cmask = np.arange(T)[None, :] < lengths[:, None]
    tokens = np.where(cmask, tokens, 0)
    adv = rng.normal(size=n).astype(np.float32)
    inputs = tm.grpo_step_inputs(cfg, batch, tokens, cmask, adv, g)
    return batch, pv_real, tokens, cmask, inputs


def _reference_loss(graphdef, params, batch, pv_real, tokens, cmask, adv, old, ref, eps, beta):
    cfg = nnx.merge(graphdef, params).config
    grids = batch.image_grid_thw
    starts = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    per_seq = []
    for r in range(len(tokens)):
        b = r // G
        prompt = batch.input_ids[b][batch.attention_mask[b] == 1]
        comp = tokens[r][cmask[r]]
        seq = np.concatenate([prompt, comp])[None]
        grid = grids[b : b + 1]
        pos, _ = qvl.get_rope_index(seq, grid, np.ones_like(seq), cfg)
        layout = qvl.vision_layout(grid, cfg.vision)
        pv = pv_real[starts[b] : starts[b + 1]]
        pv = np.pad(pv, ((0, layout.patch_index.shape[0] - len(pv)), (0, 0)))
        model = nnx.merge(graphdef, params)
        h, _ = model.hidden_states(
            jnp.asarray(seq), None, jnp.asarray(pv), position_ids=jnp.asarray(pos),
            vision_layout=layout,
        )  # fmt: skip
        logits = model.logits_from_hidden(h)[0].astype(jnp.float32)
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        k = len(comp)
        lp = logp_all[len(prompt) - 1 : len(prompt) - 1 + k][jnp.arange(k), comp]
        o = jax.lax.stop_gradient(lp) if old is None else jnp.asarray(old[r, :k])
        ratio = jnp.exp(lp - o)
        a = adv[r]
        term = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps, 1 + eps) * a)
        if beta:
            d = jnp.asarray(ref[r, :k]) - lp
            term = term + beta * (jnp.exp(d) - d - 1)
        per_seq.append(jnp.mean(term))
    return jnp.mean(jnp.stack(per_seq))


@pytest.mark.parametrize("with_old", [False, True])
def test_grpo_loss_and_grads_match_per_sequence_reference(with_old):
    model = _model()
    cfg = model.config
    graphdef, params = nnx.split(model)
    batch, pv_real, tokens, cmask, inputs = _grpo_inputs(cfg)
    rng = np.random.default_rng(1)
    beta, eps = 0.04, 0.2
    ref = rng.normal(-5.0, 0.5, size=(2 * G, T)).astype(np.float32)
    inputs = inputs.replace(rows=inputs.rows.replace(ref_logps=ref))
    old = None
    if with_old:
        # pi_old away from pi_theta so that ratios leave [0.8, 1.2] and clipping is active.
        lp = jax.jit(grpo_step.make_logps_fn(graphdef, chunk_size=5))(params, inputs)
        old = np.asarray(lp) + rng.normal(0, 0.3, size=lp.shape).astype(np.float32)
        inputs = inputs.replace(rows=inputs.rows.replace(old_logps=old))
    adv = inputs.rows.advantages

    loss_cfg = grpo.LossConfig(beta=beta, epsilon=eps)
    fn = jax.jit(
        lambda p, x: grpo_step.grpo_grads(graphdef, p, x, loss_cfg, num_micro=2, chunk_size=7)
    )
    loss, grads, aux = fn(params, jax.tree.map(jnp.asarray, inputs))
    ref_fn = lambda p: _reference_loss(  # noqa: E731
        graphdef, p, batch, pv_real, tokens, cmask, adv, old, ref, eps, beta
    )
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(ref_fn))(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-5, (float(loss), float(ref_loss))
    if with_old:
        assert float(aux["clip_frac"]) > 0  # the clipped branch was exercised
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)
    scale = jax.tree.map(lambda b: float(jnp.max(jnp.abs(b))), ref_grads)
    pairs = zip(jax.tree.leaves(diffs), jax.tree.leaves(scale), strict=True)
    worst = max(d / max(s, 1e-6) for d, s in pairs)
    d_loss = abs(float(loss) - float(ref_loss))
    print(f"GRPO loss |d|={d_loss:.2e}, worst rel grad diff {worst:.2e}")
    assert worst < 1e-4
    # The vision tower gets a gradient through the gathered features.
    vis = [float(jnp.abs(x).max()) for x in jax.tree.leaves(grads["visual"])]
    assert max(vis) > 0


def test_grpo_step_skips_nonfinite_update():
    model = _model()
    graphdef, params = nnx.split(model)
    _, _, _, _, inputs = _grpo_inputs(model.config)
    adv = np.array(inputs.rows.advantages)
    adv[3] = np.nan
    inputs = inputs.replace(rows=inputs.rows.replace(advantages=adv))
    tx = optax.adamw(1e-2)
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    step = jax.jit(grpo_step.make_grpo_step(graphdef, tx, loss=grpo.LossConfig(beta=0.0)))
    new, m = step(state, jax.tree.map(jnp.asarray, inputs))
    assert int(m["update_skipped"]) == 1 and int(new.nonfinite_count) == 1
    assert int(new.step) == 1 and int(new.nonfinite_total) == 1
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new.params, state.params)
    assert all(jax.tree.leaves(same))
    assert optim.should_stop(new, 1) and not optim.should_stop(new, 2)


def test_sft_step_loss_matches_full_hidden_reference():
    """Gathering only the target positions gives the span loss of the full forward."""
    model = _model()
    cfg = model.config
    graphdef, params = nnx.split(model)
    batch, _ = _prompt_batch(cfg)
    ids = batch.input_ids
    label_mask = np.zeros_like(ids)
    label_mask[0, -4:] = 1
    label_mask[1, -2:] = 1
    batch = batch.replace(label_mask=label_mask)
    inputs = step_inputs.sft_batch(batch, cfg)
    tx = optax.sgd(0.0)
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    step = jax.jit(sft_step.make_sft_step(graphdef, tx, grad_accum_steps=2, chunk_size=3))
    _, m = step(state, jax.tree.map(jnp.asarray, inputs))

    layout = qvl.vision_layout(batch.image_grid_thw, cfg.vision)
    n = batch.num_patches
    pv = np.pad(batch.vision.pixel_values[:n], ((0, layout.patch_index.shape[0] - n), (0, 0)))
    h, _ = model.hidden_states(
        jnp.asarray(ids), jnp.asarray(batch.attention_mask), jnp.asarray(pv),
        position_ids=jnp.asarray(batch.position_ids), vision_layout=layout,
    )  # fmt: skip
    w, lay = model.lm_head_weight()
    nll, mask = sft_step.span_nll(
        h, w, jnp.asarray(ids), jnp.asarray(label_mask), weight_layout=lay
    )
    want = float(jnp.sum(nll) / jnp.sum(mask))
    assert abs(float(m["loss"]) - want) < 1e-5, (float(m["loss"]), want)
    assert float(m["loss_tokens"]) == 6


def _sft_setup(counts=(1, 6)):
    """Tiny model, its split and SFT inputs of the two-prompt batch with ``counts`` targets."""
    model = _model()
    cfg = model.config
    graphdef, params = nnx.split(model)
    batch, _ = _prompt_batch(cfg)
    label_mask = np.zeros_like(batch.input_ids)
    for r, c in enumerate(counts):
        label_mask[r, -c - 1 : -1] = 1
    return model, graphdef, params, batch.replace(label_mask=label_mask)


def test_sft_accumulation_is_token_mean_not_mean_of_means():
    """Two micro-batches of very unequal target counts (1 and 6 tokens) give the full-batch
    token mean, its gradient and update, not the mean of the per-micro-batch means."""
    model, graphdef, params, batch = _sft_setup()
    inputs = jax.tree.map(jnp.asarray, step_inputs.sft_batch(batch, model.config))
    tx = optax.sgd(0.5)  # linear in the gradient: equal gradients give equal updates
    s0 = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    full = jax.jit(sft_step.make_sft_step(graphdef, tx, grad_accum_steps=1, chunk_size=5))
    acc = jax.jit(sft_step.make_sft_step(graphdef, tx, grad_accum_steps=2, chunk_size=5))
    s1, m1 = full(jax.tree.map(jnp.copy, s0), inputs)
    s2, m2 = acc(jax.tree.map(jnp.copy, s0), inputs)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    halves = []
    for r in range(2):
        one = batch.replace(
            input_ids=batch.input_ids[r : r + 1],
            attention_mask=batch.attention_mask[r : r + 1],
            label_mask=batch.label_mask[r : r + 1],
            position_ids=batch.position_ids[:, r : r + 1],
        )
        one_in = step_inputs.sft_batch(one, model.config)
        feat = np.asarray(inputs.rows.feat_index)[r : r + 1]
        one_in = one_in.replace(rows=one_in.rows.replace(feat_index=feat))
        _, m = full(jax.tree.map(jnp.copy, s0), jax.tree.map(jnp.asarray, one_in))
        halves.append(float(m["loss"]))
    assert abs(np.mean(halves) - float(m1["loss"])) > 1e-3  # the two definitions really differ
    assert float(m1["loss_tokens"]) == 7


def test_sft_step_reports_lr_and_skips_nan():
    model, graphdef, params, batch = _sft_setup()
    inputs = jax.tree.map(jnp.asarray, step_inputs.sft_batch(batch, model.config))
    sched = optim.make_schedule(1e-2, 10)
    tx = optim.make_optimizer(sched)
    step = jax.jit(sft_step.make_sft_step(graphdef, tx, schedule=sched, chunk_size=5))
    s = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    s, m = step(s, inputs)
    np.testing.assert_allclose(m["lr"], 1e-2)
    s, m = step(s, inputs)
    np.testing.assert_allclose(m["lr"], 1e-2 * 0.9, rtol=1e-6)
    emb = s.params["language_model"]["embed_tokens"]["embedding"]
    bad_params = jax.tree.map(lambda x: x, s.params)
    bad_params["language_model"]["embed_tokens"]["embedding"] = emb.replace(
        emb[...].at[0, 0].set(jnp.nan)
    )
    bad = s.replace(params=bad_params)
    kept = np.asarray(bad.params["language_model"]["norm"]["scale"][...])
    s3, m3 = step(bad, inputs)
    assert int(m3["update_skipped"]) == 1
    np.testing.assert_array_equal(s3.params["language_model"]["norm"]["scale"][...], kept)


def test_sft_step_packed_targets_equal_per_row_targets():
    """Packing the targets of a micro-batch's rows into one short row changes neither the loss,
    the metrics nor the update. Two accumulated micro-batches, each packed on its own (one
    micro-batch is the same code with a scan of length 1)."""
    accum = 2
    model = _model()
    cfg = model.config
    graphdef, params = nnx.split(model)
    batch, _ = _prompt_batch(cfg)
    label_mask = np.zeros_like(batch.input_ids)
    label_mask[0, -5:] = 1
    label_mask[1, -3:] = 1
    batch = batch.replace(label_mask=label_mask)
    plain = step_inputs.sft_batch(batch, cfg, num_micro=accum)
    packed = step_inputs.sft_batch(batch, cfg, num_micro=accum, pack_buckets=4)
    assert plain.pack_size == 0
    assert packed.pack_size == 32
    tx = optax.sgd(0.5)
    step = jax.jit(sft_step.make_sft_step(graphdef, tx, grad_accum_steps=accum, chunk_size=5))
    out = {}
    for name, inputs in (("plain", plain), ("packed", packed)):
        state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
        out[name] = step(state, jax.tree.map(jnp.asarray, inputs))
    (s0, m0), (s1, m1) = out["plain"], out["packed"]
    for k in ("loss", "loss_tokens", "sequences", "token_accuracy", "grad_norm"):
        assert abs(float(m0[k]) - float(m1[k])) <= 1e-6 * max(1.0, abs(float(m0[k]))), k
    assert float(m1["sequences"]) == 2 and float(m1["loss_tokens"]) == 8
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(s0.params),
            jax.tree.leaves(jax.tree.map(jnp.asarray, params)),
            strict=True,
        )
    )
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params), strict=True)
    )
    assert moved > 1e-3 and diff <= 1e-6, (moved, diff)


def test_grpo_step_on_8_devices_equals_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    model = _model()
    graphdef, params = nnx.split(model)
    _, _, _, _, inputs = _grpo_inputs(model.config, g=4)
    # Plain SGD: the parameter change is the gradient itself (Adam's g / |g| would amplify
    # float-summation-order differences of near-zero gradients).
    tx = optax.sgd(0.1)
    make = lambda: jax.tree.map(  # noqa: E731
        jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0))
    )
    step = grpo_step.make_grpo_step(graphdef, tx, loss=grpo.LossConfig(beta=0.0), chunk_size=8)

    one, m1 = jax.jit(step)(make(), jax.tree.map(jnp.asarray, inputs))

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    state = make()
    p_shard = sharding.state_shardings(state.params, mesh, rules)
    state = state.replace(params=jax.device_put(state.params, p_shard))
    rows = jax.tree.map(
        lambda v: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim, rules)), inputs.rows
    )
    vision = jax.device_put(inputs.vision, sharding.replicated(mesh))
    with sharding.use_rules(mesh, rules):
        many, m8 = jax.jit(step)(state, inputs.replace(rows=rows, vision=vision))
    assert len(rows.input_ids.sharding.device_set) == 8
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), many.params, one.params)
    assert max(jax.tree.leaves(diff)) < 1e-6
