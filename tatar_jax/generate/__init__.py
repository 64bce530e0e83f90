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

1. host (:mod:`~tatar_jax.generate.prompts`): a :class:`PromptBatch`: mRoPE positions and rope
   deltas (:func:`rope.get_rope_index`), the prompt left-padded to a length bucket, the vision
   layout for a patch-count bucket (:mod:`vision_layout`). :meth:`Sampler.prepare` makes it from
   raw prompts; a pipeline batch (:class:`tatar_jax.data.batch.Batch`) carries its own, which
   :func:`prompt_batch` hands on as it is to :meth:`Sampler.generate_prompts` and the GRPO update.
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

Constrained answers (``Sampler(..., constraint=answer_constraint.for_tokenizer(tok, vocab))``):
after ``</think>`` every step samples among the tokens that keep ``<answer>NUMBER</answer>``
parsable with a number in [0, 100] (a token mask per step from a state machine carried in the
loop, :mod:`~tatar_jax.generate.answer_constraint`); ``Sampler.last_forced`` says which rows it
had to override.

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

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from tatar_jax import sharding as sharding_mod
from tatar_jax.generate.answer_constraint import AnswerConstraint
from tatar_jax.generate.prompts import PromptBatch, Vision, next_bucket, prompt_batch
from tatar_jax.generate.sampler import Sampler, decode_completions
from tatar_jax.generate.sampling import (
    ENDOFTEXT_ID,
    IM_END_ID,
    LOGPROB_MODES,
    GenerateOutput,
    SamplingParams,
    sample_tokens,
    warp_logits,
)

__all__ = [
    "AnswerConstraint",
    "ENDOFTEXT_ID",
    "GenerateOutput",
    "IM_END_ID",
    "LOGPROB_MODES",
    "PromptBatch",
    "SamplingParams",
    "Sampler",
    "Vision",
    "decode_completions",
    "generate",
    "next_bucket",
    "prompt_batch",
    "sample_tokens",
    "warp_logits",
]

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
