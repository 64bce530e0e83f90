"""The GRPO training loop on several devices equals the one-device run (the two-process run is
tests/e2e/test_train_multidevice.py).

- ``global_batch`` (several hosts' pipeline batches -> the global batch) equals the one-host
  pipeline batch of the same global batch size, through a fake all-gather (threads);
- ``trainer.run`` of the tiny GRPO config for 2 steps on an fsdp=8 mesh (and data=2 x fsdp=4)
  ends with the parameters of the same run on one device (``mesh.num_devices=1``).

Configs and readers: tests/helpers/tiny_runs.py (why the rewards move and Adam's eps is raised).
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from tiny_runs import final_params, final_params_init, max_diff, records, tiny_config

from tatar_jax import multihost

# --------------------------------------------------------------------------------------------
# global_batch with a fake all-gather


class _FakeHosts:
    """``allgather`` for ``n`` threads playing processes: stacks every host's tree."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n)
        self.slots: list = [None] * n

    def gather(self, h: int):
        def allgather(tree):
            self.slots[h] = {k: np.array(v) for k, v in tree.items()}
            self.barrier.wait()
            out = {k: np.stack([s[k] for s in self.slots]) for k in tree}
            self.barrier.wait()
            return out

        return allgather


def _pipeline_batches(tmp_path, stage: str, batch_size: int, index: int, count: int, n: int):
    from tatar_jax.data import pipeline, synthetic
    from tatar_jax.models import qwen2_5_vl as qvl

    specs = synthetic.ensure_synthetic(tmp_path / "synthetic", image_size=56)
    sources = pipeline.sources_from_synthetic(specs, "train")
    opts = pipeline.PipelineOptions(
        stage=stage,
        batch_size=batch_size,
        # Fine steps near the synthetic SFT lengths at 56 px (232-254 tokens): hosts pick
        # different ones.
        seq_buckets=(160, 176, 192, 208, 224, 240, 256, 320, 384, 512),
        mixing="concat" if stage == "grpo" else "interleave",
        num_epochs=None,
        process_index=index,
        process_count=count,
        read_threads=1,
        vision=qvl.tiny().vision,  # batches carry their vision layout: merged, it is remade
    )
    it = iter(pipeline.make_dataset(sources, opts))
    return [next(it) for _ in range(n)], opts


def _merge(hosts_batches, opts, pad_id):
    n = len(hosts_batches)
    fake = _FakeHosts(n)
    out: list = [None] * n

    def run(h):
        out[h] = multihost.global_batch(
            hosts_batches[h], pad_id=pad_id, padding_side=opts.side,
            patch_buckets=opts.patch_buckets, process_count=n, process_index=h,
            allgather=fake.gather(h),
        )  # fmt: skip

    threads = [threading.Thread(target=run, args=(h,)) for h in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_global_batch_equals_one_host_batch(tmp_path, stage):
    """Two hosts x 2 rows merged == one host x 4 rows (every array, the vision layout's too,
    every step), identical on both hosts; the host's own rows are ``process_rows``; one
    process: no gather."""
    from tatar_jax.data.tokenizer import load_tokenizer

    pad_id = load_tokenizer(None).pad_id
    steps = 3
    single, _ = _pipeline_batches(tmp_path, stage, 4, 0, 1, steps)
    per_host = [_pipeline_batches(tmp_path, stage, 2, h, 2, steps) for h in range(2)]
    opts = per_host[0][1]
    seen_lengths = set()
    for s in range(steps):
        hb = [per_host[h][0][s] for h in range(2)]
        seen_lengths.update(b.input_ids.shape[1] for b in hb)
        merged = _merge(hb, opts, pad_id)
        want = single[s]
        for h, got in enumerate(merged):
            # Every array (the vision layout's included), by its path in the batch.
            got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
            want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
            assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
            assert any("layout" in jax.tree_util.keystr(p) for p, _ in want_leaves)
            for (path, v), (_, w) in zip(got_leaves, want_leaves, strict=True):
                k = jax.tree_util.keystr(path)
                np.testing.assert_array_equal(v, w, err_msg=f"step {s} host {h} field {k}")
                assert np.asarray(v).dtype == np.asarray(w).dtype, k
            assert got.num_patches == want.num_patches
            assert got.process_rows == (2 * h, 2 * h + 2)
    if stage == "sft":  # the hosts chose different sequence buckets: the padding path ran
        assert len(seen_lengths) > 1
    assert multihost.global_batch(single[0], pad_id=pad_id, process_count=1) is single[0]


def test_global_batch_rejects_non_row_arrays():
    import tiny_models as tm

    from tatar_jax.models import qwen2_5_vl as qvl

    batch = tm.prompt_batch(qvl.tiny())
    batch = batch.replace(meta=batch.meta.replace(task_id=np.zeros((3,), np.int32)))  # odd
    with pytest.raises(ValueError, match="meta.task_id"):
        multihost.global_batch(batch, pad_id=0, process_count=2, allgather=lambda t: t)


def test_allgather_numpy_keeps_64_bit_and_bool_values(monkeypatch):
    """64-bit ids would be truncated by a jax round trip without x64: they travel as uint32
    pairs (the real ``process_allgather`` on one process stacks a leading axis of 1)."""
    x = {
        "row_id": np.array([2**40 + 3, -(2**35) - 1], np.int64),
        "f": np.array([1e300, -2.5], np.float64),
        "valid": np.array([True, False]),
        "ids": np.array([[1, 2]], np.int32),
    }
    got = multihost.allgather_numpy(x)
    for k, v in x.items():
        assert got[k].shape == (1,) + v.shape and got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k][0], v)


# --------------------------------------------------------------------------------------------
# trainer.run on meshes


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    from tatar_jax.train import trainer

    wd = tmp_path_factory.mktemp("one_device")
    cfg = tiny_config(num_devices=1, fsdp=1)
    trainer.run(cfg, wd)
    return final_params(wd, cfg), records(wd), cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh", [{"fsdp": 8}, {"data": 2, "fsdp": 4}], ids=["fsdp8", "data2_fsdp4"]
)
def test_grpo_run_on_mesh_equals_one_device(tmp_path, one_device_run, mesh):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (virtual) devices")
    from tatar_jax.train import trainer

    want, want_rec, cfg1 = one_device_run
    cfg = tiny_config(**mesh)
    trainer.run(cfg, tmp_path)
    got, rec = final_params(tmp_path, cfg), records(tmp_path)
    init = final_params_init(cfg1)
    moved = max_diff(want, init)
    d = max_diff(got, want)
    print(f"[train multidevice] {mesh} vs 1 device, 2 GRPO steps: max|Δ params| {d:.2e} "
          f"(update size {moved:.2e})")  # fmt: skip
    assert moved > 1e-4  # the rewards moved the parameters
    assert d < 1e-6
    assert [r["step"] for r in rec] == [1, 2] == [r["step"] for r in want_rec]
    for r, w in zip(rec, want_rec, strict=True):
        assert np.isfinite([r["loss"], r["reward_mean"], r["grad_norm"]]).all()
        # same sampled completions (mesh-independent keys) -> the same rewards
        for k in ("reward_mean", "completion_len/all", "parsed_frac/all"):
            assert r[k] == pytest.approx(w[k], abs=1e-6), k
        assert r["loss"] == pytest.approx(w["loss"], abs=1e-5)
    # The update did something: with the embedded tokenizer's small vocabulary every tiny-model
    # completion runs to max_new_tokens, and at mu = 1 the loss of equal-length completions is
    # -mean(A) = 0 exactly, while its gradient is not.
    assert all(r["grad_norm"] > 0 for r in rec)
    if mesh == {"fsdp": 8}:  # resuming on the mesh (orbax restores counters to one device)
        cfg.total_steps = 3
        cfg.allow_config_change = True  # extending a finished run changes its lr schedule
        res = trainer.run(cfg, tmp_path)["grpo"]
        assert res.step == 3 and np.isfinite(res.metrics["loss"])
        assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
