"""The data of a run from its config: training sources, held-out sources, the tokenizer folder.

A config names data sets (``config.data.train`` / ``config.eval.datasets``): ``synthetic`` /
``synthetic_test`` (the embedded set, built once under ``<workdir>/synthetic``), a built-in
benchmark (``tatar_jax.data.datasets``) or a manifest (``tatar_jax.data.manifest``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from tatar_jax.data import datasets, manifest, pipeline, prompts, synthetic


def tokenizer_dir(cfg: Any) -> str | None:
    """The tokenizer's folder: ``data.tokenizer_dir``, else the HF model's, else the one of the
    model's source (``tatar_jax.loading.tokenizer_dir``: an ``init_checkpoint`` run's, or the
    embedded model's own small vocabulary); None = the offline Qwen2.5 rebuild."""
    if cfg.data.tokenizer_dir or cfg.model.hf_dir:
        return cfg.data.tokenizer_dir or cfg.model.hf_dir
    from tatar_jax import loading  # lazy: loading imports the model

    return loading.tokenizer_dir(
        loading.PolicySource(checkpoint=cfg.model.init_checkpoint, preset=cfg.model.preset)
    )


def ensure_synthetic(root: pathlib.Path, image_size: int) -> dict[str, Any]:
    """The embedded data set; with several processes sharing the workdir process 0 builds it
    and the others wait (two concurrent builds replace each other's folder while it is read)."""
    if jax.process_count() == 1:
        return synthetic.ensure_synthetic(root, image_size=image_size)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        synthetic.ensure_synthetic(root, image_size=image_size)
    multihost_utils.sync_global_devices(f"tatar_synthetic_{root}")
    return synthetic.ensure_synthetic(root, image_size=image_size)


def dataset_specs(cfg: Any, names: Sequence[str], workdir: pathlib.Path, split: str) -> list[Any]:
    """The ``DatasetSpec`` of each configured name (a synthetic name gives one per task)."""
    out = []
    for name in names:
        if name in ("synthetic", "synthetic_test"):
            specs = ensure_synthetic(workdir / "synthetic", int(cfg.data.synthetic.image_size))
            sp = "test" if name == "synthetic_test" else split
            out += [specs[f"synthetic-{t}-{sp}"] for t in prompts.TASKS]
            continue
        if name not in cfg.data.sources:
            known = sorted([*cfg.data.sources.keys(), "synthetic", "synthetic_test"])
            raise ValueError(f"unknown data set {name!r}; configured: {', '.join(known)}")
        src = cfg.data.sources[name]
        if not src.builtin:
            out.append(manifest.spec_from_config(name, src))
            continue
        spec = datasets.get(
            src.builtin, cfg.data.root, manifest=src.manifest or None,
            image_root=src.image_root or None, sampling=src.sampling,
            label_field=src.label_field or None,
        )  # fmt: skip
        spec = dataclasses.replace(spec, score_range=tuple(src.score_range))
        if src.target_field:
            spec = dataclasses.replace(spec, target_field=src.target_field)
        out.append(spec)
    return out


def sources(
    cfg: Any, names: Sequence[str], workdir: pathlib.Path, split: str = "train"
) -> list[pipeline.Source]:
    """Pipeline sources of the named data sets (``data.bad_record`` decides skip or error)."""
    specs = dataset_specs(cfg, names, workdir, split)
    on_error = "skip" if cfg.data.bad_record == "skip" else "error"
    return pipeline.sources_from_specs(specs, on_error=on_error, seed=cfg.data.seed)
