"""The builder: manifest rows -> teacher -> post-processing -> hard rules -> LLM judge -> files.

Per row (one worker thread per in-flight row, at most ``client.concurrency`` at once):

1. pre-checks: the image exists (when it is sent to the teacher or the judge), IAA rows carry
   attribute texts (the IAA teacher is text-only and has nothing else to go on);
2. the teacher's reply (:mod:`~tatar_jax.reasoning.teachers`; with ``teacher.kind = "none"`` the
   row's existing target is judged as is, i.e. judge-only mode);
3. post-processing to the exact target form (:mod:`~tatar_jax.reasoning.postprocess`);
4. hard rules (:func:`~tatar_jax.reasoning.judge.hard_rules`);
5. the LLM judge (optional) and the keep rule.

Each finished row becomes one line of ``journal.jsonl`` (``{"row", "status", "stage", "reason",
"detail", "record"}``; status ``kept`` / ``rejected`` / ``failed``), appended by the main thread
with one ``write`` + ``fsync``, so a killed run loses at most the rows in flight. A re-run reads
the journal, drops a torn last line, and skips every row already kept or rejected (failed rows
are retried unless ``retry_failed=False``). ``run.json`` fingerprints the settings that shape the
output; resuming with different ones is an error (``restart=True`` starts over).

At the end (also after a fatal error or Ctrl-C) the ordered files are assembled from the journal,
in input order whatever the completion order, each written to a temporary file and renamed:

* ``sft.jsonl``      kept rows, the SFT records (fields in :data:`OUTPUT_FIELDS_DOC`)
* ``rejected.jsonl`` rejected rows with ``stage``, ``reason``, ``detail``
* ``failed.jsonl``   rows whose teacher/judge call failed after retries (re-run to retry)
* ``summary.json``   kept / rejected by reason / failed by reason / pending, request counts

The teacher, judge and rows of a ``configs/reasoning.py`` config are built by
:mod:`tatar_jax.reasoning.from_config`.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tatar_jax.data import jsonl
from tatar_jax.reasoning import judge as judge_mod
from tatar_jax.reasoning import postprocess as pp
from tatar_jax.reasoning import prompts as P
from tatar_jax.reasoning.records import InputRow
from tatar_jax.reasoning.teachers import (
    ChatRequest,
    FatalTeacherError,
    SamplingParams,
    Teacher,
    TeacherError,
)

log = logging.getLogger("tatar_jax.reasoning")

OUTPUT_FILE = "sft.jsonl"
REJECTED_FILE = "rejected.jsonl"
FAILED_FILE = "failed.jsonl"
SUMMARY_FILE = "summary.json"
JOURNAL_FILE = "journal.jsonl"
RUN_FILE = "run.json"

OUTPUT_FIELDS_DOC = """\
Fields of each line of sft.jsonl (and of the "record" of rejected.jsonl / journal.jsonl):
  image          the image path as written in the input manifest
  gt_score       the ground truth as the input gives it (its own scale)
  gt_100         the same on 0-100 by the dataset's declared range
  task           "iqa" | "iaa"
  target         the SFT target: "<think>\\n...\\n</think>\\n<answer>SCORE</answer>"
                 (the SFT data path reads this field and rewrites the answer to the 0-100 gt)
  think          the reasoning text alone
  reversal_thinking (IQA) / cot_reasoning (IAA)   = target, the reference's field names
  aesthetic_attributes (IAA)                       the attribute texts used
  teacher_reply  the raw teacher reply (before post-processing)
  teacher        teacher name (model)
  judge, judge_reply, judge_verdict   judge name, raw reply, parsed JSON (when a judge ran)
  local_checks   IAA coverage details (aspects touched, causal hint, word count)
  source_row     0-based row of the input manifest
  plus every other field of the input record, unchanged.
"""


# --------------------------------------------------------------------------------------------
# Journal


class Journal:
    """Finished rows keyed by input row (last entry wins), appended to a JSONL file with one
    ``write`` (+ ``fsync``) per row (:class:`tatar_jax.data.jsonl.Appender`); a torn last line
    left by a killed run is dropped and cut off the file when it is opened."""

    def __init__(self, path: str, fsync: bool = True) -> None:
        self.path = path
        self.entries: dict[int, dict[str, Any]] = {}
        for n, e in enumerate(jsonl.read_rows(path, repair=True)):
            try:
                row = int(e["row"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: row {n}: corrupt journal entry: {err}") from None
            self.entries[row] = e
        self._log = jsonl.Appender(path, fsync=fsync)

    def append(self, entry: Mapping[str, Any]) -> None:
        self._log.append(entry)
        self.entries[int(entry["row"])] = dict(entry)

    def close(self) -> None:
        self._log.close()


# --------------------------------------------------------------------------------------------
# Per-row processing


@dataclasses.dataclass
class TaskSettings:
    """Everything one task's rows need (built from the config by :func:`task_settings`)."""

    task: str
    system: str
    user: str
    sampling: SamplingParams
    send_image: bool
    post: pp.PostprocessOptions
    rules: judge_mod.RuleOptions
    attribute_order: tuple[str, ...] = P.IAA_ATTRIBUTE_ORDER
    target_words: int = 100
    low_score: str = "3.0"
    require_attributes: bool = True
    judge_system: str = ""
    judge_user: str = ""
    judge_sampling: SamplingParams = SamplingParams()
    judge_send_image: bool = True
    judge_attribute_max_chars: int = 1200
    keep_rules: Mapping[str, float] = dataclasses.field(default_factory=dict)
    require_keep_decision: bool = True
    target_fields: tuple[str, ...] = ("target", "reversal_thinking", "cot_reasoning")
    num_sentences: int = 2
    min_words_prompt: int = 30
    max_words_prompt: int = 50
    send_seed: bool = False
    seed: int = 0
    score_scale: str = "native"  # "native" | "100"


def task_settings(cfg: Any) -> TaskSettings:
    """Resolve ``configs/reasoning.py``'s config into the settings of ``cfg.task``."""
    task = cfg.task
    if task not in ("iqa", "iaa"):
        raise ValueError(f"task must be 'iqa' or 'iaa', got {task!r}")
    t = cfg[task]
    rules = judge_mod.RuleOptions(
        score_range=tuple(float(x) for x in cfg.rules.score_range),
        check_image_exists=bool(cfg.rules.check_image_exists),
        min_aspects=int(cfg.rules.min_aspects),
        keywords={k: tuple(v) for k, v in cfg.rules.keywords.items()},
        causal_connectives=tuple(cfg.rules.causal_connectives),
    )
    j = cfg.judge
    return TaskSettings(
        task=task,
        system=t.system_prompt,
        user=t.user_prompt,
        sampling=SamplingParams(
            temperature=float(t.temperature),
            top_p=float(t.top_p),
            max_tokens=int(t.max_tokens),
            stop=tuple(t.stop),
        ),
        send_image=bool(t.send_image),
        post=pp.PostprocessOptions.from_config(t),
        rules=rules,
        attribute_order=tuple(cfg.iaa.attribute_order),
        target_words=int(cfg.iaa.target_words),
        low_score=str(cfg.iaa.low_score),
        require_attributes=bool(cfg.iaa.require_attributes),
        judge_system=j[task].system_prompt,
        judge_user=j[task].user_prompt,
        judge_sampling=SamplingParams(
            temperature=float(j.temperature), top_p=float(j.top_p), max_tokens=int(j.max_tokens)
        ),
        judge_send_image=bool(j.send_image),
        judge_attribute_max_chars=int(j.attribute_max_chars),
        keep_rules={k: float(v) for k, v in j[task].keep_rules.items()},
        require_keep_decision=bool(j.require_keep_decision),
        target_fields=tuple(cfg.target_fields),
        num_sentences=int(cfg.iqa.max_sentences),
        min_words_prompt=int(cfg.iqa.prompt_min_words),
        max_words_prompt=int(cfg.iqa.max_words),
        send_seed=bool(cfg.send_seed),
        seed=int(cfg.seed),
        score_scale=_score_scale(cfg.score_scale),
    )


def _score_scale(value: str) -> str:
    if value not in ("native", "100"):
        raise ValueError(f"score_scale must be 'native' or '100', got {value!r}")
    return value


def teacher_request(row: InputRow, s: TaskSettings) -> ChatRequest:
    score = pp.format_score(shown_score(row, s))
    if s.task == "iqa":
        user = s.user.format(
            score=score,
            num_sentences=s.num_sentences,
            min_words=s.min_words_prompt,
            max_words=s.max_words_prompt,
        )
    else:
        user = s.user.format(
            attributes=P.format_attributes(row.attributes, s.attribute_order),
            score=score,
            target_words=s.target_words,
            low_score=s.low_score,
        )
    sampling = s.sampling
    if s.send_seed:
        sampling = dataclasses.replace(sampling, seed=s.seed + row.row)
    return ChatRequest(s.system, user, row.image_path if s.send_image else None, sampling)


def judge_request(
    row: InputRow, target: str, checks: Mapping[str, Any], s: TaskSettings
) -> ChatRequest:
    think, answer = judge_mod.split_target(target)
    fields = dict(gt_score=pp.format_score(shown_score(row, s)), answer=answer, think=think)
    if s.task == "iaa":
        fields["attributes"] = P.format_attributes(
            row.attributes, s.attribute_order, s.judge_attribute_max_chars
        )
        fields["local_checks"] = json.dumps(dict(checks), sort_keys=True)
    return ChatRequest(
        s.judge_system,
        s.judge_user.format(**fields),
        row.image_path if s.judge_send_image else None,
        s.judge_sampling,
    )


def shown_score(row: InputRow, s: TaskSettings) -> float | int:
    """The score the teacher explains and the target's answer: the manifest's own value
    (``score_scale = "native"``, the reference) or its 0-100 value to 2 decimals (``"100"``)."""
    if s.score_scale == "native":
        return row.gt_score
    if row.gt_100 is None:
        raise ValueError(f"row {row.row}: no 0-100 score (declare the dataset's score_range)")
    return round(float(row.gt_100), 2)


def _base_record(row: InputRow, task: str) -> dict[str, Any]:
    rec = dict(row.fields)
    rec.update(image=row.image, gt_score=row.gt_score, task=task, source_row=row.row)
    if row.gt_100 is not None:
        rec["gt_100"] = row.gt_100
    if task == "iaa":
        rec["aesthetic_attributes"] = dict(row.attributes)
    return rec


def process_row(
    row: InputRow,
    s: TaskSettings,
    teacher: Teacher | None,
    judge: Teacher | None,
    coverage: judge_mod.KeywordCoverage,
    cached_reply: str | None = None,
) -> dict[str, Any]:
    """One row end to end -> a journal entry. Raises only :class:`FatalTeacherError`.

    ``cached_reply``: the teacher's reply from an earlier run whose judge call failed; it is
    reused instead of asking the teacher again.
    """
    rec = _base_record(row, s.task)

    def done(status: str, stage: str, reason: str = "", detail: str = "") -> dict[str, Any]:
        return {
            "row": row.row,
            "status": status,
            "stage": stage,
            "reason": reason,
            "detail": detail,
            "record": rec,
        }

    try:
        needs_image = s.send_image or (judge is not None and s.judge_send_image)
        if needs_image and not os.path.isfile(row.image_path):
            return done("rejected", "input", "image_missing", row.image_path)
        if s.task == "iaa" and s.require_attributes and teacher is not None:
            if not any(str(v).strip() for v in row.attributes.values()):
                return done("rejected", "input", "no_attributes", "the row has no attribute texts")
        if teacher is None:  # judge-only mode: the row's own target
            target = next((row.fields[f] for f in s.target_fields if row.fields.get(f)), None)
            if not isinstance(target, str):
                return done("rejected", "input", "no_target", f"none of {list(s.target_fields)}")
            think = judge_mod.split_target(target)[0]
        else:
            try:
                reply = cached_reply
                if reply is None:
                    reply = teacher.complete(teacher_request(row, s))
            except FatalTeacherError:
                raise
            except TeacherError as e:
                return done("failed", "teacher", "teacher_error", str(e))
            rec["teacher_reply"] = reply
            rec["teacher"] = teacher.name
            processed = pp.postprocess(reply, shown_score(row, s), s.post)
            if processed.target is None:
                rec["think"] = processed.think
                return done("rejected", "postprocess", processed.reason or "", processed.detail)
            target, think = processed.target, processed.think
        rec.update(target=target, think=think)
        rec["reversal_thinking" if s.task == "iqa" else "cot_reasoning"] = target
        rejection, checks = judge_mod.hard_rules(
            target,
            s.task,
            float(shown_score(row, s)),
            row.image_path,
            row.attributes,
            s.rules,
            coverage,
        )
        if checks:
            rec["local_checks"] = checks
        if rejection:
            return done("rejected", "rules", rejection.reason, rejection.detail)
        if judge is None:
            return done("kept", "rules")
        try:
            reply = judge.complete(judge_request(row, target, checks, s))
        except FatalTeacherError:
            raise
        except TeacherError as e:
            return done("failed", "judge", "judge_error", str(e))
        rec["judge"] = judge.name
        rec["judge_reply"] = reply
        try:
            verdict = judge_mod.parse_judge_json(reply)
        except ValueError as e:
            return done("rejected", "judge", "judge_unparseable", str(e))
        rec["judge_verdict"] = verdict
        rejection = judge_mod.keep_decision(
            verdict, s.task, {s.task: s.keep_rules}, s.require_keep_decision
        )
        if rejection:
            return done("rejected", "judge", rejection.reason, rejection.detail)
        return done("kept", "judge")
    except FatalTeacherError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded per row with its type, never swallowed silently
        log.exception("row %d (%s) failed", row.row, row.image)
        return done("failed", "internal", f"error:{type(e).__name__}", str(e))


# --------------------------------------------------------------------------------------------
# The run


def fingerprint(
    cfg: Any, rows: Sequence[InputRow], teacher: Teacher | None, judge: Teacher | None
) -> dict:
    """What must not change between a run and its resumption (no URLs, no keys)."""
    rows_blob = json.dumps([(r.row, r.image, r.gt_score) for r in rows]).encode("utf-8")
    shaping = {
        "task": cfg.task,
        "input": hashlib.sha256(rows_blob).hexdigest(),  # which rows, images and scores
        "num_rows": len(rows),
        "score_scale": cfg.score_scale,
        "teacher": teacher.name if teacher else None,
        "teacher_extra_body": cfg.teacher.extra_body,
        "judge": judge.name if judge else None,
        "task_block": cfg[cfg.task].to_dict(),
        "rules": cfg.rules.to_dict(),
        "judge_block": {
            k: v for k, v in cfg.judge.to_dict().items() if k not in ("base_url", "api_key_env")
        },
        "iaa_order": list(cfg.iaa.attribute_order),
    }
    blob = json.dumps(shaping, sort_keys=True, default=str).encode("utf-8")
    return {
        "task": cfg.task,
        "input": shaping["input"],
        "num_rows": len(rows),
        "teacher": shaping["teacher"],
        "judge": shaping["judge"],
        "settings_sha256": hashlib.sha256(blob).hexdigest(),
    }


@dataclasses.dataclass
class Summary:
    total: int
    kept: int
    rejected: dict[str, int]
    failed: dict[str, int]
    pending: int
    processed_this_run: int
    skipped_from_journal: int
    requests: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_rejected"] = sum(self.rejected.values())
        d["num_failed"] = sum(self.failed.values())
        return d

    def text(self) -> str:
        lines = [
            f"rows: {self.total}  kept: {self.kept}  rejected: {sum(self.rejected.values())}  "
            f"failed: {sum(self.failed.values())}  pending: {self.pending}",
            f"this run: processed {self.processed_this_run}, "
            f"skipped (already in journal) {self.skipped_from_journal}",
        ]
        for title, d in (("rejected", self.rejected), ("failed", self.failed)):
            for reason, n in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {title:8s} {reason}: {n}")
        return "\n".join(lines)


def assemble(
    out_dir: str, rows: Sequence[InputRow], journal: Journal, bad_rows: Sequence[Any] = ()
) -> tuple[int, dict, dict]:
    """Write the ordered output files from the journal; returns (kept, rejected, failed) counts.

    ``bad_rows`` (manifest rows skipped by the loader, ``BadRow``) go to rejected.jsonl with
    stage ``manifest`` so that nothing disappears silently.
    """
    kept, rejected, failed = [], [], []
    bad_entries = {
        int(b.row): {
            "status": "rejected",
            "stage": "manifest",
            "reason": "bad_manifest_row",
            "detail": str(b),
            "record": {"image": b.image, "source_row": int(b.row)},
        }
        for b in bad_rows
    }
    order = sorted({r.row for r in rows} | set(bad_entries))
    for row in order:  # input order
        e = journal.entries.get(row) or bad_entries.get(row)
        if e is None:
            continue
        if e["status"] == "kept":
            kept.append(e["record"])
        else:
            side = dict(e["record"])
            side.update(stage=e["stage"], reason=e["reason"], detail=e["detail"])
            (rejected if e["status"] == "rejected" else failed).append(side)
    jsonl.write_rows(os.path.join(out_dir, OUTPUT_FILE), kept)
    jsonl.write_rows(os.path.join(out_dir, REJECTED_FILE), rejected)
    jsonl.write_rows(os.path.join(out_dir, FAILED_FILE), failed)
    return (
        len(kept),
        dict(collections.Counter(x["reason"] for x in rejected)),
        dict(collections.Counter(x["reason"] for x in failed)),
    )


def _open_journal(
    cfg: Any, rows: Sequence[InputRow], teacher: Teacher | None, judge: Teacher | None
) -> Journal:
    """The journal of ``cfg.out_dir`` after the resume checks: ``run.json`` written on a fresh
    start, else matching this run's fingerprint (``restart`` discards both files first), and no
    journal row outside ``rows``."""
    out_dir = cfg.out_dir
    journal_path = os.path.join(out_dir, JOURNAL_FILE)
    run_path = os.path.join(out_dir, RUN_FILE)
    fp = fingerprint(cfg, rows, teacher, judge)
    if cfg.restart:
        for name in (JOURNAL_FILE, RUN_FILE):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in fp if old.get(k) != fp[k])
        if diff:
            raise ValueError(
                f"{out_dir} holds a run with different settings ({', '.join(diff)}); use another "
                "out_dir, or restart=True to discard its journal"
            )
    else:
        jsonl.write_json(run_path, fp, indent=2, sort_keys=True)

    journal = Journal(journal_path, fsync=bool(cfg.fsync))
    valid_rows = {r.row for r in rows}
    stray = sorted(set(journal.entries) - valid_rows)
    if stray:
        journal.close()
        raise ValueError(f"{journal_path}: rows {stray[:5]} are not in the input")
    return journal


def _process_rows(
    cfg: Any,
    s: TaskSettings,
    coverage: judge_mod.KeywordCoverage,
    todo: Sequence[InputRow],
    teacher: Teacher | None,
    judge: Teacher | None,
    journal: Journal,
    on_entry: Callable[[dict[str, Any]], None] | None,
    bar: Any,
) -> tuple[int, BaseException | None]:
    """Runs :func:`process_row` over ``todo`` on ``cfg.client.concurrency`` threads (at most
    twice that many rows in flight), journaling each finished row from this thread.

    Returns (rows journaled, the fatal error that stopped the run or None): a
    :class:`FatalTeacherError` cancels the rows not started yet (running ones finish), Ctrl-C
    stops at once; both are returned so that the caller assembles the files first.
    """
    concurrency = max(1, int(cfg.client.concurrency))
    max_inflight = concurrency * 2
    stop = threading.Event()
    fatal: BaseException | None = None
    processed = 0
    pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reasoning")
    try:
        it = iter(todo)
        pending: set[cf.Future] = set()

        def refill() -> None:
            while not stop.is_set() and len(pending) < max_inflight:
                r = next(it, None)
                if r is None:
                    return
                prior = journal.entries.get(r.row)
                cached = None
                if prior and prior["status"] == "failed" and prior["stage"] == "judge":
                    cached = prior["record"].get("teacher_reply")
                pending.add(pool.submit(process_row, r, s, teacher, judge, coverage, cached))

        refill()
        while pending:
            finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                if fut.cancelled():
                    continue
                try:
                    entry = fut.result()
                except FatalTeacherError as e:
                    if fatal is None:
                        fatal = e
                        stop.set()
                        for other in pending:  # rows not started yet; running ones finish
                            other.cancel()
                    continue
                journal.append(entry)
                processed += 1
                if on_entry is not None:
                    on_entry(entry)
                if bar is not None:
                    bar.update(1)
            refill()
    except KeyboardInterrupt:
        stop.set()
        fatal = KeyboardInterrupt()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return processed, fatal


def _request_counts(teacher: Teacher | None, judge: Teacher | None) -> dict[str, int]:
    requests = {}
    for name, client in (("teacher", teacher), ("judge", judge)):
        stats = getattr(client, "stats", None)
        if isinstance(stats, Mapping):
            requests.update({f"{name}_{k}": int(v) for k, v in stats.items()})
    return requests


def run(
    cfg: Any,
    rows: Sequence[InputRow],
    teacher: Teacher | None,
    judge: Teacher | None,
    *,
    progress: bool | None = None,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
    bad_rows: Sequence[Any] = (),
) -> Summary:
    """Process ``rows`` into ``cfg.out_dir`` (resumable; see the module docstring)."""
    out_dir = cfg.out_dir
    if not out_dir:
        raise ValueError("out_dir is empty")
    if teacher is None and judge is None:
        raise ValueError("judge-only mode (no teacher) needs a judge")
    os.makedirs(out_dir, exist_ok=True)
    s = task_settings(cfg)  # config errors surface before any file is written
    coverage = judge_mod.KeywordCoverage(s.rules.keywords)
    journal = _open_journal(cfg, rows, teacher, judge)

    def final(r: InputRow) -> bool:
        e = journal.entries.get(r.row)
        return e is not None and (e["status"] != "failed" or not cfg.retry_failed)

    todo = [r for r in rows if not final(r)]
    skipped = len(rows) - len(todo)
    if progress is None:
        progress = bool(cfg.progress)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=skipped, desc=f"build {cfg.task}", file=sys.stderr)
    try:
        processed, fatal = _process_rows(
            cfg, s, coverage, todo, teacher, judge, journal, on_entry, bar
        )
    finally:
        if bar is not None:
            bar.close()
        journal.close()
    n_kept, rejected, failed = assemble(out_dir, rows, journal, bad_rows)
    summary = Summary(
        total=len(rows),
        kept=n_kept,
        rejected=rejected,
        failed=failed,
        pending=len(rows) - len(journal.entries),
        processed_this_run=processed,
        skipped_from_journal=skipped,
        requests=_request_counts(teacher, judge),
    )
    jsonl.write_json(
        os.path.join(out_dir, SUMMARY_FILE), summary.to_dict(), indent=2, sort_keys=True
    )
    log.debug("summary for %s:\n%s", out_dir, summary.text())
    if fatal is not None:
        raise fatal
    return summary
