"""Token log-probabilities from hidden states without materialising (tokens x vocab) logits.

Qwen2.5-VL's vocabulary has 152k entries: for a GRPO batch of 128 completions x 256 tokens
the full float32 logits array alone is 20 GB, and its gradient the same again. Everything
here works on chunks of ``chunk_size`` tokens: a chunk's logits ``h @ W`` are computed
(float32 accumulation, whatever the input dtype), reduced to the log-sum-exp, the target
logit and optionally the entropy, and dropped. A ``jax.custom_vjp`` recomputes each chunk's
logits in the backward pass, so the backward pass is chunked too, and accumulates the
lm_head gradient in float32 across chunks.

Peak extra memory is O(chunk_size x vocab) float32 instead of O(tokens x vocab).

Conventions
- ``hidden``: (..., D) final hidden states (after the last norm, before the lm_head),
  any float dtype.
- ``weight``: the lm_head as a (D, V) kernel (flax ``nnx.Linear`` layout) or, with
  ``weight_layout="vd"``, a (V, D) matrix (HF ``lm_head.weight`` / tied embedding layout).
- ``targets``: (...) int token ids. Negative ids are *ignore labels* (HF's -100): their
  log-prob and entropy are 0 and they receive no gradient. Ids >= V are a caller bug and
  give NaN, so they cannot pass unnoticed into a loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 1024


def _logits_chunk(h: jax.Array, w: jax.Array, layout: str, inv_temp: float) -> jax.Array:
    """(C, D) x weight -> (C, V) float32 logits (float32 accumulation of bf16 inputs)."""
    spec = "cd,dv->cv" if layout == "dv" else "cd,vd->cv"
    z = jnp.einsum(spec, h, w, preferred_element_type=jnp.float32)
    if inv_temp != 1.0:
        z = z * jnp.float32(inv_temp)
    return z


def _chunk_stats(h, w, t, layout, inv_temp, vocab):
    """Per-chunk forward: target log-prob, entropy, and log-sum-exp (a backward residual)."""
    z = _logits_chunk(h, w, layout, inv_temp)
    lse = jax.nn.logsumexp(z, axis=-1)
    valid = (t >= 0) & (t < vocab)
    t_safe = jnp.clip(t, 0, vocab - 1)
    z_t = jnp.take_along_axis(z, t_safe[:, None], axis=-1)[:, 0]
    logp = jnp.where(t >= vocab, jnp.nan, jnp.where(valid, z_t - lse, 0.0))
    p = jnp.exp(z - lse[:, None])
    # Entropy H = lse - sum_v p_v z_v; ignore-label rows report 0 like their log-prob.
    ent = jnp.where(t >= 0, lse - jnp.sum(p * z, axis=-1), 0.0)
    return logp, ent, lse


def _to_chunks(x: jax.Array, chunk: int, n_pad: int) -> jax.Array:
    if n_pad:
        pad = [(0, n_pad)] + [(0, 0)] * (x.ndim - 1)
        # Padding rows get target -1 (ignored) and zero hidden states; they are cut off afterwards.
        x = jnp.pad(x, pad, constant_values=-1 if jnp.issubdtype(x.dtype, jnp.integer) else 0)
    return x.reshape((-1, chunk) + x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(h, w, t, chunk, layout, inv_temp):
    out, _ = _chunked_fwd(h, w, t, chunk, layout, inv_temp)
    return out


def _chunked_fwd(h, w, t, chunk, layout, inv_temp):
    n = h.shape[0]
    vocab = w.shape[1] if layout == "dv" else w.shape[0]
    n_pad = (-n) % chunk
    hc, tc = _to_chunks(h, chunk, n_pad), _to_chunks(t, chunk, n_pad)

    def body(_, xs):
        return None, _chunk_stats(xs[0], w, xs[1], layout, inv_temp, vocab)

    _, (logp, ent, lse) = jax.lax.scan(body, None, (hc, tc))
    logp, ent, lse = (a.reshape(-1)[:n] for a in (logp, ent, lse))
    return (logp, ent), (h, w, t, lse)


def _chunked_bwd(chunk, layout, inv_temp, res, g):
    h, w, t, lse = res
    g_logp, g_ent = g
    n = h.shape[0]
    vocab = w.shape[1] if layout == "dv" else w.shape[0]
    n_pad = (-n) % chunk
    hc, tc = _to_chunks(h, chunk, n_pad), _to_chunks(t, chunk, n_pad)
    lc = _to_chunks(lse, chunk, n_pad)
    glc = _to_chunks(g_logp.astype(jnp.float32), chunk, n_pad)
    gec = _to_chunks(g_ent.astype(jnp.float32), chunk, n_pad)

    def body(dw, xs):
        hb, tb, lb, gl, ge = xs
        z = _logits_chunk(hb, w, layout, inv_temp)
        logp_all = z - lb[:, None]
        p = jnp.exp(logp_all)
        valid = (tb >= 0) & (tb < vocab)
        onehot = jax.nn.one_hot(jnp.where(valid, tb, -1), vocab, dtype=jnp.float32)
        gl = jnp.where(valid, gl, 0.0)
        ge = jnp.where(tb >= 0, ge, 0.0)
        ent = -jnp.sum(p * logp_all, axis=-1)
        # d logp_t / dz = onehot - p ;  dH / dz = -p * (log p + H)
        dz = gl[:, None] * (onehot - p) - ge[:, None] * p * (logp_all + ent[:, None])
        dz = dz * jnp.float32(inv_temp)
        if layout == "dv":
            dh = jnp.einsum("cv,dv->cd", dz, w.astype(jnp.float32))
            dw = dw + jnp.einsum("cd,cv->dv", hb.astype(jnp.float32), dz)
        else:
            dh = jnp.einsum("cv,vd->cd", dz, w.astype(jnp.float32))
            dw = dw + jnp.einsum("cd,cv->vd", hb.astype(jnp.float32), dz)
        return dw, dh.astype(h.dtype)

    dw0 = jnp.zeros(w.shape, jnp.float32)
    dw, dhc = jax.lax.scan(body, dw0, (hc, tc, lc, glc, gec))
    dh = dhc.reshape((-1,) + h.shape[1:])[:n]
    return dh, dw.astype(w.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_layout: str = "dv",
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log softmax(hidden @ W / temperature)[targets], computed in token chunks.

    Args:
      hidden: (..., D) hidden states, e.g. (N, D) or (B, L, D). bf16 or f32.
      weight: (D, V) lm_head kernel, or (V, D) with ``weight_layout="vd"``.
      targets: (...) int ids matching ``hidden.shape[:-1]``; negative = ignore (0 returned).
      chunk_size: tokens per chunk (extra memory ~ chunk_size x V x 4 bytes, 2x in backward).
      weight_layout: "dv" or "vd".
      temperature: logits are divided by it (GRPO scores completions at the sampling temperature).
      return_entropy: also return the per-token entropy of the distribution.

    Returns:
      float32 log-probs of shape ``targets.shape`` (and float32 entropies of the same shape).
      Differentiable w.r.t. ``hidden`` and ``weight``; gradients are computed chunk by chunk.
    """
    if weight_layout not in ("dv", "vd"):
        raise ValueError(f"weight_layout must be 'dv' or 'vd', got {weight_layout!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} disagree")
    d = hidden.shape[-1]
    d_w = weight.shape[0] if weight_layout == "dv" else weight.shape[1]
    if d != d_w:
        raise ValueError(f"hidden size {d} != lm_head input size {d_w} (layout {weight_layout})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    n = h.shape[0]
    chunk = max(1, min(int(chunk_size), n))
    logp, ent = _chunked(h, weight, t, chunk, weight_layout, 1.0 / float(temperature))
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, ent.reshape(lead)
    return logp
