"""Image decoding ahead of the model: the next batch's images load while the current one is
scored."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from tatar_jax.data import image as image_mod

Loaded = tuple[Mapping[str, Any], Any, "str | None"]


def _load(rec: Mapping[str, Any]) -> Loaded:
    try:
        return rec, image_mod.load_image(rec["image"]), None
    except image_mod.ImageLoadError as err:
        return rec, None, err.reason


def batches_with_images(
    records: Sequence[Mapping[str, Any]], batch_size: int, threads: int
) -> Iterator[list[Loaded]]:
    """Batches of ``batch_size`` (record, PIL image or None, error reason or None), in record
    order; ``threads`` threads decode the next batch meanwhile (``record["image"]`` is the
    path)."""
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: list[Future] = [pool.submit(_load, r) for r in chunks[0]]
        for k in range(len(chunks)):
            current = pending
            pending = [pool.submit(_load, r) for r in chunks[k + 1]] if k + 1 < len(chunks) else []
            yield [f.result() for f in current]
