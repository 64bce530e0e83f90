"""The model side of evaluation: a greedy-decoding ``predict_fn`` from a checkpoint.

This is the only part of :mod:`tatar_jax.evaluation` that touches the model: weights come from
:func:`tatar_jax.loading.load_policy` (an HF directory, an orbax export, a training run), greedy
completions from :func:`tatar_jax.generate.generate`. Without weights :func:`build_predict_fn`
raises :class:`ModelUnavailableError`; nothing invents predictions.

Data parallelism: the rollout engine gets the mesh, so a batch of ``eval.batch_size`` prompts is
split over the mesh's batch axes (the KV cache with it) and the weights are sharded per the
rules. Multi-host (``jax.process_count() > 1``): the runner gives every process its own rows
(:func:`tatar_jax.evaluation.runner.evaluate_shard`); each process builds its mesh from its
*local* devices (``mesh.shape``; the DCN factor is not used), so hosts never wait for each other
inside the model and ``eval.batch_size`` is the batch of one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tatar_jax.evaluation.runner import RecordFailure

if TYPE_CHECKING:
    from tatar_jax.generate import GenerateOutput


class ModelUnavailableError(RuntimeError):
    """No weights were given (a random model would score nothing meaningful)."""


@dataclasses.dataclass
class Predictor:
    """What :func:`build_predict_fn` returns.

    predict_fn: records -> decoded completions (special tokens stripped), one per record.
    count_tokens: text -> number of tokens (think lengths in tokens).
    name: a short model name for reports (the checkpoint / HF directory).
    info: settings stored in ``run_info.json`` (a resumed run must use the same).
    """

    predict_fn: Callable[[Sequence[Mapping[str, Any]]], list[str | RecordFailure]]
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


def build_predict_fn(cfg: Any, *, checkpoint: str = "", step: int = -1) -> Predictor:
    """A greedy ``predict_fn`` for ``cfg`` (``configs/eval.py``: ``model``, ``mesh``, ``eval``).

    Initialises multi-host JAX when configured, builds the mesh, loads the weights
    (:func:`load_model`; ``step`` -1 = a training run's latest) and the tokenizer that goes with
    them (:func:`tatar_jax.loading.tokenizer_dir`: ``model.hf_dir``, an export's own, the
    training run's, else the offline Qwen rebuild),
    then wires them with ``tatar_jax.generate.generate`` through :func:`make_predict_fn`.
    Raises :class:`ModelUnavailableError` without weights.
    """
    from tatar_jax import generate, loading, sharding
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
    predict_fn = make_predict_fn(
        model,
        tok,
        cfg.eval,
        mesh=mesh,
        rules=rules,
        generate_fn=generate.generate,
        seed=cfg.seed,
        merge_size=model.config.vision.spatial_merge_size,
    )
    ev = cfg.eval
    info = {
        "model": name,
        "max_new_tokens": int(ev.max_new_tokens),
        "min_pixels": int(ev.min_pixels),
        "max_pixels": int(ev.max_pixels),
        "prompt_variant": ev.prompt_variant,
    }
    return Predictor(predict_fn, lambda s: len(tok.encode(s)), name, info)


def make_predict_fn(
    model: Any,
    tok: Any,
    ev: Any,
    *,
    mesh: Any,
    rules: Any,
    generate_fn: Callable[..., GenerateOutput],
    seed: int = 42,
    merge_size: int = 2,
) -> Callable[[Sequence[Mapping[str, Any]]], list[str | RecordFailure]]:
    """Records -> greedy completions with ``generate_fn`` (``tatar_jax.generate.generate``).

    Per call: each record's decoded ``pil_image`` is preprocessed (Qwen2.5-VL budget
    ``ev.min_pixels`` / ``ev.max_pixels``; a rejected image becomes a :class:`RecordFailure`),
    rendered into the task prompt (``ev.prompt_variant``), collated with left padding into a
    static batch of ``ev.batch_size`` rows (short batches are filled with flagged copies) and
    decoded greedily by ``generate_fn`` for up to ``ev.max_new_tokens`` tokens, stopping at
    ``<|im_end|>`` / end-of-text, data-parallel over ``mesh`` with the logical-axis ``rules``
    (``generate_fn(..., mesh=mesh, rules=rules)``; ``mesh=None``: one device). Inputs are host
    numpy arrays (the engine pads them to its buckets and places them). Completions are the
    masked tokens decoded with special tokens stripped.
    """
    import jax

    from tatar_jax import generate
    from tatar_jax.data import examples, image

    rope_cfg = examples.RopeConfig.from_tokenizer(tok, merge_size)

    def predict_fn(records: Sequence[Mapping[str, Any]]) -> list[str | RecordFailure]:
        if len(records) > ev.batch_size:
            raise ValueError(f"{len(records)} records for batch_size {ev.batch_size}")
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
                    tok,
                    pv,
                    thw,
                    r["task"],
                    gt_100=float(gt) if gt is not None else math.nan,
                    dataset=str(r.get("dataset", "")),
                    image_path=str(r.get("image", "")),
                    row_id=int(r.get("row_id", -1)),
                    variant=ev.prompt_variant,
                    rope_cfg=rope_cfg,
                    merge_size=merge_size,
                )
            )
        if not exs:
            return [failures[k] for k in range(len(records))]
        batch = examples.collate(
            exs,
            pad_id=tok.pad_id,
            seq_buckets=None,
            patch_buckets=None,
            padding_side="left",
            batch_size=ev.batch_size,
        )
        n_patch = batch.num_patches
        # Host arrays: the rollout engine buckets them and shards them over the mesh.
        out = generate_fn(
            model,
            batch.input_ids,
            batch.attention_mask,
            pixel_values=batch.vision.pixel_values[:n_patch],
            image_grid_thw=batch.image_grid_thw,
            max_new_tokens=ev.max_new_tokens,
            num_samples=1,
            temperature=0.0,
            stop_token_ids=tuple(tok.eos_ids),
            pad_token_id=tok.pad_id,
            rng=jax.random.key(seed),
            mesh=mesh,
            rules=rules,
        )
        texts = iter(generate.decode_completions(tok, out)[: len(exs)])
        return [failures[k] if k in failures else next(texts) for k in range(len(records))]

    return predict_fn
