"""What was evaluated: a fingerprint of the weights' files, the key of an evaluation's resume.

An evaluation folder's ``run_info.json`` records ``weights`` (one sha256 over the name, size and
sha256 of every file the weights were read from: an HF folder's files, an orbax export's, or the
training step folder plus the run's ``config.json``) and ``weights_files`` (each file's size,
modification time and sha256). A rerun into the same folder continues only when ``weights``
is the same (:mod:`tatar_jax.evaluation.shards`), so two models whose folders look alike
(``/runs/sft/hf`` and ``/runs/grpo/hf``) never share predictions.

Hashing reads every byte once (a 7B model in bfloat16: about 15 GB, a few seconds to a minute
depending on the disk); a rerun re-hashes only files whose size or modification time changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weight_files(
    hf_dir: str = "", checkpoint: str = "", step: int | None = None
) -> list[pathlib.Path]:
    """The files the weights of (``hf_dir``, ``checkpoint``, ``step``) are read from, as
    :mod:`tatar_jax.loading` reads them ([] for the embedded random model). ``step``: the
    training step actually loaded (a training run)."""
    if checkpoint:
        p = pathlib.Path(checkpoint)
        if is_export(checkpoint):
            return _files_under(p)
        if (p / "checkpoints").is_dir():
            p = p / "checkpoints"
        if not ((p / "state").is_dir() and p.name.isdigit()):
            p = p / str(step)
        files = _files_under(p)
        for up in (p, *p.parents[:3]):  # the architecture (loading._run_file's search)
            if (up / "config.json").is_file():
                return [*files, up / "config.json"]
        return files
    if hf_dir:
        return sorted(f for f in pathlib.Path(hf_dir).iterdir() if f.is_file())
    return []


def is_export(checkpoint: str) -> bool:
    """An orbax export (``config.json`` + ``params/``: no step to choose), as
    :func:`tatar_jax.loading.is_orbax_export`."""
    p = pathlib.Path(checkpoint)
    return (p / "config.json").is_file() and (p / "params").exists()


def _files_under(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(f for f in root.rglob("*") if f.is_file())


def fingerprint(
    files: list[pathlib.Path], known: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """(sha256 over every file's name, size and content hash, {path: {size, mtime_ns, sha256}}).

    ``known``: a previous run's per-file record; a file with the same size and modification time
    keeps its recorded sha256 (not read again)."""
    known = known or {}
    table: dict[str, dict[str, Any]] = {}
    for f in files:
        st = f.stat()
        old = known.get(str(f), {})
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old["sha256"]
        else:
            digest = _sha256(f)
        table[str(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    # The name inside its folder (not the absolute path): the same weights moved elsewhere are
    # the same weights.
    common = os.path.commonpath([str(f.parent) for f in files]) if files else ""
    body = [(os.path.relpath(k, common), v["size"], v["sha256"]) for k, v in table.items()]
    return hashlib.sha256(json.dumps(sorted(body)).encode()).hexdigest(), table


def run_info(
    *, hf_dir: str, checkpoint: str, step: int | None, dtype: str,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The ``weights`` / ``weights_files`` / ``dtype`` entries of ``run_info.json`` (module
    docstring); ``previous``: the folder's earlier ``run_info.json`` (its per-file hashes are
    reused for unchanged files). The embedded random model has no files (its ``model`` name and
    fixed initialisation identify it)."""
    files = weight_files(hf_dir, checkpoint, step)
    if not files:
        return {"weights": "none (the embedded random model)", "dtype": dtype}
    known = (previous or {}).get("weights_files") or {}
    digest, table = fingerprint(files, known)
    return {"weights": f"sha256:{digest}", "weights_files": table, "dtype": dtype}
