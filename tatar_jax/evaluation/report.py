"""Markdown summary of an evaluation in the layout of the paper's table (spec §2.1, §12).

Main table: one row per model, the IQA block (KonIQ, SPAQ, KADID, PIPAL, IQA average), the IAA
block (ArtiMuse-10K, AVA, TAD66K, FLICKR-AES, IAA average) and the overall average; every cell is
``SRCC / PLCC``. A block average over fewer datasets than the block has is marked ``*`` and says
how many it covers. A second table lists every evaluated dataset (built-in or not) with counts,
unparsed fraction, logistic PLCC, KRCC and mean think length.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

# (built-in dataset name, column header) in the paper's order.
IQA_BLOCK: tuple[tuple[str, str], ...] = (
    ("KonIQ-10K", "KonIQ"),
    ("SPAQ", "SPAQ"),
    ("KADID", "KADID"),
    ("PIPAL", "PIPAL"),
)
IAA_BLOCK: tuple[tuple[str, str], ...] = (
    ("ArtiMuse-10K", "ArtiMuse-10K"),
    ("AVA", "AVA"),
    ("TAD66K", "TAD66K"),
    ("FLICKR-AES", "FLICKR-AES"),
)
DASH = "—"


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _fmt(v: Any, digits: int = 3) -> str:
    x = _num(v)
    return DASH if math.isnan(x) else f"{x:.{digits}f}"


def _pair(m: Mapping[str, Any] | None, srcc_key: str) -> tuple[float, float]:
    if m is None:
        return math.nan, math.nan
    return _num(m.get(srcc_key)), _num(m.get("plcc"))


def _cell(s: float, p: float) -> str:
    if math.isnan(s) and math.isnan(p):
        return DASH
    return f"{_fmt(s)} / {_fmt(p)}"


def _average(pairs: Sequence[tuple[float, float]], size: int) -> tuple[str, int]:
    ok = [(s, p) for s, p in pairs if not (math.isnan(s) or math.isnan(p))]
    if not ok:
        return DASH, 0
    s = sum(v[0] for v in ok) / len(ok)
    p = sum(v[1] for v in ok) / len(ok)
    mark = "" if len(ok) == size else "*"
    return f"{s:.3f}{mark} / {p:.3f}{mark}", len(ok)


def paper_table(
    results_by_model: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    reference_compat: bool = False,
) -> str:
    """The main table; ``results_by_model[model][dataset] = metrics`` (as written by run_eval)."""
    srcc_key = "srcc_reference" if reference_compat else "srcc"
    heads = [h for _, h in IQA_BLOCK] + ["IQA avg"] + [h for _, h in IAA_BLOCK]
    heads += ["IAA avg", "Overall avg"]
    lines = [
        "| Method | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    notes = []
    for model, results in results_by_model.items():
        cells, every = [], []
        for block in (IQA_BLOCK, IAA_BLOCK):
            pairs = [_pair(results.get(name), srcc_key) for name, _ in block]
            cells += [_cell(s, p) for s, p in pairs]
            avg, n = _average(pairs, len(block))
            cells.append(avg)
            if 0 < n < len(block):
                notes.append(f"{model}: an average marked * covers {n} of {len(block)} datasets")
            every += pairs
        avg, n = _average(every, len(every))
        cells.append(avg)
        if 0 < n < len(every):
            notes.append(f"{model}: the overall average covers {n} of {len(every)} datasets")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    for n in dict.fromkeys(notes):
        text += f"\n\\* {n}.\n"
    return text


def details_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Every dataset: counts, unparsed %, SRCC, PLCC, PLCC after the logistic fit, KRCC, think."""
    head = (
        "| Dataset | Task | Records | Scored | Image errors | Unparsed % | Pairs | SRCC | PLCC "
        "| PLCC (logistic) | KRCC | Think tokens | Think words | Note |"
    )
    lines = [head, "|---|---|" + "---:|" * 11 + "---|"]
    for name, m in results.items():
        frac = _num(m.get("frac_unparsed"))
        note = m.get("reason") or ""
        fit = m.get("logistic_fit")
        if fit not in (None, "ok", "not run"):
            note = (note + "; " if note else "") + f"logistic fit fell back to plain PLCC: {fit}"
        if m.get("n_predict_errors"):
            note = (note + "; " if note else "") + f"{m['n_predict_errors']} not processable"
        if m.get("n_missing"):
            note = (note + "; " if note else "") + f"{m['n_missing']} not yet scored"
        if m.get("n_bad_rows"):
            note = (note + "; " if note else "") + f"{m['n_bad_rows']} bad manifest rows"
        if m.get("n_out_of_range"):
            note = (note + "; " if note else "") + (
                f"{m['n_out_of_range']} answers outside 0-100 (clipped)"
            )
        lines.append(
            f"| {name} | {str(m.get('task', '')).upper()} | {m.get('n_records', '')} "
            f"| {m.get('n_scored', '')} | {m.get('n_image_errors', '')} "
            f"| {DASH if math.isnan(frac) else f'{100 * frac:.1f}'} | {m.get('n_pairs', '')} "
            f"| {_fmt(m.get('srcc'), 4)} | {_fmt(m.get('plcc'), 4)} "
            f"| {_fmt(m.get('plcc_logistic'), 4)} | {_fmt(m.get('krcc'), 4)} "
            f"| {_fmt(m.get('mean_think_tokens'), 1)} | {_fmt(m.get('mean_think_words'), 1)} "
            f"| {note} |"
        )
    return "\n".join(lines) + "\n"


def samples_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """K samples per image (datasets with ``num_samples``): the aggregate's SRCC / PLCC beside one
    sample's (averaged over the K), the mean per-image std, unparsed samples and (constrained
    decoding) the answers the constraint forced; "" when no dataset was sampled."""
    sampled = {n: m for n, m in results.items() if m.get("num_samples")}
    if not sampled:
        return ""
    lines = [
        "| Dataset | K | SRCC (aggregate) | PLCC (aggregate) | SRCC (one sample) "
        "| PLCC (one sample) | Mean per-image std | Unparsed samples % | Forced answers |",
        "|---|" + "---:|" * 8,
    ]
    for name, m in sampled.items():
        frac = _num(m.get("frac_samples_unparsed"))
        forced = m.get("n_would_be_unparsed")
        lines.append(
            f"| {name} | {m['num_samples']} | {_fmt(m.get('srcc'), 4)} | {_fmt(m.get('plcc'), 4)} "
            f"| {_fmt(m.get('srcc_single'), 4)} | {_fmt(m.get('plcc_single'), 4)} "
            f"| {_fmt(m.get('mean_pred_std'), 2)} "
            f"| {DASH if math.isnan(frac) else f'{100 * frac:.1f}'} "
            f"| {DASH if forced is None else forced} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "tatar-jax",
    reference_compat: bool = False,
) -> str:
    """summary.md: the paper-layout table for one model, then the per-dataset details."""
    mode = (
        "reference-compatible (value-based labels B1, lenient parsing + rescaling B2, "
        "ordinal-rank SRCC B12) - for comparison with the authors' script only"
        if reference_compat
        else "labels mapped by declared range, strict parsing, SRCC with average ranks"
    )
    return (
        f"# Evaluation: {title}\n\nMode: {mode}. Cells are SRCC / PLCC (plain Pearson); "
        "unparsed answers are excluded from the pairs and counted below.\n\n"
        + paper_table({title: results}, reference_compat=reference_compat)
        + "\n## Per dataset\n\n"
        + details_table(results)
        + (f"\n## Sampled decoding\n\n{samples_table(results)}" if samples_table(results) else "")
    )


def load_results(out_dir: str | os.PathLike) -> tuple[str, dict[str, dict[str, Any]], bool]:
    """(model name, metrics by dataset, reference_compat) of an evaluation folder."""
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (not an evaluation folder?)")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    name, compat = os.path.basename(os.path.normpath(out_dir)), False
    info_path = os.path.join(out_dir, "run_info.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        name = info.get("model") or name
        compat = bool(info.get("reference_compat", False))
    return name, results, compat


def compare_markdown(out_dirs: Sequence[str | os.PathLike]) -> str:
    """One paper-layout table with a row per evaluation folder (e.g. several checkpoints).

    Folders are labelled by their model name (``run_info.json``), made unique with the folder
    name when two share one. Mixing reference-compatible and fixed runs is refused.
    """
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    modes = set()
    for d in out_dirs:
        name, results, compat = load_results(d)
        if name in rows:
            name = f"{name} ({os.path.basename(os.path.normpath(os.fspath(d)))})"
        rows[name] = results
        modes.add(compat)
    if len(modes) > 1:
        raise ValueError("cannot compare reference-compatible and fixed evaluations in one table")
    return paper_table(rows, reference_compat=modes.pop() if modes else False)
