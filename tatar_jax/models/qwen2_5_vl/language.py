"""Qwen2 decoder of Qwen2.5-VL (Flax NNX): GQA with q/k/v biases, RMSNorm, SwiGLU, mRoPE.

Equal to transformers' ``Qwen2_5_VLTextModel`` (the reference). The ``num_hidden_layers``
decoder layers are stacked on a leading ``layers`` axis and applied with ``jax.lax.scan``, so
compile time does not grow with depth; ``remat`` wraps the scanned body in ``jax.checkpoint``.

Attention works on a key/value buffer addressed by *slots*: without a cache the slots are the
sequence positions ``0..L-1``; with a :class:`KVCache` (static shape ``(layers, B, T, kv_heads,
head_dim)``) the new keys/values are written at ``cache.index`` and the queries attend to every
slot ``<=`` their own that the caller's ``attention_mask`` (B, T) marks valid; the cache of
all layers is the layer scan's carry and each layer writes its slots in place. Prefill and
single-token decode are the same code path with different ``L``. The rollout decodes with a
:class:`SampleCache` instead: one prompt KV per prompt shared by its G samples plus each
sample's generated slots (:func:`decode_attention`).

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
    MASK_VALUE,
    GatedMLP,
    RMSNorm,
    check_remat,
    dense,
    remat,
    stacked,
)
from tatar_jax.models.qwen2_5_vl.rope import apply_rope
from tatar_jax.sharding import constrain

__all__ = ["KVCache", "SampleCache", "TextModel", "decode_attention"]

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


class SampleCache(NamedTuple):
    """Decode cache of ``G`` samples per prompt: one shared prompt KV plus per-sample slots.

    prompt_k, prompt_v: (layers, B, P, kv_heads, head_dim), written once by the prefill;
    gen_k, gen_v: (layers, B*G, S, kv_heads, head_dim), the generated tokens of each sample
    (samples of prompt ``b`` are rows ``b*G .. b*G+G-1``); index: () int32, the generation slot
    the next token is written to. With it, the ``attention_mask`` of a forward is the prompt's
    (B, P) mask: generation slots ``<= index`` are valid. Decode writes the new key/value in
    place (one slot of one layer per step) and never copies the prompt KV per sample.
    """

    prompt_k: jax.Array
    prompt_v: jax.Array
    gen_k: jax.Array
    gen_v: jax.Array
    index: jax.Array

    @classmethod
    def from_prompt(cls, prompt: KVCache, num_samples: int, num_slots: int) -> SampleCache:
        """Empty generation slots behind a prefilled prompt cache (its ``T`` slots all prompt)."""
        layers, b, _, kvh, hd = prompt.k.shape
        shape = (layers, b * num_samples, num_slots, kvh, hd)
        zeros = jnp.zeros(shape, prompt.k.dtype)
        return cls(prompt.k, prompt.v, zeros, zeros, jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    """The q/k/v/o projections of one layer (the kernel runs in :func:`_layer_forward`)."""

    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, std: float, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
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

    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, std: float, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, std=std, rngs=rngs, **kw)
        self.mlp = GatedMLP.from_config(
            cfg, ("embed", "mlp"), hidden_names=_BLM, use_bias=False, std=std, rngs=rngs, **kw
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


def decode_attention(
    q: jax.Array,
    prompt_k: jax.Array,
    prompt_v: jax.Array,
    prompt_valid: jax.Array,
    gen_k: jax.Array,
    gen_v: jax.Array,
    gen_valid: jax.Array,
) -> jax.Array:
    """One decode step of GQA over a shared prompt KV plus each sample's own generated KV.

    q (N, 1, H, hd) with N = B*G (samples of a prompt contiguous); prompt_k/v (B, P, KV, hd),
    prompt_valid (B, P) bool; gen_k/v (N, S, KV, hd), gen_valid (S,) bool (the same generated
    slots are valid for every row). The queries are viewed as (B, G, ...) so that the G samples
    read their prompt's keys without a copy; the two partial softmaxes (prompt, generated) are
    merged exactly with their log-sum-exp, scores and normalisation in float32.
    Returns (N, 1, H, hd).
    """
    n, _, h, hd = q.shape
    b, _, kvh, _ = prompt_k.shape
    g, s = n // b, gen_k.shape[1]
    qg = q.reshape(b, g, kvh, h // kvh, hd)
    f32 = jnp.float32
    sp = jnp.einsum("bgkhd,btkd->bgkht", qg, prompt_k, preferred_element_type=f32)
    sg = jnp.einsum(
        "bgkhd,bgskd->bgkhs", qg, gen_k.reshape(b, g, s, kvh, hd), preferred_element_type=f32
    )
    sp = jnp.where(prompt_valid[:, None, None, None, :], sp * hd**-0.5, MASK_VALUE)
    sg = jnp.where(gen_valid, sg * hd**-0.5, MASK_VALUE)
    m = jnp.maximum(sp.max(-1, keepdims=True), sg.max(-1, keepdims=True))
    pp, pg = jnp.exp(sp - m), jnp.exp(sg - m)
    denom = pp.sum(-1, keepdims=True) + pg.sum(-1, keepdims=True)
    out = jnp.einsum(
        "bgkht,btkd->bgkhd", pp.astype(prompt_v.dtype), prompt_v, preferred_element_type=f32
    )
    out += jnp.einsum(
        "bgkhs,bgskd->bgkhd",
        pg.astype(gen_v.dtype),
        gen_v.reshape(b, g, s, kvh, hd),
        preferred_element_type=f32,
    )
    out = out / denom
    return out.astype(q.dtype).reshape(n, 1, h, hd)


def _qkv(
    layer: DecoderLayer, x: jax.Array, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, L, D) → rotated q (B, L, H, hd), k and v (B, L, KV, hd)."""
    attn = layer.self_attn
    b, length, _ = x.shape
    h = layer.input_layernorm(x)
    q = constrain(attn.q_proj(h).reshape(b, length, attn.num_heads, attn.head_dim), _Q_NAMES)
    k = constrain(attn.k_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), _KV_NAMES)
    v = constrain(attn.v_proj(h).reshape(b, length, attn.num_kv_heads, attn.head_dim), _KV_NAMES)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _layer_out(layer: DecoderLayer, x: jax.Array, o: jax.Array) -> jax.Array:
    """Residual stream x (B, L, D) after the attention output o (B, L, H, hd) and the MLP."""
    b, length, _ = x.shape
    o = constrain(o, _Q_NAMES)
    x = constrain(x + layer.self_attn.o_proj(o.reshape(b, length, -1)), _BLE)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return constrain(x, _BLE)


def _write(buf: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """buf (layers, B, T, KV, hd) with new (B, L, KV, hd) written at [layer, :, index] in place."""
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(
        buf, new[None].astype(buf.dtype), (layer, zero, index, zero, zero)
    )


def _layer_forward(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    kv_valid: jax.Array,
    q_slots: jax.Array,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | None,
    layer_index: jax.Array | None = None,
    *,
    attention_impl: str,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x (B, L, D) → (B, L, D), attention by ``attention_impl`` (the model's, resolved). With
    ``cache_kv`` = the (k, v) buffers of *all* layers (layers, B, T, KV, hd), this layer's
    keys/values are written at ``[layer_index, :, index]`` (in place: the buffers are the scan's
    carry) and the updated buffers are returned."""
    q, k, v = _qkv(layer, x, cos, sin)
    if cache_kv is not None:
        ck, cv = (
            _write(cache_kv[0], k, layer_index, index),
            _write(cache_kv[1], v, layer_index, index),
        )
        k = jax.lax.dynamic_index_in_dim(ck, layer_index, keepdims=False).astype(q.dtype)
        v = jax.lax.dynamic_index_in_dim(cv, layer_index, keepdims=False).astype(q.dtype)
        cache_kv = (ck, cv)
    o = attention(q, k, v, q_slots, kv_valid, attention_impl)
    return _layer_out(layer, x, o), cache_kv


def _decode_layer(
    layer: DecoderLayer,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    prompt_kv: tuple[jax.Array, jax.Array],
    prompt_valid: jax.Array,
    gen_kv: tuple[jax.Array, jax.Array],
    index: jax.Array,
    layer_index: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One token per sample row: x (N, 1, D); this layer's prompt k/v (B, P, KV, hd); the
    generated-token buffers of all layers (layers, N, S, KV, hd), written at
    ``[layer_index, :, index]`` in place and returned."""
    q, k, v = _qkv(layer, x, cos, sin)
    gk, gv = _write(gen_kv[0], k, layer_index, index), _write(gen_kv[1], v, layer_index, index)
    lk = jax.lax.dynamic_index_in_dim(gk, layer_index, keepdims=False)
    lv = jax.lax.dynamic_index_in_dim(gv, layer_index, keepdims=False)
    gen_valid = jnp.arange(gk.shape[2]) <= index
    o = decode_attention(
        q, prompt_kv[0].astype(q.dtype), prompt_kv[1].astype(q.dtype), prompt_valid,
        lk.astype(q.dtype), lv.astype(q.dtype), gen_valid,
    )  # fmt: skip
    return _layer_out(layer, x, o), (gk, gv)


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
                lambda r: DecoderLayer(cfg, std=init_std, rngs=r, **kw),
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
        cache: KVCache | SampleCache | None = None,
    ) -> tuple[jax.Array, KVCache | SampleCache | None]:
        """Decoder stack + final norm.

        inputs_embeds (B, L, D); cos/sin (B, L, head_dim) float32 (:func:`rope.mrope_cos_sin`);
        attention_mask: (B, L) without a cache, (B, T) over all cache slots with a
        :class:`KVCache`, the prompts' (B, P) with a :class:`SampleCache` (then L = 1 and the
        batch is its B*G sample rows). Returns hidden states (B, L, D) (after the final norm)
        and the updated cache (or None).
        """
        kv_valid = jnp.asarray(attention_mask).astype(bool)
        x = constrain(inputs_embeds.astype(self.dtype), _BLE)
        if isinstance(cache, SampleCache):
            return self._decode(x, cos, sin, kv_valid, cache)
        length = x.shape[1]
        graphdef, state = nnx.split(self.layers)
        impl = self.attention_impl  # static: one kernel choice for every layer
        if cache is None:
            q_slots = jnp.arange(length, dtype=jnp.int32)
            if kv_valid.shape != x.shape[:2]:
                raise ValueError(f"attention_mask {kv_valid.shape} != tokens {x.shape[:2]}")

            def body(x, layer_state):
                layer = nnx.merge(graphdef, layer_state)
                x, _ = _layer_forward(
                    layer, x, cos, sin, kv_valid, q_slots, None, None, attention_impl=impl
                )
                return x, None

            x, _ = jax.lax.scan(remat(body, self.remat), x, state)
            return self.norm(x), None
        if kv_valid.shape != cache.k.shape[1:3]:
            raise ValueError(
                f"with a cache attention_mask must cover all {cache.k.shape[2]} cache slots: "
                f"expected {cache.k.shape[1:3]}, got {kv_valid.shape}"
            )
        q_slots = cache.index + jnp.arange(length, dtype=jnp.int32)

        # The cache of all layers is the scan's carry: each layer writes its slots in place.
        def cached(carry, inputs):
            x, kv = carry
            layer_state, i = inputs
            layer = nnx.merge(graphdef, layer_state)
            x, kv = _layer_forward(
                layer, x, cos, sin, kv_valid, q_slots, kv, cache.index, i, attention_impl=impl
            )
            return (x, kv), None

        layer_ids = jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32)
        (x, (k, v)), _ = jax.lax.scan(
            remat(cached, self.remat), (x, (cache.k, cache.v)), (state, layer_ids)
        )
        return self.norm(x), KVCache(k, v, cache.index + length)

    def _decode(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, prompt_valid: jax.Array, cache: Any
    ) -> tuple[jax.Array, SampleCache]:
        """One token per sample row (x (B*G, 1, D)) against a :class:`SampleCache`."""
        if x.shape[1] != 1 or x.shape[0] != cache.gen_k.shape[1]:
            raise ValueError(
                f"a SampleCache decodes one token per sample row: expected "
                f"({cache.gen_k.shape[1]}, 1) tokens, got {x.shape[:2]}"
            )
        if prompt_valid.shape != cache.prompt_k.shape[1:3]:
            raise ValueError(
                f"with a SampleCache attention_mask is the prompts' {cache.prompt_k.shape[1:3]}, "
                f"got {prompt_valid.shape}"
            )
        graphdef, state = nnx.split(self.layers)

        # Prompt KV: read-only scan inputs; generated KV of all layers: the carry, written in
        # place at [layer, :, index].
        def body(carry, inputs):
            x, gen = carry
            layer_state, pk, pv, i = inputs
            layer = nnx.merge(graphdef, layer_state)
            x, gen = _decode_layer(layer, x, cos, sin, (pk, pv), prompt_valid, gen, cache.index, i)
            return (x, gen), None

        layer_ids = jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32)
        xs = (state, cache.prompt_k, cache.prompt_v, layer_ids)
        (x, (gk, gv)), _ = jax.lax.scan(body, (x, (cache.gen_k, cache.gen_v)), xs)
        new = cache._replace(gen_k=gk, gen_v=gv, index=cache.index + 1)
        return self.norm(x), new
