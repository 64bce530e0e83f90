"""Dataset declarations of an evaluation run from ``configs/eval.py`` (built-in or a manifest)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tatar_jax.data import datasets
from tatar_jax.data.manifest import DatasetSpec


def parse_mapping(text: str, what: str = "image_roots") -> dict[str, str]:
    """``"KonIQ-10K=/a,SPAQ=/b"`` -> ``{"KonIQ-10K": "/a", "SPAQ": "/b"}`` (names canonicalised).

    ValueError naming the entry when one has no ``=`` or names an unknown dataset.
    """
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--{what}: entry {item!r} is not NAME=PATH")
        try:
            key = datasets.canonical_name(name.strip())
        except KeyError as err:
            raise ValueError(f"--{what}: {err.args[0]}") from None
        out[key] = value.strip()
    return out


def specs_from_config(cfg: Any, image_roots: Mapping[str, str] | None = None) -> list[DatasetSpec]:
    """The datasets of ``cfg`` (the ``eval`` block of ``configs/eval.py``).

    A non-empty ``cfg.manifest`` declares one custom dataset (needs ``task`` and
    ``score_range``); otherwise ``cfg.datasets`` (comma-separated built-in names) under
    ``cfg.benchmark_root``, each with its image folder from ``image_roots`` (overrides),
    ``cfg.image_root`` (only with a single dataset) or ``cfg.image_roots``.
    """
    if cfg.manifest:
        if cfg.task not in ("iqa", "iaa"):
            raise ValueError("--manifest needs --task=iqa or --task=iaa")
        if cfg.score_range is None or len(cfg.score_range) != 2:
            raise ValueError(
                "--manifest needs --score_range=LO,HI (the labels' declared native range; "
                "LO maps to 0 and HI to 100)"
            )
        name = cfg.name or os.path.splitext(os.path.basename(cfg.manifest))[0]
        return [
            DatasetSpec(
                name=name,
                task=cfg.task,
                manifest=cfg.manifest,
                image_root=cfg.image_root,
                score_range=tuple(float(v) for v in cfg.score_range),
                label_field=cfg.label_field,
                allow_absolute_images=bool(cfg.get("allow_absolute_images", False)),
            )
        ]
    names = [n.strip() for n in str(cfg.datasets).split(",") if n.strip()]
    if not names:
        raise ValueError("no datasets: give --datasets=KonIQ-10K,... or --manifest")
    for n in names:
        try:
            datasets.canonical_name(n)
        except KeyError:
            raise ValueError(
                f"--datasets: unknown dataset {n!r}; choose from {', '.join(datasets.BENCHMARKS)}"
            ) from None
    roots = {datasets.canonical_name(k): v for k, v in dict(cfg.image_roots).items() if v}
    if cfg.image_root:  # one folder only makes sense for one dataset
        if len(names) != 1:
            raise ValueError(
                "--image_root with several datasets is ambiguous; give one folder per dataset "
                "with --image_roots=KonIQ-10K=/path,SPAQ=/path"
            )
        roots[datasets.canonical_name(names[0])] = cfg.image_root
    roots.update(image_roots or {})
    try:
        specs = datasets.benchmarks(cfg.benchmark_root or None, names, roots)
    except datasets.NoImageFolder as err:
        raise ValueError(f"{err}; give --image_roots={err.name}=/path/to/its/images") from None
    return list(specs.values())
