"""DAPO dynamic sampling: a GRPO step is filled with groups whose rewards differ.

A group (one prompt, its G completions) whose total rewards are all equal has advantage 0: it
costs a rollout and teaches nothing. With ``grpo.dynamic_sampling.enabled`` the step draws
further batches of the same data stream (the next records: the data iterator's position, saved
with each checkpoint, includes them, so a resumed run draws the same ones) and rolls them out
until it holds ``prompts_per_step`` informative groups, or ``max_extra_batches`` extra batches
were drawn; slots still empty then are filled with dropped groups marked invalid (completion
mask 0, no reward statistics): the update keeps its static shape and trains on what there is.

Which groups are informative depends on the rewards, and the IAA Thurstone reward of a group
depends on the other groups of the step (spec §8.5). So the selection is scored as a whole:
the first ``prompts_per_step`` candidates (in draw order) are scored together, groups with
reward std <= threshold are dropped, and this repeats until the selection holds none; the
step's rewards and advantages are those of its final groups. Every input of a decision is the
global batch and the gathered samples, so every host makes the same decisions.

:func:`take_rows` / :func:`merge_rows` build the step's pipeline batch from rows of several.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tatar_jax import generate
from tatar_jax.data import batch as batch_mod
from tatar_jax.data import examples as ex
from tatar_jax.data.batch import Batch
from tatar_jax.data.prompts import TASKS, task_names
from tatar_jax.train.rollout import Samples

_SEQ_FILL = {"input_ids": None, "attention_mask": 0, "label_mask": 0, "position_ids": 0}
_ROW_FIELDS = ("input_ids", "attention_mask", "position_ids", "rope_deltas", "image_grid_thw",
               "label_mask")  # fmt: skip
_META_FIELDS = ("task_id", "gt_100", "row_id", "valid", "epoch", "think_dropped")


def group_reward_std(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """(B,) population std of each group's G rewards (N = B x G, groups contiguous), computed on
    rewards shifted by the group's first: an all-equal group has std exactly 0."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    return (r - r[:, :1]).std(axis=1)


def thresholds(ds_cfg: Any) -> dict[str, float]:
    """Task -> std threshold of a ``grpo.dynamic_sampling`` block (per task, else overall)."""
    out = {}
    for task in TASKS:
        v = ds_cfg.get(f"std_threshold_{task}")
        out[task] = float(ds_cfg.std_threshold if v is None else v)
    return out


# --------------------------------------------------------------------------------------------
# Pipeline-batch rows


def merge_rows(
    picks: Sequence[tuple[Batch, Sequence[int]]],
    *,
    pad_id: int,
    padding_side: str = "left",
    patch_buckets: Sequence[int] | None = None,
) -> Batch:
    """One pipeline batch of the given rows of several batches, in the order given, as
    ``examples.collate`` would have batched those examples: the longest sequence bucket of the
    sources, the real patches concatenated in row order and padded to the patch bucket of their
    total, the vision layout made for it. ``stats``: the last source's; ``meta``'s strings
    rebuilt from the sources' where every source has them per row."""
    if not picks:
        raise ValueError("no rows to merge")
    length = max(int(np.shape(b.input_ids)[1]) for b, _ in picks)
    fields: dict[str, list[np.ndarray]] = {}
    patches = []
    for batch, rows in picks:
        rows = np.asarray(rows, np.int64)
        counts = np.prod(np.asarray(batch.image_grid_thw, np.int64), axis=1)
        starts = np.concatenate([[0], np.cumsum(counts)])
        pv = np.asarray(batch.vision.pixel_values)
        patches += [pv[starts[r] : starts[r + 1]] for r in rows]
        values = {k: getattr(batch, k) for k in _ROW_FIELDS}
        values.update({f"meta.{k}": getattr(batch.meta, k) for k in _META_FIELDS})
        for k, v in values.items():
            if v is None:
                continue
            v = np.take(np.asarray(v), rows, axis=1 if k == "position_ids" else 0)
            if k in _SEQ_FILL:
                extra = length - v.shape[-1]
                pad = [(0, 0)] * (v.ndim - 1)
                pad.append((extra, 0) if padding_side == "left" else (0, extra))
                fill = _SEQ_FILL[k]
                v = np.pad(v, pad, constant_values=pad_id if fill is None else fill)
            fields.setdefault(k, []).append(v)
    out = {k: np.concatenate(v, axis=1 if k == "position_ids" else 0) for k, v in fields.items()}
    real = np.concatenate(patches)
    q = ex.bucket_size(len(real), patch_buckets, "patch count")
    pixels = np.concatenate([real, np.zeros((q - len(real), real.shape[1]), real.dtype)])
    meta = {k.removeprefix("meta."): out.pop(k) for k in list(out) if k.startswith("meta.")}
    last = picks[-1][0]
    for key in ("dataset", "image_path"):
        per_row = all(len(getattr(b.meta, key)) == b.num_rows for b, _ in picks)
        meta[key] = tuple(getattr(b.meta, key)[r] for b, rows in picks for r in rows) if (
            per_row) else ()  # fmt: skip
    return last.replace(
        **out,
        vision=batch_mod.vision_inputs(pixels, out["image_grid_thw"], last.vision_config),
        meta=last.meta.replace(**meta),
        num_patches=len(real),
        process_rows=None,
    )


def take_samples(picks: Sequence[tuple[Samples, Sequence[int]]], g: int) -> Samples:
    """The G sample rows of the given groups (prompt indices) of several rollouts, in order."""
    rows = [(s, np.concatenate([np.arange(p * g, p * g + g) for p in groups]))
            for s, groups in picks if len(groups)]  # fmt: skip
    cat = lambda f: np.concatenate([f(s)[r] for s, r in rows])  # noqa: E731
    return Samples(cat(lambda s: s.tokens), cat(lambda s: s.mask), cat(lambda s: s.logps), g)


# --------------------------------------------------------------------------------------------
# Filling a step


@dataclasses.dataclass(frozen=True)
class Draw:
    """One batch of the data stream and its rollout."""

    batch: Batch
    samples: Samples


@dataclasses.dataclass(frozen=True)
class Filled:
    """A filled step: its pipeline batch (``valid`` False on filler slots), prompts, samples,
    its scored rollout (``score``'s output) and the dynamic-sampling metrics."""

    batch: Batch
    prompts: generate.PromptBatch
    scored: Any
    metrics: dict[str, float]


class DynamicSampler:
    """Fills a GRPO step with informative groups (see the module docstring).

    Args:
      ds_cfg: the ``grpo.dynamic_sampling`` block.
      prompts_per_step / group_size: the step's B and G.
      next_batch: the data stream's next (global) pipeline batch.
      score: ``(batch, prompts, samples) -> ScoredRollout`` (``.rewards`` (N,)).
      make_prompts: pipeline batch -> the rollout's ``PromptBatch``.
      merge: ``picks -> pipeline batch`` (:func:`merge_rows` with the pipeline's padding).
    """

    def __init__(
        self,
        ds_cfg: Any,
        prompts_per_step: int,
        group_size: int,
        *,
        next_batch: Callable[[], Batch],
        score: Callable[[Batch, generate.PromptBatch, Samples], Any],
        make_prompts: Callable[[Batch], generate.PromptBatch],
        merge: Callable[[Sequence[tuple[Batch, Sequence[int]]]], Batch],
    ) -> None:
        self.thresholds = thresholds(ds_cfg)
        self.max_extra = int(ds_cfg.max_extra_batches)
        self.p, self.g = int(prompts_per_step), int(group_size)
        self.next_batch, self.score = next_batch, score
        self.make_prompts, self.merge = make_prompts, merge


    def _build(self, draws: list[Draw], chosen: list[tuple[int, int]]):
        """(batch, prompts, samples) of the ``chosen`` (draw, row) groups, then filler slots
        (other drawn rows, valid False) up to ``prompts_per_step``."""
        taken = set(chosen)
        spare = [(d, r) for d in range(len(draws)) for r in range(draws[d].batch.num_rows)
                 if (d, r) not in taken]  # fmt: skip
        slots = chosen + spare[: self.p - len(chosen)]
        picks, spicks = [], []
        for d, r in slots:  # consecutive rows of one draw form one pick (order kept)
            if picks and picks[-1][0] is draws[d].batch:
                picks[-1][1].append(r)
                spicks[-1][1].append(r)
            else:
                picks.append((draws[d].batch, [r]))
                spicks.append((draws[d].samples, [r]))
        batch = self.merge(picks)
        valid = np.asarray(batch.meta.valid, bool).copy()
        valid[len(chosen) :] = False
        batch = batch.replace(meta=batch.meta.replace(valid=valid))
        return batch, self.make_prompts(batch), take_samples(spicks, self.g)

    def __call__(
        self,
        first: Batch,
        rng: jax.Array,
        rollout: Callable[[generate.PromptBatch, jax.Array], Samples],
    ) -> Filled:
        """The step's groups: ``first`` (the loop's batch) rolled out by ``rollout(prompts, rng)``
        with ``rng`` (as without dynamic sampling), extra draws with ``fold_in(rng, k)``,
        k = 1, 2, ..."""
        draws = [Draw(first, rollout(self.make_prompts(first), rng))]
        pool = [(0, r) for r in np.nonzero(np.asarray(first.meta.valid, bool))[0].tolist()]
        dropped = dict.fromkeys(TASKS, 0)
        examined = set()
        while True:
            chosen = pool[: self.p]
            batch, prompts, samples = self._build(draws, chosen)
            scored = self.score(batch, prompts, samples)
            std = group_reward_std(scored.rewards, self.g)[: len(chosen)]
            tasks = task_names(np.asarray(batch.meta.task_id)[: len(chosen)])
            bad = [i for i, t in enumerate(tasks) if std[i] <= self.thresholds[str(t)]]
            examined.update(chosen)
            if bad:
                for i in bad:
                    dropped[str(tasks[i])] += 1
                pool = [c for c in pool if c not in {chosen[i] for i in bad}]
                continue
            if len(pool) >= self.p or len(draws) - 1 >= self.max_extra:
                break
            try:
                nxt = self.next_batch()
            except StopIteration:
                break
            key = jax.random.fold_in(rng, len(draws))
            draws.append(Draw(nxt, rollout(self.make_prompts(nxt), key)))
            d = len(draws) - 1
            pool += [(d, r) for r in np.nonzero(np.asarray(nxt.meta.valid, bool))[0].tolist()]
        return Filled(batch, prompts, scored, self._metrics(draws, dropped, examined, chosen))

    def _metrics(self, draws, dropped, examined, chosen) -> dict[str, float]:
        extra = len(draws) - 1
        n_dropped = sum(dropped.values())
        m = {f"dynamic_sampling/dropped_groups/{t}": float(n) for t, n in dropped.items()}
        m["dynamic_sampling/dropped_groups/all"] = float(n_dropped)
        m["dynamic_sampling/extra_batches"] = float(extra)
        m["dynamic_sampling/extra_rollouts"] = float(extra * self.p * self.g)
        m["dynamic_sampling/informative_frac"] = (
            (len(examined) - n_dropped) / len(examined) if examined else 0.0
        )
        m["dynamic_sampling/empty_slots"] = float(self.p - len(chosen))
        return m
