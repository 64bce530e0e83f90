"""A training config checked before any work: enum values, numbers, data set names, paths.

    from tatar_jax.train import validate
    validate.check_config(cfg)      # ValueError: "--config.grpo.advantage: 'foo' is not one of ..."

``scripts/train.py`` calls :func:`check_config` right after parsing its flags, so a typo costs a
second instead of minutes of setup, and is reported as a usage error (one line, exit status 2).
The allowed values come from the modules that use them, where those keep a table.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

# (config path, allowed values) of a training config. Values come from their owners when the
# owner keeps a table (grpo, manifest, loading, layers, sft_step, answer_format, sharding).


def _choices() -> list[tuple[str, Sequence[str]]]:
    from tatar_jax import answer_format, grpo, loading, sharding
    from tatar_jax.data import manifest, pipeline
    from tatar_jax.models import layers
    from tatar_jax.train import offload, optim, sft_step

    return [
        ("stage", ("sft", "grpo")),
        ("grpo.advantage", grpo.ADVANTAGE_MODES),
        ("grpo.loss_aggregation", grpo.AGGREGATIONS),
        ("grpo.rollout_correction.mode", grpo.ROLLOUT_CORRECTIONS),
        ("sft.loss_normalization", sft_step.NORMALIZATIONS),
        ("data.bad_record", manifest.ON_ERROR),
        ("data.mixing", pipeline.MIXINGS),
        ("data.stopping", ("all_exhausted", "first_exhausted")),
        ("model.dtype", tuple(loading.DTYPES)),
        ("model.param_dtype", tuple(loading.DTYPES)),
        ("model.remat_policy", tuple(layers.REMAT_POLICIES)),
        ("model.vision_remat_policy", tuple(layers.REMAT_POLICIES)),
        ("optimizer.name", ("adamw",)),  # tatar_jax.train.optim.make_optimizer_from_config
        ("optimizer.mu_dtype", optim.MU_DTYPES),
        ("optimizer.schedule", ("linear", "cosine", "constant")),  # optim.make_schedule
        ("rewards.parser", tuple(answer_format.PARSERS)),
        ("rewards.scope", ("global", "device_local")),  # tatar_jax.rewards
        ("mesh.rules", tuple(sharding.RULE_SETS)),
        ("offload.mode", offload.MODES),  # tatar_jax.train.offload
    ]


# (config path, lowest value, whether the lowest is excluded, highest value or None): numbers a
# run cannot train with (a negative learning rate, an epoch count of 0, a beta2 of 1, ...).
_RANGES: tuple[tuple[str, float, bool, float | None], ...] = (
    ("optimizer.learning_rate", 0, False, None),
    ("optimizer.b1", 0, False, 1 - 1e-12),
    ("optimizer.b2", 0, False, 1 - 1e-12),
    ("optimizer.eps", 0, False, None),
    ("optimizer.weight_decay", 0, False, None),
    ("optimizer.end_lr_factor", 0, False, None),
    ("optimizer.warmup_steps", 0, False, None),
    ("optimizer.grad_accum_steps", 1, False, None),
    ("checkpoint.every_steps", 1, False, None),
    ("checkpoint.keep", 1, False, None),
    ("logging.every_steps", 1, False, None),
    ("eval.every_steps", 0, False, None),
    ("data.num_epochs", 1, False, None),
    ("sft.global_batch_size", 1, False, None),
    ("grpo.prompts_per_step", 1, False, None),
    ("grpo.num_generations", 1, False, None),
    ("grpo.temperature", 0, True, None),
    ("grpo.top_p", 0, True, 1),
    ("grpo.beta", 0, False, None),
    ("grpo.epsilon", 0, False, None),
    ("grpo.rollout_correction.clip_max", 0, True, None),
    ("grpo.rollout_correction.clip_min", 0, False, None),
    ("grpo.dynamic_sampling.std_threshold", 0, False, None),
    ("grpo.dynamic_sampling.std_threshold_iqa", 0, False, None),
    ("grpo.dynamic_sampling.std_threshold_iaa", 0, False, None),
    ("grpo.dynamic_sampling.max_extra_batches", 0, False, None),
    ("rewards.overlong.max_length", 0, False, None),
    ("rewards.overlong.cache", 1, False, None),
)


def _floats(cfg: Any, path: str = "") -> Iterator[tuple[str, float]]:
    for key in cfg.keys():
        value = cfg[key]
        if hasattr(value, "keys"):
            if key != "warmup":  # checked with its own prefix
                yield from _floats(value, f"{path}{key}.")
        elif isinstance(value, float):
            yield f"{path}{key}", value


def _number_problems(cfg: Any, prefix: str) -> Iterator[str]:
    """Non-finite numbers anywhere (a NaN learning rate trains NaN weights), numbers outside
    what their field can take, and ``total_steps`` other than -1 (whole epochs) or a positive
    count (a warm-up's: 0 = none, or a positive count)."""
    for path, value in _floats(cfg):
        if not math.isfinite(value):
            yield f"{prefix}{path}: must be a finite number, got {value!r}"
    for path, low, low_open, high in _RANGES:
        present, value = _get(cfg, path)
        if not present or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue  # reported above
        if value < low or (low_open and value == low):
            yield f"{prefix}{path}: must be {'>' if low_open else '>='} {low:g}, got {value!r}"
        elif high is not None and value > high:
            bound = "< 1" if high < 1 else f"<= {high:g}"
            yield f"{prefix}{path}: must be {bound}, got {value!r}"
    present, steps = _get(cfg, "total_steps")
    if present and isinstance(steps, int) and not isinstance(steps, bool):
        if prefix.endswith("warmup."):  # the GRPO run's SFT warm-up: 0 = none
            if steps < 0:
                yield f"{prefix}total_steps: must be 0 (no warm-up) or a step count, got {steps}"
        elif steps < -1 or steps == 0:
            yield (
                f"{prefix}total_steps: must be -1 (whole epochs: data.num_epochs) or a positive "
                f"number of steps, got {steps}"
            )


def _get(cfg: Any, path: str) -> tuple[bool, Any]:
    node = cfg
    for key in path.split("."):
        if not hasattr(node, "keys") or key not in node:
            return False, None
        node = node[key]
    return True, node


def problems(cfg: Any, prefix: str = "--config.") -> Iterator[str]:
    """Every problem of ``cfg`` as one line naming the flag (``prefix`` + field)."""
    for path, allowed in _choices():
        present, value = _get(cfg, path)
        if present and value not in allowed:
            yield f"{prefix}{path}: {value!r} is not one of {', '.join(allowed)}"
    yield from _number_problems(cfg, prefix)
    yield from _dataset_problems(cfg, prefix)
    yield from _path_problems(cfg, prefix)
    yield from _grpo_problems(cfg, prefix)
    yield from _offload_problems(cfg, prefix)
    present, warmup = _get(cfg, "warmup")
    if present and hasattr(warmup, "keys"):
        yield from problems(warmup, prefix + "warmup.")


def _offload_problems(cfg: Any, prefix: str) -> Iterator[str]:
    """``offload.parts`` names only what ``tatar_jax.train.offload`` can move; ``params`` not
    with LoRA (its base is the rollout's own weights)."""
    from tatar_jax.train import offload

    present, parts = _get(cfg, "offload.parts")
    if not present:
        return
    unknown = [p for p in parts if p not in offload.PARTS]
    if unknown:
        yield f"{prefix}offload.parts: {unknown} not among {', '.join(offload.PARTS)}"
    _, rank = _get(cfg, "model.lora.rank")
    _, mode = _get(cfg, "offload.mode")
    if "params" in parts and rank and mode != "never":
        yield f"{prefix}offload.parts: 'params' is for full-parameter runs (model.lora.rank={rank})"


def _grpo_problems(cfg: Any, prefix: str) -> Iterator[str]:
    """Combinations of the GRPO options that cannot run."""
    rc = f"{prefix}grpo.rollout_correction"
    present, lo = _get(cfg, "grpo.rollout_correction.clip_min")
    _, hi = _get(cfg, "grpo.rollout_correction.clip_max")
    if present and lo is not None and hi is not None and lo > hi:
        yield f"{rc}.clip_min: {lo!r} is above clip_max {hi!r}"
    _, mode = _get(cfg, "grpo.rollout_correction.mode")
    _, from_rollout = _get(cfg, "grpo.old_logps_from_rollout")
    if from_rollout and mode not in (None, "off"):
        yield (
            f"{rc}.mode: {mode!r} with --config.grpo.old_logps_from_rollout=True weights by "
            "pi_old / pi_rollout = 1 (the PPO ratio is already against the rollout): turn one off"
        )
    _, enabled = _get(cfg, "grpo.dynamic_sampling.enabled")
    _, steps = _get(cfg, "total_steps")
    if enabled and steps == -1:
        yield (
            f"{prefix}grpo.dynamic_sampling.enabled: needs --config.total_steps > 0 (extra draws "
            "use up the data stream, so whole epochs do not say how many steps there are)"
        )


def _dataset_problems(cfg: Any, prefix: str) -> Iterator[str]:
    known = sorted([*cfg.data.sources.keys(), "synthetic", "synthetic_test"])
    for path in ("data.train", "eval.datasets"):
        present, names = _get(cfg, path)
        if not present:
            continue
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        for name in names:
            if name not in known:
                yield f"{prefix}{path}: unknown data set {name!r}; configured: {', '.join(known)}"


def _path_problems(cfg: Any, prefix: str) -> Iterator[str]:
    checks = (
        ("model.hf_dir", "config.json"),
        ("data.tokenizer_dir", "tokenizer.json"),
        ("model.init_checkpoint", None),
        ("data.root", None),
    )
    for path, needed in checks:
        present, value = _get(cfg, path)
        if not present or not value:
            continue
        p = pathlib.Path(str(value))
        if not p.is_dir():
            yield f"{prefix}{path}: no such directory: {value}"
        elif needed and not (p / needed).is_file():
            yield f"{prefix}{path}: {value} has no {needed}"


def check_config(cfg: Any) -> None:
    """ValueError listing every problem of ``cfg`` (one per line, each naming its flag); a
    field the warm-up shares with the main stage is named once."""
    found: list[str] = []
    for line in problems(cfg):
        if line.replace("--config.warmup.", "--config.", 1) not in found:
            found.append(line)
    if found:
        raise ValueError("\n".join(found))
