"""Several JAX processes (hosts) training one model: each host's pipeline batch -> the global batch.

The grain pipeline gives host ``h`` the contiguous slots ``[h*B, (h+1)*B)`` of global batch
``b`` (``tatar_jax.data.pipeline``: the union of hosts equals the single-host run). The training
step needs the *global* batch on every host:

- the sampler and the update take the images' patches replicated (the vision tower's input), and
  ``feat_index`` points into the features of all images of the step;
- the GRPO rewards are functions of the whole step batch (the IAA Thurstone reward and the
  soft rank compare completions across prompts: spec §8.4-8.5, bug B6), so every host must score
  the same completions to compute the same rewards and advantages.

:func:`global_batch` all-gathers the host batches (``process_allgather``) and merges them exactly
as ``examples.collate`` would have batched the same examples on one host: rows in process order,
the sequence bucket of the longest row, the patches of all images concatenated (padding dropped)
and padded to the patch bucket of their total. A single-process run returns its batch unchanged
(no gather). Every host then runs the same (deterministic) host code, and places its shards of
the global arrays with ``sharding.put_global``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from tatar_jax.data import examples as ex

__all__ = ["SEQ_KEYS", "allgather_numpy", "global_batch"]

# (B, L) arrays padded along the sequence axis -> their padding value (``None``: the pad id).
SEQ_KEYS: dict[str, Any] = {"input_ids": None, "attention_mask": 0, "label_mask": 0, "labels": -100}
PATCH_KEYS = ("pixel_values", "patch_mask")


def allgather_numpy(tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{key: (P, ...) stacked over processes} of host numpy arrays of equal shapes.

    ``process_allgather`` goes through jax arrays, where 64-bit types become 32-bit unless x64
    is on: 8-byte arrays travel as pairs of uint32 and are viewed back; bools as uint8.
    """
    from jax.experimental import multihost_utils

    send, how = {}, {}
    for k, v in tree.items():
        v = np.ascontiguousarray(v)
        how[k] = v.dtype
        if v.dtype == np.bool_:
            v = v.astype(np.uint8)
        elif v.dtype.itemsize == 8:
            v = v.view(np.uint32).reshape(v.shape + (2,))
        send[k] = v
    got = multihost_utils.process_allgather(send, tiled=False)
    out = {}
    for k, v in got.items():
        v = np.asarray(v)
        if how[k] == np.bool_:
            v = v.astype(bool)
        elif how[k].itemsize == 8:
            v = np.ascontiguousarray(v).view(how[k]).reshape(v.shape[:-1])
        out[k] = v
    return out


def _pad_seq(x: np.ndarray, length: int, value: int, side: str) -> np.ndarray:
    pad = length - x.shape[-1]
    if pad == 0:
        return x
    width = [(0, 0)] * (x.ndim - 1) + [(pad, 0) if side == "left" else (0, pad)]
    return np.pad(x, width, constant_values=value)


def global_batch(
    batch: Mapping[str, Any],
    *,
    pad_id: int,
    padding_side: str = "left",
    patch_buckets: Sequence[int] | None = None,
    process_count: int | None = None,
    process_index: int | None = None,
    allgather: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The step's global batch (every host's rows, in process order) from this host's batch.

    Args:
      batch: a ``tatar_jax.data.pipeline`` batch (keys of ``examples.collate`` + ``epoch`` +
        ``meta``); every host's has the same keys and row count ``B``.
      pad_id: the tokenizer's pad id (``input_ids`` padding when hosts chose different
        sequence buckets). padding_side: the pipeline's (``"left"`` for GRPO, ``"right"`` SFT).
      patch_buckets: the pipeline's patch buckets (None: ``examples.default_patch_buckets``).
      process_count / process_index: default ``jax.process_count()`` / ``jax.process_index()``;
        one process returns ``batch`` itself (no gather).
      allgather: ``{key: host array} -> {key: (P, ...) stacked}``; default
        :func:`allgather_numpy` (a collective: every host calls it in the same order). Tests pass
        a fake.

    Returns:
      The batch of ``P * B`` rows; ``meta`` is this host's (host-only lists), with
      ``meta["process_rows"] = (start, stop)``: this host's rows in the global batch.
    """
    nproc = jax.process_count() if process_count is None else int(process_count)
    if nproc == 1:
        return batch
    gather = allgather or allgather_numpy
    arrays = {k: np.asarray(v) for k, v in batch.items() if k != "meta"}
    b = len(arrays["valid"])
    for k, v in arrays.items():
        row_axis = 1 if k == "position_ids" else 0
        if k not in PATCH_KEYS and (v.ndim <= row_axis or v.shape[row_axis] != b):
            raise ValueError(
                f"batch[{k!r}] has shape {v.shape}: not a per-row array of {b} rows (cannot merge "
                "the hosts' batches)"
            )
    length = int(arrays["input_ids"].shape[1])
    n_patch = int(arrays["pixel_values"].shape[0])
    sizes = gather({"sizes": np.array([length, n_patch], np.int32)})["sizes"]
    if sizes.shape[0] != nproc:
        raise ValueError(f"allgather returned {sizes.shape[0]} hosts' data, expected {nproc}")
    length, q_max = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    send = {}
    for k, v in arrays.items():
        if k in SEQ_KEYS:
            v = _pad_seq(v, length, pad_id if SEQ_KEYS[k] is None else SEQ_KEYS[k], padding_side)
        elif k == "position_ids":
            v = _pad_seq(v, length, 0, padding_side)
        elif k in PATCH_KEYS:
            v = np.concatenate([v, np.zeros((q_max - len(v),) + v.shape[1:], v.dtype)])
        send[k] = v
    got = gather(send)
    out: dict[str, Any] = {}
    for k, v in got.items():
        if k in PATCH_KEYS:
            continue
        out[k] = np.concatenate(list(v), axis=1 if k == "position_ids" else 0)
    # Real patches first, in row order (collate's layout), then the patch bucket of the total.
    counts = got["patch_mask"].astype(bool).sum(axis=1)
    pv = np.concatenate([got["pixel_values"][p, :c] for p, c in enumerate(counts)])
    q = ex.bucket_size(len(pv), patch_buckets, "global patch count")
    out["pixel_values"] = np.concatenate([pv, np.zeros((q - len(pv), pv.shape[1]), pv.dtype)])
    out["patch_mask"] = (np.arange(q) < len(pv)).astype(got["patch_mask"].dtype)
    meta = dict(batch.get("meta", {}))
    me = jax.process_index() if process_index is None else int(process_index)
    meta["process_rows"] = (me * b, (me + 1) * b)
    out["meta"] = meta
    return out
