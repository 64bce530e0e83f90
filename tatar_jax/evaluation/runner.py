"""Resumable evaluation of a scorer on declared datasets (spec §9, with B1/B2/B12 fixed).

The model enters through one narrow seam, a **predict function**::

    predict_fn(records: Sequence[dict]) -> Sequence[str]      # one decoded completion per record

(An entry may instead be a :class:`RecordFailure` for a record the model side cannot take, e.g.
an image whose aspect ratio the processor rejects; it is listed in errors.jsonl and counted.)

Each record is a loaded manifest record (:func:`tatar_jax.data.manifest.load_records`: ``image``
path, ``task``, ``gt_100``, ``row_id``, ...) plus ``"pil_image"``, the decoded image (so the
model side does not read the file again). ``scripts/eval.py`` builds it from a checkpoint and
greedy generation; tests pass a plain function. On a multi-host run every process calls the
runner with the same arguments (the predict function shards the batch over all devices) and
only ``options.is_writer`` writes files.

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
import json
import math
import os
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

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.bad_rows not in manifest_mod.ON_ERROR:
            raise ValueError(f"bad_rows must be one of {manifest_mod.ON_ERROR}")


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


def _evaluate_dataset(
    spec: manifest_mod.DatasetSpec,
    predict_fn: PredictFn,
    out_dir: str | os.PathLike,
    options: EvalOptions,
    count_tokens: CountTokens | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    out_dir = os.fspath(out_dir)
    loaded = manifest_mod.load_records(
        spec, on_error=options.bad_rows, reference_compat=options.reference_compat
    )
    records = loaded.records[: options.limit] if options.limit >= 0 else loaded.records
    by_id = {r["row_id"]: r for r in records}
    pred_path = os.path.join(out_dir, PREDICTIONS)
    err_path = os.path.join(out_dir, ERRORS)
    if options.is_writer:
        os.makedirs(out_dir, exist_ok=True)
    done = _check_stored(pred_path, read_jsonl(pred_path, repair=options.is_writer), by_id)
    todo = [r for r in records if r["row_id"] not in done]

    errors: list[dict[str, Any]] = [
        {
            "kind": "bad_row",
            "row_id": b.row,
            "image": b.image,
            "reason": b.reason,
            "source": b.source,
        }
        for b in loaded.skipped
    ]
    pf = ef = None
    if options.is_writer:
        pf = open(pred_path, "a", encoding="utf-8")
        ef = open(err_path, "w", encoding="utf-8")
        for e in errors:
            ef.write(json.dumps(e, ensure_ascii=False) + "\n")
        ef.flush()
    bar = _progress(len(records), len(records) - len(todo), spec.name, options.progress)
    try:
        for batch in _batches_with_images(todo, options.batch_size, options.image_threads):
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
                if ef is not None:
                    ef.write(json.dumps(err, ensure_ascii=False) + "\n")
                    ef.flush()
            completions = list(predict_fn(good)) if good else []
            if len(completions) != len(good):
                raise EvalError(
                    f"{spec.name}: predict_fn returned {len(completions)} completions for "
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
                    if ef is not None:
                        ef.write(json.dumps(err, ensure_ascii=False) + "\n")
                        ef.flush()
                    continue
                if not isinstance(text, str):
                    raise EvalError(
                        f"{spec.name}: predict_fn returned {type(text).__name__} for row "
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
                if pf is not None:
                    pf.write(json.dumps(row, ensure_ascii=False) + "\n")
            if pf is not None:
                pf.flush()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        for f in (pf, ef):
            if f is not None:
                f.close()

    rows = [done[r["row_id"]] for r in records if r["row_id"] in done]
    if errors and options.is_writer:
        first = errors[0]
        print(
            f"warning: {spec.name}: {len(errors)} of {len(records) + len(loaded.skipped)} "
            f"records not scored (first: row {first['row_id']} {first['image']!r}: "
            f"{first['reason']}); all listed in {err_path}",
            file=sys.stderr,
        )
    result = dataset_metrics(
        spec,
        rows,
        num_records=len(records) + len(loaded.skipped),
        errors=errors,
        reference_compat=options.reference_compat,
    )
    if options.is_writer:
        _write_json(os.path.join(out_dir, METRICS), result)
        if options.plots:
            from tatar_jax.evaluation import plots

            plots.scatter(
                rows, os.path.join(out_dir, "scatter.png"), title=spec.name, metrics=result
            )
    return result, rows


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
