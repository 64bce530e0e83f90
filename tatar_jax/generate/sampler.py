"""The sampler: compiled prefill / decode programs for one architecture and one
:class:`~tatar_jax.generate.sampling.SamplingParams` (G samples per prompt on one prompt KV),
on one device or data-parallel over a mesh; see :mod:`tatar_jax.generate`."""

from __future__ import annotations

import collections
import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax import sharding as sharding_mod
from tatar_jax.generate import answer_constraint
from tatar_jax.generate.prompts import PromptBatch, Vision, next_bucket, pad_rows, patch_bucket
from tatar_jax.generate.sampling import GenerateOutput, SamplingParams, sample_tokens
from tatar_jax.models.qwen2_5_vl import rope
from tatar_jax.models.qwen2_5_vl.language import SampleCache
from tatar_jax.models.qwen2_5_vl.vision_layout import vision_layout


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
    cstate: jax.Array  # (N,) int32 answer-constraint state (0 without a constraint)
    forced: jax.Array  # (N,) bool, the constraint overrode the model's own token


def _as_key(rng: Any) -> jax.Array:
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng.astype(jnp.uint32))  # legacy PRNGKey (2,) uint32


class Sampler:
    """Compiled prefill/decode programs for one model architecture and one :class:`SamplingParams`.

    ``Sampler(model, params)`` splits the model into a graph definition (static) and its state
    (an argument of the jitted functions): ``generate(..., state=)`` runs new weights (the
    ``nnx.State`` of a model of the same architecture, any dtype / layout) without recompiling.

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
      constraint: an :class:`~tatar_jax.generate.answer_constraint.AnswerConstraint` (None: off):
        every step samples among the tokens its grammar allows (an answer that always parses);
        :attr:`last_forced` then says which rows it had to override.
    """

    def __init__(
        self,
        model: nnx.Module,
        params: SamplingParams | None = None,
        *,
        prompt_buckets: Sequence[int] | None = None,
        prompt_multiple: int = 64,
        patch_buckets: Sequence[int] | None = None,
        cache_dtype: Any = None,
        weights_dtype: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding_mod.LogicalRules | None = None,
        constraint: answer_constraint.AnswerConstraint | None = None,
    ) -> None:
        self.config = model.config
        self.mesh = mesh
        self.rules = (rules or sharding_mod.DEFAULT_RULES) if mesh is not None else rules
        self.params = SamplingParams() if params is None else params
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
        self.constraint = self._check_constraint(constraint, model.config)
        # (N,) bool of the last call with a constraint: the rows whose answer it forced.
        self.last_forced: jax.Array | None = None
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
            # ids, mask (B, L); positions (3, B, L); deltas (B, 1); pixels / layout / key (and
            # the constraint's tables) replicated; with a constraint decode also gives the
            # forced rows
            cons = () if self.constraint is None else (rep,)
            in_sh = (None, rows(2), rows(2), self._pos_sharding(), rows(2), rep, rep, rep, *cons)
            self._prefill = jax.jit(self._prefill_fn, in_shardings=in_sh, out_shardings=carry_sh)
            self._decode = jax.jit(
                self._decode_fn,
                in_shardings=(None, carry_sh, *cons),
                out_shardings=(out_sh, carry_sh.cache, rep, *(rows(1) for _ in cons)),
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
            cstate=rows(1),
            forced=rows(1),
        )

    def _global_inputs(self, ids, mask, pos, deltas, pv, layout, key) -> tuple[Any, ...]:
        """Host arrays -> global arrays on a mesh spanning several processes. Every process
        passes the same whole batch (same prompts, same buckets); each keeps its shards."""
        rows, rep = self._rows_sharding, sharding_mod.replicated(self.mesh)
        glob = sharding_mod.put_global
        key_data = glob(np.asarray(jax.random.key_data(key)), rep)
        return (
            glob(np.asarray(ids), rows(2)),
            glob(np.asarray(mask), rows(2)),
            glob(np.asarray(pos), self._pos_sharding()),
            glob(np.asarray(deltas), rows(2)),
            None if pv is None else glob(np.asarray(pv), rep),
            None if layout is None else sharding_mod.put_tree_global(layout, rep),
            jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key)),
        )

    def _check_constraint(
        self, cons: answer_constraint.AnswerConstraint | None, cfg: Any
    ) -> answer_constraint.AnswerConstraint | None:
        """The constraint with its tables on the device (replicated over the mesh); ValueError
        when it cannot hold a whole answer in ``max_new_tokens`` or does not fit the vocabulary."""
        if cons is None:
            return None
        vocab = int(cfg.text.vocab_size)
        if np.shape(cons.next_state)[1] != vocab:
            raise ValueError(
                f"the answer constraint covers {np.shape(cons.next_state)[1]} tokens, the model's "
                f"vocabulary {vocab}: build it with vocab_size={vocab}"
            )
        if cons.min_tokens > self.params.max_new_tokens:
            raise ValueError(
                f"max_new_tokens={self.params.max_new_tokens} cannot hold a constrained answer: "
                f"this tokenizer needs at least {cons.min_tokens} tokens"
            )
        if self.mesh is None:
            return jax.device_put(cons)
        rep = sharding_mod.replicated(self.mesh)
        if rep.is_fully_addressable:
            return jax.device_put(cons, rep)
        return sharding_mod.put_tree_global(cons, rep)

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
            if isinstance(x, jax.Array) and x.sharding.memory_kind == "pinned_host":
                # offloaded master weights (config.offload "params"): to the device one leaf
                # at a time, so no whole float32 copy comes back for the rollout
                x = jax.device_put(x, x.sharding.with_memory_kind("device"))
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

    # --- jitted bodies ------------------------------------------------------------------------
    def _prefill_fn(
        self, state, ids, mask, pos, deltas, pixel_values, layout, key, cons=None
    ) -> _Carry:
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
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.zeros(n, int))
        cstate = jnp.zeros(n, jnp.int32)
        forced = jnp.zeros(n, bool)
        if cons is None:
            tok, lp = sample_tokens(rep(logits), step_keys, p)
        else:
            cstate = jnp.full(n, cons.start, jnp.int32)
            left = jnp.int32(p.max_new_tokens - 1)  # tokens after this one
            tok, lp, cstate, forced = answer_constraint.constrained_sample(
                rep(logits), step_keys, p, cons, cstate, left
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
            cstate=cstate,
            forced=forced,
        )

    def _decode_fn(self, state, carry: _Carry, cons=None) -> tuple[Any, ...]:
        """(outputs, the donated cache, steps run) [+ (N,) forced rows with a constraint]."""
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
            live = ~c.done
            col = c.step
            cstate, forced = c.cstate, c.forced
            if cons is None:
                tok, lp = sample_tokens(logits, keys, p)
            else:  # the answer grammar: a mask per step (answer_constraint)
                left = p.max_new_tokens - 1 - col
                tok, lp, cstate, f = answer_constraint.constrained_sample(
                    logits, keys, p, cons, c.cstate, left
                )
                forced = forced | (f & live)
            return c._replace(
                cache=cache,
                tokens=c.tokens.at[:, col].set(jnp.where(live, tok, p.pad_token_id)),
                logps=c.logps.at[:, col].set(jnp.where(live, lp, 0.0)),
                mask=c.mask.at[:, col].set(live),
                last=tok,
                done=c.done | jnp.isin(tok, stop),
                step=c.step + 1,
                cstate=cstate,
                forced=forced,
            )

        c = jax.lax.while_loop(cond, body, carry)
        # The cache is returned (and dropped by the caller) so that it can alias the donated
        # input: the loop then updates the donated buffers in place instead of copying them.
        out = GenerateOutput(c.tokens, c.mask, c.logps), c.cache, c.step
        return out if cons is None else (*out, c.forced)

    # --- host side ----------------------------------------------------------------------------
    def prepare(
        self,
        input_ids: Any,
        attention_mask: Any,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
    ) -> PromptBatch:
        """The host preprocessor of raw prompts (``input_ids`` / ``attention_mask`` (B, L)
        left-padded, the HF processor's ``pixel_values`` and ``image_grid_thw``): mRoPE positions
        and rope deltas, the prompt padded to a length bucket, the patches to a patch bucket and
        its vision layout. A batch made by the data pipeline carries all of these already
        (``generate.prompt_batch(batch, model_config)``): give that to :meth:`generate_prompts`."""
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
        vision = None
        if image_grid_thw is not None:
            vision = self._bucketed_vision(ids, pixel_values, image_grid_thw)
        return PromptBatch(ids, mask, pos, deltas, vision)

    def _bucketed_vision(self, ids: np.ndarray, pixel_values: Any, image_grid_thw: Any) -> Vision:
        """The patches padded to this sampler's patch bucket, and the bucket's layout."""
        cfg = self.config
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
        bucket = patch_bucket(grid, cfg.vision, self.patch_buckets)
        pv = np.zeros((bucket.num_patches, pv_np.shape[1]), pv_np.dtype)
        pv[:n] = pv_np
        return Vision(pv, vision_layout(grid, cfg.vision, bucket))

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
        """Generates for a left-padded batch of raw prompts (:meth:`prepare`, then
        :meth:`generate_prompts`); see the module docstring for the outputs."""
        prompts = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
        return self.generate_prompts(prompts, rng=rng, state=state)

    def generate_prompts(
        self, prompts: PromptBatch, *, rng: Any = None, state: Any = None
    ) -> GenerateOutput:
        """Generates for a :class:`PromptBatch` whose layout is already computed (its length
        and patch buckets are the compiled shapes; nothing is recomputed).

        With a mesh, a batch that is not a multiple of :attr:`num_batch_shards` is padded with
        one-token text rows that are dropped from the outputs (their keys come after the real
        rows', so the real rows' samples do not change)."""
        b = np.shape(prompts.input_ids)[0]
        extra = -b % self.num_batch_shards
        if extra:
            prompts = pad_rows(prompts, extra, self.params.pad_token_id)
        args = prompts.arrays()
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
                    *args, key = self._global_inputs(*args, key)
            cons = () if self.constraint is None else (self.constraint,)
            carry = self._prefill(st, *args, key, *cons)
            with warnings.catch_warnings():
                # Only the cache and the output buffers can alias; the small per-row vectors of
                # the donated carry cannot, which jax reports at every compilation.
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                out, _, self.last_num_steps, *forced = self._decode(st, carry, *cons)
        n = b * self.params.num_samples
        if extra:
            out = GenerateOutput(*(x[:n] for x in out))
        self.last_forced = forced[0][:n] if forced else None
        return out

    __call__ = generate

    def lower(
        self, state: Any, ids: Any, mask: Any, pos: Any, deltas: Any, pv: Any, layout: Any, key: Any
    ) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
        """The (prefill, decode) programs lowered for these inputs (concrete or
        ``jax.ShapeDtypeStruct``; the arguments of ``prefill`` as :meth:`prepare` gives them),
        exactly as :meth:`generate` runs them: AOT memory plans and HLO dumps. Call it under
        ``sharding.use_rules`` on a mesh."""
        cons = () if self.constraint is None else (self.constraint,)
        prefill = self._prefill.lower(state, ids, mask, pos, deltas, pv, layout, key, *cons)
        carry = jax.eval_shape(
            self._prefill_fn, state, ids, mask, pos, deltas, pv, layout, key, *cons
        )
        carry = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), carry)
        return prefill, self._decode.lower(state, carry, *cons)


def decode_completions(tokenizer: Any, out: GenerateOutput) -> list[str]:
    """Each row's generated text: the masked tokens (up to and including the stop token) decoded
    with special tokens skipped. Global arrays of a mesh spanning several processes are gathered
    first, so every process gets every row."""
    tokens, mask = sharding_mod.to_host(out.tokens), sharding_mod.to_host(out.mask)
    return [
        tokenizer.decode(tokens[k][mask[k].astype(bool)].tolist(), skip_special_tokens=True)
        for k in range(len(tokens))
    ]
