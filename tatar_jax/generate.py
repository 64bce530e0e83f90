"""Rollout engine: KV-cache generation for Qwen2.5-VL, G samples per prompt from one prefill.

```python
from tatar_jax import generate
out = generate.generate(model, input_ids, attention_mask, pixel_values=pv, image_grid_thw=thw,
                        max_new_tokens=256, num_samples=8, temperature=1.0, top_k=50,
                        stop_token_ids=(151645, 151643), rng=jax.random.key(0))
out.tokens  # (B*G, max_new_tokens) int32, the G samples of prompt b are rows b*G .. b*G+G-1
out.mask    # (B*G, max_new_tokens) bool, up to and including the first stop token
out.logps   # (B*G, max_new_tokens) float32, log-prob of each token (see ``logprobs`` below)
```

How a call runs (all device work under ``jax.jit``, static shapes):

1. host: mRoPE positions and rope deltas (:func:`rope.get_rope_index`), the prompt left-padded to a
   length bucket, the vision layout for a patch-count bucket (:mod:`vision_layout`).
2. ``prefill`` (one program per (batch, prompt bucket, patch bucket)): the vision tower runs once
   per image, the prompt is written once per prompt into a cache of ``bucket`` slots, the last
   position's logits give the first token of each of the G samples. The decode cache
   (:class:`~tatar_jax.models.qwen2_5_vl.language.SampleCache`) is that one prompt KV (B rows)
   plus ``max_new_tokens`` generation slots per sample (B*G rows, samples of a prompt contiguous,
   as ``num_return_sequences`` in transformers): the prompt KV is never repeated G times.
3. ``decode`` (one program per (rows, cache shape)): ``lax.while_loop`` over single-token steps,
   the cache donated and carried: each layer writes its new key/value at the current generation
   slot in place (``dynamic_update_slice`` on the loop/scan carry, no per-step rebuild) and
   attends its prompt's KV (queries viewed as (B, G, ...): no gather, no copy) plus its own
   generated slots, the two softmaxes merged exactly by their log-sum-exp
   (:func:`~tatar_jax.models.qwen2_5_vl.language.decode_attention`, float32 scores). The loop
   leaves once every row has emitted a stop token. Generated token
   ``s`` of a row sits at mRoPE position ``num_prompt_tokens + s + rope_delta`` on all three axes,
   exactly as transformers' ``generate`` continues it.

Sampling (transformers' order): logits / temperature → top-k → top-p → categorical draw with an
independent key per row and step (``fold_in(split(rng, B*G)[row], step)``); ``temperature == 0``
is greedy (argmax). With top-k the draw is among the ``lax.top_k`` candidates (see
:func:`sample_tokens`). Finished rows keep running (static shapes: compacting rows or refilling
them with the next prompts would change the compiled shapes or the per-prompt grouping of the
shared KV) but their tokens are ``pad_token_id``, their mask False, their logps 0; the loop
exits as soon as every row is done.

``logprobs`` — what ``out.logps`` holds for the chosen token:

- ``"tempered"`` (default): ``log_softmax(logits / T)`` (``T = 1`` when greedy), *without* the
  top-k/top-p truncation. This is exactly what the GRPO loss computes for π_θ
  (:func:`tatar_jax.logprobs.token_logprobs` with ``temperature=T``), so with μ = 1 the rollout's
  values are π_old and the ratio is 1 up to numerics; with T = 1 (the reference, B11 aside) they
  are the unmodified model's log-probs.
- ``"raw"``: ``log_softmax(logits)`` whatever the temperature.
- ``"policy"``: the log-prob under the distribution actually sampled from (after temperature,
  top-k and top-p renormalisation); greedy rows get 0.

:class:`Sampler` keeps the compiled programs and takes new weights without recompiling (the
parameters are an argument of the jitted functions, not constants).

Data parallelism (``mesh=``): with a :class:`jax.sharding.Mesh` (``tatar_jax.sharding.make_mesh``)
and a rules table, the prompt rows, the KV cache (``sharding.KV_CACHE_NAMES``) and every per-row
output are split over the batch axes (``"batch"`` rule, e.g. ``("data", "fsdp")``), the weights
are the rollout's copy (:meth:`Sampler.place_state`: compute dtype, placed per
``sharding.state_shardings`` of the sampler's rules, e.g. replicated: no all-gather per token),
pixel values / vision layout / key are replicated, and the model's activation constraints are on
(``sharding.use_rules``). A batch that the batch shards do not divide is padded with one-token
text rows (dropped from the outputs), so any batch size works; the G samples of a prompt stay
contiguous and on the shard of their prompt's KV. Results equal the unsharded ones: the per-row
keys ``split(rng, B*G)[row]`` do not depend on the batch size or the sharding (partitionable
threefry), so greedy and sampled tokens are the same. A mesh spanning several processes takes the
same whole batch on every process (outputs are global arrays; gather them with
``multihost_utils.process_allgather``); evaluation instead gives every process its own rows and a
mesh of its local devices (:mod:`tatar_jax.evaluation.runner`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax import sharding as sharding_mod
from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.models.qwen2_5_vl.language import SampleCache
from tatar_jax.models.qwen2_5_vl.vision_layout import VisionBucket, vision_bucket, vision_layout

__all__ = [
    "GenerateOutput",
    "LOGPROB_MODES",
    "SamplingParams",
    "Sampler",
    "generate",
    "next_bucket",
    "sample_tokens",
    "warp_logits",
]

LOGPROB_MODES = ("tempered", "raw", "policy")
IM_END_ID = 151645  # <|im_end|> of the Qwen2.5-VL tokenizer
ENDOFTEXT_ID = 151643  # <|endoftext|>


class GenerateOutput(NamedTuple):
    """tokens (N, S) int32, mask (N, S) bool, logps (N, S) float32; N = B * num_samples."""

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Everything that fixes the compiled decode program (hashable).

    temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters; ``stop_token_ids``
    end a row (the stop token itself is kept and masked in); ``pad_token_id`` fills the rest.
    """

    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = (IM_END_ID, ENDOFTEXT_ID)
    pad_token_id: int = 0
    logprobs: str = "tempered"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs not in LOGPROB_MODES:
            raise ValueError(f"logprobs must be one of {LOGPROB_MODES}, got {self.logprobs!r}")


# --------------------------------------------------------------------------------------------
# Sampling (pure, jittable)


def _top_p_sorted(srt: jax.Array, top_p: float) -> jax.Array:
    """srt (..., K) scores sorted descending → the same with tokens outside the nucleus at -inf
    (kept: the most likely tokens until their mass reaches ``top_p``, at least one)."""
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = (before < jnp.float32(top_p)).at[..., 0].set(True)
    return jnp.where(keep, srt, -jnp.inf)


def warp_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """(..., V) logits → float32 scores with filtered tokens at -inf, as transformers'
    ``TemperatureLogitsWarper`` → ``TopKLogitsWarper`` → ``TopPLogitsWarper`` (ties at the top-k
    threshold are kept; top-p keeps the smallest set of most likely tokens whose mass reaches
    ``top_p``, at least one). ``temperature`` must be > 0 here. (The decode loop samples top-k
    from the k candidates directly, see :func:`sample_tokens`; this full-vocabulary form is the
    reference semantics and the top-p-only path.)"""
    z = logits.astype(jnp.float32) / jnp.float32(temperature)
    vocab = z.shape[-1]
    k = min(int(top_k), vocab) if top_k else 0
    if k:
        top_vals = jax.lax.top_k(z, k)[0]  # (..., k) descending
        z = jnp.where(z < top_vals[..., -1:], -jnp.inf, z)
    if top_p < 1.0:
        srt = top_vals if k else jnp.flip(jnp.sort(z, axis=-1), axis=-1)
        # Threshold = smallest kept score; equal scores are kept (HF's sort order is arbitrary
        # there, so only exact ties could differ).
        kept = _top_p_sorted(srt, top_p)
        thresh = jnp.min(jnp.where(jnp.isfinite(kept), srt, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < thresh, -jnp.inf, z)
    return z


def sample_tokens(
    logits: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """logits (N, V), keys (N,) typed PRNG keys → tokens (N,) int32 and their logps (N,) float32
    (``params.logprobs`` decides which log-prob, see the module docstring).

    With top-k the draw is among the ``k`` candidates of ``lax.top_k`` (top-p applied to them):
    the same distribution as :func:`warp_logits` except that tokens tied *exactly* with the k-th
    score beyond the first k are not candidates, and ~50x cheaper on CPU than masking the full
    vocabulary (XLA then sorts all V scores).
    """
    logits = logits.astype(jnp.float32)
    greedy = params.temperature == 0.0
    k = min(params.top_k, logits.shape[-1])
    policy_lp = None
    if greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif k:
        vals, idx = jax.lax.top_k(logits / jnp.float32(params.temperature), k)
        if params.top_p < 1.0:
            vals = _top_p_sorted(vals, params.top_p)
        choice = jax.vmap(jax.random.categorical)(keys, vals)
        tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        lsm = jax.nn.log_softmax(vals, axis=-1)
        policy_lp = jnp.take_along_axis(lsm, choice[:, None], axis=-1)[:, 0]
    else:
        scores = warp_logits(logits, params.temperature, 0, params.top_p)
        tok = jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32)
        lsm = jax.nn.log_softmax(scores, axis=-1)
        policy_lp = jnp.take_along_axis(lsm, tok[:, None], axis=-1)[:, 0]
    if params.logprobs == "policy":
        return tok, (jnp.zeros(tok.shape, jnp.float32) if greedy else policy_lp)
    if params.logprobs == "raw" or greedy:
        base = logits
    else:  # tempered
        base = logits / jnp.float32(params.temperature)
    lp = jnp.take_along_axis(jax.nn.log_softmax(base, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp


# --------------------------------------------------------------------------------------------
# Buckets (host)


def next_bucket(n: int, buckets: Sequence[int] | None, multiple: int) -> int:
    """Smallest entry of ``buckets`` >= n, or n rounded up to a multiple of ``multiple``."""
    if buckets:
        for b in sorted(buckets):
            if b >= n:
                return int(b)
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")
    return -(-int(n) // multiple) * multiple


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _patch_bucket(grid: np.ndarray, vcfg: Any, patch_buckets: Sequence[int] | None) -> VisionBucket:
    """Patch budget from ``patch_buckets`` (else the next power of two), windows/segments as
    :func:`vision_bucket` rounds them, the segment length rounded up to a power-of-two number of
    windows so images of similar size share a program."""
    unit = vcfg.spatial_merge_size**2
    n = int(np.prod(grid, axis=-1).sum())
    p = next_bucket(n, patch_buckets, unit) if patch_buckets else max(_pow2(n), unit)
    if p % unit:
        raise ValueError(f"patch bucket {p} is not a multiple of spatial_merge_size**2={unit}")
    b = vision_bucket(grid, vcfg, p)
    units = -(-b.segment_len // _window_len(vcfg))
    seg_len = min(_pow2(units) * _window_len(vcfg), max(p, b.segment_len))
    return VisionBucket(p, b.num_windows, b.num_segments, seg_len)


def _window_len(vcfg: Any) -> int:
    from tatar_jax.models.qwen2_5_vl.vision_layout import window_len

    return window_len(vcfg)


# --------------------------------------------------------------------------------------------
# The engine


class _Carry(NamedTuple):
    cache: SampleCache  # one prompt KV per prompt + max_new_tokens generation slots per row
    prompt_mask: jax.Array  # (B, P) valid prompt slots
    tokens: jax.Array  # (N, S) int32
    logps: jax.Array  # (N, S) float32
    mask: jax.Array  # (N, S) bool
    last: jax.Array  # (N,) int32, the token fed at the next step
    done: jax.Array  # (N,) bool, a stop token has been emitted
    num_valid: jax.Array  # (N,) int32, real prompt tokens
    deltas: jax.Array  # (N,) int32 rope deltas
    keys: jax.Array  # (N,) typed keys, one stream per row
    step: jax.Array  # () int32, next output column


def _as_key(rng: Any) -> jax.Array:
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng.astype(jnp.uint32))  # legacy PRNGKey (2,) uint32


class Sampler:
    """Compiled prefill/decode programs for one model architecture and one :class:`SamplingParams`.

    ``Sampler(model, params)`` splits the model into a graph definition (static) and its state
    (an argument of the jitted functions): :meth:`update` swaps in new weights — an ``nnx.Module``
    of the same architecture or an ``nnx.State`` — without recompiling.

    Args:
      model: a :class:`Qwen2_5_VLForConditionalGeneration`.
      params: sampling configuration (fixed per sampler: it shapes the compiled programs).
      prompt_buckets: allowed padded prompt lengths; None rounds up to ``prompt_multiple``.
      patch_buckets: allowed patch budgets; None rounds up to the next power of two.
      cache_dtype: KV cache dtype (default: the model's activation dtype).
      weights_dtype: dtype of the rollout's copy of the floating weights (default: the model's
        activation dtype; see :meth:`place_state`).
      mesh: shard the batch (and KV cache) over this mesh's batch axes and place the weights on
        it (see the module docstring); None = jit's default placement (one device).
      rules: logical-axis rules table for ``mesh`` (default ``sharding.DEFAULT_RULES``).
    """

    def __init__(
        self,
        model: nnx.Module,
        params: SamplingParams = SamplingParams(),
        *,
        prompt_buckets: Sequence[int] | None = None,
        prompt_multiple: int = 64,
        patch_buckets: Sequence[int] | None = None,
        cache_dtype: Any = None,
        weights_dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding_mod.LogicalRules | None = None,
    ) -> None:
        self.config = model.config
        self.mesh = mesh
        self.rules = (rules or sharding_mod.DEFAULT_RULES) if mesh is not None else rules
        self.params = params
        self.prompt_buckets = tuple(prompt_buckets) if prompt_buckets else None
        self.prompt_multiple = int(prompt_multiple)
        self.patch_buckets = tuple(patch_buckets) if patch_buckets else None
        self.cache_dtype = cache_dtype or model.dtype
        # The rollout's weights are a copy in the compute dtype (bf16 weights of an fp32-master
        # policy): half the bytes read per decoded token, same results (the layers cast their
        # parameters to the compute dtype anyway).
        self.weights_dtype = jnp.dtype(weights_dtype or model.dtype)
        self.graphdef, self.state = nnx.split(model)
        self.trace_counts: collections.Counter[str] = collections.Counter()
        # output columns filled by the last call (device scalar): < max_new_tokens when every
        # row stopped early and the loop left.
        self.last_num_steps: jax.Array | None = None
        if mesh is None:
            self._prefill = jax.jit(self._prefill_fn)
            self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        else:
            # (weights are placed on first use, so that generate() never copies them twice)
            self._state_shardings = sharding_mod.state_shardings(self.state, mesh, self.rules)
            rep = sharding_mod.replicated(mesh)
            carry_sh = self._carry_shardings()
            rows = self._rows_sharding
            out_sh = GenerateOutput(rows(2), rows(2), rows(2))
            # ids, mask (B, L); positions (3, B, L); deltas (B, 1); pixels / layout / key replicated
            in_sh = (None, rows(2), rows(2), self._pos_sharding(), rows(2), rep, rep, rep)
            self._prefill = jax.jit(self._prefill_fn, in_shardings=in_sh, out_shardings=carry_sh)
            self._decode = jax.jit(
                self._decode_fn,
                in_shardings=(None, carry_sh),
                out_shardings=(out_sh, carry_sh.cache, rep),
                donate_argnums=(1,),
            )

    # --- placement (mesh only) ----------------------------------------------------------------
    @property
    def num_batch_shards(self) -> int:
        """Devices the batch is split over (1 without a mesh)."""
        if self.mesh is None:
            return 1
        axes = sharding_mod.logical_to_pspec(("batch",), self.rules, mesh=self.mesh)[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(self.mesh.shape[a] for a in axes)

    def _rows_sharding(self, ndim: int) -> jax.sharding.NamedSharding:
        return sharding_mod.batch_sharding(self.mesh, ndim, self.rules)

    def _pos_sharding(self) -> jax.sharding.NamedSharding:
        spec = sharding_mod.logical_to_pspec(("batch",), self.rules, mesh=self.mesh)
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, spec[0]))

    def _carry_shardings(self) -> _Carry:
        t = self.config.text
        # Only the divisibility of kv_heads matters here (batch is padded to the shard count,
        # cache_length is never split by the built-in tables): a representative shape.
        shape = (t.num_hidden_layers, self.num_batch_shards, 1, t.num_key_value_heads, t.head_dim)
        kv = sharding_mod.named_sharding(
            self.mesh, sharding_mod.KV_CACHE_NAMES, self.rules, shape=shape
        )
        rep = sharding_mod.replicated(self.mesh)
        rows = self._rows_sharding
        return _Carry(
            cache=SampleCache(kv, kv, kv, kv, rep),
            prompt_mask=rows(2),
            tokens=rows(2),
            logps=rows(2),
            mask=rows(2),
            last=rows(1),
            done=rows(1),
            num_valid=rows(1),
            deltas=rows(1),
            keys=rows(1),
            step=rep,
        )

    def _global_inputs(self, ids, mask, pos, deltas, pv, layout, key) -> tuple[Any, ...]:
        """Host arrays -> global arrays on a mesh spanning several processes. Every process
        passes the same whole batch (same prompts, same buckets); each keeps its shards."""
        rows, rep = self._rows_sharding, sharding_mod.replicated(self.mesh)

        def glob(x: Any, sh: jax.sharding.Sharding) -> Any:
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

        pv = None if pv is None else glob(pv, rep)
        layout = None if layout is None else jax.tree.map(lambda a: glob(a, rep), layout)
        return (
            glob(ids, rows(2)),
            glob(mask, rows(2)),
            glob(pos, self._pos_sharding()),
            glob(deltas, rows(2)),
            pv,
            layout,
            jax.random.wrap_key_data(
                glob(jax.random.key_data(key), rep), impl=jax.random.key_impl(key)
            ),
        )

    def place_state(self, state: Any) -> Any:
        """The rollout's copy of ``state`` (policy parameters in any dtype and layout): floating
        leaves cast to :attr:`weights_dtype` (the compute dtype) and, with a mesh, placed per
        the sampler's rules (``sharding.state_shardings``: replicated / tensor-parallel as its
        rules say), so that the decode loop never all-gathers a parameter. Leaves already in
        that form are kept as they are (no copy); the others are cast where they live, then
        moved (one all-gather per call for FSDP-sharded training weights)."""
        if state is None:
            return None
        dt = self.weights_dtype

        def convert(x: Any, sh: Any) -> Any:
            want = dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            if isinstance(x, jax.ShapeDtypeStruct):  # abstract (AOT plans)
                return jax.ShapeDtypeStruct(x.shape, want, sharding=sh or x.sharding)
            placed = sh is None or (
                isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, np.ndim(x))
            )
            if x.dtype == want and placed:
                return x
            x = x.astype(want) if isinstance(x, jax.Array) else np.asarray(x).astype(want)
            return x if sh is None else jax.device_put(x, sh)

        if self.mesh is None:
            return jax.tree.map(lambda x: convert(x, None), state)
        return jax.tree.map(convert, state, self._state_shardings)

    def update(self, model_or_state: Any) -> None:
        """New weights (same architecture): an ``nnx.Module`` or the ``nnx.State`` of one, in
        any dtype and sharding; converted once here to the rollout's copy (:meth:`place_state`).
        The compiled programs are reused (same shapes, dtypes and shardings)."""
        if isinstance(model_or_state, nnx.Module):
            graphdef, state = nnx.split(model_or_state)
            if graphdef != self.graphdef:
                raise ValueError("update() got a model of a different structure than the sampler's")
            self.state = self.place_state(state)
        else:
            self.state = self.place_state(model_or_state)

    # --- jitted bodies ------------------------------------------------------------------------
    def _prefill_fn(self, state, ids, mask, pos, deltas, pixel_values, layout, key) -> _Carry:
        self.trace_counts["prefill"] += 1
        p = self.params
        model = nnx.merge(self.graphdef, state)
        b, length = ids.shape
        cache = model.init_cache(b, length, self.cache_dtype)  # the prompt slots only
        # Only the last position's logits are needed: never build (B, L, V).
        h, cache = model.hidden_states(
            ids,
            None,
            pixel_values,
            position_ids=pos,
            vision_layout=layout,
            cache=cache,
            cache_attention_mask=mask,
        )
        logits = model.logits_from_hidden(h[:, -1]).astype(jnp.float32)
        g = p.num_samples
        rep = (lambda x: jnp.repeat(x, g, axis=0)) if g > 1 else (lambda x: x)
        # The G samples share this prompt KV; each gets max_new_tokens slots of its own.
        cache = SampleCache.from_prompt(cache, g, p.max_new_tokens)
        n = b * g
        keys = jax.random.split(key, n)
        tok, lp = sample_tokens(
            rep(logits), jax.vmap(jax.random.fold_in)(keys, jnp.zeros(n, int)), p
        )
        stop = jnp.asarray(p.stop_token_ids or (-1,), jnp.int32)
        done = jnp.isin(tok, stop)
        s = p.max_new_tokens
        return _Carry(
            cache=cache,
            prompt_mask=mask,
            tokens=jnp.full((n, s), p.pad_token_id, jnp.int32).at[:, 0].set(tok),
            logps=jnp.zeros((n, s), jnp.float32).at[:, 0].set(lp),
            mask=jnp.zeros((n, s), bool).at[:, 0].set(True),
            last=tok,
            done=done,
            num_valid=rep(mask.sum(-1).astype(jnp.int32)),
            deltas=rep(deltas.reshape(-1).astype(jnp.int32)),
            keys=keys,
            step=jnp.ones((), jnp.int32),
        )

    def _decode_fn(self, state, carry: _Carry) -> tuple[GenerateOutput, SampleCache, jax.Array]:
        self.trace_counts["decode"] += 1
        p = self.params
        model = nnx.merge(self.graphdef, state)
        stop = jnp.asarray(p.stop_token_ids or (-1,), jnp.int32)

        def cond(c: _Carry) -> jax.Array:
            return (c.step < p.max_new_tokens) & ~jnp.all(c.done)

        def body(c: _Carry) -> _Carry:
            # The token fed now is output column step-1: it sits num_valid + step - 1 tokens in.
            pos = rope.decode_position_ids(c.num_valid + c.step - 1, c.deltas)
            h, cache = model.hidden_states(
                c.last[:, None],
                None,
                position_ids=pos,
                cache=c.cache,
                cache_attention_mask=c.prompt_mask,
            )
            logits = model.logits_from_hidden(h[:, 0]).astype(jnp.float32)
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(c.keys, c.step)
            tok, lp = sample_tokens(logits, keys, p)
            live = ~c.done
            col = c.step
            return c._replace(
                cache=cache,
                tokens=c.tokens.at[:, col].set(jnp.where(live, tok, p.pad_token_id)),
                logps=c.logps.at[:, col].set(jnp.where(live, lp, 0.0)),
                mask=c.mask.at[:, col].set(live),
                last=tok,
                done=c.done | jnp.isin(tok, stop),
                step=c.step + 1,
            )

        c = jax.lax.while_loop(cond, body, carry)
        # The cache is returned (and dropped by the caller) so that it can alias the donated
        # input: the loop then updates the donated buffers in place instead of copying them.
        return GenerateOutput(c.tokens, c.mask, c.logps), c.cache, c.step

    # --- host side ----------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: Any,
        attention_mask: Any,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
    ) -> tuple[Any, ...]:
        """Host arrays for ``prefill``: ids/mask (B, Lb), positions (3, B, Lb), deltas (B, 1),
        pixel values (P, patch_dim) and the layout (or None, None)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if (mask[:, -1] == 0).any():
            raise ValueError(
                "prompts must be left-padded (attention_mask[:, -1] must be 1 for every row); rows "
                f"{np.nonzero(mask[:, -1] == 0)[0].tolist()} end in padding"
            )
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together")
        cfg = self.config
        if image_grid_thw is None:
            if (ids[mask != 0] == cfg.image_token_id).any():
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            pos = rope.text_position_ids(mask)
            deltas = np.zeros((ids.shape[0], 1), np.int32)
        else:
            pos, deltas = rope.get_rope_index(ids, image_grid_thw, mask, cfg)
        b, length = ids.shape
        lb = next_bucket(length, self.prompt_buckets, self.prompt_multiple)
        pad = lb - length
        ids = np.pad(
            ids.astype(np.int32), ((0, 0), (pad, 0)), constant_values=self.params.pad_token_id
        )
        mask = np.pad(mask.astype(np.int32), ((0, 0), (pad, 0)))
        pos = np.pad(pos, ((0, 0), (0, 0), (pad, 0)))
        pv = layout = None
        if image_grid_thw is not None:
            grid = np.asarray(image_grid_thw).astype(np.int64)
            pv_np = np.asarray(pixel_values)
            n = int(np.prod(grid, axis=-1).sum())
            if pv_np.ndim != 2 or pv_np.shape[0] != n:
                raise ValueError(
                    f"pixel_values has shape {pv_np.shape}; image_grid_thw needs ({n}, patch_dim)"
                )
            n_tok = int((ids == cfg.image_token_id).sum())
            if n_tok != n // cfg.vision.spatial_merge_size**2:
                raise ValueError(
                    f"input_ids hold {n_tok} image tokens but image_grid_thw gives "
                    f"{n // cfg.vision.spatial_merge_size**2} image features"
                )
            bucket = _patch_bucket(grid, cfg.vision, self.patch_buckets)
            layout = vision_layout(grid, cfg.vision, bucket)
            pv = np.zeros((bucket.num_patches, pv_np.shape[1]), pv_np.dtype)
            pv[:n] = pv_np
        return ids, mask, pos, deltas, pv, layout

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        *,
        rng: Any = None,
        state: Any = None,
    ) -> GenerateOutput:
        """Generates for a left-padded batch; see the module docstring for the outputs.

        With a mesh, a batch that is not a multiple of :attr:`num_batch_shards` is padded with
        one-token text rows that are dropped from the outputs (their keys come after the real
        rows', so the real rows' samples do not change)."""
        b = np.shape(input_ids)[0]
        pad_rows = -b % self.num_batch_shards
        if pad_rows:
            input_ids, attention_mask = _pad_rows(
                input_ids, attention_mask, pad_rows, self.params.pad_token_id
            )
        ids, mask, pos, deltas, pv, layout = self.prepare(
            input_ids, attention_mask, pixel_values, image_grid_thw
        )
        key = _as_key(jax.random.key(0) if rng is None else rng)
        if state is None:
            self.state = self.place_state(self.state)
            st = self.state
        else:
            st = self.place_state(state)
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                # The model's activation constraints act at trace time under these rules.
                stack.enter_context(sharding_mod.use_rules(self.mesh, self.rules))
                if not sharding_mod.replicated(self.mesh).is_fully_addressable:
                    ids, mask, pos, deltas, pv, layout, key = self._global_inputs(
                        ids, mask, pos, deltas, pv, layout, key
                    )
            carry = self._prefill(st, ids, mask, pos, deltas, pv, layout, key)
            with warnings.catch_warnings():
                # Only the cache and the output buffers can alias; the small per-row vectors of
                # the donated carry cannot, which jax reports at every compilation.
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                out, _, self.last_num_steps = self._decode(st, carry)
        if pad_rows:
            n = b * self.params.num_samples
            out = GenerateOutput(*(x[:n] for x in out))
        return out

    __call__ = generate

    def lower(
        self, state: Any, ids: Any, mask: Any, pos: Any, deltas: Any, pv: Any, layout: Any, key: Any
    ) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """The (prefill, decode) programs lowered for these inputs (concrete or
        ``jax.ShapeDtypeStruct``; the arguments of ``prefill`` as :meth:`prepare` gives them),
        exactly as :meth:`generate` runs them: AOT memory plans and HLO dumps. Call it under
        ``sharding.use_rules`` on a mesh."""
        prefill = self._prefill.lower(state, ids, mask, pos, deltas, pv, layout, key)
        carry = jax.eval_shape(self._prefill_fn, state, ids, mask, pos, deltas, pv, layout, key)
        carry = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), carry)
        return prefill, self._decode.lower(state, carry)


def decode_completions(tokenizer: Any, out: GenerateOutput) -> list[str]:
    """Each row's generated text: the masked tokens (up to and including the stop token) decoded
    with special tokens skipped. Global arrays of a mesh spanning several processes are gathered
    first, so every process gets every row."""
    tokens, mask = sharding_mod.to_host(out.tokens), sharding_mod.to_host(out.mask)
    return [
        tokenizer.decode(tokens[k][mask[k].astype(bool)].tolist(), skip_special_tokens=True)
        for k in range(len(tokens))
    ]


def _pad_rows(ids: Any, mask: Any, n: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Appends ``n`` rows holding one valid pad token (left-padded, no image tokens)."""
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    extra_ids = np.full((n, ids.shape[1]), pad_id, ids.dtype)
    extra_mask = np.zeros((n, ids.shape[1]), mask.dtype)
    extra_mask[:, -1] = 1
    return np.concatenate([ids, extra_ids]), np.concatenate([mask, extra_mask])


_SAMPLERS: dict[tuple[Any, ...], Sampler] = {}
_MAX_CACHED_SAMPLERS = 8


def generate(
    model: nnx.Module,
    input_ids: Any,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    *,
    max_new_tokens: int = 256,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    logprobs: str = "tempered",
    rng: Any = None,
    prompt_buckets: Sequence[int] | None = None,
    patch_buckets: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_mod.LogicalRules | None = None,
) -> GenerateOutput:
    """One-call generation; reuses a cached :class:`Sampler` per (architecture, settings), so
    repeated calls compile only for new bucket shapes.

    input_ids / attention_mask (B, L) left-padded; pixel_values (num_patches, patch_dim) and
    image_grid_thw (num_images, 3) as the HF processor gives them. ``stop_token_ids`` None means
    the model config's ``eos_token_id``; ``pad_token_id`` None the config's pad id (else 0).
    ``rng``: a typed key (``jax.random.key``) or legacy ``PRNGKey`` data; None = key(0).
    ``mesh`` / ``rules``: data-parallel over the mesh's batch axes (see :class:`Sampler`); the
    model's weights are placed on the mesh for the call unless they are already on it.
    """
    cfg = model.config
    if stop_token_ids is None:
        eos = cfg.eos_token_id
        stop_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    params = SamplingParams(
        max_new_tokens=int(max_new_tokens),
        num_samples=int(num_samples),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop_token_ids=tuple(stop_token_ids),
        pad_token_id=int(pad_token_id),
        logprobs=logprobs,
    )
    graphdef, state = nnx.split(model)
    key = (
        graphdef,
        params,
        tuple(prompt_buckets) if prompt_buckets else None,
        tuple(patch_buckets) if patch_buckets else None,
        mesh,
        tuple(rules) if rules is not None else None,
    )
    sampler = _SAMPLERS.get(key)
    if sampler is None:
        if len(_SAMPLERS) >= _MAX_CACHED_SAMPLERS:
            _SAMPLERS.pop(next(iter(_SAMPLERS)))
        sampler = Sampler(
            model,
            params,
            prompt_buckets=prompt_buckets,
            patch_buckets=patch_buckets,
            mesh=mesh,
            rules=rules,
        )
        sampler.state = None  # weights are passed per call; do not pin this model in memory
        _SAMPLERS[key] = sampler
    return sampler.generate(
        input_ids, attention_mask, pixel_values, image_grid_thw, rng=rng, state=state
    )
