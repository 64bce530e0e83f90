"""Qwen2 decoder of Qwen2.5-VL (Flax NNX): GQA with q/k/v biases, RMSNorm, SwiGLU, mRoPE.

Equal to transformers' ``Qwen2_5_VLTextModel`` (the reference). The ``num_hidden_layers``
decoder layers are stacked on a leading ``layers`` axis and applied with ``jax.lax.scan``, so
compile time does not grow with depth; ``remat`` wraps the scanned body in ``jax.checkpoint``.

Attention works on a key/value buffer addressed by *slots*: without a cache the slots are the
sequence positions ``0..L-1``; with a :class:`KVCache` (static shape ``(layers, B, T, kv_heads,
head_dim)``) the new keys/values are written at ``cache.index`` and the queries attend to every
slot ``<=`` their own that the caller's ``attention_mask`` (B, T) marks valid. Prefill and
single-token decode are the same code path with different ``L``.

Logical axis names (``out_sharding`` metadata; :mod:`tatar_jax.sharding` maps them to the mesh):

======================================  ===========================  =================
parameter path                          kernel / weight              bias
======================================  ===========================  =================
embed_tokens.embedding                  (vocab, embed)               –
layers.input_layernorm.scale            (layers, norm)               –
layers.post_attention_layernorm.scale   (layers, norm)               –
layers.self_attn.q_proj                 (layers, embed, q_heads)     (layers, q_heads)
layers.self_attn.k_proj / v_proj        (layers, embed, kv_heads)    (layers, kv_heads)
layers.self_attn.o_proj                 (layers, heads, embed)       –
layers.mlp.gate_proj / up_proj          (layers, embed, mlp)         –
layers.mlp.down_proj                    (layers, mlp, embed)         –
norm.scale                              (norm,)                      –
======================================  ===========================  =================

(``q_heads``/``kv_heads``/``heads`` dimensions are ``num_heads * head_dim`` long, head-major, as
in HF.) Activations: ``(batch, length, embed)``; the KV cache ``(layers, batch, cache_length,
kv_heads, head_dim)``. Inside :func:`tatar_jax.sharding.use_rules` the residual stream, the
attention heads and the MLP hidden layer are constrained to those names (identity otherwise), so
the batch stays split over the data axes whatever the parameters' sharding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tatar_jax.models import layers
from tatar_jax.models.layers import (
    GatedMLP,
    RMSNorm,
    check_remat,
    dense,
    remat,
    stacked,
)
from tatar_jax.models.qwen2_5_vl.rope import apply_rope
from tatar_jax.sharding import constrain

__all__ = ["KVCache", "TextModel"]

# Logical names of the activations (tatar_jax.sharding.constrain; no-ops outside use_rules).
_BLE = ("batch", "length", "embed")
_BLM = ("batch", "length", "mlp")
_Q_NAMES = ("batch", "length", "q_heads", "head_dim")
_KV_NAMES = ("batch", "length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Static-shape key/value cache of all layers.

    k, v: (layers, B, T, kv_heads, head_dim); index: () int32, the slot the next token is
    written to (the same for every row: rows are left-padded to a common prompt length).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @classmethod
    def init(
        cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any
    ) -> KVCache:
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: Any,
        *,
        dtype: Any,
        param_dtype: Any,
        std: float,
        rngs: nnx.Rngs,
        attention_impl: str = "xla",
    ):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attention_impl = attention_impl
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=std, rngs=rngs)
        self.q_proj = dense(d, self.num_heads * hd, ("embed", "q_heads"), use_bias=True, **kw)
        self.k_proj = dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = dense(d, self.num_kv_heads * hd, ("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = dense(self.num_heads * hd, d, ("heads", "embed"), use_bias=False, **kw)


class DecoderLayer(nnx.Module):
    """Parameters of one layer; the forward is :func:`_layer_forward` (run inside a scan)."""

    def __init__(
        self,
        cfg: Any,
        *,
        dtype: Any,
        param_dtype: Any,
        std: float,
        rngs: nnx.Rngs,
        attention_impl: str = "xla",
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, std=std, rngs=rngs, attention_impl=attention_impl, **kw)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            ("embed", "mlp"),
            hidden_names=_BLM,
            use_bias=False,
            std=std,
            rngs=rngs,
            **kw,
        )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_slots: jax.Array,
    kv_valid: jax.Array,
    impl: str = "xla",
) -> jax.Array:
    """Causal GQA over slots (:func:`tatar_jax.models.layers.attention`, implementation ``impl``).

    q (B, L, H, hd); k, v (B, T, KV, hd); q_slots (L,) int: slot of each query; kv_valid (B, T)
    bool. Query ``i`` sees key slot ``j`` iff ``j <= q_slots[i]`` and ``kv_valid[:, j]``.
    Scores and softmax statistics in float32. Returns (B, L, H, hd).
    """
    return layers.attention(q, k, v, kv_valid, q_positions=q_slots, impl=impl)


def _layer_forward(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    kv_valid: jax.Array,
    q_slots: jax.Array,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x (B, L, D) → (B, L, D), plus this layer's updated (k, v) cache when given."""
    attn = layer.self_attn
    b, length, _ = x.shape
    h = layer.input_layernorm(x)
    q = constrain(attn.q_proj(h).reshape(b, length, attn.num_heads, attn.head_dim), _Q_NAMES)
    k = constrain(attn.k_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), _KV_NAMES)
    v = constrain(attn.v_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), _KV_NAMES)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_kv is not None:
        ck, cv = cache_kv
        zero = jnp.zeros((), jnp.int32)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, index, zero, zero))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, index, zero, zero))
        k, v, cache_kv = ck.astype(q.dtype), cv.astype(q.dtype), (ck, cv)
    o = constrain(attention(q, k, v, q_slots, kv_valid, attn.attention_impl), _Q_NAMES)
    x = constrain(x + attn.o_proj(o.reshape(b, length, -1)), _BLE)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return constrain(x, _BLE), cache_kv


class TextModel(nnx.Module):
    """HF ``Qwen2_5_VLTextModel``: ``embed_tokens``, stacked ``layers``, final ``norm``.

    Args:
      cfg: :class:`~tatar_jax.models.qwen2_5_vl.config.TextConfig` (HF text_config names).
      dtype: activation dtype; param_dtype: parameter storage dtype.
      remat: None or a name in :data:`tatar_jax.models.layers.REMAT_POLICIES` ("full",
        "dots_saveable", ...).
      init_std: std of the normal initialiser of embeddings and kernels.
      attention_impl: a name in :data:`tatar_jax.models.layers.ATTENTION_IMPLS`, resolved here
        for this backend and ``dtype`` (:func:`~tatar_jax.models.layers.resolve_attention_impl`).
    """

    def __init__(
        self,
        cfg: Any,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str | None = None,
        init_std: float = 0.02,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        check_remat(remat)
        self.attention_impl = layers.resolve_attention_impl(attention_impl, dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        with nnx.use_eager_sharding(False):
            self.embed_tokens = nnx.Embed(
                cfg.vocab_size,
                cfg.hidden_size,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=nnx.initializers.normal(init_std),
                embedding_metadata={"out_sharding": ("vocab", "embed")},
                rngs=rngs,
            )
            self.layers = stacked(
                lambda r: DecoderLayer(
                    cfg, std=init_std, rngs=r, attention_impl=self.attention_impl, **kw
                ),
                cfg.num_hidden_layers,
                rngs,
            )
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) int → (B, L, D) in the activation dtype."""
        return constrain(self.embed_tokens(input_ids).astype(self.dtype), _BLE)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Decoder stack + final norm.

        inputs_embeds (B, L, D); cos/sin (B, L, head_dim) float32 (:func:`rope.mrope_cos_sin`);
        attention_mask: (B, L) without a cache, (B, T) over all cache slots with one.
        Returns hidden states (B, L, D) (after the final norm) and the updated cache (or None).
        """
        length = inputs_embeds.shape[1]
        kv_valid = jnp.asarray(attention_mask).astype(bool)
        x = constrain(inputs_embeds.astype(self.dtype), _BLE)
        graphdef, state = nnx.split(self.layers)
        if cache is None:
            q_slots = jnp.arange(length, dtype=jnp.int32)
            if kv_valid.shape != x.shape[:2]:
                raise ValueError(f"attention_mask {kv_valid.shape} != tokens {x.shape[:2]}")

            def body(x, layer_state):
                layer = nnx.merge(graphdef, layer_state)
                x, _ = _layer_forward(layer, x, cos, sin, kv_valid, q_slots, None, None)
                return x, None

            xs: Any = state
        else:
            if kv_valid.shape != cache.k.shape[1:3]:
                raise ValueError(
                    f"with a cache attention_mask must cover all {cache.k.shape[2]} cache slots: "
                    f"expected {cache.k.shape[1:3]}, got {kv_valid.shape}"
                )
            q_slots = cache.index + jnp.arange(length, dtype=jnp.int32)

            def body(x, inputs):
                layer_state, ck, cv = inputs
                layer = nnx.merge(graphdef, layer_state)
                x, new = _layer_forward(
                    layer, x, cos, sin, kv_valid, q_slots, (ck, cv), cache.index
                )
                return x, new

            xs = (state, cache.k, cache.v)
        x, new_kv = jax.lax.scan(remat(body, self.remat), x, xs)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], cache.index + length)
        return self.norm(x), new_cache
