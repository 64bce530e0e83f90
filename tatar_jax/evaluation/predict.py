"""The model side of evaluation: a ``predict_fn`` from a checkpoint (greedy, or K samples per
image from one prefill).

This is the only part of :mod:`tatar_jax.evaluation` that touches the model: weights come from
:func:`tatar_jax.loading.load_policy` (an HF directory, an orbax export, a training run),
completions from a :class:`tatar_jax.generate.Sampler`. Without weights :func:`build_predict_fn`
raises :class:`ModelUnavailableError`; nothing invents predictions.

One batch layout: the records' prompts are collated once (:func:`eval_prompts`: mRoPE positions
and rope deltas per example, the patch bucket of the collated batch, its vision layout) into a
:class:`tatar_jax.generate.PromptBatch` that the sampler consumes as it is
(``Sampler.generate_prompts``), exactly as the GRPO rollout consumes a pipeline batch; nothing is
stripped and re-bucketed.

K samples (``eval.num_samples`` > 1): the rollout engine's G-sample path (one prompt KV per
image, K decode rows); the key of a batch is :func:`batch_key` (the seed folded with the batch's
first ``row_id``), so the same command gives the same samples.

Data parallelism: the sampler gets the mesh, so a batch of ``eval.batch_size`` prompts is split
over the mesh's batch axes (the KV cache with it) and the weights are sharded per the rules.
Multi-host (``jax.process_count() > 1``): the runner gives every process its own rows
(:func:`tatar_jax.evaluation.runner.evaluate_shard`); each process builds its mesh from its
*local* devices (``mesh.shape``; the DCN factor is not used), so hosts never wait for each other
inside the model and ``eval.batch_size`` is the batch of one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tatar_jax.evaluation.runner import RecordFailure
from tatar_jax.evaluation.scoring import Samples

Completion = str | Samples | RecordFailure


class ModelUnavailableError(RuntimeError):
    """No weights were given (a random model would score nothing meaningful)."""


@dataclasses.dataclass
class Predictor:
    """What :func:`build_predict_fn` returns.

    predict_fn: records -> decoded completions (special tokens stripped), one entry per record:
      a ``str`` (one sample), a :class:`~tatar_jax.evaluation.scoring.Samples` of
      ``num_samples`` texts, or a :class:`RecordFailure`.
    count_tokens: text -> number of tokens (think lengths in tokens).
    name: a short model name for reports (the checkpoint / HF directory).
    info: settings stored in ``run_info.json`` (a resumed run must use the same).
    """

    predict_fn: Callable[[Sequence[Mapping[str, Any]]], list[Completion]]
    count_tokens: Callable[[str], int]
    name: str
    info: dict[str, Any]


def policy_source(model_cfg: Any, checkpoint: str = "", step: int = -1) -> Any:
    """The :class:`tatar_jax.loading.PolicySource` of ``checkpoint`` (an orbax export or a
    training run, ``step`` -1 = its latest) or ``model_cfg.hf_dir``; ModelUnavailableError
    without either."""
    from tatar_jax import loading

    if not checkpoint and not model_cfg.hf_dir:
        raise ModelUnavailableError(
            "no weights: give --checkpoint (an orbax export or a training run) or --hf_dir "
            "(a Hugging Face directory)"
        )
    return loading.PolicySource(hf_dir=model_cfg.hf_dir, checkpoint=checkpoint, step=int(step))


def load_model(
    model_cfg: Any, mesh: Any, rules: Any, checkpoint: str = "", step: int = -1
) -> tuple[Any, str]:
    """(model, name) of :func:`policy_source`, in ``model_cfg.dtype`` (see
    :mod:`tatar_jax.loading`)."""
    from tatar_jax import loading

    source = policy_source(model_cfg, checkpoint, step)
    policy = loading.load_policy(
        source, dtype=model_cfg.dtype, mesh=mesh, rules=rules,
        attention_impl=model_cfg.attention_impl,
    )  # fmt: skip
    return policy.model, policy.name


def decoding_info(ev: Any, seed: int) -> dict[str, Any]:
    """The decoding settings of ``ev`` as stored in ``run_info.json`` (``decoding``): a resumed
    run must decode the same way. Greedy single-sample decoding is
    :data:`~tatar_jax.evaluation.shards.GREEDY_DECODING` (what an out_dir written before these
    settings existed holds); sampling adds top_k, top_p and the seed."""
    info: dict[str, Any] = {
        "num_samples": int(ev.num_samples),
        "temperature": float(ev.temperature),
        "constrained": bool(ev.constrained_answer),
    }
    if float(ev.temperature) > 0:
        info.update(top_k=int(ev.top_k), top_p=float(ev.top_p), seed=int(seed))
    if int(ev.num_samples) > 1:
        info["aggregate"] = str(ev.aggregate)
    return info


def build_predict_fn(cfg: Any, *, checkpoint: str = "", step: int = -1) -> Predictor:
    """A ``predict_fn`` for ``cfg`` (``configs/eval.py``: ``model``, ``mesh``, ``eval``, ``seed``).

    Initialises multi-host JAX when configured, builds the mesh, loads the weights
    (:func:`load_model`; ``step`` -1 = a training run's latest) and the tokenizer that goes with
    them (:func:`tatar_jax.loading.tokenizer_dir`: ``model.hf_dir``, an export's own, the
    training run's, else the offline Qwen rebuild), then wires them through
    :func:`make_predict_fn`. Raises :class:`ModelUnavailableError` without weights.
    """
    from tatar_jax import loading, sharding
    from tatar_jax.data import tokenizer

    sharding.maybe_initialize_distributed(
        cfg.mesh.distributed,
        coordinator_address=cfg.mesh.coordinator_address,
        num_processes=cfg.mesh.num_processes,
        process_id=cfg.mesh.process_id,
    )
    import jax

    if jax.process_count() > 1:
        # Each process evaluates its own rows (runner.evaluate_shard) on its own devices.
        mesh = sharding.make_mesh(dict(cfg.mesh.shape), devices=jax.local_devices())
    else:
        mesh = sharding.make_mesh(dict(cfg.mesh.shape), dcn_shape=dict(cfg.mesh.dcn_shape))
    rules = sharding.get_rules(cfg.mesh.rules)
    tok_dir = loading.tokenizer_dir(policy_source(cfg.model, checkpoint, step))
    tok = tokenizer.load_tokenizer(tok_dir)  # first: a missing tokenizer fails before the weights
    model, name = load_model(cfg.model, mesh, rules, checkpoint, step)
    predict_fn = make_predict_fn(model, tok, cfg.eval, mesh=mesh, rules=rules, seed=cfg.seed)
    ev = cfg.eval
    info = {
        "model": name,
        "max_new_tokens": int(ev.max_new_tokens),
        "min_pixels": int(ev.min_pixels),
        "max_pixels": int(ev.max_pixels),
        "prompt_variant": ev.prompt_variant,
        "decoding": decoding_info(ev, cfg.seed),
    }
    return Predictor(predict_fn, lambda s: len(tok.encode(s)), name, info)


def sampling_params(ev: Any, tok: Any) -> Any:
    """The sampler's settings from the ``eval`` config block: ``num_samples`` completions per
    image at ``temperature`` (0 = greedy) with ``top_k`` / ``top_p``, stopping at the
    tokenizer's end ids."""
    from tatar_jax import generate

    return generate.SamplingParams.from_config(ev, tok, num_samples=int(ev.num_samples))


def batch_key(seed: int, records: Sequence[Mapping[str, Any]]) -> Any:
    """The sampling key of one batch: ``fold_in(key(seed), row_id of its first record)``: the
    same command (same rows, same batch size) draws the same samples, and batches never share a
    key."""
    import jax

    first = int(records[0].get("row_id", 0)) if records else 0
    return jax.random.fold_in(jax.random.key(int(seed)), first % (2**31))


def prompt_examples(
    records: Sequence[Mapping[str, Any]], tok: Any, ev: Any, rope_cfg: Any, merge_size: int
) -> tuple[list[dict[str, Any]], dict[int, RecordFailure]]:
    """Each record's prompt example (its decoded ``pil_image`` preprocessed at the Qwen2.5-VL
    budget ``ev.min_pixels`` / ``ev.max_pixels``, the task prompt ``ev.prompt_variant``, its
    mRoPE positions) and, by record index, a :class:`RecordFailure` for an image the processor
    rejects."""
    from tatar_jax.data import examples, image

    exs, failures = [], {}
    for k, r in enumerate(records):
        try:
            pv, thw = image.preprocess_image(r["pil_image"], ev.min_pixels, ev.max_pixels)
        except ValueError as err:  # e.g. an aspect ratio the processor rejects
            failures[k] = RecordFailure(f"image preprocessing failed: {err}")
            continue
        gt = r.get("gt_100", math.nan)
        exs.append(
            examples.make_prompt_example(
                tok, pv, thw, r["task"],
                gt_100=float(gt) if gt is not None else math.nan,
                dataset=str(r.get("dataset", "")), image_path=str(r.get("image", "")),
                row_id=int(r.get("row_id", -1)), variant=ev.prompt_variant,
                rope_cfg=rope_cfg, merge_size=merge_size,
            )
        )  # fmt: skip
    return exs, failures


def eval_prompts(exs: Sequence[Mapping[str, Any]], tok: Any, batch_size: int, model_cfg: Any):
    """The :class:`tatar_jax.generate.PromptBatch` of prompt examples, computed once: collated
    left-padded into ``batch_size`` rows (short batches filled with flagged copies) at the
    default length / patch buckets, positions and rope deltas as the examples carry them, the
    vision layout of the batch's patch bucket (:func:`tatar_jax.generate.prompt_batch`, the
    GRPO rollout's path)."""
    from tatar_jax import generate
    from tatar_jax.data import examples

    batch = examples.collate(
        exs, pad_id=tok.pad_id, seq_buckets=None, patch_buckets=None,
        padding_side="left", batch_size=batch_size, vision_config=model_cfg.vision,
    )  # fmt: skip
    return generate.prompt_batch(batch, model_cfg)


def make_predict_fn(
    model: Any,
    tok: Any,
    ev: Any,
    *,
    mesh: Any,
    rules: Any,
    sampler: Any = None,
    seed: int = 42,
) -> Callable[[Sequence[Mapping[str, Any]]], list[Completion]]:
    """Records -> completions: :func:`prompt_examples`, :func:`eval_prompts`, then
    ``sampler.generate_prompts(prompts, rng=batch_key(seed, records))``.

    ``sampler``: default a :class:`tatar_jax.generate.Sampler` of ``model`` with
    :func:`sampling_params` (``ev.num_samples`` / ``temperature`` / ``top_k`` / ``top_p``, up to
    ``ev.max_new_tokens`` tokens, stopping at ``<|im_end|>`` / end-of-text; with
    ``ev.constrained_answer`` the answer constraint of the tokenizer), data-parallel over
    ``mesh`` with the logical-axis ``rules`` (``mesh=None``: one device); any object with
    ``params`` (its ``num_samples`` is used) and ``generate_prompts(prompts, *, rng)``.
    Completions are the masked tokens decoded with special tokens stripped: a ``str`` per record
    with one unconstrained sample, else a :class:`~tatar_jax.evaluation.scoring.Samples` of the
    K texts (and, constrained, which ones the constraint forced: ``sampler.last_forced``).
    """
    import numpy as np

    from tatar_jax import generate, sharding
    from tatar_jax.data import examples

    if sampler is None:
        extra = {}
        if bool(getattr(ev, "constrained_answer", False)):
            from tatar_jax.generate import answer_constraint

            vocab = int(model.config.text.vocab_size)
            extra["constraint"] = answer_constraint.for_tokenizer(tok, vocab)
        sampler = generate.Sampler(model, sampling_params(ev, tok), mesh=mesh, rules=rules, **extra)
    k_samples = int(sampler.params.num_samples)
    merge_size = model.config.vision.spatial_merge_size
    rope_cfg = examples.RopeConfig.from_tokenizer(tok, merge_size)

    def predict_fn(records: Sequence[Mapping[str, Any]]) -> list[Completion]:
        if len(records) > ev.batch_size:
            raise ValueError(f"{len(records)} records for batch_size {ev.batch_size}")
        exs, failures = prompt_examples(records, tok, ev, rope_cfg, merge_size)
        if not exs:
            return [failures[k] for k in range(len(records))]
        prompts = eval_prompts(exs, tok, ev.batch_size, model.config)
        out = sampler.generate_prompts(prompts, rng=batch_key(seed, records))
        n = len(exs) * k_samples
        texts = generate.decode_completions(tok, out)[:n]
        forced = getattr(sampler, "last_forced", None)
        if forced is not None:
            forced = [bool(f) for f in np.asarray(sharding.to_host(forced))[:n]]
        if k_samples == 1 and forced is None:
            grouped = iter(texts)  # one greedy completion per record: a str
        else:
            grouped = iter(
                Samples(
                    tuple(texts[i : i + k_samples]),
                    None if forced is None else tuple(forced[i : i + k_samples]),
                )
                for i in range(0, n, k_samples)
            )
        return [failures[k] if k in failures else next(grouped) for k in range(len(records))]

    return predict_fn
