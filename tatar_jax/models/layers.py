"""Building blocks shared by the Qwen2.5-VL decoder and vision tower (Flax NNX).

One definition of each piece both towers use: the RMS norm, the dense layer with logical-axis
metadata, the gated MLP, the activation and rematerialisation tables, the attention mask value
and masked softmax, rotary helpers and the construction of a layer stack for ``jax.lax.scan``.
Parameter names created here (``scale``, ``kernel``, ``bias``, ``gate_proj``, ``up_proj``,
``down_proj``) are part of the checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax.sharding import constrain

__all__ = [
    "ACTIVATIONS",
    "GatedMLP",
    "MASK_VALUE",
    "REMAT_POLICIES",
    "RMSNorm",
    "activation",
    "apply_rotary",
    "check_remat",
    "cos_sin",
    "dense",
    "inv_frequencies",
    "masked_softmax",
    "remat",
    "rotate_half",
    "stacked",
]

# Finite "minus infinity" for masked attention scores: a fully masked row (left padding, a
# padding slot) gets a uniform softmax instead of NaN, so no NaN reaches the gradients.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# Per-layer ``jax.checkpoint`` policies. Configs name them either by the jax policy name or by
# the short name ("dots", "dots_no_batch"), so both spellings stay accepted.
REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing inside a layer
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_F = TypeVar("_F", bound=Callable[..., Any])
_M = TypeVar("_M", bound=nnx.Module)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation called ``name`` in HF configs (``hidden_act``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def masked_softmax(scores: jax.Array, allowed: jax.Array, dtype: Any) -> jax.Array:
    """Softmax over the last axis of ``scores`` (..., T) where ``allowed`` (bool, broadcastable).

    Disallowed entries get :data:`MASK_VALUE`; the result is cast to ``dtype``.
    """
    return jax.nn.softmax(jnp.where(allowed, scores, MASK_VALUE), axis=-1).astype(dtype)


def check_remat(name: str | None) -> None:
    """Raises ``ValueError`` unless ``name`` is None or a key of :data:`REMAT_POLICIES`."""
    if name is not None and name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}")


def remat(fn: _F, name: str | None) -> _F:
    """``fn`` under ``jax.checkpoint`` with the policy ``name``; ``fn`` itself for None."""
    check_remat(name)
    if name is None:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[name])


def dense(
    d_in: int,
    d_out: int,
    names: tuple[str, str],
    *,
    use_bias: bool,
    dtype: Any,
    param_dtype: Any,
    std: float,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear`` (..., d_in) → (..., d_out) with a normal(``std``) kernel (d_in, d_out).

    ``names`` are the logical axes of the kernel; the bias (d_out,) gets ``names[1]``.
    """
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(std),
        kernel_metadata={"out_sharding": names},
        bias_metadata={"out_sharding": (names[1],)},
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """HF ``Qwen2_5_VLRMSNorm``: normalise in float32, cast back, multiply by ``scale`` (dim,).

    (..., dim) → (..., dim) in ``dtype``.
    """

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any) -> None:
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class GatedMLP(nnx.Module):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``: (..., dim) → (..., dim).

    Args:
      dim, hidden_dim: model and hidden widths; act: ``hidden_act`` name (:func:`activation`).
      names: logical axes (model, hidden) of the kernels; down_proj's are reversed.
      hidden_names: logical names the (..., hidden_dim) activation is constrained to
        (:func:`tatar_jax.sharding.constrain`), or None to leave it unconstrained.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str,
        names: tuple[str, str],
        *,
        hidden_names: tuple[str | None, ...] | None,
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        std: float,
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, std=std, rngs=rngs)
        self.gate_proj = dense(dim, hidden_dim, names, **kw)
        self.up_proj = dense(dim, hidden_dim, names, **kw)
        self.down_proj = dense(hidden_dim, dim, (names[1], names[0]), **kw)
        self.act = activation(act)
        self.hidden_names = hidden_names

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.gate_proj(x)) * self.up_proj(x)
        if self.hidden_names is not None:
            h = constrain(h, self.hidden_names)
        return self.down_proj(h)


def stacked(make: Callable[[nnx.Rngs], _M], num: int, rngs: nnx.Rngs) -> _M:
    """``num`` modules from ``make``, every parameter stacked on a leading ``layers`` axis.

    Each copy draws its own random keys; the result is what ``jax.lax.scan`` iterates over.
    """

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_all(rngs: nnx.Rngs) -> _M:
        return make(rngs)

    return make_all(rngs)


def inv_frequencies(dim: int, theta: float) -> jax.Array:
    """Rotary inverse frequencies ``theta ** (-2i / dim)``, (dim // 2,) float32."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def cos_sin(freqs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """freqs (..., d // 2) float32 angles → cos, sin (..., d) of the HF layout ``[f, f]``."""
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    """(..., d) → (..., d): the halves ``[x1, x2]`` of the last axis become ``[-x2, x1]``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding: x (..., d); cos/sin float32 broadcastable to x → x.dtype.

    The rotation is computed in float32 whatever x's dtype.
    """
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
