"""grain pipelines: schedule (mixing, epochs, sharding), deterministic resume, bad records."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from random_images import write_random_images

from tatar_jax.data import pipeline as pl


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    pytest.importorskip("tatar_jax.data.image")  # the image module of the data issue
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    iqa = [
        {"image": p, "gt_100": float(i), "row_id": i, "target": f"<think>\nq{i}\n</think>"}
        for i, p in enumerate(write_random_images(root, 7, rng, "q", max_side=72))
    ]
    iaa = [
        {"image": p, "gt_100": 50.0 + i, "row_id": i, "target": f"<think>\na{i}\n</think>"}
        for i, p in enumerate(write_random_images(root, 5, rng, "a", max_side=72))
    ]
    return [pl.Source("toy_iqa", "iqa", iqa), pl.Source("toy_iaa", "iaa", iaa)]


def _opts(**kw):
    base = dict(
        batch_size=2,
        seq_buckets=(512,),
        process_index=0,
        process_count=1,
        read_threads=1,
        min_pixels=3136,
        max_pixels=4 * 28 * 28 * 4,
    )
    base.update(kw)
    return pl.PipelineOptions(**base)


def _slots(sizes, tasks, **kw):
    s = pl.Schedule(sizes, tasks, _opts(**kw))
    return [s[k] for k in range(len(s))]


# ----------------------------------------------------------------------------------- schedule


def test_concat_epochs_are_permutations_and_drop_incomplete_batch():
    slots = _slots([7, 5], ["iqa", "iaa"], mixing="concat", num_epochs=2, batch_size=5)
    assert len(slots) == 20  # 12 records -> 10 per epoch (2 full batches of 5)
    for e in range(2):
        ep = [(s, r) for s, r, epoch, *_ in slots if epoch == e]
        assert len(ep) == 10 and len(set(ep)) == 10
    assert [x[:2] for x in slots[:10]] != [x[:2] for x in slots[10:]]  # reshuffled per epoch
    again = _slots([7, 5], ["iqa", "iaa"], mixing="concat", num_epochs=2, batch_size=5)
    assert again == slots
    other = _slots([7, 5], ["iqa", "iaa"], mixing="concat", num_epochs=2, batch_size=5, seed=1)
    assert other != slots


def test_interleave_all_exhausted_oversamples_smaller_pool():
    sizes, tasks = [300, 40], ["iqa", "iaa"]
    slots = _slots(sizes, tasks, mixing="interleave", p_iqa=0.5, num_epochs=1, batch_size=1)
    by_src = collections.Counter(s for s, *_ in slots)
    # All of the 300 IQA records were seen; IAA restarted several times (~300 draws).
    assert len({r for s, r, *_ in slots if s == 0}) == 300
    assert by_src[1] > 150 and len({r for s, r, *_ in slots if s == 1}) == 40
    # Each pass over the IAA pool is a new visit: (record, visit) never repeats in an epoch.
    iaa = [(r, v) for s, r, _, _, v in slots if s == 1]
    assert len(set(iaa)) == len(iaa) and max(v for _, v in iaa) >= 3
    # The choice is a fair coin: IAA share within a binomial bound.
    n = len(slots)
    assert abs(by_src[1] - n / 2) <= 4.5 * np.sqrt(n / 4)
    first = _slots(
        sizes, tasks, mixing="interleave", stopping="first_exhausted", num_epochs=1, batch_size=1
    )
    assert len(first) < len(slots)
    assert collections.Counter(s for s, *_ in first)[1] >= 40


def test_stratified_batches_hold_a_fixed_task_count():
    # Sources: two IQA sets (20 + 10 records) and one IAA set (13): 8 per batch at p_iqa 0.5.
    sizes, tasks = [20, 10, 13], ["iqa", "iqa", "iaa"]
    kw = dict(mixing="stratified", p_iqa=0.5, batch_size=8, num_epochs=1)
    first = _slots(sizes, tasks, stopping="first_exhausted", **kw)
    # first_exhausted: 13 IAA records fill 3 batches of 4 (30 IQA would fill 7).
    assert len(first) == 24
    is_iaa = [[s == 2 for s, *_ in first[8 * b : 8 * b + 8]] for b in range(3)]
    assert [sum(b) for b in is_iaa] == [4, 4, 4]
    # The tasks are in a seeded order inside a batch (hosts read slices of it), not IQA first.
    assert any(b != [False] * 4 + [True] * 4 for b in is_iaa)
    # No record twice before its pool restarts.
    iqa = [(s, r) for s, r, *_ in first if s < 2]
    assert len(set(iqa)) == 12
    every = _slots(sizes, tasks, stopping="all_exhausted", **kw)
    # all_exhausted: ceil(30 / 4) = 8 batches; every IQA record seen, IAA restarted twice.
    assert len(every) == 64
    assert len({(s, r) for s, r, *_ in every if s < 2}) == 30
    iaa = [(r, v) for s, r, _, _, v in every if s == 2]
    assert len(iaa) == 32 and len(set(iaa)) == 32 and max(v for _, v in iaa) == 2
    assert len({r for r, v in iaa if v == 0}) == 13
    # Deterministic; another seed, another order.
    assert _slots(sizes, tasks, stopping="all_exhausted", **kw) == every
    assert _slots(sizes, tasks, stopping="all_exhausted", seed=7, **kw) != every
    # p_iqa 0.25 of 8: 2 IQA + 6 IAA per batch.
    quarter = _slots(sizes, tasks, stopping="first_exhausted", **{**kw, "p_iqa": 0.25})
    assert len(quarter) == 16 and sum(s == 2 for s, *_ in quarter[:8]) == 6
    # p_iqa 1: IQA batches only (an IAA list may be absent); 30 IQA records fill 3 of 8.
    only_iqa = _slots(sizes, tasks, stopping="first_exhausted", **{**kw, "p_iqa": 1.0})
    assert len(only_iqa) == 24 and all(s < 2 for s, *_ in only_iqa)
    assert _slots([20, 10], ["iqa", "iqa"], **{**kw, "p_iqa": 1.0})[:8] == only_iqa[:8]
    with pytest.raises(
        ValueError, match="asks for 4 iaa records per batch of 8, but there are no iaa"
    ):
        _slots([20], ["iqa"], **kw)


@pytest.mark.parametrize("hosts,mixing", [(2, "concat"), (3, "concat"), (2, "stratified")])
def test_host_shards_partition_the_single_host_order(hosts, mixing):
    sizes, tasks = [30, 17], ["iqa", "iaa"]
    kw = dict(num_epochs=2, mixing=mixing)
    single = _slots(sizes, tasks, batch_size=2 * hosts, **kw)
    shards = [
        _slots(sizes, tasks, batch_size=2, process_index=h, process_count=hosts, **kw)
        for h in range(hosts)
    ]
    assert len({len(s) for s in shards}) == 1
    # Global batch b of the single-host run == concatenation of the hosts' batch b.
    merged = []
    for b in range(len(shards[0]) // 2):
        for h in range(hosts):
            merged += shards[h][2 * b : 2 * b + 2]
    assert [x[:3] for x in merged] == [x[:3] for x in single]


def test_eval_schedule_covers_each_record_once_with_fillers():
    slots = _slots([5, 4], ["iqa", "iaa"], stage="eval", shuffle=False, batch_size=4)
    real = [x[:2] for x in slots if x[0] >= 0]
    assert real == [(0, i) for i in range(5)] + [(1, i) for i in range(4)]
    assert len(slots) == 12 and sum(x[0] < 0 for x in slots) == 3


def test_eval_schedule_two_hosts_cover_each_record_once():
    shards = [
        _slots(
            [5, 4],
            ["iqa", "iaa"],
            stage="eval",
            shuffle=False,
            batch_size=2,
            process_index=h,
            process_count=2,
        )  # fmt: skip
        for h in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # 9 records -> 3 global batches of 4
    real = sorted(x[:2] for sh in shards for x in sh if x[0] >= 0)
    assert real == [(0, i) for i in range(5)] + [(1, i) for i in range(4)]


# ----------------------------------------------------------------------------------- batches


def test_grpo_batches_shapes_and_keys(sources):
    ds = pl.make_dataset(sources, _opts(stage="grpo", num_epochs=1, batch_size=4))
    batches = list(ds)
    assert len(batches) == 3 == pl.num_batches(sources, _opts(num_epochs=1, batch_size=4))
    b = batches[0]
    assert b.input_ids.shape == (4, 512) and b.input_ids.dtype == np.int32
    assert b.position_ids.shape == (3, 4, 512)
    assert b.vision.pixel_values.shape[1] == 1176 and b.vision.pixel_values.dtype == np.float32
    assert b.image_grid_thw.shape == (4, 3) and b.rope_deltas.shape == (4, 1)
    assert b.attention_mask[:, -1].all()  # left padded for generation
    assert b.meta.valid.all() and b.stats.num_skipped == 0
    rows = sorted(
        (d, int(r)) for bb in batches for d, r in zip(bb.meta.dataset, bb.meta.row_id, strict=True)
    )
    assert rows == sorted([("toy_iqa", i) for i in range(7)] + [("toy_iaa", i) for i in range(5)])
    for bb in batches:
        for d, t, g, r in zip(
            bb.meta.dataset, bb.meta.task_id, bb.meta.gt_100, bb.meta.row_id, strict=True
        ):
            assert t == (0 if d == "toy_iqa" else 1)
            assert g == (float(r) if d == "toy_iqa" else 50.0 + r)


def test_sft_batches_have_labels(sources):
    ds = pl.make_dataset(
        sources, _opts(stage="sft", mixing="interleave", num_epochs=1, batch_size=2)
    )
    b = next(iter(ds))
    assert b.attention_mask[:, 0].all()  # right padded
    assert b.label_mask.sum() > 0
    assert np.all(b.labels[b.label_mask == 0] == -100)


def _flat(batch):
    return (
        batch.input_ids.tolist(),
        batch.meta.row_id.tolist(),
        batch.meta.dataset,
        float(np.abs(batch.vision.pixel_values).sum()),
    )


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_mid_epoch_equals_uninterrupted(sources, workers):
    opts = _opts(stage="grpo", num_epochs=2, batch_size=2, worker_count=workers)
    it = iter(pl.make_dataset(sources, opts))
    full, state = [], None
    for i in range(12):  # 2 epochs x 6 batches
        if i == 5:  # mid-epoch 0
            state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
        full.append(_flat(next(it)))
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    it2 = iter(pl.make_dataset(sources, opts))  # a fresh pipeline, as after a restart
    it2.set_state(state)
    rest = [_flat(next(it2)) for _ in range(7)]
    with pytest.raises(StopIteration):
        next(it2)
    it2.close()
    assert rest == full[5:]
    # A state only restores into the same reading order.
    other = iter(pl.make_dataset(sources, _opts(stage="grpo", num_epochs=2, batch_size=2, seed=7)))
    with pytest.raises(ValueError, match="fingerprint"):
        other.set_state(state)


def test_bad_record_error_names_file_and_row(sources, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    recs = list(sources[0].records) + [
        {"image": str(broken), "gt_100": 1.0, "row_id": 41, "target": "x"}
    ]
    src = [pl.Source("toy_iqa", "iqa", recs)]
    ds = pl.make_dataset(src, _opts(stage="eval", shuffle=False, batch_size=8))
    with pytest.raises(pl.BadRecordError, match=r"'toy_iqa' row 41 .*broken\.png"):
        list(ds)
    missing = [{"image": str(tmp_path / "nope.jpg"), "gt_100": 1.0, "row_id": 3}]
    ds = pl.make_dataset(
        [pl.Source("m", "iaa", missing + recs[:1])], _opts(stage="eval", batch_size=2)
    )
    with pytest.raises(pl.BadRecordError, match=r"'m' row 3 .*nope\.jpg"):
        list(ds)


def test_bad_record_skip_is_counted_never_substituted(sources, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    recs = list(sources[0].records[:3]) + [{"image": str(broken), "gt_100": 1.0, "row_id": 99}]
    src = [pl.Source("toy_iqa", "iqa", recs)]
    opts = _opts(stage="eval", shuffle=False, batch_size=2, bad_record="skip",
                 max_skip_fraction=0.5)  # fmt: skip
    batches = list(pl.make_dataset(src, opts))
    rows = [int(r) for b in batches for r, v in zip(b.meta.row_id, b.meta.valid, strict=True) if v]
    assert rows == [0, 1, 2]  # row 99 is gone, nothing stands in for it
    skipped = [s for b in batches for s in b.stats.skipped]
    assert len(skipped) == 1 and "row 99" in skipped[0].where
    assert batches[-1].meta.valid.tolist() == [True, False]
    assert [b.stats.num_skipped for b in batches] == [0, 1]
    assert dict(batches[-1].stats.skipped_by_dataset) == {"toy_iqa": 1}


def _with_broken(sources, tmp_path, bad_rows):
    """toy_iqa with the images of ``bad_rows`` replaced by junk files."""
    recs = list(sources[0].records)
    for r in bad_rows:
        junk = tmp_path / f"junk{r}.png"
        junk.write_bytes(b"junk")
        recs[r] = dict(recs[r], image=str(junk))
    return [pl.Source("toy_iqa", "iqa", recs), sources[1]]


def test_skip_refills_batches_logs_once_and_counts_per_dataset(sources, tmp_path, caplog):
    # 3 of toy_iqa's 7 rows are junk; the first batch (no shuffle) is rows 0-2 of toy_iqa, so
    # all but one of its slots fail and are refilled from the next records.
    src = _with_broken(sources, tmp_path, (0, 1, 4))
    opts = _opts(stage="grpo", mixing="concat", shuffle=False, batch_size=3, num_epochs=2,
                 bad_record="skip", max_skip_fraction=0.5)  # fmt: skip
    caplog.set_level("WARNING")
    it = iter(pl.make_dataset(src, opts))
    batches = [next(it) for _ in range(3)]
    b0 = batches[0]
    first = [(d, int(r)) for d, r in zip(b0.meta.dataset, b0.meta.row_id, strict=True)]
    assert batches[0].meta.valid.all()
    assert first == [("toy_iqa", 2), ("toy_iqa", 3), ("toy_iqa", 5)]  # refilled, in order
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    batches += rest
    # 2 epochs x 12 records, 6 bad reads: 18 good rows, each epoch's good rows exactly once.
    good = [(d, int(r)) for b in batches for d, r, v in
            zip(b.meta.dataset, b.meta.row_id, b.meta.valid, strict=True) if v]  # fmt: skip
    assert len(good) == 18 and collections.Counter(good).most_common(1)[0][1] == 2
    assert not {("toy_iqa", r) for r in (0, 1, 4)} & set(good)
    # The same number of batches as without skips (hosts in step): the tail is padding.
    assert len(batches) == pl.num_batches(src, opts) == 8
    assert [int(b.meta.valid.sum()) for b in batches] == [3] * 6 + [0, 0]
    assert np.all(batches[-1].attention_mask.sum(1) > 0)  # a real (masked) example shape
    assert dict(batches[-1].stats.skipped_by_dataset) == {"toy_iqa": 3, "toy_iaa": 0}
    assert batches[-1].stats.num_skipped == 6  # failed reads, both epochs
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(logged) == 3  # once per record, not again in epoch 2
    assert "'toy_iqa' row 0" in logged[0] and "junk0.png" in logged[0]
    assert "not a readable image" in logged[0]
    # A resumed iterator continues the counts and logs nothing twice.
    caplog.clear()
    it2 = iter(pl.make_dataset(src, opts))
    it2.set_state(state)
    again = list(it2)
    assert [_flat(b) for b in again] == [_flat(b) for b in rest]
    assert dict(again[-1].stats.skipped_by_dataset) == {"toy_iqa": 3, "toy_iaa": 0}
    assert not [r for r in caplog.records if r.getMessage().startswith("skipped")]


def test_skip_budget_stops_with_the_count(sources, tmp_path):
    src = _with_broken(sources, tmp_path, (0, 1, 4))
    opts = _opts(stage="grpo", mixing="concat", shuffle=False, batch_size=3, num_epochs=1,
                 bad_record="skip", max_skip_fraction=0.25)  # fmt: skip
    it = iter(pl.make_dataset(src, opts))
    with pytest.raises(pl.TooManySkippedError) as err:
        next(it)
    msg = str(err.value)
    assert "dataset 'toy_iqa': 2 of 7 records skipped (28.6%)" in msg
    assert "data.max_skip_fraction = 0.25" in msg and "row 1" in msg
    # Rows the manifest loader rejected count against the same budget, at once.
    loader = pl.Source("toy_iaa", "iaa", sources[1].records, num_skipped_rows=2,
                       skipped_rows=("row 5: bad score", "row 6: no image"))  # fmt: skip
    with pytest.raises(pl.TooManySkippedError, match="'toy_iaa': 2 of 7 .* loader rejected 2"):
        iter(pl.make_dataset([sources[0], loader], opts))
    # The default budget (1 %) of the config; fraction 1 reads on while any record is good.
    assert pl.PipelineOptions().max_skip_fraction == 0.01
    every = [pl.Source("toy_iqa", "iqa", _with_broken(sources, tmp_path, range(7))[0].records)]
    for epochs, match in ((None, "a whole pass read no record"), (1, "no readable record")):
        o = dict_replace(opts, max_skip_fraction=1.0, batch_size=1, num_epochs=epochs)
        with pytest.raises(pl.TooManySkippedError, match=match):
            next(iter(pl.make_dataset(every, o)))


def dict_replace(opts, **kw):
    import dataclasses

    return dataclasses.replace(opts, **kw)


def test_skip_keeps_hosts_in_step_and_sft_rows_untrained(sources, tmp_path):
    src = _with_broken(sources, tmp_path, (2,))
    counts, skipped, valid = [], 0, 0
    for h in range(2):
        opts = _opts(stage="sft", batch_size=2, bad_record="skip", process_index=h,
                     process_count=2, num_epochs=1, max_skip_fraction=0.5)  # fmt: skip
        batches = list(pl.make_dataset(src, opts))
        counts.append(len(batches))
        skipped += dict(batches[-1].stats.skipped_by_dataset)["toy_iqa"]
        valid += sum(int(b.meta.valid.sum()) for b in batches)
        for b in batches:
            assert b.meta.valid.shape == (2,)
            assert np.all(b.label_mask[~b.meta.valid] == 0)
            assert np.all(b.labels[~b.meta.valid] == -100)
    assert counts[0] == counts[1] == 3  # 12 records / (2 per host x 2 hosts)
    assert skipped == 1 and valid == 11


def test_options_validation():
    with pytest.raises(ValueError, match="bad_record"):
        pl.PipelineOptions(bad_record="replace")
    with pytest.raises(ValueError, match="mixing"):
        pl.PipelineOptions(mixing="zip")
    with pytest.raises(ValueError, match="multiples of 4"):
        pl.PipelineOptions(patch_buckets=(1024, 1026))
    with pytest.raises(ValueError, match="no full global batch"):
        pl.Schedule([3], ["iqa"], _opts(batch_size=4))
    with pytest.raises(ValueError, match="no full global batch"):
        pl.Schedule([3], ["iqa"], _opts(batch_size=4, num_epochs=None))
    assert pl.Schedule([9], ["iqa"], _opts(batch_size=4, num_epochs=None)).num_batches() == -1


def test_synthetic_sft_end_to_end(tmp_path_factory):
    from tatar_jax.data import synthetic
    from tatar_jax.data import tokenizer as tk

    specs = synthetic.ensure_synthetic(tmp_path_factory.mktemp("syn") / "s", image_size=32)
    sources = pl.sources_from_synthetic(specs, "train")
    assert [s.task for s in sources] == ["iqa", "iaa"]
    opts = _opts(stage="sft", mixing="interleave", num_epochs=1, batch_size=4, seq_buckets=(1024,))
    b = next(iter(pl.make_dataset(sources, opts)))
    tok = tk.load_tokenizer()
    for r in range(4):
        text = tok.decode(b.input_ids[r][b.label_mask[r] == 1], skip_special_tokens=False)
        assert text.startswith("<think>\n")
        assert text.endswith("</answer><|im_end|>")
        answer = float(text.rsplit("<answer>", 1)[1].split("</answer>")[0])
        assert abs(answer - float(b.meta.gt_100[r])) <= 0.005 + 1e-4  # two decimals of the gt
    assert b.stats.num_skipped_rows == 0


def test_tfds_source_reads_like_the_manifest(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    from tatar_jax.data import manifest, synthetic, tfds_builder

    root = tmp_path_factory.mktemp("syn_tfds")
    spec = synthetic.ensure_synthetic(root / "s", image_size=32)["synthetic-iaa-test"]
    rows = manifest.read_rows(spec.manifest)[:6]
    small = root / "small.jsonl"
    manifest.write_manifest(small, rows)
    spec = spec.replace(manifest=str(small))
    path = tfds_builder.build(spec, root / "tfds", split="test")
    from_tfds = pl.source_from_tfds(path, "test")
    from_manifest = pl.sources_from_specs([spec])[0]
    assert (from_tfds.name, from_tfds.task) == (from_manifest.name, from_manifest.task)
    opts = _opts(stage="eval", shuffle=False, batch_size=4, worker_count=0)
    a = [_flat(b) for b in pl.make_dataset([from_tfds], opts)]
    b = [_flat(b) for b in pl.make_dataset([from_manifest], opts)]
    assert a == b and len(a) == 2


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_options_from_the_stage_configs(stage):
    import importlib

    cfg = importlib.import_module(f"configs.{stage}").get_config("reference")
    opts = pl.options_from_config(cfg.data, stage, 16, process_index=0, process_count=1)
    assert opts.mixing == ("interleave" if stage == "sft" else "concat")
    assert opts.p_iqa == cfg.data.p_iqa and opts.seed == cfg.data.seed
    assert opts.seq_buckets == tuple(cfg.data.seq_buckets)
    assert opts.side == ("right" if stage == "sft" else "left")
    assert dict(opts.p_drop_think) == dict(cfg.data.p_drop_think)
    ev = pl.options_from_config(cfg.data, "eval", 4, process_index=0, process_count=1)
    assert (ev.shuffle, ev.num_epochs, ev.side) == (False, 1, "left")
    # A missing (e.g. renamed) field is an error naming it, never a silent default.
    data = cfg.data.to_dict()
    del data["p_iqa"]
    with pytest.raises(KeyError, match="p_iqa"):
        pl.options_from_config(data, stage, 16)


def test_state_round_trips_through_the_orbax_checkpointer(sources, tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    checkpointing = pytest.importorskip("tatar_jax.train.checkpointing")
    opts = _opts(stage="grpo", num_epochs=3, batch_size=2)
    it = iter(pl.make_dataset(sources, opts))
    for _ in range(4):
        next(it)
    ck = checkpointing.Checkpointer(tmp_path / "run", every_steps=1, async_save=False)
    ck.save(4, {"x": jnp.zeros(2)}, data_iter=it)
    want = [_flat(next(it)) for _ in range(5)]
    it2 = iter(pl.make_dataset(sources, opts))
    ck.restore(4, {"x": jnp.zeros(2)}, data_iter=it2)
    assert [_flat(next(it2)) for _ in range(5)] == want
    ck.close()
