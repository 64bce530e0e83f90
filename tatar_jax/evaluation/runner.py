"""Resumable evaluation of a scorer on declared datasets (spec §9, with B1/B2/B12 fixed).

The model enters through one narrow seam, a **predict function**::

    predict_fn(records: Sequence[dict]) -> Sequence[str]      # one decoded completion per record

(An entry may instead be a :class:`RecordFailure` for a record the model side cannot take, e.g.
an image whose aspect ratio the processor rejects; it is listed in errors.jsonl and counted; or
a :class:`~tatar_jax.evaluation.scoring.Samples` of K completions, scored by
:func:`~tatar_jax.evaluation.scoring.score_samples`: the prediction is their mean / median.)

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

* ``predictions.jsonl``: one row per scored record, appended as it is scored:
  ``row_id, image, gt_raw, gt_100, task, completion, parsed, prediction, think_tokens,
  think_words, num_words``. ``prediction`` is the parsed answer clipped to [0, 100] (None when
  unparsed); ``think_tokens`` is None without a token counter. With K samples per image the row
  also holds ``samples`` (the K completions), ``answers`` (each one's clipped prediction, None
  when unparsed), ``raw_answers``, ``n_samples``, ``n_parsed``, ``pred_std`` and (constrained
  decoding) ``n_forced``; ``prediction`` is then the ``aggregate`` of ``answers``.
* ``errors.jsonl``: every record that could not be scored (missing / unreadable image) with the
  reason. Rewritten by each run (failed rows are retried on resume).
* ``metrics.json``: counts and :func:`tatar_jax.evaluation.metrics.correlation_metrics`.

Resuming: a re-run with the same ``out_dir`` reads ``predictions.jsonl`` (a partial last line
from a killed run is cut off), checks every row against the manifest (same image and label) and
the run settings against ``run_info.json``, and calls the predict function only for the rows
that are missing. Metrics are computed from the file in ``row_id`` order, so a resumed run gives
exactly the metrics of an uninterrupted one.

Parts: scoring completions and metrics in :mod:`~tatar_jax.evaluation.scoring`, the folder's
file names and reading in :mod:`~tatar_jax.evaluation.outputs`, resume checks and process
sharding in :mod:`~tatar_jax.evaluation.shards`, image decoding ahead of the model in
:mod:`~tatar_jax.evaluation.prefetch`; this module runs the loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tatar_jax.data import jsonl
from tatar_jax.data import manifest as manifest_mod
from tatar_jax.evaluation import shards
from tatar_jax.evaluation.outputs import (
    ERRORS,
    METRICS,
    PREDICTIONS,
    RUN_INFO,
    EvalError,
    read_jsonl,
)
from tatar_jax.evaluation.prefetch import batches_with_images
from tatar_jax.evaluation.scoring import (
    CountTokens,
    Samples,
    dataset_metrics,
    score_completion,
    score_samples,
)


@dataclasses.dataclass(frozen=True)
class RecordFailure:
    """Returned by a predict function in place of a completion: this record cannot be scored."""

    reason: str


PredictFn = Callable[[Sequence[Mapping[str, Any]]], Sequence["str | Samples | RecordFailure"]]


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
    aggregate: the prediction of K samples (:class:`~tatar_jax.evaluation.scoring.Samples`
      entries): ``"mean"`` | ``"median"`` of the parsed answers.
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
    aggregate: str = "mean"
    run_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.aggregate not in ("mean", "median"):
            raise ValueError(f"aggregate must be 'mean' or 'median', got {self.aggregate!r}")
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


def _record_error(
    err: dict[str, Any], errors: list[dict[str, Any]], ef: jsonl.Appender | None
) -> None:
    errors.append(err)
    if ef is not None:
        ef.append(err)


def _scored(
    name: str,
    rec: Mapping[str, Any],
    text: Any,
    options: EvalOptions,
    count_tokens: CountTokens | None,
) -> dict[str, Any]:
    """The scored fields of one record's predict-function entry (one completion or K)."""
    if isinstance(text, Samples):
        return {
            "completion": text.texts[0] if text.texts else "",
            **score_samples(
                text, rec["task"], aggregate=options.aggregate,
                reference_compat=options.reference_compat, count_tokens=count_tokens,
            ),
        }  # fmt: skip
    if not isinstance(text, str):
        raise EvalError(
            f"{name}: predict_fn returned {type(text).__name__} for row "
            f"{rec['row_id']} ({rec['image_name']}); expected the decoded text"
        )
    return {
        "completion": text,
        **score_completion(
            text, rec["task"], reference_compat=options.reference_compat,
            count_tokens=count_tokens,
        ),
    }  # fmt: skip


def _score_batches(
    name: str,
    todo: Sequence[Mapping[str, Any]],
    predict_fn: PredictFn,
    options: EvalOptions,
    count_tokens: CountTokens | None,
    done: dict[int, dict[str, Any]],
    errors: list[dict[str, Any]],
    pf: jsonl.Appender | None,
    ef: jsonl.Appender | None,
    bar: Any,
    num_batches: int | None = None,
) -> None:
    """Scores ``todo`` batch by batch: rows into ``done`` / ``pf``, failures into ``errors`` /
    ``ef`` (each appended as it is known; no file when None). ``num_batches`` (multi-process):
    exactly that many ``predict_fn`` calls, the last ones with empty batches, so that every
    process makes the same calls."""
    batches = batches_with_images(todo, options.batch_size, options.image_threads)
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
            _record_error(err, errors, ef)
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
                _record_error(err, errors, ef)
                continue
            row = {
                "row_id": rec["row_id"],
                "image": rec["image_name"],
                "gt_raw": rec["score_raw"],
                "gt_100": rec["gt_100"],
                "task": rec["task"],
                **_scored(name, rec, text, options, count_tokens),
            }
            done[row["row_id"]] = row
            if pf is not None:
                pf.append(row)
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
        jsonl.write_json(os.path.join(out_dir, METRICS), result, indent=1)
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
    done = shards.read_stored(pred_path, by_id, repair=options.is_writer)
    todo = [r for r in records if r["row_id"] not in done]
    pf = ef = None
    if options.is_writer:
        pf = jsonl.Appender(pred_path, fsync=False)
        ef = jsonl.Appender(err_path, fsync=False, truncate=True)  # failed rows are retried
        for e in errors:
            ef.append(e)
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
    read), then scores its rows (:func:`~tatar_jax.evaluation.shards.shard_rows`) into
    ``predictions.<index>.jsonl`` (appended row by row, resumable) and its failures into
    ``errors.<index>.jsonl``. The folder must be shared by all processes. :func:`merge_shards`
    combines the files.
    """
    out_dir = os.fspath(out_dir)
    p, count = options.processes()
    loaded, records, by_id, _ = _load_selection(spec, options)
    os.makedirs(out_dir, exist_ok=True)
    pred_path = shards.shard_path(out_dir, PREDICTIONS, p)
    done = shards.read_done(out_dir, by_id, repair=pred_path)
    parts, num_batches = shards.shard_rows(records, done, count, options.batch_size)
    shards.barrier(f"tatar_eval:{spec.name}:read")
    mine = parts[p]
    errors: list[dict[str, Any]] = []
    bar = _progress(len(mine), 0, f"{spec.name} [{p}/{count}]", options.progress)
    err_path = shards.shard_path(out_dir, ERRORS, p)
    with (
        jsonl.Appender(pred_path, fsync=False) as pf,
        jsonl.Appender(err_path, fsync=False, truncate=True) as ef,
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
    done = shards.merge_files(out_dir, records, by_id, errors)
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
    shards.barrier(f"tatar_eval:{spec.name}:scored")
    if options.is_writer:
        result = merge_shards(spec, out_dir, options)
    shards.barrier(f"tatar_eval:{spec.name}:merged")
    if options.is_writer:
        return result
    # the others read the merged files: every process returns the same metrics
    loaded, records, by_id, _ = _load_selection(spec, options)
    done = shards.read_stored(os.path.join(out_dir, PREDICTIONS), by_id)
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
    old = shards.check_run_info(info_path, info)
    # Datasets evaluated into this out_dir by earlier runs stay in the summary.
    earlier = {k: v for k, v in old.get("datasets", {}).items() if k not in info["datasets"]}
    info["datasets"] = {**earlier, **info["datasets"]}
    if options.is_writer:
        os.makedirs(out_dir, exist_ok=True)
        jsonl.write_json(info_path, info, indent=1)
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
        jsonl.write_json(os.path.join(out_dir, METRICS), every, indent=1)
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
