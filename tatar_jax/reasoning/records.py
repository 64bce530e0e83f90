"""Input rows for the builder: a dataset declaration (``tatar_jax.data.manifest.DatasetSpec``:
manifest + image folder + declared native score range) plus, for IAA, the eight ArtiMuse
attribute texts (spec §5.2).

Manifests are read and checked by :func:`tatar_jax.data.manifest.load_records` (JSON list or
JSONL; missing fields, non-numeric / out-of-range scores and duplicate images are errors naming
file and row, or are skipped and reported). Each row keeps its score as the manifest gives it
(the teacher explains the score on the dataset's own scale, as in the reference) and its 0-100
value from the declared range (``gt_100``).

Attribute texts are read, per row, from (first found): ``aesthetic_attributes`` or
``attributes`` (a mapping of attribute key -> text, the reference generator's output field), or
top-level keys named like the attribute keys (``composition_structure``, …). Raw ArtiMuse
annotation conversations can be attached with :func:`merge_attribute_conversations` (the
reference's ``merge_artimuse_attrs.py``; later duplicates win, as there).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tatar_jax.data import manifest as manifest_mod
from tatar_jax.data.manifest import BadRow, DatasetSpec, ManifestError
from tatar_jax.reasoning.prompts import ATTRIBUTE_KEYS

__all__ = [
    "ATTRIBUTE_FIELDS",
    "BadRow",
    "DatasetSpec",
    "InputRow",
    "ManifestError",
    "load_rows",
    "merge_attribute_conversations",
    "row_attributes",
]

ATTRIBUTE_FIELDS: tuple[str, ...] = ("aesthetic_attributes", "attributes")


@dataclasses.dataclass(frozen=True)
class InputRow:
    row: int  # 0-based row of the manifest file (the journal key; output order)
    image: str  # as written in the manifest
    image_path: str  # resolved against the image root
    gt_score: float | int  # as the manifest gives it (its own scale)
    attributes: dict[str, str]
    fields: dict[str, Any]  # the manifest row as read (passed through to the output)
    gt_100: float | None = None  # 0-100 by the declared range


def row_attributes(rec: Mapping[str, Any]) -> dict[str, str]:
    for field in ATTRIBUTE_FIELDS:
        if isinstance(rec.get(field), Mapping):
            return {str(k): str(v) for k, v in rec[field].items() if v is not None}
    keys = set(ATTRIBUTE_KEYS.values())
    return {k: str(v) for k, v in rec.items() if k in keys and v is not None}


def load_rows(spec: DatasetSpec, on_error: str = "error") -> tuple[list[InputRow], list[BadRow]]:
    """Rows of a declared dataset (sampling applied) and the bad rows skipped (``on_error``)."""
    raw_rows = manifest_mod.read_rows(spec.manifest)
    loaded = manifest_mod.load_records(spec, on_error=on_error, rows=raw_rows)
    rows = []
    for rec in loaded.records:
        fields = dict(raw_rows[int(rec["row_id"])])  # the row exactly as the file has it
        fields.setdefault("dataset", spec.name)
        original = fields.get(spec.label_field)
        given = original if isinstance(original, (int, float)) else rec["score_raw"]
        rows.append(
            InputRow(
                row=int(rec["row_id"]),
                image=rec["image_name"],
                image_path=rec["image"],
                gt_score=given,
                attributes=row_attributes(rec),
                fields=fields,
                gt_100=float(rec["gt_100"]),
            )
        )
    rows.sort(key=lambda r: r.row)  # random: sampling permutes; output follows the file
    return rows, list(loaded.skipped)


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
