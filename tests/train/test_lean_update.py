"""The lean GRPO update: the vision tower once per step equals the per-micro-batch path.

Reference: the update as it was before (every micro-batch runs the model's own forward, vision
tower included, and is differentiated end to end; gradients summed over micro-batches by
``optim.accumulate_gradients``), on the tiny random model with 2 and 4 row micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import grpo
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import grpo_step, optim
from tatar_jax.train import inputs as step_inputs

G, T = 4, 5
BETA, EPS = 0.04, 0.2


def _setup(seed=0):
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(0)
    )
    cfg = model.config
    batch = tm.prompt_batch(cfg)
    rng = np.random.default_rng(seed)
    n = 2 * G
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, T)).astype(np.int32)
    cmask = np.arange(T)[None, :] < rng.integers(1, T + 1, size=n)[:, None]
    adv = rng.normal(size=n).astype(np.float32)
    inputs = tm.grpo_step_inputs(cfg, batch, np.where(cmask, tokens, 0), cmask, adv, G)
    inputs = inputs.replace(
        rows=inputs.rows.replace(
            ref_logps=rng.normal(-5.0, 0.5, size=(n, T)).astype(np.float32),
            old_logps=rng.normal(-5.0, 0.3, size=(n, T)).astype(np.float32),
        )
    )
    graphdef, params = nnx.split(model)
    return graphdef, params, jax.tree.map(jnp.asarray, inputs)


def _per_micro_batch_grads(graphdef, params, inputs, num_micro, aggregation):
    """The update before the vision tower was hoisted: every micro-batch runs it."""
    rows, vision = inputs.rows, inputs.vision
    tokens_step = jnp.maximum(jnp.sum(rows.completion_mask), 1.0)

    def loss_fn(p, mb):
        logps = grpo_step.completion_logps(nnx.merge(graphdef, p), mb, vision, chunk_size=7)
        loss, m = grpo.grpo_loss(
            logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask,
            epsilon=EPS, beta=BETA, aggregation=aggregation,
        )  # fmt: skip
        tokens_mb = jnp.sum(mb.completion_mask)
        if aggregation == "token_mean":
            return loss * jnp.maximum(tokens_mb, 1.0) / tokens_step, {"kl": m["kl"]}
        return loss / num_micro, {"kl": m["kl"]}

    return optim.accumulate_gradients(loss_fn, params, rows, num_micro)


def _worst_rel(a_tree, b_tree):
    pairs = zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True)
    return max(
        float(jnp.max(jnp.abs(a - b))) / max(float(jnp.max(jnp.abs(b))), 1e-6) for a, b in pairs
    )


@pytest.mark.parametrize(
    ("num_micro", "aggregation"), [(2, "seq_mean_token_mean"), (4, "token_mean")]
)
def test_vision_once_equals_per_micro_batch_vision(num_micro, aggregation):
    graphdef, params, inputs = _setup()
    new = jax.jit(
        lambda p, x: grpo_step.grpo_grads(
            graphdef, p, x, grpo.LossConfig(beta=BETA, epsilon=EPS, aggregation=aggregation),
            num_micro=num_micro, chunk_size=7,
        )
    )  # fmt: skip
    old = jax.jit(lambda p, x: _per_micro_batch_grads(graphdef, p, x, num_micro, aggregation))
    loss, grads, _ = new(params, inputs)
    ref_loss, ref_grads, _ = old(params, inputs)
    assert abs(float(loss) - float(ref_loss)) < 1e-6 * max(1.0, abs(float(ref_loss)))
    assert _worst_rel(grads, ref_grads) < 1e-5
    vis = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads["visual"]))
    assert vis > 1e-4  # the accumulated feature gradient reached the tower
    if num_micro > 2:
        return
    # A frozen tower (make_grpo_step's default from the trainable mask): no backward through
    # it, the rest unchanged.
    mask = optim.trainable_mask(params, freeze_vision=True)
    assert not step_inputs.vision_trains(mask) and step_inputs.vision_trains(None)
    frozen, f_grads, _ = jax.jit(
        lambda p, x: grpo_step.grpo_grads(
            graphdef, p, x, grpo.LossConfig(beta=BETA, epsilon=EPS, aggregation=aggregation),
            num_micro=num_micro, train_vision=False, chunk_size=7,
        )
    )(params, inputs)  # fmt: skip
    assert float(frozen) == pytest.approx(float(ref_loss), rel=1e-6)
    assert _worst_rel(f_grads["language_model"], ref_grads["language_model"]) < 1e-5
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(f_grads["visual"]))


def test_reference_logps_vision_once_equal_full_forward():
    graphdef, params, inputs = _setup()
    lean = jax.jit(grpo_step.make_logps_fn(graphdef, chunk_size=7, num_micro=4))(params, inputs)
    model = nnx.merge(graphdef, params)
    full = grpo_step.completion_logps(model, inputs.rows, inputs.vision, chunk_size=7)
    np.testing.assert_allclose(np.asarray(lean), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(full).max()) > 0
