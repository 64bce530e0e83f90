"""DAPO dynamic sampling (tatar_jax/train/dynamic_sampling.py) on real pipeline batches with a
stand-in rollout and reward: rows merged as the pipeline batches them, zero-variance groups
never in the step, the stream read in order, the cap, per-task thresholds, the metrics."""

from __future__ import annotations

import dataclasses
import types

import jax
import ml_collections
import numpy as np
import pytest
from random_images import write_random_images

from configs import grpo as grpo_config
from tatar_jax.data import pipeline as pl
from tatar_jax.data.prompts import TASK_IDS
from tatar_jax.train import dynamic_sampling as ds
from tatar_jax.train.rollout import Samples

G = 4
PAD = 151643


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A GRPO pipeline over 9 IQA + 7 IAA images of different sizes (different patch counts
    and sequence lengths per row), batches of 4 prompts."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    iqa = [
        {"image": p, "gt_100": float(10 + i), "row_id": i}
        for i, p in enumerate(write_random_images(root, 9, rng, "q", max_side=160))
    ]
    iaa = [
        {"image": p, "gt_100": float(60 + i), "row_id": 100 + i}
        for i, p in enumerate(write_random_images(root, 7, rng, "a", max_side=160))
    ]
    srcs = [pl.Source("toy_iqa", "iqa", iqa), pl.Source("toy_iaa", "iaa", iaa)]
    opts = pl.PipelineOptions(
        stage="grpo", batch_size=4, num_epochs=None, seq_buckets=(512,), process_index=0,
        process_count=1, read_threads=1, min_pixels=3136, max_pixels=16 * 28 * 28, seed=3,
    )  # fmt: skip
    return srcs, opts


def _batches(stream, n, **kw):
    srcs, opts = stream
    it = iter(pl.make_dataset(srcs, dataclasses.replace(opts, **kw)))
    return [next(it) for _ in range(n)]


def _merge(stream):
    _, opts = stream
    return lambda picks: ds.merge_rows(
        picks, pad_id=PAD, padding_side=opts.side, patch_buckets=opts.patch_buckets
    )


def _arrays(b):
    out = {k: getattr(b, k) for k in ("input_ids", "attention_mask", "position_ids",
                                      "rope_deltas", "image_grid_thw")}  # fmt: skip
    out.update({f"meta.{k}": getattr(b.meta, k) for k in ("task_id", "gt_100", "row_id",
                                                          "valid", "epoch")})  # fmt: skip
    out["pixel_values"] = b.vision.pixel_values
    out["num_patches"] = b.num_patches
    return {k: np.asarray(v) for k, v in out.items()}


def test_merge_rows_is_collate_of_the_rows(stream):
    """All rows of one batch: the batch itself. All rows of two: what the multi-host merge
    (tested against one host's collate) gives. A subset: each row's tokens, positions and
    patches are its source's, its padding on the left."""
    b1, b2 = _batches(stream, 2)
    merge = _merge(stream)
    same = merge([(b1, range(4))])
    got = _arrays(same)
    for k, v in _arrays(b1).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert same.meta.image_path == b1.meta.image_path
    # two hosts' halves of the same steps (host h holds slots [2h, 2h + 2)), merged, are the
    # one-host batches of 4: sequence bucket, positions, patches and their bucket
    buckets = dict(seq_buckets=(96, 112, 128, 160, 192, 256, 512))
    one = _batches(stream, 3, **buckets)
    halves = [_batches(stream, 3, batch_size=2, process_index=h, process_count=2, **buckets)
              for h in range(2)]  # fmt: skip
    lengths = {(h[s].input_ids.shape[1], len(h[s].vision.pixel_values)) for h in halves
               for s in range(3)}  # fmt: skip
    assert len(lengths) > 1  # the halves differ: padding and patch buckets are merged
    for step in range(3):
        both = merge([(halves[0][step], [0, 1]), (halves[1][step], [0, 1])])
        got = _arrays(both)
        for k, v in _arrays(one[step]).items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"step {step}: {k}")
        assert (both.vision.layout is None) == (one[step].vision.layout is None)
        for a, b in zip(both.vision.layout or (), one[step].vision.layout or (), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sub = merge([(b2, [2]), (b1, [0, 3])])
    src = [(b2, 2), (b1, 0), (b1, 3)]
    for i, (b, r) in enumerate(src):
        n = int(b.attention_mask[r].sum())
        np.testing.assert_array_equal(sub.input_ids[i, -n:], b.input_ids[r, -n:])
        np.testing.assert_array_equal(sub.position_ids[:, i, -n:], b.position_ids[:, r, -n:])
        assert sub.attention_mask[i].sum() == n and (sub.input_ids[i, :-n] == PAD).all()
        assert sub.meta.gt_100[i] == b.meta.gt_100[r] and sub.meta.image_path[i] == (
            b.meta.image_path[r]
        )
    counts = np.prod(sub.image_grid_thw, axis=1)
    start = 0
    for i, (b, r) in enumerate(src):
        bc = np.prod(b.image_grid_thw, axis=1)
        s0 = int(bc[:r].sum())
        np.testing.assert_array_equal(
            sub.vision.pixel_values[start : start + counts[i]],
            b.vision.pixel_values[s0 : s0 + bc[r]],
        )
        start += int(counts[i])
    assert sub.num_patches == start and not sub.vision.pixel_values[start:].any()


def _rollout(calls):
    """Samples whose tokens name the prompt (its row_id) and the completion index."""

    def rollout(prompts, rng):
        del rng
        calls.append(prompts)
        b = len(prompts.input_ids)
        tokens = np.zeros((b * G, 3), np.int32)
        return Samples(tokens, np.ones((b * G, 3), bool), np.zeros((b * G, 3), np.float32), G)

    return rollout


def _score(flat_iaa=True, flat_iqa_gt=()):
    """Rewards: IAA groups all equal (when ``flat_iaa``), IQA groups spread (gt x completion
    index) unless their gt is in ``flat_iqa_gt``; invalid rows 0."""

    def score(batch, prompts, samples):
        del prompts
        task = np.repeat(np.asarray(batch.meta.task_id), G)
        gt = np.repeat(np.asarray(batch.meta.gt_100), G)
        valid = np.repeat(np.asarray(batch.meta.valid), G)
        spread = gt * (1 + np.tile(np.arange(G), batch.num_rows))
        flat = np.isin(gt, flat_iqa_gt) | ((task == TASK_IDS["iaa"]) & flat_iaa)
        r = np.where(valid & ~flat, spread, 0.0)
        return types.SimpleNamespace(rewards=r.astype(np.float32), batch=batch)

    return score


def _sampler(stream, extra_batches, cfg_kw=None, score=None):
    cfg = grpo_config.get_config("tiny").grpo.dynamic_sampling
    cfg.enabled = True
    cfg.max_extra_batches = 10
    for k, v in (cfg_kw or {}).items():
        setattr(cfg, k, v)
    it = iter(extra_batches)
    return ds.DynamicSampler(
        cfg, 4, G, next_batch=lambda: next(it), score=score or _score(),
        make_prompts=lambda b: types.SimpleNamespace(input_ids=np.asarray(b.input_ids)),
        merge=_merge(stream),
    )  # fmt: skip


def test_zero_variance_groups_never_reach_the_step(stream):
    batches = _batches(stream, 8)
    first, rest = batches[0], batches[1:]
    calls = []
    filled = _sampler(stream, rest)(first, jax.random.key(0), _rollout(calls))
    b = filled.batch
    tasks = np.asarray(b.meta.task_id)
    assert np.asarray(b.meta.valid).all() and (tasks == TASK_IDS["iqa"]).all()
    # the IQA prompts of the stream, in stream order, the first 4 of them
    stream_iqa = [(int(x.meta.row_id[r])) for x in batches for r in range(4)
                  if x.meta.task_id[r] == TASK_IDS["iqa"]]  # fmt: skip
    assert np.asarray(b.meta.row_id).tolist() == stream_iqa[:4]
    n_draws = len(calls)
    seen = [x for x in batches[:n_draws]]
    n_iaa = sum(int((np.asarray(x.meta.task_id) == TASK_IDS["iaa"]).sum()) for x in seen)
    n_iqa = sum(int((np.asarray(x.meta.task_id) == TASK_IDS["iqa"]).sum()) for x in seen)
    assert n_iqa >= 4 and n_iqa - int((np.asarray(seen[-1].meta.task_id) == 0).sum()) < 4
    m = filled.metrics
    assert m["dynamic_sampling/extra_batches"] == n_draws - 1 >= 1
    assert m["dynamic_sampling/extra_rollouts"] == (n_draws - 1) * 4 * G
    assert m["dynamic_sampling/dropped_groups/iaa"] == n_iaa
    assert m["dynamic_sampling/dropped_groups/iqa"] == 0
    assert m["dynamic_sampling/empty_slots"] == 0
    assert m["dynamic_sampling/informative_frac"] == pytest.approx(4 / (4 + n_iaa))
    # the scored rollout the step trains on is the final selection's
    np.testing.assert_array_equal(filled.scored.batch.meta.row_id, b.meta.row_id)


def test_cap_trains_on_what_there_is_and_counts_it(stream):
    batches = _batches(stream, 3)
    filled = _sampler(stream, batches[1:], {"max_extra_batches": 0})(
        batches[0], jax.random.key(0), _rollout([])
    )
    n_iqa = int((np.asarray(batches[0].meta.task_id) == TASK_IDS["iqa"]).sum())
    valid = np.asarray(filled.batch.meta.valid)
    assert valid.sum() == n_iqa < 4 and not valid[n_iqa:].any()
    assert filled.metrics["dynamic_sampling/empty_slots"] == 4 - n_iqa
    assert filled.metrics["dynamic_sampling/extra_batches"] == 0


def test_per_task_threshold_and_data_end(stream):
    """A per-task threshold drops only that task's groups (IQA groups with std <= 1e9: all);
    the stream's end stops the draws without an error."""
    batches = _batches(stream, 3)
    s = _sampler(stream, batches[1:], {"std_threshold_iqa": 1e9},
                 score=_score(flat_iaa=False))  # fmt: skip
    filled = s(batches[0], jax.random.key(0), _rollout([]))
    tasks = np.asarray(filled.batch.meta.task_id)[np.asarray(filled.batch.meta.valid)]
    assert (tasks == TASK_IDS["iaa"]).all() and len(tasks) == 4
    assert filled.metrics["dynamic_sampling/dropped_groups/iqa"] > 0
    assert filled.metrics["dynamic_sampling/dropped_groups/iaa"] == 0
    assert ds.thresholds(ml_collections.ConfigDict(
        {"std_threshold": 0.5, "std_threshold_iqa": None, "std_threshold_iaa": 2.0}
    )) == {"iqa": 0.5, "iaa": 2.0}  # fmt: skip


def test_group_std_is_exactly_zero_for_equal_rewards():
    r = np.full(8, 0.1 + 0.2, np.float32)
    assert (ds.group_reward_std(r, 4) == 0).all()
    assert ds.group_reward_std(np.array([0, 0, 0, 1e-6], np.float32), 4)[0] > 0
