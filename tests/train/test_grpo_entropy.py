"""The GRPO step's token-entropy metrics (``entropy/all``, ``entropy/<task>``) against the full
(tokens x vocab) softmax of the same forward, with micro-batches and with lm_head packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import grpo
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import grpo_step, optim
from tatar_jax.train import inputs as step_inputs

G, T, TEMP = 2, 6, 0.7


def _inputs(cfg):
    batch = tm.prompt_batch(cfg, patch_bucket=64)
    rng = np.random.default_rng(0)
    n = 2 * G
    tokens = rng.integers(*tm.TEXT_ID_RANGE, size=(n, T)).astype(np.int32)
    cmask = np.arange(T)[None, :] < np.array([T, 2, 4, 1])[:, None]
    tokens = np.where(cmask, tokens, 0)
    adv = rng.normal(size=n).astype(np.float32)
    # prompt 0 IQA, 1 IAA
    return tm.grpo_step_inputs(cfg, batch, tokens, cmask, adv, G, task_id=[0, 1])


def _reference(model, inputs):
    """Per-task mean entropy of softmax(logits / TEMP) over the completion tokens."""
    rows = jax.tree.map(jnp.asarray, inputs.rows)
    h = step_inputs.hidden_states(model, rows, inputs.vision)
    length = h.shape[1]
    logits = model.logits_from_hidden(h[:, length - T - 1 : length - 1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / TEMP, axis=-1)
    ent = np.asarray(-jnp.sum(jnp.exp(logp) * logp, axis=-1))  # (N, T)
    m = inputs.rows.completion_mask
    task = inputs.rows.task_id
    out = {"entropy/all": (ent * m).sum() / m.sum()}
    for name, tid in (("iqa", 0), ("iaa", 1)):
        on = m * (task == tid)[:, None]
        out[f"entropy/{name}"] = (ent * on).sum() / on.sum()
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_entropy_metrics_match_full_softmax(packed):
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model)
    inputs = _inputs(model.config)
    want = _reference(model, inputs)
    if packed:
        inputs = inputs.replace(pack_size=step_inputs.pack_size(inputs.rows.completion_mask, 2, 4))
        assert inputs.pack_size > 0
    tx = optax.sgd(0.0)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    step = jax.jit(
        grpo_step.make_grpo_step(
            graphdef, tx, loss=grpo.LossConfig(beta=0.0, temperature=TEMP), num_micro=2,
            chunk_size=5,
        )
    )
    _, m = step(state, jax.tree.map(jnp.asarray, inputs))
    for k, v in want.items():
        assert float(m[k]) == pytest.approx(float(v), rel=1e-5), k
    assert float(want["entropy/iqa"]) != pytest.approx(float(want["entropy/iaa"]), rel=1e-3)
    assert not any(k.startswith("entropy_sum") for k in m)
