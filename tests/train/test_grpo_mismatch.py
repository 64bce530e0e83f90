"""The GRPO step's rollout/trainer mismatch metrics and its rollout correction options, on the
tiny model: metrics per task against numpy on the step's own log-probs (micro-batches: a max is
not a sum), the defaults' update equal to the update without the sampler's log-probs, pi_old
from the rollout, TIS changing the update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models as tm
from flax import nnx

from configs import grpo as grpo_config
from tatar_jax import grpo
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import grpo_step, optim

G, T = 2, 6


@pytest.fixture(scope="module")
def setup():
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model)
    batch = tm.prompt_batch(model.config, patch_bucket=64)
    rng = np.random.default_rng(0)
    n = 2 * G
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, T)).astype(np.int32)
    cmask = np.arange(T)[None, :] < np.array([T, 2, 4, 3])[:, None]
    tokens = np.where(cmask, tokens, 0)
    adv = np.array([1.0, -0.5, 0.7, -1.2], np.float32)
    inputs = tm.grpo_step_inputs(model.config, batch, tokens, cmask, adv, G, task_id=[0, 1])
    logps = np.asarray(jax.jit(grpo_step.make_logps_fn(graphdef, chunk_size=5))(
        params, jax.tree.map(jnp.asarray, inputs)
    ))  # fmt: skip
    # the sampler's log-probs: the trainer's, off by up to ~0.5 nats per counted token
    rollout = np.where(cmask, logps + rng.normal(0, 0.3, logps.shape), 0.0).astype(np.float32)
    return graphdef, params, inputs, logps, rollout


def _step(graphdef, params, inputs, num_micro=2, **kw):
    tx = optax.sgd(0.1)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    loss = grpo.LossConfig(beta=0.0, **kw.pop("loss", {}))
    step = jax.jit(grpo_step.make_grpo_step(
        graphdef, tx, loss=loss, num_micro=num_micro, chunk_size=5, **kw
    ))  # fmt: skip
    new, m = step(state, jax.tree.map(jnp.asarray, inputs))
    return new.params, {k: np.asarray(v) for k, v in m.items()}


def test_mismatch_metrics_per_task(setup):
    graphdef, params, inputs, logps, rollout = setup
    _, m = _step(graphdef, params, inputs.replace(rows=inputs.rows.replace(rollout_logps=rollout)))
    mask = inputs.rows.completion_mask
    d = (logps - rollout) * mask
    k3 = (np.exp(d) - d - 1) * mask
    for task, rows in (("all", [0, 1, 2, 3]), ("iqa", [0, 1]), ("iaa", [2, 3])):
        tok = mask[rows].sum()
        assert m[f"mismatch/k3/{task}"] == pytest.approx(k3[rows].sum() / tok, rel=1e-4)
        assert m[f"mismatch/abs_logp_diff/{task}"] == pytest.approx(
            np.abs(d[rows]).sum() / tok, rel=1e-4
        )
        # the max sits in another micro-batch than the first for one of the tasks
        assert m[f"mismatch/max_abs_logp_diff/{task}"] == pytest.approx(
            np.abs(d[rows]).max(), rel=1e-4
        )
    assert m["mismatch/k3/iqa"] != pytest.approx(m["mismatch/k3/iaa"], rel=1e-2)
    assert not any(k.startswith("mismatch_rows") for k in m)


def test_defaults_update_equals_the_update_without_rollout_logps(setup):
    """configs/grpo.py's defaults (correction off, pi_old recomputed): the sampler's log-probs
    only add metrics; parameters and loss are bit-identical to a step without them."""
    graphdef, params, inputs, _, rollout = setup
    g = grpo_config.get_config("tiny").grpo
    assert g.rollout_correction.mode == "off" and not g.old_logps_from_rollout
    assert not g.dynamic_sampling.enabled
    cfg_loss = grpo.LossConfig.from_config(g)
    assert cfg_loss.rollout_correction == "off"
    kw = dict(loss={"rollout_correction": cfg_loss.rollout_correction})
    p0, m0 = _step(graphdef, params, inputs, **kw)
    with_r = inputs.replace(rows=inputs.rows.replace(rollout_logps=rollout))
    p1, m1 = _step(graphdef, params, with_r, **kw)
    assert m0["loss"] == m1["loss"]
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "mismatch/k3/all" in m1 and "mismatch/k3/all" not in m0


def test_old_from_rollout_and_tis_change_the_update(setup):
    """pi_old = the sampler's log-probs: the ratio is pi_theta / pi_rollout (clipped where it
    leaves [0.8, 1.2]); token TIS weights the surrogate: both change the loss."""
    graphdef, params, inputs, logps, rollout = setup
    rows = inputs.rows.replace(rollout_logps=rollout)
    x = inputs.replace(rows=rows)
    _, base = _step(graphdef, params, x)
    _, from_r = _step(graphdef, params, x, old_from_rollout=True)
    mask = inputs.rows.completion_mask
    ratio = np.exp((logps - rollout) * mask)
    assert from_r["ratio_mean"] == pytest.approx((ratio * mask).sum() / mask.sum(), rel=1e-4)
    assert base["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert from_r["clip_frac"] > 0
    _, tis = _step(graphdef, params, x, loss={"rollout_correction": "token_truncate",
                                               "rollout_clip_max": 1.2})  # fmt: skip
    w = np.minimum(np.exp((logps - rollout) * mask), 1.2)
    assert tis["is_weight_mean"] == pytest.approx((w * mask).sum() / mask.sum(), rel=1e-4)
    assert abs(tis["loss"] - base["loss"]) > 1e-4
    with pytest.raises(ValueError, match="needs rows.rollout_logps"):
        _step(graphdef, params, inputs, old_from_rollout=True)
