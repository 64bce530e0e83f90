"""Ready-made declarations of the eight benchmarks and the two training sets (spec §2).

Manifests are found under a user-given root with the UniPercept-Bench / TATAR layout
``<root>/<IQA|IAA>/<name>/<name>.json`` (training sets: ``<root>/train/<file>``). Images are not
shipped; each dataset's image folder defaults to its manifest's folder and is set per dataset
with ``image_roots={"KonIQ-10K": "/data/koniq10k/1024x768", ...}``.

Declared native ranges (label statistics from ``shared/benchmarks/README.md``):

==============  ====  =========  ================================================================
dataset         task  range      why
==============  ====  =========  ================================================================
KonIQ-10K       iqa   (0, 100)   MOS_zscore, published on 0-100; file spans 4.17-88.24
SPAQ            iqa   (0, 100)   0-100 slider MOS; file spans 4.00-93.67
KADID           iqa   (1, 5)     KADID-10k DMOS on a 1-5 ACR scale (higher = better); 1.03-4.87
PIPAL           iqa   (1, 5)     rescaled Elo published on about 1-5; file spans 1.00-4.67
ArtiMuse-10K    iaa   (0, 10)    0-10 scores (train file has exact 0 and 10); test spans 1.00-9.78
AVA             iaa   (1, 10)    mean of 1-10 votes; 2.07-8.30
TAD66K          iaa   (1, 10)    mean of 1-10 ratings; 1.39-9.28
FLICKR-AES      iaa   (0, 1)     released normalised to 0-1 (mean 1-5 rating / 5); 0.20-1.00
koniq-train     iqa   (1, 5)     DeQA-Score ``gt_score_norm`` = 1 + 4 (MOS - min) / (max - min)
artimuse-train  iaa   (0, 10)    ``train_iaa.json``, 0-10 with exact 0s and 10s
==============  ====  =========  ================================================================

Since the mapping is linear per dataset, rank metrics (SRCC) are unchanged by the choice of range;
the range matters for rewards and absolute errors, where it decides what 0 and 100 mean.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from tatar_jax.data.manifest import DatasetSpec


@dataclasses.dataclass(frozen=True)
class Builtin:
    """A built-in dataset: where its manifest lives under the root, task, range, label field."""

    name: str
    task: str
    relpath: str
    score_range: tuple[float, float]
    label_field: str = "gt_score"
    role: str = "benchmark"  # "benchmark" | "train"


def _bench(name: str, task: str, lo: float, hi: float) -> Builtin:
    return Builtin(name, task, f"{task.upper()}/{name}/{name}.json", (lo, hi))


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        _bench("KonIQ-10K", "iqa", 0.0, 100.0),
        _bench("SPAQ", "iqa", 0.0, 100.0),
        _bench("KADID", "iqa", 1.0, 5.0),
        _bench("PIPAL", "iqa", 1.0, 5.0),
        _bench("ArtiMuse-10K", "iaa", 0.0, 10.0),
        _bench("AVA", "iaa", 1.0, 10.0),
        _bench("TAD66K", "iaa", 1.0, 10.0),
        _bench("FLICKR-AES", "iaa", 0.0, 1.0),
        # GRPO reads DeQA's gt_score_norm (spec §2.2, §7.1); the file itself is not public in the
        # authors' snapshot: put DeQA-Score's KONIQ/metas/train_koniq_7k.json at this path.
        Builtin(
            "koniq-train", "iqa", "train/train_koniq_7k.json", (1.0, 5.0), "gt_score_norm", "train"
        ),
        Builtin("artimuse-train", "iaa", "train/train_iaa.json", (0.0, 10.0), "gt_score", "train"),
    )
}
BENCHMARKS = tuple(n for n, b in BUILTINS.items() if b.role == "benchmark")
TRAINING_SETS = tuple(n for n, b in BUILTINS.items() if b.role == "train")


def canonical_name(name: str) -> str:
    """Built-in name for ``name`` (case and ``-``/``_`` insensitive); KeyError listing the names."""
    key = name.lower().replace("_", "-")
    for n in BUILTINS:
        if n.lower() == key:
            return n
    raise KeyError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTINS)}")


def get(
    name: str,
    root: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    sampling: str = "all",
    label_field: str | None = None,
) -> DatasetSpec:
    """DatasetSpec of a built-in dataset with its manifest under ``root``.

    ``manifest`` overrides the path (e.g. a JSONL copy); ``image_root`` defaults to the manifest's
    folder; ``label_field`` overrides the built-in one (e.g. ``"gt_score"`` for DeQA's raw MOS,
    which then needs its own range via ``.replace(score_range=...)``).
    """
    b = BUILTINS[canonical_name(name)]
    path = os.fspath(manifest) if manifest else os.path.join(os.fspath(root), b.relpath)
    return DatasetSpec(
        name=b.name,
        task=b.task,
        manifest=path,
        image_root=os.fspath(image_root) if image_root else "",
        score_range=b.score_range,
        sampling=sampling,
        label_field=label_field or b.label_field,
    )


def benchmarks(
    root: str | os.PathLike,
    names: Sequence[str] | None = None,
    image_roots: Mapping[str, str] | None = None,
) -> dict[str, DatasetSpec]:
    """Declarations of the benchmarks ``names`` (default: all eight), keyed by built-in name."""
    image_roots = {canonical_name(k): v for k, v in (image_roots or {}).items()}
    out = {}
    for n in names or BENCHMARKS:
        c = canonical_name(n)
        out[c] = get(c, root, image_root=image_roots.get(c))
    return out
