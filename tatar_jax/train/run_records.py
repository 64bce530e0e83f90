"""A run's records across restarts: the stored run config, its changes, the summary.

``run_config.json`` holds the config a workdir's checkpoints were trained with. A restart that
resumes from a checkpoint with different hyper-parameters is refused, listing each difference,
unless ``allow_config_change`` (``--allow_config_change``) is set; an accepted change is
appended to ``config_changes.jsonl`` (time, checkpoint step it resumes from, each field's old and
new value) before ``run_config.json`` is replaced.

Fields that may change on resume without that flag (they do not change what is trained, only
how it is run, logged, checkpointed or evaluated): ``RESUMABLE_PREFIXES``. ``total_steps`` is
not among them: the learning-rate schedule is laid out over it, so extending a run changes the
learning rate of every later step.

A field a later version of tatar-jax added is absent from an older run's ``run_config.json``;
at the value that does what the older version did (``ADDED_FIELDS``) it is not a change, so a run
resumes across an upgrade; at any other value it is a change like any other.

``summary.json`` is merged, not rewritten: a stage that ran no step in this invocation (a
finished run started again) keeps its stored row, and a resumed stage keeps the ``eval_first``
of the invocation that started it.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from tatar_jax import cli_errors

RUN_CONFIG = "run_config.json"
CHANGES = "config_changes.jsonl"
SUMMARY = "summary.json"

RESUMABLE_PREFIXES = (
    "allow_config_change",
    "logging.",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save",
    "checkpoint.save_at_end",
    "checkpoint.export_hf",
    "eval.",
    "mesh.",  # placement (devices, coordinator); the data order is checked by its fingerprint
    "data.worker_count",
    "data.prefetch",
    "data.bad_record",  # a run stopped by a bad record may resume skipping it
    "data.max_skip_fraction",
    "data.root",  # the data moved to another disk
)

# Fields added after runs were started, with the value that trains as before they existed.
ADDED_FIELDS = {
    "optimizer.mu_dtype": "params",  # AdamW's first moment in the parameters' dtype
}


class ConfigChangeError(ValueError):
    """A resume whose hyper-parameters differ from the workdir's run config."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _resumable(key: str) -> bool:
    return key.startswith(RESUMABLE_PREFIXES) or key.endswith(".image_root")


def _as_before(key: str, value: Any) -> bool:
    return key in ADDED_FIELDS and value == ADDED_FIELDS[key]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{dotted.field: [old, new]}`` of the fields that differ (absent = None)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_run_config(cfg: Any, workdir: pathlib.Path, resume_step: int | None) -> None:
    """Writes ``run_config.json``; on a resume (``resume_step`` not None) first compares it with
    the stored one and refuses or records a change (module docstring)."""
    path = workdir / RUN_CONFIG
    text = cfg.to_json_best_effort(indent=1)
    if resume_step is not None and path.exists():
        stored = cli_errors.read_json(path)  # a damaged file: one line naming it
        if not isinstance(stored, dict):
            raise cli_errors.DamagedInputError(path, "not a JSON object (a run's config)")
        diff = config_diff(stored, json.loads(text))
        had = _flatten(stored)  # the fields the stored run already had
        changes = {
            k: v
            for k, v in diff.items()
            if not _resumable(k) and not (k not in had and _as_before(k, v[1]))
        }
        if changes and not bool(cfg.allow_config_change):
            listing = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
            raise ConfigChangeError(
                f"{workdir} resumes from step {resume_step} with a config that differs from its "
                f"{RUN_CONFIG}: {listing}. Rerun with --allow_config_change to accept and record "
                f"the change (in {CHANGES}), or use a new --workdir"
            )
        if diff:
            record = {"time": time.time(), "resume_step": resume_step, "changes": diff}
            with open(workdir / CHANGES, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
    path.write_text(text)


def merge_summary(rows: Mapping[str, dict[str, Any]], ran: Mapping[str, bool], wd: pathlib.Path):
    """``summary.json`` with this invocation's ``rows``; a stage that did not run keeps its
    stored row, a resumed one its stored ``eval_first``. Returns the merged rows."""
    path = wd / SUMMARY
    old = cli_errors.read_json(path) if path.exists() else {}
    out = dict(old)
    for name, row in rows.items():
        prev = old.get(name)
        if prev is not None and not ran.get(name, True):
            continue  # a finished stage started again: its record stays as it was
        if prev is not None and not row.get("eval_first"):
            row = dict(row, eval_first=prev.get("eval_first", {}))
        out[name] = row
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(path)
    return out
