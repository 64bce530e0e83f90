"""Host offload (tatar_jax.train.offload): exact round trips through pinned_host memory, and the
config's errors (the end-to-end run: tests/e2e/test_offload_resume.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_bad_offload_config_names_the_field():
    with pytest.raises(ValueError, match="offload.mode"):
        offload.Offload("sometimes")
    with pytest.raises(ValueError, match="offload.parts"):
        offload.Offload("rollout", ("moments",))
