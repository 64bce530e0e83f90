"""Building blocks shared by the Qwen2.5-VL decoder and vision tower (Flax NNX).

One definition of each piece both towers use: the RMS norm, the dense layer with logical-axis
metadata, the gated MLP, the activation and rematerialisation tables, the attention mask value
and masked softmax, :func:`attention`, rotary helpers and the construction of a layer stack for
``jax.lax.scan``. Parameter names created here (``scale``, ``kernel``, ``bias``, ``gate_proj``,
``up_proj``, ``down_proj``) are part of the checkpoint layout.

Attention implementations (``attention_impl``; :func:`resolve_attention_impl`):

- ``"xla"``: einsum with float32 scores and a masked softmax: the parity reference. Memory
  O(B·H·L·T) float32 per layer (the largest buffers of a long-sequence update).
- ``"chunked"``: flash-attention in plain JAX (online softmax over key blocks of
  :data:`CHUNK_K`, query blocks of :data:`CHUNK_Q`, float32 statistics) with a hand-written
  backward (``jax.custom_vjp``) that recomputes the blocks from the output and log-sum-exp, so
  neither pass keeps more than one (B, H, CHUNK_Q, CHUNK_K) block of scores. Runs on every
  backend; the CPU stand-in for a fused kernel in memory plans. Equal to ``"xla"``, including
  the uniform softmax of fully masked (padding) queries.
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention,
  NVIDIA GPUs, bf16/fp16, head_dim <= 256 on Hopper and a multiple of 8: the decoder's 128 and
  the vision tower's 80 both qualify; GQA native). Padding goes through sequence lengths, which
  cuDNN supports only as right padding: vision groups are right-padded by construction
  (``right_padded=True``); decoder rows (left-padded prompts, right-padded completions) are
  rolled so that each row's valid slots start at 0 (rope is already applied, so positions
  travel with the vectors) and run with ``is_causal`` + lengths, then rolled back. That is exact
  when each row's valid slots are one contiguous run, which every batch this project builds
  satisfies; a batch that does not is routed, at run time, to ``"chunked"`` (``lax.cond``).
  Queries offset against a longer key buffer (a KV cache) use a boolean mask (an additive bias
  inside cuDNN), which is exact for any mask.
- ``"splash"``: Pallas splash attention for TPU (``jax.experimental.pallas.ops.tpu``), padding
  as segment ids (valid = 1, padding = 0: a valid query sees exactly the valid keys, padding
  queries see padding keys), a causal mask object, GQA native; sequences padded to the
  128-multiple blocks and head_dim to 128 lanes; under an active mesh it runs inside
  ``jax.shard_map`` over the batch axes, as MaxText does. ``"splash_interpret"`` is the same
  path in the Pallas interpreter (CPU; tests only, slow). Queries offset against a longer key
  buffer (a KV cache) fall back to ``"chunked"``.
- ``"auto"``: ``"cudnn"`` on NVIDIA GPUs for bf16/fp16 inputs, ``"splash"`` on TPU,
  ``"chunked"`` otherwise (float32 on GPU included: cuDNN has no float32 flash kernel).

Choosing ``"cudnn"`` or ``"splash"`` on another platform raises ``ValueError`` naming it. The
platform is this process's backend, or, inside :func:`compile_target`, the devices an
ahead-of-time compile is for (``scripts/plan_memory.py --target=tpu:...`` / ``gpu:...``).
Library kernels only: jax's own cuDNN binding and the splash kernel shipped in jax; ``tokamax``
is not a dependency of this project.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax import sharding
from tatar_jax.sharding import constrain

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "CHUNK_K",
    "CHUNK_Q",
    "GatedMLP",
    "MASK_VALUE",
    "REMAT_POLICIES",
    "RMSNorm",
    "activation",
    "apply_rotary",
    "attention",
    "check_remat",
    "compile_target",
    "cos_sin",
    "dense",
    "inv_frequencies",
    "masked_softmax",
    "remat",
    "resolve_attention_impl",
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

    @classmethod
    def from_config(cls, cfg: Any, names: tuple[str, str], **kw: Any) -> GatedMLP:
        """The MLP of an HF config block, ``hidden_size`` → ``intermediate_size`` with
        ``hidden_act`` (the text and the vision config name them alike); ``kw``: the
        keyword-only arguments of the constructor."""
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, names, **kw)

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


# --- attention -----------------------------------------------------------------------------------

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash", "splash_interpret")
CHUNK_Q = 512  # "chunked": queries per block
CHUNK_K = 512  # "chunked": keys per block
_SPLASH_BLOCK = 128  # splash: sequence padding multiple (its default block sizes)
_LANES = 128  # splash: head_dim padding multiple (TPU lanes)
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# The platform :func:`resolve_attention_impl` decides for when none is passed: None = this
# process's backend; an ahead-of-time compile for other devices sets it (:func:`compile_target`).
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)
TARGET_PLATFORMS = ("cpu", "tpu", "cuda", "rocm")


@contextlib.contextmanager
def compile_target(platform: str | None) -> Iterator[None]:
    """Inside it, ``"auto"`` and the kernel checks of :func:`resolve_attention_impl` follow the
    devices being compiled for (``"tpu"``, ``"cuda"``: NVIDIA, ``"rocm"``, ``"cpu"``), not this
    host's backend: deviceless AOT plans build and lower the model inside it. None: the host."""
    if platform is not None and platform not in TARGET_PLATFORMS:
        raise ValueError(f"unknown target platform {platform!r}; choose one of {TARGET_PLATFORMS}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def _host_platform() -> str:
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    rocm = "rocm" in str(jax.devices()[0].client.platform_version).lower()
    return "rocm" if rocm else "cuda"


def resolve_attention_impl(
    impl: str, dtype: Any = jnp.bfloat16, platform: str | None = None
) -> str:
    """The implementation ``impl`` runs as for activations of ``dtype`` on ``platform``.

    ``platform``: "tpu" / "cuda" (NVIDIA) / "rocm" / "cpu"; None = the :func:`compile_target`
    in force, else this process's backend. ``"auto"`` becomes ``"cudnn"`` (NVIDIA, bf16/fp16),
    ``"splash"`` (TPU) or ``"chunked"``. Raises ``ValueError`` for an unknown name or a kernel
    that platform / dtype cannot run.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {list(ATTENTION_IMPLS)}")
    platform = platform or _TARGET.get() or _host_platform()
    half = jnp.dtype(dtype) in _HALF
    if impl == "auto":
        if platform == "cuda" and half:
            return "cudnn"
        return "splash" if platform == "tpu" else "chunked"
    if impl == "cudnn":
        if platform != "cuda":
            raise ValueError(
                f"attention_impl='cudnn' needs an NVIDIA GPU; the platform here is {platform!r} "
                "(use 'chunked', or 'auto')"
            )
        if not half:
            raise ValueError(
                f"attention_impl='cudnn' needs bfloat16/float16 activations, got "
                f"{jnp.dtype(dtype).name} (cuDNN has no float32 flash kernel; use 'chunked')"
            )
    if impl == "splash" and platform != "tpu":
        raise ValueError(
            f"attention_impl='splash' needs a TPU; the platform here is {platform!r} "
            "(use 'chunked', or 'auto')"
        )
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_valid: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    impl: str = "xla",
    right_padded: bool = False,
    q_chunk: int | None = None,
) -> jax.Array:
    """Grouped-query attention with a key mask and an optional causal order.

    q (B, L, H, hd); k, v (B, T, KV, hd) with H a multiple of KV; kv_valid (B, T) bool.
    ``q_positions`` None: every query sees every valid key; (L,) int: query ``i`` sees key slot
    ``j`` iff ``j <= q_positions[i]`` and ``kv_valid[b, j]``. ``right_padded``: the caller
    guarantees each ``kv_valid[b]`` is a prefix and L == T (lets cuDNN use lengths).
    ``q_chunk`` (``"xla"`` only): queries per ``jax.checkpoint``-ed chunk. Scale ``hd**-0.5``;
    scores and softmax statistics in float32. Returns (B, L, H, hd) in ``v.dtype``. A query
    with no visible key gets the mean of all values (as :func:`masked_softmax`), never NaN.
    """
    impl = resolve_attention_impl(impl, q.dtype)
    if impl == "xla":
        return _attention_xla(q, k, v, kv_valid, q_positions, q_chunk)
    if impl == "chunked":
        return _attention_chunked(q, k, v, kv_valid, q_positions)
    if impl == "cudnn":
        return _attention_cudnn(q, k, v, kv_valid, q_positions, right_padded)
    return _attention_splash(q, k, v, kv_valid, q_positions, impl == "splash_interpret")


def _allowed(kv_valid: jax.Array, q_positions: jax.Array | None, k_slots: jax.Array) -> jax.Array:
    """(B, T') key mask, (L,) positions, (T',) key slots → (B, L or 1, T') bool."""
    allowed = kv_valid[:, None, :]
    if q_positions is not None:
        allowed = allowed & (k_slots[None, :] <= q_positions[:, None])[None]
    return allowed


def _attention_xla(q, k, v, kv_valid, q_positions, q_chunk):
    b, length, h, hd = q.shape
    kvh = k.shape[2]
    k_slots = jnp.arange(k.shape[1])

    def attend(qi: jax.Array, pos: jax.Array | None) -> jax.Array:
        qg = qi.reshape(b, qi.shape[1], kvh, h // kvh, hd)
        scores = jnp.einsum("blkgd,btkd->bkglt", qg, k, preferred_element_type=jnp.float32)
        scores = scores * (hd**-0.5)
        probs = masked_softmax(scores, _allowed(kv_valid, pos, k_slots)[:, None, None], v.dtype)
        return jnp.einsum("bkglt,btkd->blkgd", probs, v).reshape(qi.shape)

    if q_chunk is None or length <= q_chunk:
        return attend(q, q_positions)
    # Only (B, H, q_chunk, T) scores are live, in the forward and the backward pass.
    n = -(-length // q_chunk)
    pad = n * q_chunk - length
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, q_chunk, h, hd)
    qc = jnp.moveaxis(qc, 1, 0)
    if q_positions is None:
        out = jax.lax.map(jax.checkpoint(lambda qi: attend(qi, None)), qc)
    else:
        pc = jnp.pad(q_positions, (0, pad)).reshape(n, q_chunk)
        out = jax.lax.map(jax.checkpoint(lambda a: attend(*a)), (qc, pc))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, h, hd)[:, :length]


# "chunked": key codes 0 = visible to the mask, 1 = masked (MASK_VALUE, as "xla"), 2 = block
# padding past T (-inf: absent, so a fully masked query averages exactly the T real values).
def _attention_chunked(q, k, v, kv_valid, q_positions):
    b, length, h, hd = q.shape
    t, kvh = k.shape[1], k.shape[2]
    bq, bk = min(CHUNK_Q, length), min(CHUNK_K, t)
    lp, tp = -(-length // bq) * bq, -(-t // bk) * bk
    qp = jnp.pad(q, ((0, 0), (0, lp - length), (0, 0), (0, 0))).reshape(b, lp, kvh, h // kvh, hd)
    kp = jnp.pad(k, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    codes = jnp.where(kv_valid, 0, 1).astype(jnp.int32)
    codes = jnp.pad(codes, ((0, 0), (0, tp - t)), constant_values=2)
    causal = q_positions is not None
    pos = jnp.zeros((length,), jnp.int32) if q_positions is None else q_positions
    pos = jnp.pad(pos.astype(jnp.int32), (0, lp - length))
    out = _flash(qp, kp, vp, codes, pos, causal, bq, bk)
    return out.reshape(b, lp, h, hd)[:, :length]


def _blocks(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """Splits ``axis`` into blocks of ``size`` and moves the block index to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x: jax.Array, axis: int = 1) -> jax.Array:
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _block_scores(qb, kb, codes, pos, k0, causal):
    """qb (B, bq, KV, G, hd), kb (B, bk, KV, hd), codes (B, bk), pos (bq,), k0 first key slot
    → masked float32 scores (B, KV, G, bq, bk) and the (B, 1, 1, bq|1, bk) visibility."""
    s = jnp.einsum("bqkgd,btkd->bkgqt", qb, kb, preferred_element_type=jnp.float32)
    s = s * (qb.shape[-1] ** -0.5)
    visible = (codes == 0)[:, None, :]
    if causal:
        slots = k0 + jnp.arange(kb.shape[1])
        visible = visible & (slots[None, :] <= pos[:, None])[None]
    visible = visible[:, None, None]
    s = jnp.where(visible, s, MASK_VALUE)
    return jnp.where((codes == 2)[:, None, None, None, :], -jnp.inf, s), visible


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, codes, pos, causal, bq, bk):
    return _flash_fwd(q, k, v, codes, pos, causal, bq, bk)[0]


def _flash_fwd(q, k, v, codes, pos, causal, bq, bk):
    """q (B, Lp, KV, G, hd), k/v (B, Tp, KV, hd) → out like q (v.dtype), residuals."""
    kb, vb, cb = _blocks(k, bk), _blocks(v, bk), _blocks(codes, bk)
    k0s = jnp.arange(kb.shape[0]) * bk
    b, _, kvh, g, hd = q.shape

    def one_q_block(args):
        qb, pb = args

        def step(carry, xs):
            m, denom, acc = carry
            kj, vj, cj, k0 = xs
            s, _ = _block_scores(qb, kj, cj, pb, k0, causal)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkgqt,btkd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32
            )
            return (m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + pv), None

        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, hd), jnp.float32),
        )
        (m, denom, acc), _ = jax.lax.scan(step, init, (kb, vb, cb, k0s))
        out = jnp.einsum("bkgqd->bqkgd", acc / denom[..., None]).astype(v.dtype)
        # (m, denom) rather than m + log(denom): for a fully masked query m is MASK_VALUE, at
        # which float32 cannot represent the log term.
        return out, (m, denom)

    out, stats = jax.lax.map(one_q_block, (_blocks(q, bq), _blocks(pos, bq, 0)))
    out = _unblocks(out)  # (B, Lp, KV, G, hd)
    return out, (q, k, v, codes, pos, out, stats)


def _flash_bwd(causal, bq, bk, res, dout):
    q, k, v, codes, pos, out, stats = res  # stats: max, denominator (nq, B, KV, G, bq)
    f32 = jnp.float32
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(f32), out.astype(f32))
    qb, dob, pb = _blocks(q, bq), _blocks(dout, bq), _blocks(pos, bq, 0)
    db = _blocks(delta, bq, 3)
    kb, vb, cb = _blocks(k, bk), _blocks(v, bk), _blocks(codes, bk)
    k0s = jnp.arange(kb.shape[0]) * bk

    def grads_s(qi, doi, stats_i, di, pi, kj, vj, cj, k0):
        s, visible = _block_scores(qi, kj, cj, pi, k0, causal)
        p = jnp.exp(s - stats_i[0][..., None]) / stats_i[1][..., None]
        dp = jnp.einsum("bqkgd,btkd->bkgqt", doi, vj, preferred_element_type=f32)
        # Masked scores are constants in "xla": no gradient reaches them.
        ds = jnp.where(visible, p * (dp - di[..., None]), 0.0) * (q.shape[-1] ** -0.5)
        return p, ds

    def dq_block(args):
        qi, doi, stats_i, di, pi = args

        def step(dq, xs):
            kj, vj, cj, k0 = xs
            _, ds = grads_s(qi, doi, stats_i, di, pi, kj, vj, cj, k0)
            return dq + jnp.einsum("bkgqt,btkd->bqkgd", ds, kj, preferred_element_type=f32), None

        dq, _ = jax.lax.scan(step, jnp.zeros(qi.shape, f32), (kb, vb, cb, k0s))
        return dq.astype(q.dtype)

    def dkv_block(args):
        kj, vj, cj, k0 = args

        def step(carry, xs):
            dk, dv = carry
            qi, doi, stats_i, di, pi = xs
            p, ds = grads_s(qi, doi, stats_i, di, pi, kj, vj, cj, k0)
            dv = dv + jnp.einsum(
                "bkgqt,bqkgd->btkd", p.astype(doi.dtype), doi, preferred_element_type=f32
            )
            return (
                dk + jnp.einsum("bkgqt,bqkgd->btkd", ds, qi, preferred_element_type=f32),
                dv,
            ), None

        init = (jnp.zeros(kj.shape, f32), jnp.zeros(vj.shape, f32))
        (dk, dv), _ = jax.lax.scan(step, init, (qb, dob, stats, db, pb))
        return dk.astype(k.dtype), dv.astype(v.dtype)

    dq = _unblocks(jax.lax.map(dq_block, (qb, dob, stats, db, pb)))
    dk, dv = jax.lax.map(dkv_block, (kb, vb, cb, k0s))
    return dq, _unblocks(dk), _unblocks(dv), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# jax.nn.dot_product_attention's implementation for "cudnn". Tests set "xla" (jax's reference
# implementation of the same call and arguments) to check the padding logic below on CPU.
_DPA_IMPL = "cudnn"


def _same_sharding(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, ...]:
    """q, k, v constrained to one sharding (batch over the batch axes, heads over the tensor
    axis when both head counts divide it, else replicated heads), as jax's cuDNN partitioner
    requires: left to propagation, the backward's q / k / v can come out sharded differently
    ("Query, key and value should have same sharding") on 2-device meshes. Identity outside
    ``sharding.use_rules``."""
    active = sharding.active()
    if active is None:
        return q, k, v
    mesh, rules = active
    q_spec = sharding.logical_to_pspec(_CUDNN_Q, rules, mesh=mesh, shape=q.shape)
    kv_spec = sharding.logical_to_pspec(_CUDNN_KV, rules, mesh=mesh, shape=k.shape)
    if tuple(q_spec) != tuple(kv_spec):  # one head count does not divide: replicate heads
        q_spec = kv_spec = sharding.logical_to_pspec(
            _CUDNN_Q[:2], rules, mesh=mesh, shape=q.shape[:2]
        )
    put = lambda x, spec: jax.lax.with_sharding_constraint(  # noqa: E731
        x, jax.sharding.NamedSharding(mesh, spec)
    )
    return put(q, q_spec), put(k, kv_spec), put(v, kv_spec)


_CUDNN_Q = ("batch", None, "q_heads", None)
_CUDNN_KV = ("batch", None, "kv_heads", None)


def _attention_cudnn(q, k, v, kv_valid, q_positions, right_padded):
    def dpa(q, k, v, **kw):
        q, k, v = _same_sharding(q, k, v)
        return jax.nn.dot_product_attention(q, k, v, implementation=_DPA_IMPL, **kw)

    b, length, t = q.shape[0], q.shape[1], k.shape[1]
    if q_positions is None and right_padded:
        # (a group with no real row gets length 1: its output is never read, and never NaN)
        lens = jnp.maximum(kv_valid.sum(-1), 1).astype(jnp.int32)
        return dpa(q, k, v, query_seq_lengths=lens, key_value_seq_lengths=lens)
    if q_positions is None or length != t:
        # Exact for any mask; cuDNN turns it into an additive bias (no causal block skipping).
        allowed = _allowed(kv_valid, q_positions, jnp.arange(t))
        return dpa(q, k, v, mask=jnp.broadcast_to(allowed[:, None], (b, 1, length, t)))
    slots = jnp.arange(t)
    start = jnp.argmax(kv_valid, axis=-1).astype(jnp.int32)
    n = kv_valid.sum(-1).astype(jnp.int32)
    run = (slots[None] >= start[:, None]) & (slots[None] < (start + n)[:, None])
    exact = jnp.all(run == kv_valid) & jnp.all(q_positions == slots)
    n = jnp.maximum(n, 1)

    def rolled(q, k, v):
        idx = (slots[None] + start[:, None]) % t  # rolled slot i holds slot start + i

        def take(x, index):
            return jnp.take_along_axis(x, index[:, :, None, None], axis=1)

        o = dpa(
            take(q, idx), take(k, idx), take(v, idx),
            is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
        )  # fmt: skip
        return take(o, (slots[None] - start[:, None]) % t)

    def fallback(q, k, v):
        return _attention_chunked(q, k, v, kv_valid, q_positions)

    return jax.lax.cond(exact, rolled, fallback, q, k, v)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, interpret: bool) -> Any:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    one = sa.CausalMask((lq, lk)) if causal else sa.FullMask((lq, lk))
    mask = sa.MultiHeadMask([one] * heads)
    # Built once per shape and cached: its mask tables must be constants, not tracers.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _attention_splash(q, k, v, kv_valid, q_positions, interpret):
    b, length, h, hd = q.shape
    t = k.shape[1]
    if length != t:  # an offset causal order (a KV cache) is not a splash mask: stay exact
        return _attention_chunked(q, k, v, kv_valid, q_positions)
    causal = q_positions is not None
    fn = functools.partial(_splash_per_shard, causal=causal, interpret=interpret)
    active = sharding.active()
    if active is not None:  # Pallas kernels are not auto-partitioned: one call per shard
        mesh, rules = active
        spec = sharding.logical_to_pspec(("batch",), rules, mesh=mesh, shape=(b,))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    if not causal:
        return fn(q, k, v, kv_valid)
    return jax.lax.cond(
        jnp.all(q_positions == jnp.arange(t)),
        fn,
        lambda q, k, v, valid: _attention_chunked(q, k, v, valid, q_positions),
        q, k, v, kv_valid,
    )  # fmt: skip


def _splash_per_shard(q, k, v, kv_valid, *, causal, interpret):
    """Splash on this shard's rows: q (b, L, H, hd), k/v (b, L, KV, hd), kv_valid (b, L)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, length, h, hd = q.shape
    lp = -(-length // _SPLASH_BLOCK) * _SPLASH_BLOCK
    dp = -(-hd // _LANES) * _LANES

    def prep(x: jax.Array, scale: float = 1.0) -> jax.Array:
        x = jnp.pad(
            x * jnp.asarray(scale, x.dtype), ((0, 0), (0, lp - length), (0, 0), (0, dp - hd))
        )
        return jnp.swapaxes(x, 1, 2)  # (b, heads, Lp, dp)

    seg = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, lp - length)))
    kernel = _splash_kernel(h, lp, lp, causal, interpret)
    out = jax.vmap(kernel)(prep(q, hd**-0.5), prep(k), prep(v), SegmentIds(q=seg, kv=seg))
    return jnp.swapaxes(out, 1, 2)[:, :length, :, :hd].astype(v.dtype)
