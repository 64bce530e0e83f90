"""Resumable evaluation of a scorer on declared datasets (spec §9, with B1/B2/B12 fixed).

The model enters through one narrow seam, a **predict function**::

    predict_fn(records: Sequence[dict]) -> Sequence[str]      # one decoded completion per record

(An entry may instead be a :class:`RecordFailure` for a record the model side cannot take, e.g.
an image whose aspect ratio the processor rejects; it is listed in errors.jsonl and counted.)

Each record is a loaded manifest record (:func:`tatar_jax.data.manifest.load_records`: ``image``
path, ``task``, ``gt_100``, ``row_id``, ...) plus ``"pil_image"``, the decoded image (so the
model side does not read the file again). ``scripts/eval.py`` builds it from a checkpoint and
greedy generation; tests pass a plain function.

Multi-host (``jax.process_count() > 1``, or ``EvalOptions.process_index/process_count``): every
process calls the runner with the same arguments; the rows still to score are dealt out by
manifest position (row ``i`` to process ``i % count``), each process scores its own into
``predictions.<index>.jsonl`` / ``errors.<index>.jsonl`` (resumable per process) running the same
number of batches as the others (the short ones end with empty batches), and after a barrier
process 0 merges the shards into ``predictions.jsonl`` (manifest order), ``errors.jsonl`` and
``metrics.json`` and removes them (:func:`evaluate_shard`, :func:`merge_shards`). ``out_dir``
must be a folder every process sees. With one process nothing changes: no shard files.

Per dataset, in ``out_dir/<dataset>/``:

* ``predictions.jsonl``: one row per scored record, appended and flushed batch by batch:
  ``row_id, image, gt_raw, gt_100, task, completion, parsed, prediction, think_tokens,
  think_words, num_words``. ``prediction`` is the parsed answer clipped to [0, 100] (None when
  unparsed); ``think_tokens`` is None without a token counter.
* ``errors.jsonl``: every record that could not be scored (missing / unreadable image) with the
  reason. Rewritten by each run (failed rows are retried on resume).
* ``metrics.json``: counts and :func:`tatar_jax.evaluation.metrics.correlation_metrics`.

Resuming: a re-run with the same ``out_dir`` reads ``predictions.jsonl`` (a partial last line
from a killed run is cut off), checks every row against the manifest (same image and label) and
the run settings against ``run_info.json``, and calls the predict function only for the rows
that are missing. Metrics are computed from the file in ``row_id`` order, so a resumed run gives
exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from tatar_jax import rewards
from tatar_jax.data import image as image_mod
from tatar_jax.data import manifest as manifest_mod
from tatar_jax.evaluation import metrics as metrics_mod


@dataclasses.dataclass(frozen=True)
class RecordFailure:
    """Returned by a predict function in place of a completion: this record cannot be scored."""

    reason: str


PredictFn = Callable[[Sequence[Mapping[str, Any]]], Sequence["str | RecordFailure"]]
CountTokens = Callable[[str], int]

PREDICTIONS = "predictions.jsonl"
ERRORS = "errors.jsonl"
METRICS = "metrics.json"
RUN_INFO = "run_info.json"
# Settings that change what a stored prediction means; a resumed run must agree on them.
RESUME_KEYS = (
    "reference_compat",
    "model",
    "max_new_tokens",
    "min_pixels",
    "max_pixels",
    "prompt_variant",
)


class EvalError(RuntimeError):
    """Evaluation cannot continue (inconsistent resume state, bad predict function output)."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (``configs/eval.py`` holds the defaults of the script).

    batch_size: records per predict-function call (global batch).
    limit: score only the first ``limit`` records of each dataset (-1 = all).
    reference_compat: reproduce the reference (value-based labels B1, lenient parse + rescale B2,
      ordinal-rank SRCC B12) for comparison only.
    bad_rows: manifest rows with a bad label: ``"error"`` stops naming the row, ``"skip"`` lists
      them in errors.jsonl and counts them.
    image_threads: threads decoding the next batch's images while the current one is scored.
    progress: tqdm bar with ETA on stderr.
    is_writer: this process writes files (process 0 of a multi-host run).
    plots: write PNG plots (matplotlib).
    run_info: settings stored in run_info.json and checked on resume (model, decoding, ...).
    process_index / process_count: this process and the number of processes sharing the rows
      (None: ``jax.process_index()`` / ``jax.process_count()``, 0 / 1 without jax). With more
      than one process every process scores its own rows into ``predictions.<index>.jsonl``
      and process 0 (``is_writer``) merges them (see :func:`evaluate_shard`).
    """

    batch_size: int = 16
    limit: int = -1
    reference_compat: bool = False
    bad_rows: str = "error"
    image_threads: int = 4
    progress: bool = True
    is_writer: bool = True
    plots: bool = True
    run_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.bad_rows not in manifest_mod.ON_ERROR:
            raise ValueError(f"bad_rows must be one of {manifest_mod.ON_ERROR}")
        if (self.process_index is None) != (self.process_count is None):
            raise ValueError("give process_index and process_count together")
        if self.process_count is not None and not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    def processes(self) -> tuple[int, int]:
        """(process index, process count) of this run."""
        if self.process_count is not None:
            return int(self.process_index), int(self.process_count)
        if "jax" in sys.modules:
            import jax

            return jax.process_index(), jax.process_count()
        return 0, 1


# ---------------------------------------------------------------------------------------------
# Scoring one completion


def score_completion(
    completion: str,
    task: str,
    *,
    reference_compat: bool = False,
    count_tokens: CountTokens | None = None,
) -> dict[str, Any]:
    """Parsed prediction and think length of one completion.

    Strict parser (spec §4, :func:`tatar_jax.rewards.parse_answer`); the answer is clipped to
    [0, 100]. ``reference_compat``: the reference's lenient parser and value-based rescaling
    (B2). Returns ``parsed`` (bool), ``prediction`` (float or None), ``think_tokens`` (int, or
    None without ``count_tokens``), ``think_words`` and ``num_words`` (whitespace words).
    """
    if reference_compat:
        value = rewards.reference_rescale_prediction(rewards.parse_answer_lenient(completion), task)
    else:
        value = rewards.parse_answer(completion)
    parsed = value is not None and not math.isnan(value)
    feats = rewards.completion_features([completion], parser=lambda _: None)
    think_words = int(feats.think_len[0])
    think_tokens = None
    if count_tokens is not None:
        think_tokens = int(
            rewards.completion_features([completion], count_tokens=count_tokens).think_len[0]
        )
    return {
        "parsed": bool(parsed),
        "prediction": float(min(max(value, 0.0), 100.0)) if parsed else None,
        "think_tokens": think_tokens,
        "think_words": think_words,
        "num_words": int(feats.num_words[0]),
    }


# ---------------------------------------------------------------------------------------------
# predictions.jsonl


def read_jsonl(path: str, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file. A partial last line (a killed writer) is dropped; with ``repair``
    it is also cut off the file so that appending continues cleanly. Any other bad line raises
    EvalError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(
            f"warning: {path}: dropping a partial last line ({len(data) - end} bytes) "
            "left by an interrupted run",
            file=sys.stderr,
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
    rows = []
    for i, line in enumerate(data[:end].decode("utf-8").splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}: line {i + 1}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise EvalError(f"{path}: line {i + 1}: expected an object")
        rows.append(row)
    return rows


def _same_float(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _check_stored(
    path: str, rows: Sequence[Mapping[str, Any]], by_id: Mapping[int, Mapping[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Stored rows of the current records by row_id; EvalError on duplicates or mismatches."""
    done: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        rid = row.get("row_id")
        if not isinstance(rid, int):
            raise EvalError(f"{path}: line {i + 1}: missing integer row_id")
        if rid in done:
            raise EvalError(f"{path}: line {i + 1}: row_id {rid} appears twice")
        rec = by_id.get(rid)
        if rec is None:  # outside the current selection (e.g. a smaller --limit): kept, unused
            continue
        if row.get("image") != rec["image_name"] or not _same_float(
            row.get("gt_raw"), rec["score_raw"]
        ):
            raise EvalError(
                f"{path}: line {i + 1}: row_id {rid} holds image {row.get('image')!r} / gt "
                f"{row.get('gt_raw')!r} but the manifest has {rec['image_name']!r} / "
                f"{rec['score_raw']!r}; use a fresh out_dir for a different dataset"
            )
        if not _same_float(row.get("gt_100"), rec["gt_100"]):
            raise EvalError(
                f"{path}: line {i + 1}: row_id {rid} was stored with gt_100 "
                f"{row.get('gt_100')!r}, now {rec['gt_100']!r} (another score_range or label "
                "mapping); use a fresh out_dir"
            )
        done[rid] = dict(row)
    return done


def _check_run_info(path: str, info: Mapping[str, Any]) -> dict[str, Any]:
    """The stored run_info (or {}); EvalError if a setting that changes predictions differs."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    for key in RESUME_KEYS:
        if key in old and key in info and old[key] != info[key]:
            raise EvalError(
                f"{path}: this out_dir was written with {key}={old[key]!r}, now {info[key]!r}; "
                "stored predictions would be mixed with new ones - use a fresh out_dir"
            )
    return old


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Image loading ahead of the model


def _load(rec: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any, str | None]:
    try:
        return rec, image_mod.load_image(rec["image"]), None
    except image_mod.ImageLoadError as err:
        return rec, None, err.reason


def _batches_with_images(
    records: Sequence[Mapping[str, Any]], batch_size: int, threads: int
) -> Iterator[list[tuple[Mapping[str, Any], Any, str | None]]]:
    """Batches of (record, image or None, error reason); the next batch decodes meanwhile."""
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: list[Future] = [pool.submit(_load, r) for r in chunks[0]]
        for k in range(len(chunks)):
            current = pending
            pending = [pool.submit(_load, r) for r in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield [f.result() for f in current]


# ---------------------------------------------------------------------------------------------
# Metrics of one dataset


def dataset_metrics(
    spec: manifest_mod.DatasetSpec,
    rows: Sequence[Mapping[str, Any]],
    *,
    num_records: int,
    errors: Sequence[Mapping[str, Any]] = (),
    reference_compat: bool = False,
) -> dict[str, Any]:
    """metrics.json of one dataset from its prediction rows (any order) and error rows.

    Denominators: ``n_records`` = selected manifest rows; ``n_scored`` = rows with a completion;
    ``n_image_errors`` / ``n_bad_rows`` / ``n_predict_errors`` = listed in errors.jsonl;
    ``n_missing`` = the rest (0 after a complete run); ``frac_unparsed`` = unparsed / scored.
    Correlations use the ``n_pairs`` parsed rows.
    """
    rows = sorted(rows, key=lambda r: r["row_id"])
    gt = np.array([r["gt_100"] for r in rows], np.float64)
    pred = np.array(
        [math.nan if r["prediction"] is None else r["prediction"] for r in rows], np.float64
    )
    n_scored = len(rows)
    n_unparsed = sum(1 for r in rows if not r["parsed"])
    think_tok = [r["think_tokens"] for r in rows if r.get("think_tokens") is not None]
    out: dict[str, Any] = {
        "dataset": spec.name,
        "task": spec.task,
        "score_range": list(spec.score_range),
        "mode": "reference_compat" if reference_compat else "fixed",
        "n_records": int(num_records),
        "n_scored": n_scored,
        "n_image_errors": sum(1 for e in errors if e.get("kind") == "image"),
        "n_bad_rows": sum(1 for e in errors if e.get("kind") == "bad_row"),
        "n_predict_errors": sum(1 for e in errors if e.get("kind") == "predict"),
        "n_unparsed": n_unparsed,
        "frac_unparsed": n_unparsed / n_scored if n_scored else math.nan,
        "mean_think_tokens": float(np.mean(think_tok)) if think_tok else math.nan,
        "mean_think_words": (
            float(np.mean([r["think_words"] for r in rows])) if rows else math.nan
        ),
    }
    out["n_missing"] = (
        out["n_records"]
        - n_scored
        - out["n_image_errors"]
        - out["n_bad_rows"]
        - out["n_predict_errors"]
    )
    out.update(metrics_mod.correlation_metrics(gt, pred, reference_compat=reference_compat))
    return metrics_mod.json_ready(out)


def metrics_from_completions(
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    reference_compat: bool = False,
    count_tokens: CountTokens | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Metrics of completions already generated elsewhere (the trainer's periodic evaluation).

    ``records`` need ``gt_100`` and ``task`` (one task per call); ``completions[i]`` answers
    ``records[i]``. Same parsing and statistics as :func:`evaluate_dataset`, no files.
    """
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    tasks = {r["task"] for r in records}
    if len(tasks) > 1:
        raise ValueError(f"one task per call, got {sorted(tasks)}")
    task = tasks.pop() if tasks else "iqa"
    rows = [
        {
            "row_id": i,
            "gt_100": float(r["gt_100"]),
            **score_completion(
                c, task, reference_compat=reference_compat, count_tokens=count_tokens
            ),
        }
        for i, (r, c) in enumerate(zip(records, completions, strict=True))
    ]
    spec = manifest_mod.DatasetSpec(name or "eval", task, manifest="")
    out = dataset_metrics(spec, rows, num_records=len(rows), reference_compat=reference_compat)
    out.pop("score_range")  # not known here: gt_100 is already on 0-100
    return out


# ---------------------------------------------------------------------------------------------
# One dataset


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True)


def evaluate_dataset(
    spec: manifest_mod.DatasetSpec,
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    count_tokens: CountTokens | None = None,
) -> dict[str, Any]:
    """Scores ``spec``'s records with ``predict_fn`` into ``out_dir`` (resumable); returns metrics.

    ``out_dir`` is this dataset's folder (:func:`run_eval` uses ``<out>/<dataset name>``).
    """
    return _evaluate_dataset(spec, predict_fn, out_dir, options, count_tokens)[0]


def _load_selection(
    spec: manifest_mod.DatasetSpec, options: EvalOptions
) -> tuple[Any, list[dict[str, Any]], dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(loaded manifest, selected records, records by row_id, bad-row error entries)."""
    loaded = manifest_mod.load_records(
        spec, on_error=options.bad_rows, reference_compat=options.reference_compat
    )
    records = loaded.records[: options.limit] if options.limit >= 0 else loaded.records
    by_id = {r["row_id"]: r for r in records}
    bad = [
        {
            "kind": "bad_row",
            "row_id": b.row,
            "image": b.image,
            "reason": b.reason,
            "source": b.source,
        }
        for b in loaded.skipped
    ]
    return loaded, records, by_id, bad


def _write_line(f: Any, obj: Mapping[str, Any]) -> None:
    if f is not None:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _score_batches(
    name: str,
    todo: Sequence[Mapping[str, Any]],
    predict_fn: PredictFn,
    options: EvalOptions,
    count_tokens: CountTokens | None,
    done: dict[int, dict[str, Any]],
    errors: list[dict[str, Any]],
    pf: Any,
    ef: Any,
    bar: Any,
    num_batches: int | None = None,
) -> None:
    """Scores ``todo`` batch by batch: rows into ``done`` / ``pf``, failures into ``errors`` /
    ``ef``. ``num_batches`` (multi-process): exactly that many ``predict_fn`` calls, the last
    ones with empty batches, so that every process makes the same calls."""
    batches = _batches_with_images(todo, options.batch_size, options.image_threads)
    if num_batches is not None:
        batches = itertools.chain(batches, itertools.repeat([], num_batches))
        batches = itertools.islice(batches, num_batches)
    for batch in batches:
        good = []
        for rec, im, reason in batch:
            if reason is None:
                good.append({**rec, "pil_image": im})
                continue
            err = {
                "kind": "image",
                "row_id": rec["row_id"],
                "image": rec["image_name"],
                "path": rec["image"],
                "reason": reason,
            }
            errors.append(err)
            _write_line(ef, err)
        if ef is not None:
            ef.flush()
        completions = list(predict_fn(good)) if good or num_batches is not None else []
        if len(completions) != len(good):
            raise EvalError(
                f"{name}: predict_fn returned {len(completions)} completions for "
                f"{len(good)} records"
            )
        for rec, text in zip(good, completions, strict=True):
            if isinstance(text, RecordFailure):
                err = {
                    "kind": "predict",
                    "row_id": rec["row_id"],
                    "image": rec["image_name"],
                    "path": rec["image"],
                    "reason": text.reason,
                }
                errors.append(err)
                _write_line(ef, err)
                if ef is not None:
                    ef.flush()
                continue
            if not isinstance(text, str):
                raise EvalError(
                    f"{name}: predict_fn returned {type(text).__name__} for row "
                    f"{rec['row_id']} ({rec['image_name']}); expected the decoded text"
                )
            row = {
                "row_id": rec["row_id"],
                "image": rec["image_name"],
                "gt_raw": rec["score_raw"],
                "gt_100": rec["gt_100"],
                "task": rec["task"],
                "completion": text,
                **score_completion(
                    text,
                    rec["task"],
                    reference_compat=options.reference_compat,
                    count_tokens=count_tokens,
                ),
            }
            done[row["row_id"]] = row
            _write_line(pf, row)
        if pf is not None:
            pf.flush()
        if bar is not None:
            bar.update(len(batch))


def _finish_dataset(
    spec: manifest_mod.DatasetSpec,
    out_dir: str,
    options: EvalOptions,
    records: Sequence[Mapping[str, Any]],
    num_skipped: int,
    done: Mapping[int, dict[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    write: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics (written with plots when ``write``) and the scored rows in record order."""
    rows = [done[r["row_id"]] for r in records if r["row_id"] in done]
    if errors and write:
        first = errors[0]
        print(
            f"warning: {spec.name}: {len(errors)} of {len(records) + num_skipped} "
            f"records not scored (first: row {first['row_id']} {first['image']!r}: "
            f"{first['reason']}); all listed in {os.path.join(out_dir, ERRORS)}",
            file=sys.stderr,
        )
    result = dataset_metrics(
        spec,
        rows,
        num_records=len(records) + num_skipped,
        errors=errors,
        reference_compat=options.reference_compat,
    )
    if write:
        _write_json(os.path.join(out_dir, METRICS), result)
        if options.plots:
            from tatar_jax.evaluation import plots

            plots.scatter(
                rows, os.path.join(out_dir, "scatter.png"), title=spec.name, metrics=result
            )
    return result, rows


def _evaluate_dataset(
    spec: manifest_mod.DatasetSpec,
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    options: EvalOptions,
    count_tokens: CountTokens | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out_dir = os.fspath(out_dir)
    if options.processes()[1] > 1:
        return _evaluate_dataset_multiprocess(spec, predict_fn, out_dir, options, count_tokens)
    loaded, records, by_id, errors = _load_selection(spec, options)
    pred_path = os.path.join(out_dir, PREDICTIONS)
    err_path = os.path.join(out_dir, ERRORS)
    if options.is_writer:
        os.makedirs(out_dir, exist_ok=True)
    done = _check_stored(pred_path, read_jsonl(pred_path, repair=options.is_writer), by_id)
    todo = [r for r in records if r["row_id"] not in done]
    pf = ef = None
    if options.is_writer:
        pf = open(pred_path, "a", encoding="utf-8")
        ef = open(err_path, "w", encoding="utf-8")
        for e in errors:
            _write_line(ef, e)
        ef.flush()
    bar = _progress(len(records), len(records) - len(todo), spec.name, options.progress)
    try:
        _score_batches(
            spec.name, todo, predict_fn, options, count_tokens, done, errors, pf, ef, bar
        )
    finally:
        if bar is not None:
            bar.close()
        for f in (pf, ef):
            if f is not None:
                f.close()
    return _finish_dataset(
        spec, out_dir, options, records, len(loaded.skipped), done, errors, options.is_writer
    )


# ---------------------------------------------------------------------------------------------
# Several processes (multi-host data parallelism)


def shard_path(out_dir: str, base: str, process_index: int) -> str:
    """``predictions.jsonl`` -> ``predictions.<process_index>.jsonl`` (same folder)."""
    stem, ext = os.path.splitext(base)
    return os.path.join(out_dir, f"{stem}.{process_index}{ext}")


def _shard_files(out_dir: str, base: str) -> list[str]:
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


def _barrier(name: str) -> None:
    """All processes reach this point (a no-op in one real process, e.g. simulated shards)."""
    if "jax" in sys.modules:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)


def _read_done(
    out_dir: str, by_id: Mapping[int, Mapping[str, Any]], repair: str | None = None
) -> dict[int, dict[str, Any]]:
    """Stored rows of the merged file and of every shard file (first occurrence wins: a row can
    be in both when a merge was interrupted before the shards were removed)."""
    done: dict[int, dict[str, Any]] = {}
    for path in [os.path.join(out_dir, PREDICTIONS), *_shard_files(out_dir, PREDICTIONS)]:
        for rid, row in _check_stored(path, read_jsonl(path, repair=path == repair), by_id).items():
            done.setdefault(rid, row)
    return done


def evaluate_shard(
    spec: manifest_mod.DatasetSpec,
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    options: EvalOptions,
    *,
    count_tokens: CountTokens | None = None,
) -> int:
    """This process's part of a multi-process evaluation of ``spec``; returns its row count.

    Every process reads what is stored (``predictions.jsonl`` and all
    ``predictions.<k>.jsonl``), waits for the others (barrier: nobody appends before everyone
    read), then scores its rows (:func:`shard_rows`) into ``predictions.<index>.jsonl``
    (appended batch by batch, resumable) and its failures into ``errors.<index>.jsonl``. The
    folder must be shared by all processes. :func:`merge_shards` combines the files.
    """
    out_dir = os.fspath(out_dir)
    p, count = options.processes()
    loaded, records, by_id, _ = _load_selection(spec, options)
    os.makedirs(out_dir, exist_ok=True)
    pred_path = shard_path(out_dir, PREDICTIONS, p)
    done = _read_done(out_dir, by_id, repair=pred_path)
    parts, num_batches = shard_rows(records, done, count, options.batch_size)
    _barrier(f"tatar_eval:{spec.name}:read")
    mine = parts[p]
    errors: list[dict[str, Any]] = []
    bar = _progress(len(mine), 0, f"{spec.name} [{p}/{count}]", options.progress)
    with (
        open(pred_path, "a", encoding="utf-8") as pf,
        open(shard_path(out_dir, ERRORS, p), "w", encoding="utf-8") as ef,
    ):
        try:
            _score_batches(
                spec.name,
                mine,
                predict_fn,
                options,
                count_tokens,
                {},
                errors,
                pf,
                ef,
                bar,
                num_batches=num_batches,
            )
        finally:
            if bar is not None:
                bar.close()
    return len(mine)


def merge_shards(
    spec: manifest_mod.DatasetSpec,
    out_dir: str | os.PathLike,
    options: EvalOptions,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Process 0 after every :func:`evaluate_shard`: writes ``predictions.jsonl`` (every stored
    row, in manifest order: the file a one-process run writes), ``errors.jsonl`` (bad rows, then
    the shards' failures in manifest order), ``metrics.json`` and the plot, then removes the
    shard files. Returns (metrics, rows)."""
    out_dir = os.fspath(out_dir)
    loaded, records, by_id, errors = _load_selection(spec, options)
    done = _read_done(out_dir, by_id, repair=os.path.join(out_dir, PREDICTIONS))
    # rows stored for records outside this selection (a smaller --limit) are kept
    path = os.path.join(out_dir, PREDICTIONS)
    others = [r for r in read_jsonl(path) if r.get("row_id") not in by_id]
    rows = others + [done[r["row_id"]] for r in records if r["row_id"] in done]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            _write_line(f, row)
    os.replace(tmp, path)
    order = {r["row_id"]: i for i, r in enumerate(records)}
    failed: dict[tuple[str, int], dict[str, Any]] = {}
    err_shards = _shard_files(out_dir, ERRORS)
    for p in err_shards:
        for e in read_jsonl(p):
            if e.get("row_id") in order and e["row_id"] not in done:
                failed.setdefault((e.get("kind"), e["row_id"]), e)
    errors += sorted(failed.values(), key=lambda e: order[e["row_id"]])
    err_path = os.path.join(out_dir, ERRORS)
    with open(f"{err_path}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
        for e in errors:
            _write_line(f, e)
    os.replace(f"{err_path}.tmp{os.getpid()}", err_path)
    for p in _shard_files(out_dir, PREDICTIONS) + err_shards:
        os.remove(p)
    return _finish_dataset(
        spec, out_dir, options, records, len(loaded.skipped), done, errors, write=True
    )


def _evaluate_dataset_multiprocess(
    spec: manifest_mod.DatasetSpec,
    predict_fn: PredictFn,
    out_dir: str,
    options: EvalOptions,
    count_tokens: CountTokens | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    evaluate_shard(spec, predict_fn, out_dir, options, count_tokens=count_tokens)
    _barrier(f"tatar_eval:{spec.name}:scored")
    if options.is_writer:
        result = merge_shards(spec, out_dir, options)
    _barrier(f"tatar_eval:{spec.name}:merged")
    if options.is_writer:
        return result
    # the others read the merged files: every process returns the same metrics
    loaded, records, by_id, _ = _load_selection(spec, options)
    done = _check_stored(
        os.path.join(out_dir, PREDICTIONS), read_jsonl(os.path.join(out_dir, PREDICTIONS)), by_id
    )
    errors = read_jsonl(os.path.join(out_dir, ERRORS))
    return _finish_dataset(
        spec, out_dir, options, records, len(loaded.skipped), done, errors, write=False
    )


# ---------------------------------------------------------------------------------------------
# Several datasets + summary


def run_eval(
    specs: Sequence[manifest_mod.DatasetSpec] | Mapping[str, manifest_mod.DatasetSpec],
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    options: EvalOptions = EvalOptions(),
    *,
    count_tokens: CountTokens | None = None,
    title: str = "tatar-jax",
) -> dict[str, dict[str, Any]]:
    """Evaluates every dataset into ``out_dir/<name>/``; writes ``out_dir/metrics.json``,
    ``summary.md`` (paper layout) and the think-length histograms. Returns metrics by name.

    Datasets evaluated into the same ``out_dir`` by earlier runs (with the same settings) stay in
    ``metrics.json`` and ``summary.md``, so the eight benchmarks can run as separate jobs.
    """
    from tatar_jax.evaluation import report

    out_dir = os.fspath(out_dir)
    spec_list = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
    names = [s.name for s in spec_list]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique, got {names}")
    info = {
        "reference_compat": options.reference_compat,
        **dict(options.run_info),
        "datasets": {
            s.name: {
                "task": s.task,
                "manifest": s.manifest,
                "image_root": s.resolved_image_root,
                "score_range": list(s.score_range),
            }
            for s in spec_list
        },
    }
    info_path = os.path.join(out_dir, RUN_INFO)
    old = _check_run_info(info_path, info)
    # Datasets evaluated into this out_dir by earlier runs stay in the summary.
    earlier = {k: v for k, v in old.get("datasets", {}).items() if k not in info["datasets"]}
    info["datasets"] = {**earlier, **info["datasets"]}
    if options.is_writer:
        os.makedirs(out_dir, exist_ok=True)
        _write_json(info_path, info)
    results: dict[str, dict[str, Any]] = {}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for s in spec_list:
        results[s.name], rows = _evaluate_dataset(
            s, predict_fn, os.path.join(out_dir, s.name), options, count_tokens
        )
        by_task.setdefault(s.task, []).extend(rows)
    if options.is_writer:
        every = {}
        for name in info["datasets"]:
            path = os.path.join(out_dir, name, METRICS)
            if name in results:
                every[name] = results[name]
            elif os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    every[name] = json.load(f)
        _write_json(os.path.join(out_dir, METRICS), every)
        with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
            f.write(
                report.summary_markdown(
                    every, title=title, reference_compat=options.reference_compat
                )
            )
        if options.plots:
            from tatar_jax.evaluation import plots

            for task, rows in by_task.items():
                plots.think_histogram(
                    rows, os.path.join(out_dir, f"think_length_{task}.png"), title=task.upper()
                )
    return results
