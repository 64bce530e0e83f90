"""Qwen2.5-VL vision tower (Flax NNX).

Equal to transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (the reference).

Pipeline (``P`` = padded patch budget, ``D`` = hidden_size, ``M = P // spatial_merge_size**2``):

  pixel_values (P, C*T*p*p) ──gather(layout.patch_index)──► window order
  ──patch_embed.proj (Linear == the Conv3d)──► (P, D)
  ──scan over ``depth`` stacked blocks (window or full attention per block, 2D rope in float32)──►
  ──merger (RMSNorm, 2x2 concat, Linear-GELU-Linear)──► (M, out_hidden_size)
  ──gather(layout.merged_index)──► tokens in HF order (image after image), padding rows zeroed.

All data-dependent indexing lives in :mod:`.vision_layout` (host numpy), so the jitted forward sees
static shapes only. Window blocks attend within windows, full-attention blocks within each frame,
both as padded groups ``(G, L)`` — never a mask over all patches of the batch.

Logical axis names (``out_sharding`` metadata; :mod:`tatar_jax.sharding` maps them to the mesh):

=============================  ===========================================  ========================
parameter path                 kernel / weight                              bias
=============================  ===========================================  ========================
patch_embed.proj.kernel        (vision_patch, vision_embed)                 –
blocks.norm1/norm2.scale       (layers, norm)                               –
blocks.attn.qkv                (layers, vision_embed, vision_qkv)           (layers, vision_qkv)
blocks.attn.proj               (layers, vision_heads, vision_embed)         (layers, vision_embed)
blocks.mlp.gate_proj/up_proj   (layers, vision_embed, vision_mlp)           (layers, vision_mlp)
blocks.mlp.down_proj           (layers, vision_mlp, vision_embed)           (layers, vision_embed)
merger.ln_q.scale              (norm,)                                      –
merger.mlp_0                   (vision_merge, vision_mlp)                   (vision_mlp,)
merger.mlp_2                   (vision_mlp, embed)                          (embed,)
=============================  ===========================================  ========================

``blocks`` holds the parameters of all blocks stacked on a leading ``layers`` axis. The HF
checkpoint names are given by :func:`hf_vision_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax.models import layers
from tatar_jax.models.layers import (
    GatedMLP,
    RMSNorm,
    activation,
    apply_rotary,
    check_remat,
    cos_sin,
    dense,
    inv_frequencies,
    remat,
    stacked,
)
from tatar_jax.models.qwen2_5_vl.vision_layout import (
    VisionBucket,
    VisionLayout,
    fixed_bucket,
    hf_position_ids,
    hf_window_index,
    vision_bucket,
    vision_layout,
    window_len,
)
from tatar_jax.sharding import constrain

__all__ = [
    "VisionBucket",
    "VisionLayout",
    "VisionTransformer",
    "fixed_bucket",
    "hf_position_ids",
    "hf_vision_rules",
    "hf_window_index",
    "hf_to_param",
    "load_hf_vision_weights",
    "param_to_hf",
    "vision_bucket",
    "vision_layout",
    "window_len",
]

# Fixed by the architecture (HF hard-codes both; vision_config has no field for them).
_RMS_EPS = 1e-6
_INIT_STD = 0.02

# Logical names of the activations (tatar_jax.sharding.constrain; no-ops outside use_rules).
_TOKEN_NAMES = ("vision_tokens", "vision_embed")
_GROUP_NAMES = ("vision_groups", None, "vision_heads", None)
_MLP_NAMES = ("vision_embed", "vision_mlp")  # the MLP kernels' (model, hidden) axes


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
        d = cfg.hidden_size
        if d % cfg.num_heads:
            raise ValueError(f"hidden_size={d} is not divisible by num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=_INIT_STD, use_bias=True, rngs=rngs)
        self.qkv = dense(d, 3 * d, ("vision_embed", "vision_qkv"), **kw)
        self.proj = dense(d, d, ("vision_heads", "vision_embed"), **kw)


class VisionBlock(nnx.Module):
    """One pre-norm transformer block; parameters only, the forward is :func:`_block_forward`."""

    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, _RMS_EPS, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, _RMS_EPS, **kw)
        self.attn = VisionAttention(cfg, rngs=rngs, **kw)
        self.mlp = GatedMLP.from_config(
            cfg, _MLP_NAMES, hidden_names=None, use_bias=True, std=_INIT_STD, rngs=rngs, **kw
        )


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=_INIT_STD, use_bias=False, rngs=rngs)
        self.proj = dense(patch_dim(cfg), cfg.hidden_size, ("vision_patch", "vision_embed"), **kw)


class PatchMerger(nnx.Module):
    """HF ``Qwen2_5_VLPatchMerger``: ``mlp.0`` / ``mlp.2`` are ``mlp_0`` / ``mlp_2`` here."""

    def __init__(self, cfg: Any, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
        d = cfg.hidden_size * cfg.spatial_merge_size**2
        kw = dict(dtype=dtype, param_dtype=param_dtype, std=_INIT_STD, use_bias=True, rngs=rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, _RMS_EPS, dtype=dtype, param_dtype=param_dtype)
        self.mlp_0 = dense(d, d, ("vision_merge", "vision_mlp"), **kw)
        self.mlp_2 = dense(d, cfg.out_hidden_size, ("vision_mlp", "embed"), **kw)
        self.merged_dim = d

    def __call__(self, x: jax.Array) -> jax.Array:
        """(P, D) in window order → (P // merge**2, out_hidden_size)."""
        x = self.ln_q(x).reshape(-1, self.merged_dim)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


def patch_dim(cfg: Any) -> int:
    """Length of one flattened input patch: in_channels * temporal_patch_size * patch_size**2."""
    return cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2


def _rope_theta(cfg: Any) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def rotary_cos_sin(pos_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Axial 2D rope (HF ``Qwen2_5_VLVisionRotaryEmbedding``), float32.

    pos_ids (P, 2) int → cos, sin (P, head_dim): [h-freqs, w-freqs] repeated twice.
    """
    inv_freq = inv_frequencies(head_dim // 2, theta)
    freqs = pos_ids.astype(jnp.float32)[..., None] * inv_freq  # (P, 2, head_dim // 4)
    return cos_sin(freqs.reshape(pos_ids.shape[0], -1))


def grouped_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rows: jax.Array,
    valid: jax.Array,
    slot: jax.Array,
    q_chunk: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Attention within padded groups of rows (:func:`tatar_jax.models.layers.attention`).

    q, k, v (P, H, hd); rows/valid (G, L), each ``valid`` row a prefix (:mod:`.vision_layout`);
    slot (P,) → (P, H, hd). Rows absent from every group (padding) get zeros. Scores and softmax
    statistics are float32. ``q_chunk`` (``impl="xla"``): queries per ``jax.checkpoint``-ed
    chunk, so only (G, H, q_chunk, L) scores are live (frames of thousands of patches).
    """
    g, length = rows.shape
    # Groups (windows / frames) are independent: split them over the batch devices.
    qg, kg, vg = (constrain(a[rows], _GROUP_NAMES) for a in (q, k, v))  # (G, L, H, hd)
    out = layers.attention(qg, kg, vg, valid, impl=impl, right_padded=True, q_chunk=q_chunk)
    out = out.reshape(g * length, *out.shape[2:])
    out = jnp.concatenate([out, jnp.zeros((1, *out.shape[1:]), out.dtype)], axis=0)
    return out[slot]


def _block_forward(
    blk: VisionBlock,
    x: jax.Array,
    is_full: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    layout: VisionLayout,
    q_chunk: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """x (P, D) → (P, D); ``is_full`` (bool scalar) picks frame-wide vs window attention."""
    attn = blk.attn
    p = x.shape[0]
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(p, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    c, s = cos[:, None, :], sin[:, None, :]
    q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)

    def full(q, k, v):
        return grouped_attention(
            q,
            k,
            v,
            layout.segment_rows,
            layout.segment_valid,
            layout.segment_slot,
            q_chunk,
            impl,
        )

    def window(q, k, v):
        return grouped_attention(
            q, k, v, layout.window_rows, layout.window_valid, layout.window_slot, None, impl
        )

    o = jax.lax.cond(is_full, full, window, q, k, v)
    x = x + attn.proj(o.reshape(p, -1))
    return x + blk.mlp(blk.norm2(x))


class VisionTransformer(nnx.Module):
    """The Qwen2.5-VL vision tower (HF ``visual``).

    Args:
      cfg: object with HF vision_config attribute names (depth, hidden_size, intermediate_size,
        num_heads, in_channels, patch_size, spatial_merge_size, temporal_patch_size, window_size,
        fullatt_block_indexes, out_hidden_size, hidden_act; optional rope_parameters/rope_theta).
      dtype: activation / compute dtype. param_dtype: storage dtype of the parameters.
      remat: None, or a name in :data:`tatar_jax.models.layers.REMAT_POLICIES`, per block.
      attn_q_chunk: ``attention_impl="xla"`` only: full-attention queries per chunk (see
        :func:`grouped_attention`); None never chunks. Frames longer than this (up to ~8k
        patches at TATAR's max_pixels) then need (G, H, attn_q_chunk, L) float32 scores
        instead of (G, H, L, L).
      attention_impl: a name in :data:`tatar_jax.models.layers.ATTENTION_IMPLS`, resolved here
        for this backend and ``dtype``.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str | None = None,
        attn_q_chunk: int | None = 1024,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ) -> None:
        check_remat(remat)
        self.attention_impl = layers.resolve_attention_impl(attention_impl, dtype)
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside [0, depth={cfg.depth})")
        activation(cfg.hidden_act)
        window_len(cfg)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        if attn_q_chunk is not None and attn_q_chunk < 1:
            raise ValueError(f"attn_q_chunk must be >= 1 or None, got {attn_q_chunk}")
        self.attn_q_chunk = attn_q_chunk
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.rope_theta = _rope_theta(cfg)
        self.full_attention = tuple(i in set(cfg.fullatt_block_indexes) for i in range(cfg.depth))
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        # Logical names are metadata only; placement goes through sharding.state_shardings.
        with nnx.use_eager_sharding(False):
            self.patch_embed = PatchEmbed(cfg, rngs=rngs, **kw)
            self.blocks = stacked(lambda r: VisionBlock(cfg, rngs=r, **kw), cfg.depth, rngs)
            self.merger = PatchMerger(cfg, rngs=rngs, **kw)

    def __call__(
        self, pixel_values: jax.Array, layout: VisionLayout
    ) -> tuple[jax.Array, jax.Array]:
        """pixel_values (P, C*T*p*p) in HF patch order, padded to the layout's budget P.

        Returns (tokens (M, out_hidden_size) in HF order with padding rows zero, valid (M,) bool).
        """
        p = layout.patch_index.shape[0]
        if pixel_values.shape != (p, patch_dim(self.cfg)):
            raise ValueError(
                f"pixel_values has shape {pixel_values.shape}, the layout expects "
                f"({p}, {patch_dim(self.cfg)})"
            )
        layout = VisionLayout(*(jnp.asarray(a) for a in layout))
        x = self.patch_embed.proj(pixel_values[layout.patch_index].astype(self.dtype))
        cos, sin = rotary_cos_sin(layout.pos_ids, self.head_dim, self.rope_theta)

        graphdef, block_state = nnx.split(self.blocks)

        def body(x: jax.Array, inputs: tuple[Any, jax.Array]) -> tuple[jax.Array, None]:
            state, is_full = inputs
            blk = nnx.merge(graphdef, state)
            x = _block_forward(
                blk,
                constrain(x, _TOKEN_NAMES),
                is_full,
                cos,
                sin,
                layout,
                self.attn_q_chunk,
                self.attention_impl,
            )
            return constrain(x, _TOKEN_NAMES), None

        flags = jnp.asarray(self.full_attention, dtype=bool)
        x, _ = jax.lax.scan(remat(body, self.remat), x, (block_state, flags))

        merged = self.merger(x)[layout.merged_index]
        merged = jnp.where(layout.merged_valid[:, None], merged, jnp.zeros((), merged.dtype))
        return merged, layout.merged_valid

    def embed_images(
        self, pixel_values: Any, grid_thw: Any, bucket: VisionBucket | None = None
    ) -> jax.Array:
        """Eager convenience on HF-style inputs: pixel_values (N, C*T*p*p), grid_thw (n, 3).

        Returns the (N // merge**2, out_hidden_size) image tokens, exactly HF's ``pooler_output``.
        ``bucket`` (static sizes, see :func:`vision_layout`) defaults to the tightest one.
        """
        grid = np.asarray(grid_thw)
        layout = vision_layout(grid, self.cfg, bucket)
        n = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
        pv = jnp.asarray(pixel_values)
        if pv.shape[0] != n:
            raise ValueError(f"pixel_values has {pv.shape[0]} rows, grid_thw describes {n} patches")
        pv = jnp.pad(pv, ((0, layout.patch_index.shape[0] - n), (0, 0)))
        tokens, _ = self(pv, layout)
        return tokens[: n // self.cfg.spatial_merge_size**2]


# --- HF checkpoint names ------------------------------------------------------------------------

_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def hf_vision_rules() -> list[tuple[str, tuple[str, ...], str]]:
    """(HF name under ``visual.``, our parameter path, transform) for every vision parameter.

    A name containing ``{i}`` is per block: our parameter is stacked over blocks (leading axis =
    block index ``i``). Transforms (see :func:`hf_to_param` / :func:`param_to_hf`):
    ``"linear"`` kernel = weight.T; ``"conv_to_linear"`` kernel = weight.reshape(out, -1).T (the
    Conv3d kernel (out, C, T, p, p) flattened in the pixel_values (C, T, p, p) order); ``"none"``.
    """
    rules: list[tuple[str, tuple[str, ...], str]] = [
        ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv_to_linear"),
        ("blocks.{i}.norm1.weight", ("blocks", "norm1", "scale"), "none"),
        ("blocks.{i}.norm2.weight", ("blocks", "norm2", "scale"), "none"),
    ]
    for name in _BLOCK_LINEARS:
        path = ("blocks", *name.split("."))
        rules.append((f"blocks.{{i}}.{name}.weight", (*path, "kernel"), "linear"))
        rules.append((f"blocks.{{i}}.{name}.bias", (*path, "bias"), "none"))
    rules += [
        ("merger.ln_q.weight", ("merger", "ln_q", "scale"), "none"),
        ("merger.mlp.0.weight", ("merger", "mlp_0", "kernel"), "linear"),
        ("merger.mlp.0.bias", ("merger", "mlp_0", "bias"), "none"),
        ("merger.mlp.2.weight", ("merger", "mlp_2", "kernel"), "linear"),
        ("merger.mlp.2.bias", ("merger", "mlp_2", "bias"), "none"),
    ]
    return rules


def hf_to_param(transform: str, x: Any) -> Any:
    """HF tensor (numpy-like) → our parameter value, per :func:`hf_vision_rules` transform."""
    if transform == "none":
        return x
    if transform == "linear":
        return x.T
    if transform == "conv_to_linear":
        return x.reshape(x.shape[0], -1).T
    raise ValueError(f"unknown transform {transform!r}")


def param_to_hf(transform: str, x: Any, cfg: Any) -> Any:
    """Our parameter value → HF tensor; the inverse of :func:`hf_to_param`."""
    if transform == "none":
        return x
    if transform == "linear":
        return x.T
    if transform == "conv_to_linear":
        p = cfg.patch_size
        return x.T.reshape(x.shape[1], cfg.in_channels, cfg.temporal_patch_size, p, p)
    raise ValueError(f"unknown transform {transform!r}")


def load_hf_vision_weights(
    model: VisionTransformer,
    tensors: Mapping[str, Any] | Callable[[str], Any],
    prefix: str = "visual.",
) -> None:
    """Copies HF vision weights into ``model`` (in place), casting to each parameter's dtype.

    ``tensors`` maps full HF names (``prefix`` + rule name) to numpy-like arrays, or is a callable
    that returns one by name. Missing or mis-shaped tensors raise ``KeyError`` / ``ValueError``
    naming them; extra names are the caller's business (they are simply not read).
    """
    get = tensors.__getitem__ if isinstance(tensors, Mapping) else tensors
    depth = model.cfg.depth
    missing: list[str] = []
    for template, path, transform in hf_vision_rules():
        names = [template.format(i=i) for i in range(depth)] if "{i}" in template else [template]
        values = []
        for name in names:
            try:
                values.append(np.asarray(hf_to_param(transform, np.asarray(get(prefix + name)))))
            except KeyError:
                missing.append(prefix + name)
        if missing:
            continue
        value = np.stack(values) if "{i}" in template else values[0]
        var = model
        for part in path:
            var = getattr(var, part)
        if tuple(var.shape) != value.shape:
            raise ValueError(
                f"{prefix}{template}: expected {tuple(var.shape)} after transform {transform!r}, "
                f"got {value.shape}"
            )
        var[...] = jnp.asarray(value, dtype=var.dtype)
    if missing:
        raise KeyError(f"missing vision tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
