"""Optimizer pieces vs their references: HF schedules (transformers), torch AdamW + clip_grad_norm_,
exact skipping of non-finite updates, frozen subtrees, accumulation == one big batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from tatar_jax.train import optim


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "visual": {"blocks": {"w": jax.random.normal(k[0], (3, 4))}, "merger": jnp.ones((4,))},
        "language": {"w": jax.random.normal(k[1], (4, 5)), "b": jax.random.normal(k[2], (5,))},
    }


def _hf_lrs(kind, lr, warmup, total):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    fn = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    sch = fn(opt, warmup, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])  # lr used by this update
        opt.step()
        sch.step()
    return np.array(out)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_matches_transformers(kind, warmup):
    lr, total = 2e-5, 12
    ours = np.array(
        [
            optim.make_schedule(lr, total, schedule=kind, warmup_steps=warmup)(i)
            for i in range(total)
        ]
    )
    np.testing.assert_allclose(ours, _hf_lrs(kind, lr, warmup, total), rtol=1e-5, atol=1e-12)


def test_schedule_errors():
    with pytest.raises(ValueError, match="total_steps"):
        optim.make_schedule(1e-3, 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.make_schedule(1e-3, 10, schedule="step")


def test_adamw_clip_matches_torch():
    """optax chain == torch.optim.AdamW after clip_grad_norm_ (HF Trainer order), 4 steps."""
    lr, total = 1e-2, 4
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
    tx = optim.make_optimizer(optim.make_schedule(lr, total), weight_decay=0.01, max_grad_norm=0.5)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    tw = torch.nn.Parameter(torch.tensor(np.asarray(params["w"])))
    topt = torch.optim.AdamW([tw], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tsch = get_linear_schedule_with_warmup(topt, 0, total)
    rng = np.random.default_rng(1)
    for _ in range(total):
        g = rng.normal(size=(3, 4)).astype(np.float32) * 3
        state, info = optim.apply_gradients(state, {"w": jnp.asarray(g)}, tx)
        tw.grad = torch.tensor(g)
        tnorm = torch.nn.utils.clip_grad_norm_([tw], 0.5)
        topt.step()
        tsch.step()
        np.testing.assert_allclose(info["grad_norm"], tnorm.item(), rtol=1e-6)
    np.testing.assert_allclose(state.params["w"], tw.detach().numpy(), atol=1e-6, rtol=0)


def test_nonfinite_update_is_skipped_bit_identically():
    params = _params()
    tx = optim.make_optimizer(1e-2)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda s, g, loss: optim.apply_gradients(s, g, tx, loss=loss))
    state, _ = step(state, grads, jnp.float32(1.0))
    before = state
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan) if g.ndim else g, grads)
    for i in range(2):
        state, info = step(state, bad, jnp.float32(1.0))
        assert int(info["update_skipped"]) == 1 and int(state.nonfinite_count) == i + 1
    state, info = step(state, grads, jnp.float32(jnp.inf))  # finite grads, infinite loss
    assert int(info["update_skipped"]) == 1 and int(state.nonfinite_count) == 3
    assert optim.should_stop(state, 3) and not optim.should_stop(state, 4)
    for a, b in zip(
        jax.tree.leaves((state.params, state.opt_state)),
        jax.tree.leaves((before.params, before.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # bit-identical, schedule count included
    assert int(state.step) == int(before.step) + 3 and int(state.nonfinite_total) == 3
    state, info = step(state, grads, jnp.float32(1.0))
    assert int(info["update_skipped"]) == 0 and int(state.nonfinite_count) == 0
    assert int(state.nonfinite_total) == 3
    assert not np.array_equal(state.params["language"]["w"], before.params["language"]["w"])


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_nonfinite_learning_rate_is_caught_by_the_guard(lr):
    """Issue 32 item 3: finite gradients and loss, but a NaN / infinite learning rate makes a
    non-finite update: it is skipped (update_skipped 1), the weights stay as they were."""
    params = _params()
    tx = optim.make_optimizer(lr)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    grads = jax.tree.map(jnp.ones_like, params)
    new, info = jax.jit(lambda s, g: optim.apply_gradients(s, g, tx, loss=jnp.float32(1.0)))(
        state, grads
    )
    assert int(info["update_skipped"]) == 1 and int(new.nonfinite_count) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
        assert np.isfinite(np.asarray(a)).all()


def test_frozen_vision_gets_no_update_and_no_state():
    params = _params()
    mask = optim.trainable_mask(params, freeze_vision=True)
    assert mask["visual"]["blocks"]["w"] is False and mask["visual"]["merger"] is False
    assert mask["language"]["w"] is True
    tx = optim.make_optimizer(1e-1, trainable=mask)
    state = optim.TrainState.create(params, tx, jax.random.key(0))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    n_train = sum(x.size for x in jax.tree.leaves(params["language"]))
    assert n_state == 2 * n_train  # Adam mu + nu for trainable leaves only
    grads = jax.tree.map(jnp.ones_like, params)
    grads["visual"]["merger"] = jnp.full((4,), jnp.nan)  # frozen NaN must not block the update
    new, info = optim.apply_gradients(state, grads, tx, trainable=mask)
    assert int(info["update_skipped"]) == 0
    np.testing.assert_array_equal(
        new.params["visual"]["blocks"]["w"], params["visual"]["blocks"]["w"]
    )
    np.testing.assert_array_equal(new.params["visual"]["merger"], params["visual"]["merger"])
    assert not np.array_equal(new.params["language"]["w"], params["language"]["w"])
    # Gradient norm covers the trainable leaves only.
    np.testing.assert_allclose(info["grad_norm"], np.sqrt(n_train), rtol=1e-6)


def test_trainable_mask_patterns():
    mask = optim.trainable_mask(_params(), freeze=(r"language/b$",))
    assert mask["language"]["b"] is False and mask["language"]["w"] is True
    assert mask["visual"]["merger"] is True


def test_accumulation_equals_full_batch():
    """Sum over micro-batches of (per-token loss / whole-step tokens) == full-batch token mean."""
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4,)), jnp.float32)}
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 5, 4)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.6, jnp.float32)
    total = mask.sum()

    def loss_fn(p, b):
        per_tok = (b["x"] @ p["w"]) ** 2
        return jnp.sum(per_tok * b["m"]) / total, {"tokens": b["m"].sum()}

    batch = {"x": x, "m": mask}
    l1, g1, a1 = optim.accumulate_gradients(loss_fn, params, batch, 1)
    l4, g4, a4 = jax.jit(lambda p, b: optim.accumulate_gradients(loss_fn, p, b, 4))(params, batch)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-5)
    assert float(a4["tokens"]) == float(total) == float(a1["tokens"])
    with pytest.raises(ValueError, match="divisible"):
        optim.accumulate_gradients(loss_fn, params, batch, 3)


def test_rng_for_step_is_a_function_of_step():
    tx = optim.make_optimizer(1e-3)
    s = optim.TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(42))
    assert s.rng.dtype == jnp.uint32
    k0 = jax.random.key_data(optim.rng_for_step(s))
    k1 = jax.random.key_data(optim.rng_for_step(s.replace(step=s.step + 1)))
    assert not np.array_equal(k0, k1)
    np.testing.assert_array_equal(k0, jax.random.key_data(optim.rng_for_step(s)))


def _train_tiny_lm(mu_dtype, steps=5, lr=1e-3):
    """``steps`` AdamW updates of the tiny Qwen2.5-VL (float32 parameters, text only) on one
    next-token batch: (total parameter change, final optimizer state)."""
    from flax import nnx

    from tatar_jax.models import qwen2_5_vl as qvl

    model = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), init_std=0.08, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, model.config.text.vocab_size)
    pos = jnp.asarray(qvl.text_position_ids(np.ones((2, 11))))

    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(ids[:, :-1], position_ids=pos)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    tx = optim.make_optimizer(lr, mu_dtype=mu_dtype)
    state = optim.TrainState.create(params, tx, jax.random.key(0))

    @jax.jit
    def step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return optim.apply_gradients(state, grads, tx, loss=loss)[0]

    for _ in range(steps):
        state = step(state)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, params)
    return delta, state.opt_state


def test_bfloat16_first_moment_matches_float32_update_within_tolerance():
    """config.optimizer.mu_dtype="bfloat16" (optax's ``mu_dtype``): the first moment is stored in
    bfloat16 (half its bytes; the second stays float32), and 5 updates of the tiny model move
    the parameters by what the float32-moment updates do: the difference of the two total
    changes within 0.5% of the change's norm and 2% of its largest element (measured
    2026-12-07: see the print)."""
    want, opt32 = _train_tiny_lm("params")
    got, opt16 = _train_tiny_lm("bfloat16")
    adam16 = opt16[1][0]  # (clip, adamw chain) -> ScaleByAdamState
    assert {x.dtype for x in jax.tree.leaves(adam16.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam16.nu)} == {jnp.dtype(jnp.float32)}
    nbytes = [sum(x.nbytes for x in jax.tree.leaves(s)) for s in (opt32, opt16)]
    assert nbytes[1] / nbytes[0] == pytest.approx(0.75, abs=1e-3)  # (2 + 4) / (4 + 4) bytes
    flat32 = np.concatenate([x.ravel() for x in jax.tree.leaves(want)])
    flat16 = np.concatenate([x.ravel() for x in jax.tree.leaves(got)])
    rel_norm = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
    rel_max = np.abs(flat16 - flat32).max() / np.abs(flat32).max()
    print(f"[mu bf16] 5 steps: |Δ16 - Δ32| / |Δ32| = {rel_norm:.2e} (norm), {rel_max:.2e} (max)")
    assert np.abs(flat32).max() > 1e-3  # 5 steps of lr 1e-3 moved the weights
    assert 0 < rel_norm < 5e-3 and rel_max < 2e-2  # a different update (rounding), close
    # "float32" equals "params" on float32 parameters, bit for bit
    same, base = _train_tiny_lm("float32", steps=2)[0], _train_tiny_lm("params", steps=2)[0]
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_mu_dtype_names_the_field():
    with pytest.raises(ValueError, match=r"config.optimizer.mu_dtype must be one of"):
        optim.make_optimizer(1e-3, mu_dtype="int8")
