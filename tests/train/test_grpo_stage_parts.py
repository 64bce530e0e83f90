"""GRPO stage parts: reference parameters in the compute dtype, pixel values sent in the
compute dtype (same vision output), rewards compiled before the first step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from configs import grpo as grpo_config
from tatar_jax import grpo, rewards
from tatar_jax.data.batch import vision_inputs
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import stages


def test_reference_params_dtype():
    params = {"w": jnp.ones((2, 2), jnp.float32), "i": jnp.arange(3, dtype=jnp.int32)}
    bf = stages.reference_params(params, "compute", "bfloat16")
    assert bf["w"].dtype == jnp.bfloat16 and bf["i"].dtype == jnp.int32
    f32 = stages.reference_params(bf, "float32", "bfloat16")
    assert f32["w"].dtype == jnp.float32
    same = stages.reference_params(params, "compute", "float32")
    assert same["w"] is params["w"]  # nothing copied when the dtype already matches
    with pytest.raises(ValueError, match="config.grpo.ref_param_dtype"):
        stages.reference_params(params, "bf16", "bfloat16")
    assert grpo_config.get_config().grpo.ref_param_dtype == "compute"


def test_pixels_in_compute_dtype_give_the_same_features():
    cfg = qvl.tiny()
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    b = tm.make_batch([[2, (1, 4, 8), 3]], seed=1)
    vision = vision_inputs(b["pixel_values"], b["image_grid_thw"], cfg.vision)
    f32 = step_inputs.image_features(model, jax.tree.map(jnp.asarray, vision))
    cast = vision.cast(jnp.bfloat16)
    pv = cast.pixel_values
    assert pv.dtype == jnp.bfloat16 and isinstance(pv, np.ndarray)  # cast on the host
    assert vision.pixel_values.dtype == np.float32  # a new value: the input is not changed
    bf = step_inputs.image_features(model, jax.tree.map(jnp.asarray, cast))
    assert float(jnp.max(jnp.abs(f32.astype(jnp.float32)))) > 0
    np.testing.assert_array_equal(np.asarray(bf, np.float32), np.asarray(f32, np.float32))


def _features(rng, n, g):
    return dict(
        pred=rng.uniform(0, 100, n).astype(np.float32),
        gt=rng.uniform(0, 100, n).astype(np.float32),
        parsed=rng.random(n) > 0.2,
        num_words=rng.integers(1, 50, n).astype(np.int32),
        is_iaa=np.repeat(rng.random(n // g) > 0.5, g),
        group_ids=np.repeat(np.arange(n // g, dtype=np.int32), g),
    )


def test_reward_set_compiles_once_and_equals_total_reward():
    """The built-in rewards are one program jitted once: a step after the first compiles
    nothing; the jitted total equals the eager :func:`rewards.total_reward`."""
    cfg = grpo_config.get_config("tiny")
    g = int(cfg.grpo.num_generations)
    n = int(cfg.grpo.prompts_per_step) * g
    reward_set = rewards.RewardSet(cfg.rewards)

    def step(f):
        total, parts = reward_set(f, num_groups=n // g)
        grpo.group_advantages(
            np.asarray(total, np.float32), g, cfg.grpo.advantage, cfg.grpo.advantage_eps,
            ddof=int(cfg.grpo.advantage_std_ddof),
        )  # fmt: skip
        return total, parts

    step(_features(np.random.default_rng(4), n, g))  # the first step compiles
    compiles = []

    def listen(event, duration, **kw):
        if "compile" in event:
            compiles.append(event)

    f = _features(np.random.default_rng(5), n, g)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        total, parts = step(f)
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
    eager, eager_parts = rewards.total_reward(**f, config=cfg.rewards, num_groups=n // g)
    np.testing.assert_allclose(total, np.asarray(eager), rtol=1e-6, atol=1e-6)
    assert parts.keys() == eager_parts.keys() and np.abs(total).max() > 0


def test_step_batches_are_frozen_and_replaced_not_mutated():
    """A step batch is a frozen pytree: the stage adds the reference log-probs as a new value,
    the pack size is a static field (part of the jit key), not an array."""
    import dataclasses

    cfg = qvl.tiny()
    b = tm.prompt_batch(cfg)
    n, t = 2 * b.num_rows, 3
    tokens = np.full((n, t), tm.TEXT_ID_RANGE[0], np.int32)
    batch = tm.grpo_step_inputs(cfg, b, tokens, np.ones((n, t), bool), np.zeros(n, np.float32), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.rows.ref_logps = np.zeros((n, t), np.float32)
    new = batch.replace(rows=batch.rows.replace(ref_logps=np.zeros((n, t), np.float32)))
    assert batch.rows.ref_logps is None and new.rows.ref_logps.shape == (n, t)
    packed = batch.replace(pack_size=4)
    assert jax.tree.structure(packed) != jax.tree.structure(batch)  # static: a new program
    assert len(jax.tree.leaves(packed)) == len(jax.tree.leaves(batch))
