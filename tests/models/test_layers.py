"""tatar_jax.models.layers: the building blocks shared by the decoder and the vision tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tatar_jax.models import layers as L


def test_rotate_half_and_apply_rotary():
    x = jnp.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(L.rotate_half(x), [[-2, -3, 0, 1], [-6, -7, 4, 5]])
    # cos 1, sin 0 is the identity; the result keeps the input dtype.
    xb = x.astype(jnp.bfloat16)
    out = L.apply_rotary(xb, jnp.ones((1, 4)), jnp.zeros((1, 4)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, xb)


def test_cos_sin_duplicates_the_frequencies():
    freqs = jnp.asarray([[0.0, 1.0]])
    cos, sin = L.cos_sin(freqs)
    np.testing.assert_allclose(cos, np.cos([[0.0, 1.0, 0.0, 1.0]]), rtol=1e-6)
    np.testing.assert_allclose(sin, np.sin([[0.0, 1.0, 0.0, 1.0]]), rtol=1e-6)
    np.testing.assert_allclose(L.inv_frequencies(4, 100.0), [1.0, 0.1], rtol=1e-6)


def test_masked_softmax_fully_masked_row_is_uniform():
    scores = jnp.asarray([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    allowed = jnp.asarray([[True, True, False], [False, False, False]])
    p = np.asarray(L.masked_softmax(scores, allowed, jnp.float32))
    assert p[0, 2] == 0 and np.isclose(p[0].sum(), 1)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=1e-6)


def test_rmsnorm_matches_formula_and_names_scale():
    with nnx.use_eager_sharding(False):  # logical names only; no mesh here
        norm = L.RMSNorm(4, 1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    ref = x / np.sqrt(np.mean(np.square(x)) + 1e-6)
    np.testing.assert_allclose(norm(x), ref, rtol=1e-6)
    assert [p[0] for p, _ in nnx.to_flat_state(nnx.state(norm, nnx.Param))] == ["scale"]


def test_gated_mlp_and_stacked_parameter_paths():
    def make(rngs):
        return L.GatedMLP(
            4,
            6,
            "silu",
            ("embed", "mlp"),
            hidden_names=None,
            use_bias=True,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            std=0.02,
            rngs=rngs,
        )

    with nnx.use_eager_sharding(False):  # logical names only; no mesh here
        stack = L.stacked(make, 3, nnx.Rngs(0))
        mlp = make(nnx.Rngs(1))
    shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(stack, nnx.Param))}
    assert shapes == {
        ("gate_proj", "kernel"): (3, 4, 6),
        ("gate_proj", "bias"): (3, 6),
        ("up_proj", "kernel"): (3, 4, 6),
        ("up_proj", "bias"): (3, 6),
        ("down_proj", "kernel"): (3, 6, 4),
        ("down_proj", "bias"): (3, 4),
    }
    x = jnp.ones((2, 4))
    ref = mlp.down_proj(jax.nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    np.testing.assert_array_equal(mlp(x), ref)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="hidden_act"):
        L.activation("relu6")
    with pytest.raises(ValueError, match="remat policy"):
        L.check_remat("everything")
    L.check_remat(None)
    f = lambda x: x * 2  # noqa: E731
    assert L.remat(f, None) is f
    assert float(L.remat(f, "full")(jnp.float32(3))) == 6
