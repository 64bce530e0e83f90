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
and padded to the patch bucket of their total, whose vision layout it makes (the one layout
computation of a multi-process step; positions and rope deltas travel as the hosts made them).
A single-process run returns its batch unchanged (no gather). Every host then runs the same
(deterministic) host code, and places its shards of the global arrays with
``sharding.put_global``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from tatar_jax.data import examples as ex
from tatar_jax.data.batch import Batch, vision_inputs

__all__ = ["allgather_numpy", "global_batch"]


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


def _row_arrays(batch: Batch) -> dict[str, np.ndarray]:
    """The per-row arrays of ``batch`` by name, each checked to hold ``B`` rows."""
    meta = batch.meta
    out = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids, "rope_deltas": batch.rope_deltas,
        "label_mask": batch.label_mask, "image_grid_thw": batch.image_grid_thw,
        "meta.task_id": meta.task_id, "meta.gt_100": meta.gt_100, "meta.row_id": meta.row_id,
        "meta.valid": meta.valid, "meta.epoch": meta.epoch,
        "meta.think_dropped": meta.think_dropped,
    }  # fmt: skip
    out = {k: np.asarray(v) for k, v in out.items() if v is not None}
    b = batch.num_rows
    for k, v in out.items():
        row_axis = 1 if k == "position_ids" else 0
        if v.ndim <= row_axis or v.shape[row_axis] != b:
            raise ValueError(
                f"batch field {k} has shape {v.shape}: not a per-row array of {b} rows (cannot "
                "merge the hosts' batches)"
            )
    return out


def global_batch(
    batch: Batch,
    *,
    pad_id: int,
    padding_side: str | None = None,
    patch_buckets: Sequence[int] | None = None,
    process_count: int | None = None,
    process_index: int | None = None,
    allgather: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] | None = None,
) -> Batch:
    """The step's global batch (every host's rows, in process order) from this host's batch.

    Args:
      batch: a ``tatar_jax.data.pipeline`` batch; every host's has the same row count ``B``.
      pad_id: the tokenizer's pad id (``input_ids`` padding when hosts chose different
        sequence buckets). padding_side: the pipeline's (default: the batch's).
      patch_buckets: the pipeline's patch buckets (None: ``examples.default_patch_buckets``).
      process_count / process_index: default ``jax.process_count()`` / ``jax.process_index()``;
        one process returns ``batch`` itself (no gather).
      allgather: ``{key: host array} -> {key: (P, ...) stacked}``; default
        :func:`allgather_numpy` (a collective: every host calls it in the same order). Tests pass
        a fake.

    Returns:
      The batch of ``P * B`` rows, its vision layout made for the merged patch bucket (the
      positions and rope deltas are the hosts', padded); ``meta``'s strings and ``stats`` are
      this host's, ``process_rows = (start, stop)`` this host's rows in the global batch.
    """
    nproc = jax.process_count() if process_count is None else int(process_count)
    if nproc == 1:
        return batch
    gather = allgather or allgather_numpy
    side = padding_side or batch.padding_side
    arrays = _row_arrays(batch)
    b = batch.num_rows
    pv = np.asarray(batch.vision.pixel_values)
    mine = np.array([arrays["input_ids"].shape[1], len(pv), batch.num_patches], np.int32)
    sizes = gather({"sizes": mine})["sizes"]
    if sizes.shape[0] != nproc:
        raise ValueError(f"allgather returned {sizes.shape[0]} hosts' data, expected {nproc}")
    length, q_max = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    fill = {"input_ids": pad_id, "attention_mask": 0, "label_mask": 0, "position_ids": 0}
    send = {k: _pad_seq(v, length, fill[k], side) if k in fill else v for k, v in arrays.items()}
    send["pixel_values"] = np.concatenate([pv, np.zeros((q_max - len(pv), pv.shape[1]), pv.dtype)])
    got = gather(send)
    out = {k: np.concatenate(list(got[k]), axis=1 if k == "position_ids" else 0) for k in arrays}
    # Real patches first, in row order (collate's layout), then the patch bucket of the total.
    real = np.concatenate([got["pixel_values"][p, :c] for p, c in enumerate(sizes[:, 2])])
    q = ex.bucket_size(len(real), patch_buckets, "global patch count")
    pixels = np.concatenate([real, np.zeros((q - len(real), real.shape[1]), real.dtype)])
    meta = {k.removeprefix("meta."): out.pop(k) for k in list(out) if k.startswith("meta.")}
    me = jax.process_index() if process_index is None else int(process_index)
    return batch.replace(
        **out,
        vision=vision_inputs(pixels, out["image_grid_thw"], batch.vision_config),
        meta=batch.meta.replace(**meta),
        num_patches=len(real),
        process_rows=(me * b, (me + 1) * b),
    )
