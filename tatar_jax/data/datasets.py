"""Ready-made declarations of the eight benchmarks and the two training sets (spec §2).

The eight benchmarks' label files ship with tatar-jax (package data, :data:`PACKAGED_ROOT`,
public labels only) with a ``SHA256SUMS`` list that is checked before a file is used; they are the
default root. A user's own root in the same UniPercept-Bench / TATAR layout
``<root>/<IQA|IAA>/<name>/<name>.json`` (training sets: ``<root>/train/<file>``, not shipped)
still works, and its ``SHA256SUMS`` is checked too when it has one. Images are not shipped: with
the shipped labels each dataset's image folder must be given
(``image_roots={"KonIQ-10K": "/data/koniq10k/1024x768", ...}``); with a user root it defaults
to the manifest's folder.

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
import functools
import hashlib
import os
from collections.abc import Mapping, Sequence

from tatar_jax.data.manifest import DatasetSpec, ManifestError

PACKAGED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
SHA256_LIST = "SHA256SUMS"  # ``sha256sum`` format: "<hex>  <relative path>" per line


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


class NoImageFolder(ValueError):
    """A shipped label file was declared without its dataset's image folder (``.name``)."""

    def __init__(self, name: str):
        super().__init__(f"{name}: no image folder (the shipped label files come without images)")
        self.name = name


def _sha256_list(root: str) -> dict[str, str]:
    """``{relative path: sha256}`` of ``<root>/SHA256SUMS`` (empty when there is none)."""
    path = os.path.join(root, SHA256_LIST)
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                digest, sep, rel = line.strip().partition("  ")
                if not sep or len(digest) != 64:
                    raise ManifestError(f"{path}: line {n} is not '<sha256>  <path>'")
                out[rel] = digest
    return out


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # cache key only: a file changed on disk is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_label_file(root: str | os.PathLike, relpath: str) -> None:
    """Checks ``<root>/<relpath>`` against ``<root>/SHA256SUMS`` (when listed there).

    ManifestError naming the file when it is missing or its sha256 differs from the list.
    """
    root = os.fspath(root)
    want = _sha256_list(root).get(relpath)
    if want is None:
        return
    path = os.path.join(root, relpath)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: label file missing (listed in {SHA256_LIST})")
    st = os.stat(path)
    got = _file_sha256(path, st.st_size, st.st_mtime_ns)
    if got != want:
        raise ManifestError(
            f"{path}: sha256 {got[:16]}... differs from {os.path.join(root, SHA256_LIST)} "
            f"({want[:16]}...): the label file is damaged or was edited; restore it"
        )


def get(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    sampling: str = "all",
    label_field: str | None = None,
    images: bool = True,
) -> DatasetSpec:
    """DatasetSpec of a built-in dataset with its manifest under ``root``.

    ``root`` None / "" = the label files shipped with tatar-jax (:data:`PACKAGED_ROOT`; the eight
    benchmarks only). The label file is checked against the root's ``SHA256SUMS``.
    ``manifest`` overrides the path (e.g. a JSONL copy); ``image_root`` defaults to the manifest's
    folder, except for the shipped labels, which have no images beside them
    (:class:`NoImageFolder` unless ``images=False``, for label-only checks); ``label_field``
    overrides the built-in one (e.g. ``"gt_score"`` for DeQA's raw MOS, which then needs its own
    range via ``.replace(score_range=...)``).
    """
    b = BUILTINS[canonical_name(name)]
    packaged = not root and not manifest
    if packaged and b.role != "benchmark":
        raise ValueError(
            f"{b.name}: its label file is not shipped with tatar-jax; give the folder that holds "
            f"{b.relpath} (data.root / --benchmark_root)"
        )
    root = PACKAGED_ROOT if not root else os.fspath(root)
    if manifest:
        path = os.fspath(manifest)
    else:
        verify_label_file(root, b.relpath)
        path = os.path.join(root, b.relpath)
    if packaged and images and not image_root:
        raise NoImageFolder(b.name)
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
    root: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    image_roots: Mapping[str, str] | None = None,
    *,
    images: bool = True,
) -> dict[str, DatasetSpec]:
    """Declarations of the benchmarks ``names`` (default: all eight), keyed by built-in name
    (``root`` None = the shipped label files; see :func:`get`)."""
    image_roots = {canonical_name(k): v for k, v in (image_roots or {}).items()}
    out = {}
    for n in names or BENCHMARKS:
        c = canonical_name(n)
        out[c] = get(c, root, image_root=image_roots.get(c), images=images)
    return out
