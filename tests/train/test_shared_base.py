"""One frozen LoRA base in memory (tatar_jax.train.frozen, lora.adapters_off): the reference
model, the update and the rollout read the same base buffers, and compute what separate copies
computed (a separate base model, a merged model, today's full-copy update)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import generate, grpo
from tatar_jax.models import lora
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import frozen, grpo_step, optim, stages

RANK, ALPHA = 4, 8.0


def _base(dtype=jnp.float32):
    return qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), init_std=0.08, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)
    )


def _adapted(dtype=jnp.float32, std=0.2):
    """The tiny base with rank-4 adapters whose A and B are both non-zero."""
    model = lora.apply_lora(_base(dtype), lora.LoraSpec(rank=RANK, alpha=ALPHA), seed=1)
    state = lora.adapter_state(model)
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(5), len(flat))
    for k, (_, v) in zip(keys, flat, strict=True):
        if isinstance(v, nnx.LoRAParam):
            v.set_value(std * jax.random.normal(k, v.shape, jnp.float32))
    nnx.update(model, state)
    return model


def _inputs(cfg, g=4, t=6, seed=0):
    batch = tm.prompt_batch(cfg)
    rng = np.random.default_rng(seed)
    n = 2 * g
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, t)).astype(np.int32)
    adv = rng.normal(size=n).astype(np.float32)
    out = tm.grpo_step_inputs(cfg, batch, tokens, np.ones((n, t), bool), adv, g)
    return jax.tree.map(jnp.asarray, out)


def _base_leaves(params):
    """'/'-joined path -> leaf of the base (non-adapter) parameters."""
    return {
        optim.path_str(p): x
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if "_lora_" not in optim.path_str(p) and "lora_scale" not in optim.path_str(p)
    }


def _buffers(leaves):
    return {x.unsafe_buffer_pointer() for x in leaves}


def test_reference_is_the_base_with_adapters_off_on_the_same_buffers():
    model = _adapted()
    graphdef, params = nnx.split(model)
    inputs = _inputs(model.config)
    ref = lora.adapters_off(params)
    # no copy of the base: every base leaf of the reference is the policy's own array
    pb, rb = _base_leaves(params), _base_leaves(ref)
    assert pb.keys() == rb.keys() and len(pb) > 10
    assert all(rb[k] is pb[k] for k in pb)
    plain_graphdef, plain = nnx.split(_base())  # a separate model: the same base, no adapters
    fn = jax.jit(grpo_step.make_logps_fn(graphdef))
    got = np.asarray(fn(ref, inputs))
    want = np.asarray(jax.jit(grpo_step.make_logps_fn(plain_graphdef))(plain, inputs))
    adapted = np.asarray(fn(params, inputs))
    assert np.abs(got - want).max() <= 1e-6
    assert np.abs(adapted - want).max() > 1e-3  # the adapters do change the policy


def _old_and_new(beta, steps=2):
    """Two GRPO updates, each with the reference log-probs, by today's path (a full copy of the
    state donated, a separate reference copy of the initial policy) and by the shared base;
    fresh adapters (B = 0) as a run starts them."""
    model = lora.apply_lora(_base(), lora.LoraSpec(rank=RANK, alpha=ALPHA), seed=1)
    graphdef, params = nnx.split(model)
    trainable = optim.trainable_mask(params, train_only=(lora.ADAPTER_PATTERN,))
    tx = optim.make_optimizer(1e-2, trainable=trainable)
    loss = grpo.LossConfig(beta=beta)
    step = grpo_step.make_grpo_step(graphdef, tx, trainable=trainable, loss=loss)
    logps = jax.jit(grpo_step.make_logps_fn(graphdef))
    inputs = _inputs(model.config)

    def run(state, step_fn, ref_of):
        out = []
        for _ in range(steps):
            rows = inputs.rows.replace(ref_logps=logps(ref_of(state), inputs))
            state, m = step_fn(state, inputs.replace(rows=rows))
            out.append({k: float(v) for k, v in m.items()})
        return state, out

    old_ref = jax.tree.map(jnp.copy, stages.reference_params(params, "compute", "float32"))
    old_state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    old = run(old_state, jax.jit(step, donate_argnums=(0,)), lambda s: old_ref)
    new_state = frozen.init_state(params, tx, jax.random.key(0), trainable)
    new_step = frozen.step_without_frozen(step, trainable)
    new = run(new_state, new_step, lambda s: lora.adapters_off(s.params))
    return params, old, new


def test_shared_base_update_equals_todays_path():
    params, (old_state, old_m), (new_state, new_m) = _old_and_new(beta=0.04)
    assert len(old_m) == 2 and old_m[0]["loss"] != 0.0 and old_m[1]["kl"] > 0
    for a, b in zip(old_m, new_m, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    lo = jax.tree_util.tree_leaves_with_path(old_state)
    ln = jax.tree_util.tree_leaves_with_path(new_state)
    for (p, x), (_, y) in zip(lo, ln, strict=True):
        np.testing.assert_allclose(
            np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7, err_msg=str(p)
        )
    # the base after two updates: still the model's own buffers (never copied, never donated)
    pb, nb = _base_leaves(params), _base_leaves(new_state.params)
    assert all(nb[k] is pb[k] and not nb[k].is_deleted() for k in pb)


def test_one_base_copy_among_the_live_arrays():
    """Policy state, reference view and rollout weights (bf16 model: the rollout's dtype) hold
    one base: the distinct live buffers of the base leaves' shapes are one set."""
    model = _adapted(jnp.bfloat16)
    graphdef, params = nnx.split(model)
    trainable = optim.trainable_mask(params, train_only=(lora.ADAPTER_PATTERN,))
    tx = optim.make_optimizer(1e-2, trainable=trainable)
    state = frozen.init_state(params, tx, jax.random.key(0), trainable)
    ref = lora.adapters_off(state.params)
    sampler = generate.Sampler(model, generate.SamplingParams(max_new_tokens=2))
    rollout_weights = sampler.place_state(state.params)
    base = _base_leaves(params)
    for tree in (state.params, ref, rollout_weights):
        assert _buffers(_base_leaves(tree).values()) == _buffers(base.values())
    big = {(x.shape, x.dtype) for x in base.values() if x.size >= 64 * 64}
    live = [x for x in jax.live_arrays() if (x.shape, x.dtype) in big]
    n_base = sum(1 for x in base.values() if (x.shape, x.dtype) in big)
    assert len(_buffers(live)) == n_base  # one buffer per base weight; nothing else that big


@pytest.mark.parametrize("temperature", [1.0])
def test_rollout_with_adapters_equals_the_merged_model(temperature):
    """The rollout's LoRA-aware forward on the shared base samples what the merged model
    samples (same key): same tokens, log-probs to float32 rounding."""
    model = _adapted()
    merged = lora.merge(model)
    batch = tm.prompt_batch(model.config)
    params = generate.SamplingParams(
        max_new_tokens=8, num_samples=3, temperature=temperature, pad_token_id=0,
        logprobs="tempered",
    )  # fmt: skip
    width = np.shape(batch.input_ids)[1]
    outs = []
    for m in (model, merged):
        sampler = generate.Sampler(m, params, prompt_buckets=(width,))
        prompts = sampler.prepare(
            batch.input_ids, batch.attention_mask, batch.vision.pixel_values, batch.image_grid_thw
        )
        outs.append(sampler.generate_prompts(prompts, rng=jax.random.key(3), state=nnx.state(m)))
    (lt, lm, llp), (mt, mm, mlp) = (map(np.asarray, o) for o in outs)
    np.testing.assert_array_equal(lt, mt)
    np.testing.assert_array_equal(lm, mm)
    np.testing.assert_allclose(llp, mlp, atol=1e-5, rtol=1e-5)  # (W + sAB)x vs Wx + s(xA)B
    assert len(set(map(tuple, lt))) > 1  # the samples differ between rows (a real sample)
