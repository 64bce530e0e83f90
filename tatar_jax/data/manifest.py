"""Dataset declarations, manifest loading, 0-100 label mapping, sampling and validation.

A dataset is a manifest file (a JSON list, or JSONL with one object per line) of rows such as
``{"image": "123.jpg", "gt_score": 3.71, ...}`` plus an image folder and a **declared native
score range**. Scores map linearly from the declared range to 0-100 (:func:`to_score_100`), which
fixes the reference's value-based rule (spec §2.3, bug B1); :func:`reference_score_100` keeps that
rule for comparisons only.

Loaded records are plain dicts (what :mod:`tatar_jax.data.pipeline` consumes)::

    every field of the manifest row, then (overriding):
    image       str    resolved image path (image_root / row[image_field])
    image_name  str    the row's image entry as written in the manifest
    score_raw   float  row[label_field] in the dataset's native scale
    gt_100      float  score on 0-100 (declared-range map, or the reference rule)
    row_id      int    0-based row of the manifest (line number - 1 for JSONL)
    source      str    manifest path
    dataset     str    DatasetSpec.name
    task        str    "iqa" | "iaa"
    target      str    only when DatasetSpec.target_field is set (SFT rationale)

Bad rows (missing field, non-numeric / NaN / out-of-range score, duplicate image) raise
:class:`ManifestError` naming file, row and reason, or with ``on_error="skip"`` are dropped and
returned in ``Loaded.skipped`` so the caller counts them; nothing is ever replaced (bug B5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tatar_jax import cli_errors
from tatar_jax.data import jsonl

TASKS = ("iqa", "iaa")
ON_ERROR = ("error", "skip")
# Scores within this distance outside the declared range are accepted (float noise in label files).
RANGE_TOLERANCE = 1e-6


class ManifestError(ValueError):
    """A manifest (or one of its rows) is unusable; the message names the file and the row."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Declaration of one dataset.

    Attributes:
      name: dataset name (appears in records, metrics and errors).
      task: ``"iqa"`` or ``"iaa"``.
      manifest: path of the JSON / JSONL manifest.
      image_root: folder the manifest's image entries are relative to ("" = the manifest's
        folder). An entry must stay inside it: a ``..`` that leaves it is a bad row, and so is an
        absolute entry unless ``allow_absolute_images``.
      score_range: declared native ``(lo, hi)`` of the label; ``lo`` maps to 0 and ``hi`` to 100.
      sampling: ``"all"``, ``"first:N"``, ``"end:N"``, ``"random:N"`` (N a count or ``"P%"``) or
        ``"P%"`` (= ``"random:P%"``) - the reference's strategies (see :func:`sample_indices`).
      label_field: row field holding the score (DeQA KonIQ train for GRPO: ``gt_score_norm``).
      image_field: row field holding the image path.
      target_field: row field holding the SFT rationale, copied to ``record["target"]``.
      synthetic: True for the embedded synthetic datasets (reported with results).
      allow_absolute_images: the explicit opt-out of confinement for manifests that name their
        images by absolute paths (used as they are).
    """

    name: str
    task: str
    manifest: str
    image_root: str = ""
    score_range: tuple[float, float] = (0.0, 100.0)
    sampling: str = "all"
    label_field: str = "gt_score"
    image_field: str = "image"
    target_field: str | None = None
    synthetic: bool = False
    allow_absolute_images: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(
                f"dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}"
            )
        lo, hi = (float(v) for v in self.score_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(
                f"dataset {self.name!r}: score_range must be finite lo < hi, got {self.score_range}"
            )
        object.__setattr__(self, "score_range", (lo, hi))
        parse_sampling(self.sampling)  # fail at declaration time

    def replace(self, **changes: Any) -> DatasetSpec:
        return dataclasses.replace(self, **changes)

    @property
    def resolved_image_root(self) -> str:
        return self.image_root or os.path.dirname(os.path.abspath(self.manifest))


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One rejected row: where it is and why."""

    source: str
    row: int
    reason: str
    image: str = ""
    kind: str = ""  # "field" | "score" | "duplicate" | "image"

    def __str__(self) -> str:
        img = f" (image {self.image!r})" if self.image else ""
        return f"{self.source}: row {self.row}{img}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Records of one dataset plus the rows dropped under ``on_error="skip"``."""

    spec: DatasetSpec
    records: list[dict[str, Any]]
    skipped: list[BadRow]

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


_SPEC_FIELDS = frozenset(
    {"builtin", "task", "manifest", "score_range", "image_root", "sampling", "label_field",
     "image_field", "target_field"}
)  # fmt: skip
_OPTIONAL_SPEC_FIELDS = frozenset({"allow_absolute_images"})  # default False


def spec_from_config(name: str, cfg: Any) -> DatasetSpec:
    """DatasetSpec from a ``configs/common.py:dataset_source`` block (a ConfigDict or a dict).

    Every field of that block is required and no other is allowed (a renamed field is an error,
    never a silent default): ``task``, ``manifest``, ``score_range`` (the declared native range;
    all three non-empty), ``image_root``, ``sampling``, ``label_field``, ``image_field``,
    ``target_field`` ("" = none) and ``builtin`` (read by the trainer; empty here).
    """
    missing = sorted(_SPEC_FIELDS - set(cfg.keys()))
    unknown = sorted(set(cfg.keys()) - _SPEC_FIELDS - _OPTIONAL_SPEC_FIELDS)
    if missing or unknown:
        raise ValueError(
            f"dataset {name!r}: missing config field(s) {missing}, unknown field(s) {unknown}; "
            f"a dataset block has exactly: {', '.join(sorted(_SPEC_FIELDS))}"
        )
    for key in ("task", "manifest", "score_range"):
        if cfg[key] in (None, "", ()):
            raise ValueError(
                f"dataset {name!r}: config needs {key!r}"
                + (" (the declared native range, e.g. (1, 5))" if key == "score_range" else "")
            )
    return DatasetSpec(
        name=name,
        task=cfg["task"],
        manifest=str(cfg["manifest"]),
        image_root=str(cfg["image_root"]),
        score_range=tuple(float(v) for v in cfg["score_range"]),
        sampling=cfg["sampling"],
        label_field=cfg["label_field"],
        image_field=cfg["image_field"],
        target_field=cfg["target_field"] or None,
        allow_absolute_images=bool(
            cfg["allow_absolute_images"] if "allow_absolute_images" in cfg.keys() else False
        ),
    )


# ---------------------------------------------------------------------------------------------
# Score mapping


def to_score_100(raw: Any, score_range: Sequence[float] = (0.0, 100.0)) -> Any:
    """Linear map of ``raw`` from the declared ``(lo, hi)`` to ``[0, 100]``, clipped.

    ``y = clip(100 * (raw - lo) / (hi - lo), 0, 100)``. Scalars give a Python float, arrays an
    array of float64 of the same shape. NaN stays NaN (callers validate first).
    """
    lo, hi = float(score_range[0]), float(score_range[1])
    if not hi > lo:
        raise ValueError(f"score_range must have lo < hi, got {tuple(score_range)}")
    y = np.clip(100.0 * (np.asarray(raw, dtype=np.float64) - lo) / (hi - lo), 0.0, 100.0)
    return float(y) if y.ndim == 0 else y


def reference_score_100(x: Any, task: str) -> Any:
    """The reference's value-based 0-100 rule (spec §2.3), for comparisons only (bug B1).

    IQA: ``[0,1] -> 100x``; else ``[1,5] -> 25(x-1)``; else ``clip(x, 0, 100)``.
    IAA: ``[0,10] -> 10x``; else ``clip(x, 0, 100)``. Scalars give a float, arrays float64.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x = np.asarray(x, dtype=np.float64)
    clipped = np.clip(x, 0.0, 100.0)
    if task == "iqa":
        y = np.where(
            (x >= 0) & (x <= 1), 100.0 * x, np.where((x >= 1) & (x <= 5), 25.0 * (x - 1), clipped)
        )
    else:
        y = np.where((x >= 0) & (x <= 10), 10.0 * x, clipped)
    return float(y) if y.ndim == 0 else y


# ---------------------------------------------------------------------------------------------
# Sampling


def parse_sampling(strategy: str) -> tuple[str, int | None, float | None]:
    """``all | first:N | end:N | random:N | P% | <kind>:P%`` -> ``(kind, count, percent)``."""
    s = (strategy or "all").strip()
    if s == "all":
        return "all", None, None
    kind, sep, amount = s.partition(":")
    if not sep:
        kind, amount = "random", s
        if not amount.endswith("%"):
            raise ValueError(f"unknown sampling strategy {strategy!r}")
    if kind not in ("first", "end", "random"):
        raise ValueError(
            f"unknown sampling strategy {strategy!r} (all, first:N, end:N, random:N, P%)"
        )
    try:
        if amount.endswith("%"):
            pct = float(amount[:-1])
            if not 0.0 <= pct <= 100.0:
                raise ValueError
            return kind, None, pct
        n = int(amount)
        if n < 0:
            raise ValueError
        return kind, n, None
    except ValueError:
        raise ValueError(f"sampling strategy {strategy!r}: bad amount {amount!r}") from None


def sample_indices(n: int, strategy: str = "all", seed: int = 42) -> np.ndarray:
    """Row indices kept by a sampling strategy over ``n`` rows, as the reference does it.

    ``P%`` means ``ceil(P * n / 100)`` rows (the reference rounds up). ``first`` keeps the head,
    ``end`` the tail, ``random`` a seeded permutation's first rows (in that permuted order).
    Returns int64 indices.
    """
    kind, count, pct = parse_sampling(strategy)
    if kind == "all":
        return np.arange(n, dtype=np.int64)
    k = math.ceil(pct * n / 100.0) if pct is not None else count
    k = min(int(k), n)
    if kind == "first":
        return np.arange(k, dtype=np.int64)
    if kind == "end":
        return np.arange(n - k, n, dtype=np.int64)
    return np.random.default_rng(seed).permutation(n)[:k].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON list or JSONL manifest (format detected from the first character).

    Raises ManifestError naming the file (and line for JSONL) on unreadable / malformed input.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read manifest ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: {cli_errors.decode_reason(err)}") from None
    stripped = text.lstrip()
    if not stripped:
        raise ManifestError(f"{path}: manifest is empty")
    if stripped[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(rows, list) or not rows:
            raise ManifestError(f"{path}: no rows (expected a non-empty JSON list of objects)")
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ManifestError(f"{path}: row {i}: expected an object, got {type(r).__name__}")
        return rows
    try:
        return jsonl.parse_rows(path, text)
    except jsonl.JsonlError as err:
        raise ManifestError(str(err)) from err


def parse_score(value: Any, score_range: Sequence[float] | None) -> float:
    """The row's score as a float; ValueError with the reason if non-numeric, NaN or out of range.

    Only JSON numbers are scores: a string (``"3.5"``), a boolean or null is refused, since a
    quoted score is a sign of a file written by mistake (or a column of text) and is never
    guessed at.
    """
    if isinstance(value, str):
        raise ValueError(f"score {value!r} is a string, not a number (write it without quotes)")
    if isinstance(value, bool) or value is None:
        raise ValueError(f"score {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"score {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"score {value!r} is not finite")
    if score_range is not None:
        lo, hi = score_range
        if x < lo - RANGE_TOLERANCE or x > hi + RANGE_TOLERANCE:
            raise ValueError(f"score {x:g} is outside the declared range [{lo:g}, {hi:g}]")
    return x


def _resolve(image_root: str, name: str) -> str:
    return os.path.normpath(os.path.join(image_root, name))


def image_path_problem(spec: DatasetSpec, name: str) -> str | None:
    """Why the image entry ``name`` may not be opened, or None: it must name a file inside the
    image root (checked on the path as written, so a symlink the user put inside the root is
    followed); an absolute entry only with ``spec.allow_absolute_images``."""
    if os.path.isabs(name):
        if spec.allow_absolute_images:
            return None
        return (
            f"absolute image path {name!r}: image entries are relative to the image root "
            "(set allow_absolute_images / --allow_absolute_images to use absolute paths)"
        )
    root = os.path.normpath(os.path.abspath(spec.resolved_image_root))
    path = os.path.normpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        return f"image path {name!r} leaves the image root {root}"
    return None


def target_problem(target: str) -> str | None:
    """Why an SFT target is not a ``<think>…</think>`` then ``<answer>…</answer>`` text, or
    None (a target without them would teach the model to answer in no parseable format)."""
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    at = [target.find(t) for t in tags]
    if -1 in at:
        missing = [t for t, i in zip(tags, at, strict=True) if i == -1]
        return f"SFT target lacks {', '.join(missing)} (needs <think>…</think><answer>…</answer>)"
    if at != sorted(at):
        return "SFT target's tags are out of order (needs <think>…</think><answer>…</answer>)"
    return None


def _row_problems(
    spec: DatasetSpec, rows: Sequence[Mapping[str, Any]], indices: Iterable[int]
) -> tuple[dict[int, tuple[str, str]], dict[int, float]]:
    """Per-row ``(kind, reason)`` problems and the parsed scores of the good rows."""
    problems: dict[int, str] = {}
    scores: dict[int, float] = {}
    seen: dict[str, int] = {}
    root = spec.resolved_image_root
    for i in indices:
        row = rows[i]
        name = row.get(spec.image_field)
        if not isinstance(name, str) or not name:
            problems[i] = ("field", f"missing or empty field {spec.image_field!r}")
            continue
        if spec.label_field not in row:
            problems[i] = ("field", f"missing field {spec.label_field!r}")
            continue
        if spec.target_field is not None and not isinstance(row.get(spec.target_field), str):
            problems[i] = ("field", f"missing or non-text field {spec.target_field!r}")
            continue
        if spec.target_field is not None:
            why = target_problem(row[spec.target_field])
            if why:
                problems[i] = ("field", f"field {spec.target_field!r}: {why}")
                continue
        why = image_path_problem(spec, name)
        if why:
            problems[i] = ("image", why)
            continue
        try:
            scores[i] = parse_score(row[spec.label_field], spec.score_range)
        except ValueError as err:
            problems[i] = ("score", f"field {spec.label_field!r}: {err}")
            continue
        path = _resolve(root, name)
        if path in seen:
            problems[i] = ("duplicate", f"duplicate image (same as row {seen[path]})")
            scores.pop(i)
            continue
        seen[path] = i
    return problems, scores


def load_records(
    spec: DatasetSpec,
    *,
    on_error: str = "error",
    reference_compat: bool = False,
    seed: int = 42,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> Loaded:
    """Read, sample and check ``spec``'s manifest; returns records and the skipped rows.

    Args:
      spec: the declaration.
      on_error: ``"error"`` raises ManifestError at the first bad row (file, row, reason);
        ``"skip"`` drops bad rows and lists them in ``Loaded.skipped``.
      reference_compat: map with :func:`reference_score_100` (value-based, bug B1) instead of the
        declared range. Scores are still checked against the declared range.
      seed: seed of ``random:`` sampling.
      rows: already-read rows (tests); default reads ``spec.manifest``.

    Sampling is applied first (as in the reference), so ``row_id`` is the row in the file and
    only sampled rows are checked. Images are not opened here (see :func:`validate`).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if rows is None:
        rows = read_rows(spec.manifest)
    idx = sample_indices(len(rows), spec.sampling, seed)
    problems, scores = _row_problems(spec, rows, idx)
    root = spec.resolved_image_root
    records: list[dict[str, Any]] = []
    skipped: list[BadRow] = []
    for i in idx:
        i = int(i)
        row = rows[i]
        if i in problems:
            kind, reason = problems[i]
            bad = BadRow(spec.manifest, i, reason, str(row.get(spec.image_field, "") or ""), kind)
            if on_error == "error":
                raise ManifestError(f"dataset {spec.name!r}: {bad}")
            skipped.append(bad)
            continue
        raw = scores[i]
        gt = (
            reference_score_100(raw, spec.task)
            if reference_compat
            else to_score_100(raw, spec.score_range)
        )
        rec = dict(row)
        rec.update(
            image=_resolve(root, row[spec.image_field]),
            image_name=row[spec.image_field],
            score_raw=raw,
            gt_100=gt,
            row_id=i,
            source=spec.manifest,
            dataset=spec.name,
            task=spec.task,
        )
        if spec.target_field is not None:
            rec["target"] = row[spec.target_field]
        records.append(rec)
    return Loaded(spec, records, skipped)


# ---------------------------------------------------------------------------------------------
# Validation (scripts/check_data.py)


def check_image_file(path: str) -> str | None:
    """None if the image decodes fully, else the reason (missing, unreadable, truncated)."""
    from tatar_jax.data import image as image_mod  # PIL only when images are checked

    try:
        image_mod.load_image(path)
    except image_mod.ImageLoadError as err:
        return err.reason
    return None


def check_image_files(paths: Sequence[str], num_threads: int = 8) -> list[str | None]:
    """:func:`check_image_file` over ``paths`` with a thread pool (PIL decodes without the GIL)."""
    if num_threads > 1 and len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(check_image_file, paths))
    return [check_image_file(p) for p in paths]


def validate(
    spec: DatasetSpec,
    *,
    check_images: bool = True,
    num_threads: int = 8,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> list[BadRow]:
    """Check every row of ``spec``'s manifest (sampling ignored); returns the problems, row order.

    Row checks: image field present, score numeric / finite / inside the declared range, no
    duplicate image. With ``check_images`` every image of a row that passed is fully decoded:
    missing, unreadable and truncated files are reported. A manifest that cannot be read at all
    raises ManifestError.
    """
    if rows is None:
        rows = read_rows(spec.manifest)
    problems, _ = _row_problems(spec, rows, range(len(rows)))
    out = {
        i: BadRow(spec.manifest, i, r, str(rows[i].get(spec.image_field, "") or ""), kind)
        for i, (kind, r) in problems.items()
    }
    if check_images:
        good = [i for i in range(len(rows)) if i not in problems]
        paths = [_resolve(spec.resolved_image_root, rows[i][spec.image_field]) for i in good]
        reasons = check_image_files(paths, num_threads)
        for i, reason in zip(good, reasons, strict=True):
            if reason is not None:
                out[i] = BadRow(spec.manifest, i, reason, rows[i][spec.image_field], "image")
    return [out[i] for i in sorted(out)]


def write_manifest(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows as JSONL (``.jsonl``) or a JSON list (anything else), atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".jsonl"):
        jsonl.write_rows(path, rows)
    else:
        jsonl.write_atomic(path, lambda f: json.dump(list(rows), f, ensure_ascii=False, indent=1))
