"""The sampler and the learner see the same policy: log-probs of sampled completions, as the
sampler reports them, equal the GRPO update's log-probs of the same rows (``expand_prompts``).

If positions, image-feature indices, padding or row order differed between the rollout and the
update, the policy gradient would be taken at the wrong contexts and GRPO would silently fail to
learn; this pins them together (tiny random model, CPU, float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train_step as tts
import tiny_models as tm
from flax import nnx

from tatar_jax import generate, grpo
from tatar_jax.train import grpo_step, rollout
from tatar_jax.train import inputs as step_inputs


def _setup(seed, g, t, temperature, stop_token_ids):
    """Tiny model, the two-prompt image batch of test_train_step, and a sampler over it."""
    model = tts._model(seed=seed)
    batch, pv_real = tts._prompt_batch(model.config)
    params = generate.SamplingParams(
        max_new_tokens=t, num_samples=g, temperature=temperature,
        stop_token_ids=stop_token_ids, pad_token_id=0, logprobs="tempered",
    )  # fmt: skip
    width = np.shape(batch.input_ids)[1]
    return model, batch, pv_real, generate.Sampler(model, params, prompt_buckets=(width,))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logps_equal_update_logps(temperature):
    g, t = 3, 8
    # Stop on a token id that is likely to be sampled, so some completions end early.
    model, batch, pv_real, sampler = _setup(1, g, t, temperature, stop_token_ids=(7, 11))
    cfg, ids = model.config, np.asarray(batch.input_ids)
    out = sampler.generate(
        ids, batch.attention_mask, pv_real, batch.image_grid_thw, rng=jax.random.key(5)
    )
    tokens, cmask, lps = (np.asarray(x) for x in out)
    assert tokens.shape == (2 * g, t)
    assert cmask.any(axis=1).all()

    inputs = tm.grpo_step_inputs(cfg, batch, tokens, cmask, np.zeros(len(tokens), np.float32), g)
    graphdef, state = nnx.split(model)
    fn = jax.jit(grpo_step.make_logps_fn(graphdef, temperature=temperature, chunk_size=5))
    upd = np.asarray(fn(state, inputs))

    m = cmask.astype(bool)
    assert np.isfinite(lps[m]).all() and (lps[m] < 0).all()
    np.testing.assert_allclose(upd[m], lps[m], atol=2e-5, rtol=0)
    assert (upd[~m] == 0).all()
    # A row order mix-up would show: pair every row with every other row's log-probs.
    sums = np.where(m, upd, 0).sum(1)
    assert np.abs(sums - np.where(m, lps, 0).sum(1)).max() < 1e-4
    assert jnp.all(jnp.diff(jnp.sort(jnp.asarray(sums))) > 0)


def test_grpo_loop_learns_a_bandit():
    """Sampler -> reward -> group advantages -> jitted update, a few steps: the policy must move
    towards the rewarded completions. Reward: 1 when the first sampled token is even. A sign,
    row-order or alignment error anywhere in the loop makes this fail."""
    import optax

    from tatar_jax.train import optim

    g, t = 8, 3
    model, batch, pv_real, sampler = _setup(2, g, t, 1.0, stop_token_ids=())
    cfg, ids = model.config, np.asarray(batch.input_ids)
    graphdef, p0 = nnx.split(model)
    tx = optax.adam(3e-2)
    step = jax.jit(
        grpo_step.make_grpo_step(graphdef, tx, loss=grpo.LossConfig(beta=0.0), chunk_size=64)
    )
    logps_fn = jax.jit(grpo_step.make_logps_fn(graphdef, chunk_size=64))
    state = optim.TrainState.create(p0, tx, jax.random.key(0))

    def p_even(params):
        # Exact P(first token even) under the policy: log-probs of every first token.
        vocab = cfg.text.vocab_size
        toks = np.zeros((vocab * 2, t), np.int32)
        toks[:, 0] = np.tile(np.arange(vocab), 2)
        cm = np.zeros((vocab * 2, t), bool)
        cm[:, 0] = True
        inputs = tm.grpo_step_inputs(cfg, batch, toks, cm, np.zeros(len(toks), np.float32), vocab)
        lp = np.asarray(logps_fn(params, inputs))[:, 0]
        return float(np.exp(lp)[toks[:, 0] % 2 == 0].sum() / 2)

    before = p_even(state.params)
    for i in range(6):
        out = sampler.generate(
            ids, batch.attention_mask, pv_real, batch.image_grid_thw,
            rng=jax.random.key(100 + i), state=state.params,
        )  # fmt: skip
        tokens, cmask = np.asarray(out.tokens), np.asarray(out.mask)
        reward = (tokens[:, 0] % 2 == 0).astype(np.float32)
        adv = np.asarray(grpo.group_advantages(reward, g, "grpo", 1e-4), np.float32)
        state, m = step(state, tm.grpo_step_inputs(cfg, batch, tokens, cmask, adv, g))
        assert np.isfinite(float(m["loss"]))
    after = p_even(state.params)
    assert 0.3 < before < 0.7, before
    assert after > before + 0.25, (before, after)


def test_packed_completion_logps_equal_unpacked():
    """Packing the counted completion tokens into K slots changes nothing but the work: the
    same log-probs, loss and gradients as scoring every position. Two micro-batches, each packed
    into its own slots (one micro-batch is the same code with a scan of length 1)."""
    num_micro = 2
    import optax

    from tatar_jax.train import optim

    model = tts._model(seed=3)
    cfg = model.config
    _, _, _, cmask, inputs = tts._grpo_inputs(cfg, seed=4, g=4)
    slots = step_inputs.pack_size(cmask, num_micro, num_buckets=12)
    assert slots > 0 and slots < cmask.size // num_micro
    assert slots >= cmask.reshape(num_micro, -1).sum(1).max()
    packed = inputs.replace(pack_size=slots)
    graphdef, params = nnx.split(model)
    fn = jax.jit(grpo_step.make_logps_fn(graphdef, chunk_size=7, num_micro=num_micro))
    a, b = np.asarray(fn(params, inputs)), np.asarray(fn(params, packed))
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert (b[cmask == 0] == 0).all()

    tx = optax.sgd(1.0)
    step = jax.jit(
        grpo_step.make_grpo_step(
            graphdef, tx, loss=grpo.LossConfig(beta=0.0), num_micro=num_micro
        )
    )
    s0 = optim.TrainState.create(params, tx, jax.random.key(0))
    s1 = optim.TrainState.create(params, tx, jax.random.key(0))
    s0, m0 = step(jax.tree.map(jnp.copy, s0), inputs)
    s1, m1 = step(jax.tree.map(jnp.copy, s1), packed)
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), atol=1e-6)
    d = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), s0.params, s1.params)
    assert max(jax.tree.leaves(d)) < 1e-5
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), s0.params, params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the update did something


def test_pack_size_buckets():
    m = np.zeros((8, 10), np.float32)
    m[:, :3] = 1  # 24 of 80 tokens
    assert step_inputs.pack_size(m, 1, 4) == 40  # buckets of 20: 24 -> 40
    assert step_inputs.pack_size(m, 2, 4) == 20  # 12 per micro-batch of 40 -> 20
    assert step_inputs.pack_size(m, 1, 0) == 0
    m[:, :] = 1
    assert step_inputs.pack_size(m, 1, 4) == 0  # nothing to save


def test_trainer_rollout_on_its_own_layout_equals_one_device_generate():
    """The trainer's engine (rollout block "auto": the policy's FSDP-sharded weights turned into a
    replicated copy over the 8 devices, batch split over them) gives the one-device sampler's
    samples and log-probs on the same weights and key."""
    import types

    from configs import grpo as grpo_config
    from tatar_jax import sharding

    g, t = 2, 6
    model, batch, pv_real, sampler = _setup(2, g, t, 1.0, stop_token_ids=(7, 11))
    gcfg = grpo_config.grpo_block()
    gcfg.update(dict(num_generations=g, max_new_tokens=t, top_k=0))
    tok = types.SimpleNamespace(eos_ids=(7, 11), pad_id=0)
    mesh = sharding.make_mesh({"fsdp": 8})
    engine = rollout.RolloutEngine(
        model, tok, gcfg, mesh=mesh, rules=sharding.DEFAULT_RULES,
        rollout_cfg=grpo_config.rollout_block(),
    )  # fmt: skip
    assert dict(engine.sampler.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    state = nnx.state(model)
    fsdp = jax.device_put(state, sharding.state_shardings(state, mesh))
    key = jax.random.key(9)
    # The prompts' layout is computed once; both engines consume it as it is.
    prompts = sampler.prepare(
        batch.input_ids, batch.attention_mask, pv_real, batch.image_grid_thw
    )
    out = engine.generate(fsdp, prompts, key)
    ref = sampler.generate_prompts(prompts, rng=key)
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens))
    np.testing.assert_array_equal(out.mask, np.asarray(ref.mask))
    np.testing.assert_allclose(out.logps, np.asarray(ref.logps), atol=1e-5, rtol=0)


def test_rollout_layout_default():
    """Replicated when the weights fit in a quarter of a device, else the smallest tensor axis."""
    gib = 2**30
    assert rollout.rollout_layout(16 * gib, 8, 80 * gib, 4) == (
        {"data": 8, "tensor": 1},
        "replicated",
    )
    assert rollout.rollout_layout(67 * gib, 16, 80 * gib, 8) == ({"data": 4, "tensor": 4}, "tensor")
    assert rollout.rollout_layout(16 * gib, 8, None, 4) == ({"data": 8, "tensor": 1}, "replicated")
    # the tensor axis never exceeds the kv heads or the devices
    assert rollout.rollout_layout(500 * gib, 8, 16 * gib, 2)[0] == {"data": 4, "tensor": 2}
