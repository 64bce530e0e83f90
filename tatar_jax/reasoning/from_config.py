"""The reasoning builder from a ``configs/reasoning.py`` config (what scripts/build_reasoning.py
calls): the config's usage problems, its teacher and judge, its rows, and :func:`main`, which runs
:func:`tatar_jax.reasoning.build.run` on them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

from tatar_jax.reasoning.build import Summary, run
from tatar_jax.reasoning.records import InputRow
from tatar_jax.reasoning.teachers import (
    Teacher,
)

log = logging.getLogger("tatar_jax.reasoning")


def _api_key(env_name: str, who: str) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        log.info("%s: environment variable %s is not set; sending no API key", who, env_name)
    return key or None


def _extra_body(text: str, who: str) -> dict[str, Any]:
    try:
        body = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{who}.extra_body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{who}.extra_body must be a JSON object, got {text!r}")
    return body


def _retry_policy(cfg: Any):
    from tatar_jax.reasoning.teachers import RetryPolicy

    c = cfg.client
    return RetryPolicy(
        max_retries=int(c.max_retries),
        backoff_base_s=float(c.backoff_base_s),
        backoff_max_s=float(c.backoff_max_s),
        jitter=float(c.jitter),
        seed=None if int(c.retry_seed) < 0 else int(c.retry_seed),
    )


def _chat_client(cfg: Any, who: str) -> Teacher:
    """The OpenAI-compatible client of the ``cfg.<who>`` block (``who``: teacher or judge)."""
    from tatar_jax.reasoning.teachers import OpenAIChatClient

    block = cfg[who]
    return OpenAIChatClient(
        block.base_url,
        block.model,
        _api_key(block.api_key_env, who),
        timeout_s=float(cfg.client.timeout_s),
        retry=_retry_policy(cfg),
        extra_body=_extra_body(block.extra_body, who),
    )


TEACHER_KINDS = ("openai", "jax", "none")


def usage_problems(cfg: Any) -> list[str]:
    """What in a ``configs/reasoning.py`` config cannot work, one line per problem naming its
    ``--config.`` field, before anything is read or sent (``scripts/build_reasoning.py`` reports
    them as usage errors, exit status 2)."""
    from tatar_jax.reasoning.teachers import URL_SCHEMES

    out = []
    kind = cfg.teacher.kind
    if kind not in TEACHER_KINDS:
        out.append(f"--config.teacher.kind: {kind!r} is not one of {', '.join(TEACHER_KINDS)}")
    blocks = [("teacher", kind == "openai"), ("judge", bool(cfg.judge.enabled))]
    for who, used in blocks:
        block = cfg[who]
        if not used:
            continue
        if not block.base_url:
            out.append(
                f"--config.{who}.base_url: empty (the endpoint URL, e.g. http://host:8000/v1)"
            )
        elif not str(block.base_url).startswith(URL_SCHEMES):
            out.append(f"--config.{who}.base_url: must start with http:// or https://, got "
                       f"{block.base_url!r}")  # fmt: skip
        if not block.model:
            out.append(f"--config.{who}.model: empty (the served model name)")
    if kind == "jax" and not cfg.teacher.checkpoint:
        out.append("--config.teacher.checkpoint: teacher.kind 'jax' needs a Qwen2.5-VL directory")
    for field in ("input", "attributes"):
        path = cfg.get(field) or ""
        if path and not os.path.isfile(path):
            out.append(f"--config.{field}: no such file: {path}")
    if cfg.score_range is not None:
        try:
            lo, hi = (float(x) for x in cfg.score_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError
        except (TypeError, ValueError):
            out.append(f"--config.score_range: needs two finite numbers lo < hi, got "
                       f"{cfg.score_range!r}")  # fmt: skip
    return out


def make_teacher(cfg: Any) -> Teacher | None:
    """The teacher named by ``cfg.teacher.kind``; ``"none"`` (judge-only) returns None."""
    kind = cfg.teacher.kind
    if kind == "none":
        return None
    if kind == "openai":
        return _chat_client(cfg, "teacher")
    if kind == "jax":
        from tatar_jax.reasoning.teachers import load_jax_teacher

        return load_jax_teacher(cfg.teacher.checkpoint, seed=int(cfg.seed))
    raise ValueError(f"teacher.kind must be 'openai', 'jax' or 'none', got {kind!r}")


def make_judge(cfg: Any) -> Teacher | None:
    if not cfg.judge.enabled:
        return None
    if not cfg.judge.base_url or not cfg.judge.model:
        raise ValueError(
            "the judge is enabled but judge.base_url / judge.model are not set "
            "(set them, or --config.judge.enabled=False to keep rows that pass the hard rules)"
        )
    return _chat_client(cfg, "judge")


def dataset_spec(cfg: Any):
    """The dataset declaration: a built-in (``cfg.dataset`` under ``cfg.data_root``) or
    ``cfg.input`` with its declared ``cfg.score_range``."""
    from tatar_jax.data import datasets
    from tatar_jax.data.manifest import DatasetSpec

    if cfg.dataset:
        spec = datasets.get(
            cfg.dataset,
            cfg.data_root,
            image_root=cfg.image_root or None,
            manifest=cfg.input or None,
            sampling=cfg.sampling,
            label_field=cfg.label_field or None,
        )
        if cfg.score_range is not None:
            spec = spec.replace(score_range=tuple(cfg.score_range))
        spec = spec.replace(allow_absolute_images=bool(cfg.get("allow_absolute_images", False)))
        if spec.task != cfg.task:
            raise ValueError(f"dataset {spec.name!r} is an {spec.task} dataset, task is {cfg.task}")
        return spec
    if not cfg.input:
        raise ValueError("set input (a JSON/JSONL manifest) or dataset (a built-in name)")
    if cfg.score_range is None:
        raise ValueError(
            f"declare the native score range of {cfg.input} (score_range=(lo, hi), e.g. (0, 10) "
            "for ArtiMuse, (1, 5) for DeQA gt_score_norm, (0, 100) for KonIQ MOS)"
        )
    name = cfg.dataset_name or os.path.splitext(os.path.basename(cfg.input))[0]
    return DatasetSpec(
        name=name,
        task=cfg.task,
        manifest=cfg.input,
        image_root=cfg.image_root,
        score_range=tuple(cfg.score_range),
        sampling=cfg.sampling,
        label_field=cfg.label_field or "gt_score",
        allow_absolute_images=bool(cfg.get("allow_absolute_images", False)),
    )


def load_rows(cfg: Any) -> tuple[list[InputRow], list[Any]]:
    """(rows, manifest rows skipped under ``on_bad_row = "skip"``)."""
    from tatar_jax.data import manifest
    from tatar_jax.reasoning import records

    rows, bad = records.load_rows(dataset_spec(cfg), on_error=cfg.on_bad_row)
    if cfg.attributes:
        rows = records.merge_attribute_conversations(rows, manifest.read_rows(cfg.attributes))
    return rows, bad


def main(cfg: Any) -> Summary:
    """Build from a ``configs/reasoning.py`` config; prints the summary."""
    rows, bad_rows = load_rows(cfg)
    teacher = make_teacher(cfg)
    judge = make_judge(cfg)
    if teacher is not None and cfg.teacher.kind == "jax" and int(cfg.client.concurrency) != 1:
        log.info("JAX teacher: running rows one at a time (concurrency 1)")
        cfg.client.concurrency = 1
    summary = run(cfg, rows, teacher, judge, bad_rows=bad_rows)
    print(summary.text())
    return summary
