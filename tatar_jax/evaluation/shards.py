"""Resume checks and process sharding of an evaluation (see :mod:`tatar_jax.evaluation.runner`).

Resuming: stored prediction rows are checked against the manifest (same image and label,
:func:`check_stored`) and the run settings against ``run_info.json`` (:func:`check_run_info`).

Several processes: the rows still to score are dealt out by manifest position (row ``i`` to
process ``i % count``, :func:`shard_rows`); each process appends its own to
``predictions.<index>.jsonl`` / ``errors.<index>.jsonl`` (:func:`shard_path`), and process 0
merges the shards into the one-process files and removes them (:func:`merge_files`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from tatar_jax.data import jsonl
from tatar_jax.evaluation.outputs import (
    ERRORS,
    PREDICTIONS,
    DamagedOutputError,
    ResumeMismatchError,
    read_jsonl,
)

# Settings that change what a stored prediction means; a resumed run must agree on them.
RESUME_KEYS = (
    "reference_compat",
    "model",
    "max_new_tokens",
    "min_pixels",
    "max_pixels",
    "prompt_variant",
    "weights",  # tatar_jax.evaluation.fingerprint: what was evaluated, not its folder's name
    "dtype",
    "decoding",  # predict.decoding_info: K, temperature, top-k/p, seed, the answer constraint
)
# What an out_dir written before the decoding settings were recorded was decoded with.
GREEDY_DECODING = {"num_samples": 1, "temperature": 0.0, "constrained": False}


# ---------------------------------------------------------------------------------------------
# Resume checks


def _same_float(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def check_stored(
    path: str, rows: Sequence[Mapping[str, Any]], by_id: Mapping[int, Mapping[str, Any]]
) -> dict[int, dict[str, Any]]:
    """The rows of ``path`` (``rows``, as read) that belong to the selected records ``by_id``,
    by row_id; EvalError on duplicates or on a row that disagrees with its manifest record."""
    done: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        rid = row.get("row_id")
        if not isinstance(rid, int):
            raise DamagedOutputError(path, f"row {i}: missing integer row_id")
        if rid in done:
            raise DamagedOutputError(path, f"row {i}: row_id {rid} appears twice")
        rec = by_id.get(rid)
        if rec is None:  # outside the current selection (e.g. a smaller --limit): kept, unused
            continue
        if row.get("image") != rec["image_name"] or not _same_float(
            row.get("gt_raw"), rec["score_raw"]
        ):
            raise ResumeMismatchError(
                f"{path}: row {i}: row_id {rid} holds image {row.get('image')!r} / gt "
                f"{row.get('gt_raw')!r} but the manifest has {rec['image_name']!r} / "
                f"{rec['score_raw']!r}; use a fresh out_dir for a different dataset"
            )
        if not _same_float(row.get("gt_100"), rec["gt_100"]):
            raise ResumeMismatchError(
                f"{path}: row {i}: row_id {rid} was stored with gt_100 "
                f"{row.get('gt_100')!r}, now {rec['gt_100']!r} (another score_range or label "
                "mapping); use a fresh out_dir"
            )
        done[rid] = dict(row)
    return done


def read_stored(
    path: str, by_id: Mapping[int, Mapping[str, Any]], *, repair: bool = False
) -> dict[int, dict[str, Any]]:
    """:func:`check_stored` rows of the predictions file ``path`` (``repair``: see
    :func:`~tatar_jax.evaluation.outputs.read_jsonl`)."""
    return check_stored(path, read_jsonl(path, repair=repair), by_id)


def check_run_info(path: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The stored run_info (or {}); EvalError if a setting that changes predictions differs."""
    if not os.path.exists(path):
        return {}
    from tatar_jax import cli_errors

    old = cli_errors.read_json(path)
    if not isinstance(old, dict):
        raise cli_errors.DamagedInputError(path, "not a JSON object (an evaluation's run_info)")
    if "weights" in info and "weights" not in old:
        raise ResumeMismatchError(
            f"{path}: this out_dir does not record which weights wrote its predictions (written "
            "before evaluations were keyed by a fingerprint of the weights); stored predictions "
            "could be another model's - use a fresh out_dir"
        )
    if "weights" in old and "weights" in info and old["weights"] != info["weights"]:
        raise ResumeMismatchError(
            f"{path}: this out_dir holds the predictions of other weights ({old['weights']} of "
            f"{old.get('model', '?')}; now {info['weights']}); stored predictions would be "
            "mixed with new ones - use a fresh out_dir"
        )
    if "decoding" in info and "decoding" not in old and old:
        old = {**old, "decoding": GREEDY_DECODING}
    for key in RESUME_KEYS:
        if key in old and key in info and old[key] != info[key]:
            raise ResumeMismatchError(
                f"{path}: this out_dir was written with {key}={old[key]!r}, now {info[key]!r}; "
                "stored predictions would be mixed with new ones - use a fresh out_dir"
            )
    return old


# ---------------------------------------------------------------------------------------------
# Several processes


def shard_path(out_dir: str, base: str, process_index: int) -> str:
    """``predictions.jsonl`` -> ``predictions.<process_index>.jsonl`` (same folder)."""
    stem, ext = os.path.splitext(base)
    return os.path.join(out_dir, f"{stem}.{process_index}{ext}")


def shard_files(out_dir: str, base: str) -> list[str]:
    """Existing ``<stem>.<k>.jsonl`` files of ``base``, by k."""
    stem, ext = os.path.splitext(base)
    pat = re.compile(re.escape(stem) + r"\.(\d+)" + re.escape(ext) + "$")
    found = []
    if os.path.isdir(out_dir):
        for f in os.listdir(out_dir):
            m = pat.match(f)
            if m:
                found.append((int(m.group(1)), os.path.join(out_dir, f)))
    return [p for _, p in sorted(found)]


def shard_rows(
    records: Sequence[Mapping[str, Any]],
    done: Mapping[int, Any],
    process_count: int,
    batch_size: int,
) -> tuple[list[list[Mapping[str, Any]]], int]:
    """Pending rows of each process and the number of batches every process runs.

    The record at position ``i`` of ``records`` belongs to process ``i % process_count``
    (deterministic, disjoint, balanced, and independent of how far the other processes got);
    its pending rows are the ones not in ``done``. Every process runs ``num_batches`` = the
    largest ``ceil(pending / batch_size)`` batches (the shorter ones end with empty batches), so
    that predict functions running collective programs stay in lockstep.
    """
    parts: list[list[Mapping[str, Any]]] = [[] for _ in range(process_count)]
    for i, r in enumerate(records):
        if r["row_id"] not in done:
            parts[i % process_count].append(r)
    num_batches = max(-(-len(p) // batch_size) for p in parts)
    return parts, num_batches


def barrier(name: str) -> None:
    """All processes reach this point (a no-op in one real process, e.g. simulated shards)."""
    if "jax" in sys.modules:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


def read_done(
    out_dir: str, by_id: Mapping[int, Mapping[str, Any]], repair: str | None = None
) -> dict[int, dict[str, Any]]:
    """Stored rows of the merged file and of every shard file (first occurrence wins: a row can
    be in both when a merge was interrupted before the shards were removed). The file named by
    ``repair`` has its partial last line cut off."""
    done: dict[int, dict[str, Any]] = {}
    for path in [os.path.join(out_dir, PREDICTIONS), *shard_files(out_dir, PREDICTIONS)]:
        for rid, row in read_stored(path, by_id, repair=path == repair).items():
            done.setdefault(rid, row)
    return done


def merge_files(
    out_dir: str,
    records: Sequence[Mapping[str, Any]],
    by_id: Mapping[int, Mapping[str, Any]],
    errors: list[dict[str, Any]],
) -> dict[int, dict[str, Any]]:
    """Merges the shard files of ``out_dir`` and removes them; returns the stored rows by row_id.

    ``predictions.jsonl`` gets every stored row (rows of records outside the selection first,
    then the selected ``records`` in their order: the file a one-process run writes);
    ``errors.jsonl`` gets ``errors`` (the bad rows; extended in place) followed by the shards'
    failures of rows still unscored, in record order.
    """
    path = os.path.join(out_dir, PREDICTIONS)
    done = read_done(out_dir, by_id, repair=path)
    # rows stored for records outside this selection (a smaller --limit) are kept
    others = [r for r in read_jsonl(path) if r.get("row_id") not in by_id]
    jsonl.write_rows(path, others + [done[r["row_id"]] for r in records if r["row_id"] in done])
    order = {r["row_id"]: i for i, r in enumerate(records)}
    failed: dict[tuple[str, int], dict[str, Any]] = {}
    err_shards = shard_files(out_dir, ERRORS)
    for p in err_shards:
        for e in read_jsonl(p):
            if e.get("row_id") in order and e["row_id"] not in done:
                failed.setdefault((e.get("kind"), e["row_id"]), e)
    errors += sorted(failed.values(), key=lambda e: order[e["row_id"]])
    jsonl.write_rows(os.path.join(out_dir, ERRORS), errors)
    for p in shard_files(out_dir, PREDICTIONS) + err_shards:
        os.remove(p)
    return done
