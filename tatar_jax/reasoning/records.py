"""Input rows for the builder: a manifest (JSON list or JSONL of ``{"image", "gt_score", ...}``)
plus, for IAA, the eight ArtiMuse attribute texts (spec §5.2).

Minimal reader of its own (``tatar_jax.data.manifest`` was not available when this was written):
it only needs the image, the score as the record gives it and the attribute texts; the score is
*not* mapped to 0-100 here (the teacher explains the score on the dataset's own scale, as in the
reference; the SFT data path maps it by the dataset's declared range).

Attribute texts are read, per row, from (first found): ``aesthetic_attributes`` or
``attributes`` (a mapping of attribute key -> text, the reference generator's output field), or
top-level keys named like the attribute keys (``composition_structure``, …). Raw ArtiMuse
annotation conversations can be attached with :func:`merge_attribute_conversations` (the
reference's ``merge_artimuse_attrs.py``; later duplicates win, as there).

Every problem raises :class:`ManifestError` naming the file and the row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tatar_jax.reasoning.prompts import ATTRIBUTE_KEYS

SCORE_KEYS: tuple[str, ...] = ("gt_score", "score", "mos")
ATTRIBUTE_FIELDS: tuple[str, ...] = ("aesthetic_attributes", "attributes")


class ManifestError(ValueError):
    """A manifest problem; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class InputRow:
    row: int  # 0-based index in the manifest (the journal key; output order)
    image: str  # as written in the manifest
    image_path: str  # resolved against the image root
    gt_score: float | int  # as the record gives it (its own scale)
    attributes: dict[str, str]
    fields: dict[str, Any]  # the whole input record (passed through to the output)


def _load_json_rows(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: invalid JSON: {e}") from None
        return list(rows)
    if stripped.startswith("{") and not path.endswith((".jsonl", ".ndjson")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # JSONL after all
        if isinstance(obj, dict):
            for key in ("data", "records", "annotations"):
                if isinstance(obj.get(key), list):
                    return list(obj[key])
            raise ManifestError(f"{path}: a JSON object without a 'data'/'records' list")
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: line {i + 1} is not valid JSON: {e}") from None
    return rows


def _score(rec: Mapping[str, Any], keys: Sequence[str], where: str) -> float | int:
    for key in keys:
        if key in rec and rec[key] is not None:
            v = rec[key]
            if isinstance(v, bool):
                raise ManifestError(f"{where}: {key} is a boolean")
            if isinstance(v, str):
                try:
                    v = float(v.strip())
                except ValueError:
                    raise ManifestError(f"{where}: {key} = {rec[key]!r} is not a number") from None
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ManifestError(f"{where}: {key} = {rec[key]!r} is not a finite number")
            return v
    raise ManifestError(f"{where}: no score field (looked for {', '.join(keys)})")


def row_attributes(rec: Mapping[str, Any]) -> dict[str, str]:
    for field in ATTRIBUTE_FIELDS:
        if isinstance(rec.get(field), Mapping):
            return {str(k): str(v) for k, v in rec[field].items() if v is not None}
    keys = set(ATTRIBUTE_KEYS.values())
    return {k: str(v) for k, v in rec.items() if k in keys and v is not None}


def read_manifest(
    path: str,
    image_root: str = "",
    score_keys: Sequence[str] = SCORE_KEYS,
    max_records: int = -1,
) -> list[InputRow]:
    """Rows of a JSON/JSONL manifest. Relative image paths resolve against ``image_root``, else
    against the manifest's folder."""
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path!r} does not exist")
    root = image_root or os.path.dirname(os.path.abspath(path))
    out = []
    for i, rec in enumerate(_load_json_rows(path)):
        if 0 <= max_records <= len(out):
            break
        where = f"{path} row {i}"
        if not isinstance(rec, Mapping):
            raise ManifestError(f"{where}: expected an object, got {type(rec).__name__}")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise ManifestError(f"{where}: missing or empty 'image'")
        resolved = image if os.path.isabs(image) else os.path.join(root, image)
        out.append(
            InputRow(
                row=i,
                image=image,
                image_path=resolved,
                gt_score=_score(rec, score_keys, where),
                attributes=row_attributes(rec),
                fields=dict(rec),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# ArtiMuse annotation conversations -> attribute texts

_ASPECT_RE = re.compile(r"aspect of\s*[\"'“”‘’]?([^\"'“”‘’?.,;:!()\n]+)", re.IGNORECASE)
_NAME_TO_KEY = {
    " ".join(k.lower().replace("&", " and ").split()): v for k, v in ATTRIBUTE_KEYS.items()
}


def attribute_key(question: str) -> str | None:
    """The attribute key a question asks about ("... from the aspect of Visual Elements")."""
    m = _ASPECT_RE.search(question)
    if not m:
        return None
    name = " ".join(m.group(1).lower().replace("&", " and ").split())
    return _NAME_TO_KEY.get(name)


def _turns(rec: Mapping[str, Any]) -> list[tuple[str, str]]:
    convs = rec.get("conversations") or rec.get("messages") or []
    turns = []
    for t in convs:
        if not isinstance(t, Mapping):
            continue
        role = str(t.get("from", t.get("role", ""))).lower()
        text = t.get("value", t.get("content", ""))
        if isinstance(text, list):  # [{"type": "text", "text": ...}, ...]
            text = " ".join(p.get("text", "") for p in text if isinstance(p, Mapping))
        turns.append((role, str(text)))
    return turns


def merge_attribute_conversations(
    rows: Sequence[InputRow], conversations: Iterable[Mapping[str, Any]]
) -> list[InputRow]:
    """Attach attribute texts from annotation conversations, matched on the image name.

    A question turn naming an attribute ("from the aspect of Composition & Structure") followed
    by an answer turn gives that attribute's text. Images are matched by their path as written and
    by their file name. Later duplicates win (as in the reference).
    """
    by_image: dict[str, dict[str, str]] = {}
    for rec in conversations:
        image = rec.get("image")
        if isinstance(image, list):
            image = image[0] if image else None
        if not isinstance(image, str):
            continue
        turns = _turns(rec)
        for (role_q, q), (role_a, a) in zip(turns, turns[1:], strict=False):
            if role_q in ("human", "user") and role_a in ("gpt", "assistant"):
                key = attribute_key(q)
                if key:
                    for name in {image, os.path.basename(image)}:
                        by_image.setdefault(name, {})[key] = a.strip()
    out = []
    for r in rows:
        found = by_image.get(r.image) or by_image.get(os.path.basename(r.image)) or {}
        out.append(dataclasses.replace(r, attributes={**r.attributes, **found}))
    return out
