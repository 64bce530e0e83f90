"""The GRPO training loop on several devices and several processes equals the one-device run.

- ``global_batch`` (several hosts' pipeline batches -> the global batch) equals the one-host
  pipeline batch of the same global batch size, through a fake all-gather (threads);
- ``trainer.run`` of the tiny GRPO config for 2 steps on an fsdp=8 mesh (and data=2 x fsdp=4)
  ends with the parameters of the same run on one device (``mesh.num_devices=1``);
- two real JAX processes x 2 CPU devices (``jax.distributed`` on localhost, gloo collectives)
  end with the parameters of one process with 4 devices (same global batch).

The random tiny model never writes a parseable answer, so every reward would be 0 and nothing
would move: the runs use a parser that reads a number from any text (a function of the whole
completion), which makes the real rewards (accuracy, IAA Thurstone over the global batch, ...)
and advantages non-zero. Adam's ``eps`` is raised so that the update is nearly linear in the
gradient (``g / (|g| + eps)`` would turn float-summation-order noise of near-zero gradients into
full-size steps).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import pytest

from configs import grpo as grpo_configs
from configs import sft as sft_configs
from tatar_jax import multihost

ROOT = pathlib.Path(__file__).resolve().parents[2]


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

    specs = synthetic.ensure_synthetic(tmp_path / "synthetic", image_size=56)
    sources = pipeline.sources_from_synthetic(specs, "train")
    opts = pipeline.PipelineOptions(
        stage=stage,
        batch_size=batch_size,
        seq_buckets=(160, 192, 224, 256, 320, 384, 512),  # hosts may pick different buckets
        mixing="concat" if stage == "grpo" else "interleave",
        num_epochs=None,
        process_index=index,
        process_count=count,
        read_threads=1,
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
    """Two hosts x 2 rows merged == one host x 4 rows (every array, every step), identical on
    both hosts; the host's own rows are ``meta["process_rows"]``; one process: no gather."""
    from tatar_jax.data.tokenizer import load_tokenizer

    pad_id = load_tokenizer(None).pad_id
    steps = 3
    single, _ = _pipeline_batches(tmp_path, stage, 4, 0, 1, steps)
    per_host = [_pipeline_batches(tmp_path, stage, 2, h, 2, steps) for h in range(2)]
    opts = per_host[0][1]
    seen_lengths = set()
    for s in range(steps):
        hb = [per_host[h][0][s] for h in range(2)]
        seen_lengths.update(b["input_ids"].shape[1] for b in hb)
        merged = _merge(hb, opts, pad_id)
        want = single[s]
        for h, got in enumerate(merged):
            assert set(got) == set(want), set(got) ^ set(want)
            for k, v in want.items():
                if k == "meta":
                    continue
                np.testing.assert_array_equal(got[k], v, err_msg=f"step {s} host {h} key {k}")
                assert got[k].dtype == np.asarray(v).dtype, k
            assert got["meta"]["process_rows"] == (2 * h, 2 * h + 2)
    if stage == "sft":  # the hosts chose different sequence buckets: the padding path ran
        assert len(seen_lengths) > 1
    assert multihost.global_batch(single[0], pad_id=pad_id, process_count=1) is single[0]


def test_global_batch_rejects_non_row_arrays():
    batch = {"valid": np.ones(2, bool), "input_ids": np.zeros((2, 4), np.int32),
             "odd": np.zeros((3,), np.int32)}  # fmt: skip
    with pytest.raises(ValueError, match="odd"):
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


def _parse_any(text: str) -> float:
    """A number from any completion (the tiny random model writes no answer tags)."""
    return float(sum(map(ord, text)) % 101)


def tiny_config(**mesh):
    """configs/grpo.py:tiny for 2 short steps with rewards that move the parameters."""
    cfg = grpo_configs.get_config("tiny")
    cfg.total_steps = 2
    cfg.eval.datasets = ()
    cfg.model.remat = False
    cfg.grpo.beta = 0.0  # no reference pass: half the compiles
    cfg.grpo.max_new_tokens = 8
    # (``parser`` is a str field of the config: a new block holds the callable)
    cfg.rewards = ml_collections.ConfigDict({**cfg.rewards.to_dict(), "parser": _parse_any})
    cfg.optimizer.learning_rate = 1e-3
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.eps = 1e-3  # near-linear update: see the module docstring
    cfg.checkpoint.every_steps = 100
    cfg.logging.tensorboard = False
    for k, v in mesh.items():
        if k == "num_devices":
            cfg.mesh.num_devices = v
        else:
            cfg.mesh.shape[k] = v
    return cfg


def tiny_sft_config(**mesh):
    """configs/sft.py:tiny for 2 steps, evaluated at the end on 4 held-out images (greedy)."""
    cfg = sft_configs.get_config("tiny")
    cfg.total_steps = 2
    cfg.model.remat = False
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.eps = 1e-3  # near-linear update: see the module docstring
    cfg.checkpoint.every_steps = 100
    cfg.logging.tensorboard = False
    cfg.eval.datasets = ("synthetic_test",)
    cfg.eval.max_examples = 4
    cfg.eval.batch_size = 4
    cfg.eval.max_new_tokens = 6
    for k, v in mesh.items():
        cfg.mesh.shape[k] = v
    return cfg


def final_params(workdir, cfg) -> dict[str, np.ndarray]:
    """{path: value} of the last checkpoint's parameters (host numpy)."""
    from flax import nnx

    from tatar_jax.data import tokenizer
    from tatar_jax.train import checkpointing, trainer

    tok = tokenizer.load_tokenizer(None)
    model = trainer.load_policy(cfg, tok).model
    _, target = nnx.split(model)
    params, _ = checkpointing.load_params(workdir, target)
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def _records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip() and "loss" in json.loads(x)]


def _eval_records(workdir) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.update({k: v for k, v in r.items() if k.startswith("eval/")})
    return out


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    from tatar_jax.train import trainer

    wd = tmp_path_factory.mktemp("one_device")
    cfg = tiny_config(num_devices=1, fsdp=1)
    trainer.run(cfg, wd)
    return final_params(wd, cfg), _records(wd), cfg


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
    got, rec = final_params(tmp_path, cfg), _records(tmp_path)
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
    assert any(abs(r["loss"]) > 0 for r in rec)
    if mesh == {"fsdp": 8}:  # resuming on the mesh (orbax restores counters to one device)
        cfg.total_steps = 3
        cfg.allow_config_change = True  # extending a finished run changes its lr schedule
        res = trainer.run(cfg, tmp_path)["grpo"]
        assert res.step == 3 and np.isfinite(res.metrics["loss"])
        assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]


_INIT_CACHE: dict = {}


def final_params_init(cfg) -> dict[str, np.ndarray]:
    """The initial parameters (embedded tiny model, the run's seed)."""
    if "p" not in _INIT_CACHE:
        from flax import nnx

        from tatar_jax.data import tokenizer
        from tatar_jax.train import trainer

        model = trainer.load_policy(cfg, tokenizer.load_tokenizer(None)).model
        flat = jax.tree_util.tree_leaves_with_path(nnx.state(model))
        _INIT_CACHE["p"] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
    return _INIT_CACHE["p"]


# --------------------------------------------------------------------------------------------
# Two real processes

_PROCESS = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + sys.argv[4]
import jax
nproc = int(sys.argv[3])
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
import test_train_multidevice as t
cfg = t.tiny_config(fsdp=-1)
cfg.grpo.prompts_per_step = 4  # 2 prompts per process
if nproc > 1:
    cfg.mesh.coordinator_address = "localhost:" + sys.argv[2]
    cfg.mesh.num_processes = nproc
    cfg.mesh.process_id = int(sys.argv[1])
from tatar_jax.train import trainer
trainer.run(cfg, sys.argv[5] + "/grpo")
sft = t.tiny_sft_config(fsdp=-1)
sft.mesh = cfg.mesh
trainer.run(sft, sys.argv[5] + "/sft")
assert jax.process_count() == nproc and jax.device_count() == 4, jax.devices()
"""


def _launch(nproc: int, devices: int, workdir, env):
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(p), port, str(nproc), str(devices), workdir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        for p in range(nproc)
    ]
    return procs


@pytest.mark.slow
def test_grpo_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 CPU devices (fsdp=4 over both, 2 prompts per process) == 1 process x 4
    devices with the same 4-prompt global batch: same parameters after 2 GRPO steps, same
    (global-batch) reward metrics on both processes."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([here, str(ROOT / "tests" / "helpers"), str(ROOT)]),
    }
    env.pop("XLA_FLAGS", None)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    procs = _launch(2, 2, two, env)
    procs += _launch(1, 4, one, env)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        # (a process that dies takes the others down at jax's shutdown barrier: show its error)
        cut = out.find("Traceback")
        assert p.returncode == 0, out[-5000:] if cut < 0 else out[cut : cut + 5000]
    cfg = tiny_config(num_devices=1)
    init = final_params_init(cfg)
    for stage in ("grpo", "sft"):
        want, got = final_params(f"{one}/{stage}", cfg), final_params(f"{two}/{stage}", cfg)
        d = max_diff(got, want)
        moved = max_diff(want, init)
        print(f"[train multiprocess] {stage}: 2 processes x 2 devices vs 1 x 4, 2 steps: "
              f"max|Δ params| {d:.2e} (update size {moved:.2e})")  # fmt: skip
        assert moved > 1e-4
        assert d < 1e-6
    rec_one, rec_two = _records(f"{one}/grpo"), _records(f"{two}/grpo")
    assert [r["step"] for r in rec_two] == [1, 2]
    for r, w in zip(rec_two, rec_one, strict=True):
        assert r["valid_prompts"] == w["valid_prompts"] == 4  # the global batch
        for k in ("reward_mean", "reward_total/all", "completion_len/all", "loss"):
            assert r[k] == pytest.approx(w[k], abs=1e-5), k
    sft_one, sft_two = _records(f"{one}/sft"), _records(f"{two}/sft")
    for r, w in zip(sft_two, sft_one, strict=True):
        assert r["loss"] == pytest.approx(w["loss"], abs=1e-5)
    ev_one, ev_two = _eval_records(f"{one}/sft"), _eval_records(f"{two}/sft")
    assert ev_two and ev_two.keys() == ev_one.keys()
    assert ev_two["eval/synthetic-iqa-test/n"] == 2  # every held-out row once, not per process
    for k, v in ev_one.items():
        assert v == pytest.approx(ev_two[k], abs=1e-6, nan_ok=True), k
