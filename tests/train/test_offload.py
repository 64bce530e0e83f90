"""Host offload (tatar_jax.train.offload): exact round trips through pinned_host memory, and the
config's errors (the end-to-end run: tests/e2e/test_offload_resume.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tatar_jax.train import offload, optim


def _state():
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    tx = optim.make_optimizer(1e-2)
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, x.dtype), params)
    return optim.apply_gradients(state, grads, tx)[0]  # non-zero moments


def _kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)}


def test_round_trip_through_host_memory_is_exact():
    assert offload.supported()  # jax's CPU backend has a pinned_host memory
    state = _state()
    off = offload.Offload("rollout", ("opt_state",))
    parked = off.park(state)
    assert _kinds(parked.opt_state) == {"pinned_host"}
    assert _kinds(parked.params) == {"device"}  # only the configured part moves
    back = off.fetch(parked, "update_start")
    assert _kinds(back.opt_state) == {"device"}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # "always": the reference / pi_old passes run without the optimizer state
    always = offload.Offload("always", ("opt_state", "reference"))
    assert _kinds(always.fetch(always.park(state), "update_start").opt_state) == {"pinned_host"}
    assert _kinds(always.fetch(always.park(state), "step").opt_state) == {"device"}
    ref = always.park_reference(state.params)
    assert _kinds(ref) == {"pinned_host"} and _kinds(always.fetch_reference(ref)) == {"device"}
    never = offload.Offload()
    assert never.park(state) is state


def test_master_weights_round_trip_and_come_back_for_the_passes_that_read_them():
    state = _state()
    off = offload.Offload("always", ("opt_state", "params"))
    parked = off.park(state)
    assert _kinds(parked.params) == {"pinned_host"} and _kinds(parked.opt_state) == {"pinned_host"}
    start = off.fetch(parked, "update_start")  # the reference pass runs without either
    assert _kinds(start.params) == {"pinned_host"} and _kinds(start.opt_state) == {"pinned_host"}
    policy = off.fetch(start, "policy")  # a pi_old pass reads the parameters only
    assert _kinds(policy.params) == {"device"} and _kinds(policy.opt_state) == {"pinned_host"}
    back = off.fetch(policy, "step")
    assert _kinds(back.params) == {"device"} and _kinds(back.opt_state) == {"device"}
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rollout = offload.Offload("rollout", ("params",))
    assert _kinds(rollout.fetch(rollout.park(state), "update_start").params) == {"device"}
    with pytest.raises(ValueError, match="unknown program"):
        off.fetch(parked, "rollout")
    # frozen leaves (the model's own buffers) stay where they are: only trainable ones move
    some = offload.Offload("rollout", ("params",), trainable={"w": True, "b": False})
    kept = some.park(state)
    assert _kinds(kept.params["w"]) == {"pinned_host"} and kept.params["b"] is state.params["b"]


def test_rollout_copy_of_offloaded_master_weights_equals_the_device_ones():
    """The sampler's compute-dtype copy made from host-resident float32 weights: on the device,
    equal to the copy made from the device weights."""
    from tatar_jax import generate
    from tatar_jax.models import qwen2_5_vl as qvl

    model = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    params = nnx.state(model)
    sampler = generate.Sampler(model, generate.SamplingParams(max_new_tokens=2))
    want = sampler.place_state(params)
    got = sampler.place_state(offload.move(params, offload.HOST))
    assert _kinds(got) == {"device"}
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert x.dtype == y.dtype == jnp.bfloat16 or not jnp.issubdtype(x.dtype, jnp.floating)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_offload_config_names_the_field():
    with pytest.raises(ValueError, match="offload.mode"):
        offload.Offload("sometimes")
    with pytest.raises(ValueError, match="offload.parts"):
        offload.Offload("rollout", ("moments",))
    assert "params" in offload.PARTS
    from configs import grpo as grpo_configs
    from tatar_jax.train import validate

    cfg = grpo_configs.get_config("lora_1gpu")
    cfg.offload.mode, cfg.offload.parts = "rollout", ("params", "moments")
    cfg.optimizer.mu_dtype = "fp8"
    assert sorted(validate.problems(cfg)) == [
        "--config.offload.parts: 'params' is for full-parameter runs (model.lora.rank=16)",
        "--config.offload.parts: ['moments'] not among opt_state, reference, params",
        "--config.optimizer.mu_dtype: 'fp8' is not one of params, float32, bfloat16",
    ]
