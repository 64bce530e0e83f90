"""Chunked token log-probs vs the direct ``jax.nn.log_softmax`` + gather on the full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tatar_jax.logprobs import token_logprobs


def _reference(h, w, t, layout="dv", temperature=1.0):
    h32, w32 = h.astype(jnp.float32), w.astype(jnp.float32)
    z = h32 @ w32 if layout == "dv" else h32 @ w32.T
    z = z / temperature
    lsm = jax.nn.log_softmax(z, axis=-1)
    valid = t >= 0
    lp = jnp.take_along_axis(lsm, jnp.clip(t, 0)[..., None], axis=-1)[..., 0]
    lp = jnp.where(valid, lp, 0.0)
    ent = -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)
    return lp, jnp.where(valid, ent, 0.0)


def _data(n_shape, d=16, v=50, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k1, (*n_shape, d), dtype) * 2.0
    w = (jax.random.normal(k2, (d, v)) * 0.5).astype(dtype)
    t = jax.random.randint(k3, n_shape, 0, v)
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_matches_full_log_softmax(chunk, layout):
    h, w, t = _data((3, 13))  # 39 tokens: chunk 7 needs 3 padding rows
    t = t.at[0, :4].set(-100)  # ignore labels (prompt tokens)
    wl = w if layout == "dv" else w.T
    lp, ent = token_logprobs(h, wl, t, chunk_size=chunk, weight_layout=layout, return_entropy=True)
    ref_lp, ref_ent = _reference(h, wl, t, layout)
    assert lp.shape == t.shape and lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, ref_lp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5, rtol=0)
    assert np.all(np.asarray(lp)[0, :4] == 0.0)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_gradients_match(layout):
    h, w, t = _data((2, 11), seed=1)
    t = t.at[1, -3:].set(-1)
    wl = w if layout == "dv" else w.T
    cw = jax.random.normal(jax.random.key(5), t.shape)
    ce = jax.random.normal(jax.random.key(6), t.shape)

    def ours(h, w):
        lp, ent = token_logprobs(h, w, t, chunk_size=5, weight_layout=layout, return_entropy=True)
        return jnp.sum(cw * lp) + jnp.sum(ce * ent)

    def ref(h, w):
        lp, ent = _reference(h, w, t, layout)
        return jnp.sum(cw * lp) + jnp.sum(ce * ent)

    g = jax.jit(jax.grad(ours, argnums=(0, 1)))(h, wl)
    r = jax.grad(ref, argnums=(0, 1))(h, wl)
    for a, b in zip(g, r, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_temperature():
    h, w, t = _data((17,), seed=2)
    lp = token_logprobs(h, w, t, chunk_size=4, temperature=0.7)
    np.testing.assert_allclose(lp, _reference(h, w, t, temperature=0.7)[0], atol=1e-5)
    g = jax.grad(lambda x: token_logprobs(x, w, t, chunk_size=4, temperature=0.7).sum())(h)
    gr = jax.grad(lambda x: _reference(x, w, t, temperature=0.7)[0].sum())(h)
    np.testing.assert_allclose(g, gr, atol=1e-5)


def test_bf16_inputs_accumulate_in_f32():
    h, w, t = _data((4, 9), d=64, v=300, seed=3, dtype=jnp.bfloat16)
    lp = token_logprobs(h, w, t, chunk_size=8)
    assert lp.dtype == jnp.float32
    # Reference: the same bf16 values, exactly upcast, f32 math.
    np.testing.assert_allclose(lp, _reference(h, w, t)[0], atol=1e-4, rtol=0)
    gh, gw = jax.grad(lambda a, b: token_logprobs(a, b, t, chunk_size=8).sum(), (0, 1))(h, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    rh, rw = jax.grad(lambda a, b: _reference(a, b, t)[0].sum(), (0, 1))(
        h.astype(jnp.float32), w.astype(jnp.float32)
    )
    np.testing.assert_allclose(gw.astype(jnp.float32), rw, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(gh.astype(jnp.float32), rh, rtol=2e-2, atol=2e-2)


def test_out_of_vocab_target_is_nan_and_shape_errors():
    h, w, t = _data((5,), v=10)
    lp = token_logprobs(h, w, t.at[2].set(10))
    assert np.isnan(lp[2]) and np.all(np.isfinite(np.delete(np.asarray(lp), 2)))
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(h, w, t[:3])
    with pytest.raises(ValueError, match="hidden size"):
        token_logprobs(h, w.T, t)


def test_no_full_logits_in_jaxpr():
    """The (tokens x vocab) array must not appear in the forward+backward program."""
    n, d, v, chunk = 512, 8, 1000, 32
    h, w, t = _data((n,), d=d, v=v)
    f = jax.grad(lambda a, b: token_logprobs(a, b, t, chunk_size=chunk).sum(), (0, 1))
    text = str(jax.make_jaxpr(f)(h, w))
    assert f"{n},{v}" not in text.replace(" ", "")
    assert f"{chunk},{v}" in text.replace(" ", "")


def test_sharded_batch_and_vocab_match_single_device():
    """Batch over data x fsdp, lm_head vocab over tensor (8 virtual CPU devices): same values and
    gradients as unsharded."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tatar_jax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    h, w, t = _data((8, 6), d=16, v=64, seed=4)

    def f(h, w):
        lp, ent = token_logprobs(h, w, t, chunk_size=16, return_entropy=True)
        return jnp.sum(lp * jnp.cos(jnp.arange(6.0))) + jnp.sum(ent), (lp, ent)

    ref = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    hs = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"), None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6)
