"""A training config checked before any work: enum values, data set names, paths.

    from tatar_jax.train import validate
    validate.check_config(cfg)      # ValueError: "--config.grpo.advantage: 'foo' is not one of ..."

``scripts/train.py`` calls :func:`check_config` right after parsing its flags, so a typo costs a
second instead of minutes of setup, and is reported as a usage error (one line, exit status 2).
The allowed values come from the modules that use them, where those keep a table.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

# (config path, allowed values) of a training config. Values come from their owners when the
# owner keeps a table (grpo, manifest, loading, layers, sft_step, answer_format, sharding).


def _choices() -> list[tuple[str, Sequence[str]]]:
    from tatar_jax import answer_format, grpo, loading, sharding
    from tatar_jax.data import manifest
    from tatar_jax.models import layers
    from tatar_jax.train import sft_step

    return [
        ("stage", ("sft", "grpo")),
        ("grpo.advantage", grpo.ADVANTAGE_MODES),
        ("grpo.loss_aggregation", grpo.AGGREGATIONS),
        ("sft.loss_normalization", sft_step.NORMALIZATIONS),
        ("data.bad_record", manifest.ON_ERROR),
        ("data.mixing", ("concat", "interleave")),  # tatar_jax.data.pipeline.ScheduleOptions
        ("data.stopping", ("all_exhausted", "first_exhausted")),
        ("model.dtype", tuple(loading.DTYPES)),
        ("model.param_dtype", tuple(loading.DTYPES)),
        ("model.remat_policy", tuple(layers.REMAT_POLICIES)),
        ("model.vision_remat_policy", tuple(layers.REMAT_POLICIES)),
        ("optimizer.name", ("adamw",)),  # tatar_jax.train.optim.make_optimizer_from_config
        ("optimizer.schedule", ("linear", "cosine", "constant")),  # optim.make_schedule
        ("rewards.parser", tuple(answer_format.PARSERS)),
        ("rewards.scope", ("global", "device_local")),  # tatar_jax.rewards
        ("mesh.rules", tuple(sharding.RULE_SETS)),
    ]


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
    yield from _dataset_problems(cfg, prefix)
    yield from _path_problems(cfg, prefix)
    present, warmup = _get(cfg, "warmup")
    if present and hasattr(warmup, "keys"):
        yield from problems(warmup, prefix + "warmup.")


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
