"""Host offload (tatar_jax.train.offload): exact round trips through pinned_host memory, and a
tiny GRPO run with the optimizer state and the reference offloaded equals the run without, also
when it is resumed from a checkpoint."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs

from tatar_jax.train import offload, optim, trainer


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


def _config(mode):
    cfg = tiny_runs.tiny_config()
    cfg.grpo.beta = 0.04  # the reference pass runs (its copy is offloaded too)
    cfg.checkpoint.every_steps = 1
    cfg.checkpoint.keep = 5
    cfg.offload.mode = mode
    cfg.offload.parts = ("opt_state", "reference")
    return cfg


def _final_state(wd, step=2):
    with ocp.PyTreeCheckpointer() as c:
        tree = c.restore(wd / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(tree)}  # fmt: skip


@pytest.mark.slow
def test_grpo_with_offload_equals_without_and_resumes_bit_identically(tmp_path):
    trainer.run(_config("never"), tmp_path / "never")
    trainer.run(_config("always"), tmp_path / "always")
    # a run killed after its step-1 checkpoint (step 2 never written), restarted with offload
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "always", resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    trainer.run(_config("always"), resumed)
    want = _final_state(tmp_path / "never")
    assert any("opt_state" in k for k in want) and len(want) > 20
    for name in ("always", "resumed"):
        got = _final_state(tmp_path / name)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    losses = [r["loss"] for r in tiny_runs.records(tmp_path / "never")]
    assert losses == [r["loss"] for r in tiny_runs.records(tmp_path / "always")]
    assert any(r.get("kl", 0.0) != 0.0 for r in tiny_runs.records(tmp_path / "never"))
