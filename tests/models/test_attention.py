"""tatar_jax.models.layers.attention: every implementation that runs on CPU equals "xla".

"xla" (float32 scores, masked softmax) is the reference the full-model parity tests compare with
transformers. Block sizes are shrunk so that "chunked" really iterates over several query and
key blocks (and pads the last one) on these small shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tatar_jax.models import layers as L
from tatar_jax.models import qwen2_5_vl as qvl

B, LEN, H, KV, HD = 3, 37, 4, 2, 16


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_Q", 16)  # 37 queries: blocks of 16, 16, 5 (+11 padding)
    monkeypatch.setattr(L, "CHUNK_K", 8)  # 37 keys: 5 blocks, the last one 3 real + 5 padding


def _inputs(seed=0, length=LEN, kv_len=LEN, kv_heads=KV):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, length, H, HD)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, kv_len, kv_heads, HD)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, kv_len, kv_heads, HD)), jnp.float32)
    valid = np.ones((B, kv_len), bool)
    valid[0, :5] = False  # left padding: queries 0..4 of row 0 see no key at all (causal)
    valid[1, 30:] = False  # right padding
    valid[2, :3] = False  # both
    valid[2, 33:] = False
    return q, k, v, jnp.asarray(valid)


def _ref_numpy(q, k, v, valid, q_positions):
    """Plain numpy float64 attention → (B, L, H, hd) and (B, L) which queries see any key."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("blhd,bthd->bhlt", q, k) / np.sqrt(q.shape[-1])
    allowed = np.asarray(valid)[:, None, None, :]
    if q_positions is not None:
        allowed = allowed & (np.arange(k.shape[1])[None, :] <= np.asarray(q_positions)[:, None])
    allowed = np.broadcast_to(allowed, s.shape)
    s = np.where(allowed, s, -1e300)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhlt,bthd->blhd", p, v), allowed.any(-1)[:, 0]


@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_numpy(causal):
    q, k, v, valid = _inputs()
    pos = jnp.arange(LEN) if causal else None
    out = np.asarray(L.attention(q, k, v, valid, q_positions=pos, impl="xla"))
    ref, seen = _ref_numpy(q, k, v, valid, pos)
    assert seen.sum() > LEN  # most queries see keys (row 0's first five do not when causal)
    np.testing.assert_allclose(out[seen], ref[seen], atol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_equals_xla_everywhere_including_padding_queries(causal):
    q, k, v, valid = _inputs(1)
    pos = jnp.arange(LEN) if causal else None
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla")
    got = L.attention(q, k, v, valid, q_positions=pos, impl="chunked")
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_chunked_offset_queries_against_a_longer_key_buffer():
    """The KV-cache shape: 6 queries at slots 20..25 over 37 key slots."""
    q, k, v, valid = _inputs(2)
    q = q[:, :6]
    pos = 20 + jnp.arange(6)
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla")
    got = L.attention(q, k, v, valid, q_positions=pos, impl="chunked")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_gradients_equal_xla(causal):
    q, k, v, valid = _inputs(3)
    pos = jnp.arange(LEN) if causal else None
    w = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: (L.attention(q, k, v, valid, q_positions=pos, impl=impl) * w).sum()

    want = jax.grad(loss("xla"), (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("chunked"), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert float(jnp.abs(b).max()) > 0.1, name  # not a vacuous comparison
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, err_msg=name)


def test_chunked_bfloat16_close_to_xla():
    q, k, v, valid = (a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in _inputs(5))
    pos = jnp.arange(LEN)
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla").astype(jnp.float32)
    got = L.attention(q, k, v, valid, q_positions=pos, impl="chunked")
    assert got.dtype == jnp.bfloat16
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 2e-2


def test_xla_query_chunks_equal_one_pass():
    q, k, v, valid = _inputs(6)
    pos = jnp.arange(LEN)
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla")
    got = L.attention(q, k, v, valid, q_positions=pos, impl="xla", q_chunk=10)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpreted_equals_xla_on_valid_queries(causal):
    """The TPU splash kernel, run by the Pallas interpreter on CPU (padding = segment ids:
    padding queries differ from "xla", which they may: nothing reads them)."""
    q, k, v, valid = _inputs(7)
    pos = jnp.arange(LEN) if causal else None
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla")
    got = L.attention(q, k, v, valid, q_positions=pos, impl="splash_interpret")
    mask = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(want)[mask], atol=2e-6)
    w = (
        jnp.asarray(np.random.default_rng(8).normal(size=q.shape), jnp.float32)
        * valid[:, :, None, None]
    )

    def loss(impl):
        return lambda q, k, v: (L.attention(q, k, v, valid, q_positions=pos, impl=impl) * w).sum()

    for a, b in zip(
        jax.grad(loss("splash_interpret"), (0, 1, 2))(q, k, v),
        jax.grad(loss("xla"), (0, 1, 2))(q, k, v),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)


def test_auto_resolves_to_chunked_on_cpu():
    assert jax.default_backend() == "cpu"
    assert L.resolve_attention_impl("auto", jnp.bfloat16) == "chunked"
    assert L.resolve_attention_impl("auto", jnp.float32) == "chunked"
    model = qvl.Qwen2_5_VLForConditionalGeneration(qvl.tiny(), rngs=nnx.Rngs(0))
    assert model.config.attention_impl == "auto"
    assert model.language_model.attention_impl == "chunked"
    assert model.visual.attention_impl == "chunked"


@pytest.mark.parametrize("impl, needs", [("cudnn", "NVIDIA GPU"), ("splash", "TPU")])
def test_kernel_unavailable_on_this_backend_is_a_clear_error(impl, needs):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' needs an? {needs}"):
        L.resolve_attention_impl(impl, jnp.bfloat16)
    with pytest.raises(ValueError, match=impl):
        qvl.Qwen2_5_VLForConditionalGeneration(
            qvl.tiny().replace(attention_impl=impl), rngs=nnx.Rngs(0)
        )


def test_auto_follows_the_compile_target_not_the_host():
    """An ahead-of-time compile for TPU / NVIDIA devices from this CPU host resolves "auto" (and
    accepts the kernels) for the target's platform; outside the context the host decides again."""
    pick = L.resolve_attention_impl
    assert pick("auto", jnp.bfloat16, platform="tpu") == "splash"
    assert pick("auto", jnp.float32, platform="tpu") == "splash"
    assert pick("auto", jnp.bfloat16, platform="cuda") == "cudnn"
    assert pick("auto", jnp.float32, platform="cuda") == "chunked"  # no float32 cuDNN kernel
    assert pick("auto", jnp.bfloat16, platform="rocm") == "chunked"
    with L.compile_target("cuda"):
        assert pick("auto") == "cudnn" and pick("cudnn") == "cudnn"
        with pytest.raises(ValueError, match="'splash' needs a TPU; the platform here is 'cuda'"):
            pick("splash")
        model = nnx.eval_shape(
            lambda: qvl.Qwen2_5_VLForConditionalGeneration(
                qvl.tiny(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
            )
        )
        assert model.language_model.attention_impl == "cudnn"
    with L.compile_target("tpu"):
        assert pick("auto", jnp.float32) == "splash"
    assert pick("auto") == "chunked"
    with pytest.raises(ValueError, match="unknown target platform 'gpu'"):
        with L.compile_target("gpu"):
            pass


def test_unknown_impl_is_rejected_by_the_config_and_the_function():
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        qvl.tiny().replace(attention_impl="flash")
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        L.attention(*_inputs(), impl="flash")


def test_attention_impl_is_not_architecture():
    cfg = qvl.tiny().replace(attention_impl="xla")
    d = cfg.to_hf_dict()
    assert "attention_impl" not in d
    assert qvl.Qwen2_5_VLConfig.from_hf_dict({**d, "attention_impl": "xla"}).attention_impl == (
        "auto"
    )


@pytest.mark.parametrize(
    "case", ["causal_contiguous", "causal_holes_fallback", "offset_queries", "groups", "keys_only"]
)
def test_cudnn_padding_logic_through_jax_reference_implementation(monkeypatch, case):
    """The "cudnn" path's padding (rows rolled to right padding + sequence lengths + is_causal,
    the run-time fallback for rows with holes, the mask bias for offset queries, lengths for
    right-padded groups) with jax's XLA implementation of the same ``dot_product_attention``
    call standing in for the cuDNN kernel, which needs an NVIDIA GPU."""
    monkeypatch.setattr(L, "_DPA_IMPL", "xla")
    q, k, v, valid = _inputs(11)
    pos, right_padded = jnp.arange(LEN), False
    if case == "causal_holes_fallback":
        valid = valid.at[1, 10:12].set(False)  # a row whose valid slots are not one run
    elif case == "offset_queries":
        q, pos = q[:, :6], 20 + jnp.arange(6)
    elif case in ("groups", "keys_only"):
        pos = None
        right_padded = case == "groups"
        valid = jnp.asarray(np.arange(LEN)[None] < np.asarray([[37], [20], [1]]))
    want = L.attention(q, k, v, valid, q_positions=pos, impl="xla")
    got = L._attention_cudnn(q, k, v, valid, pos, right_padded)
    seen = np.asarray(valid[:, : q.shape[1]]) if pos is not None else np.asarray(valid)
    if case == "offset_queries":
        seen = np.ones((B, 6), bool)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=2e-6)
