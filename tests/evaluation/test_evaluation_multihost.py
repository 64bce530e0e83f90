"""Multi-process (multi-host) evaluation: every process scores its own rows, process 0 merges.

Two processes are simulated in one by running the per-process part (``runner.evaluate_shard``)
with explicit ``process_index`` / ``process_count`` one after the other, then the merge; the
merged files must equal, byte for byte, a one-process run's. The model is the runner tests' fake
predictor (plus a failure), except in the last test: the real greedy predict path on a tiny
random model, with the batch over an 8-device mesh vs one device.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from test_evaluation_runner import FakePredictor, _dataset

from tatar_jax.evaluation import runner, shards

FILES = ("predictions.jsonl", "errors.jsonl", "metrics.json")


class FailingFake(FakePredictor):
    """The fake predictor, but row 7 cannot be scored (a RecordFailure)."""

    def __call__(self, records):
        out = super().__call__(records)
        return [
            runner.RecordFailure("rejected") if r["row_id"] == 7 else t
            for r, t in zip(records, out, strict=True)
        ]


def _opts(p=None, n=None, **kw):
    base = dict(batch_size=4, progress=False, image_threads=2, plots=False)
    base.update(kw)
    return runner.EvalOptions(process_index=p, process_count=n, **base)


def _read(d):
    return {f: (d / f).read_bytes() for f in FILES}


@pytest.fixture
def spec(tmp_path):
    return _dataset(tmp_path, "KADID", "iqa", (1.0, 5.0), 23, missing=(4,))


def test_two_processes_merged_equal_one_process(tmp_path, spec):
    single = tmp_path / "single"
    want = runner.evaluate_dataset(spec, FailingFake(), single, _opts())
    out = tmp_path / "multi"
    fakes = [FailingFake(), FailingFake()]
    for p in range(2):  # two "processes", one after the other
        runner.evaluate_shard(spec, fakes[p], out, _opts(p, 2))
        assert (out / f"predictions.{p}.jsonl").is_file()
    seen = [set(f.rows_seen("KADID")) for f in fakes]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(23)) - {4}
    # lockstep: both made ceil(12 / 4) = 3 calls although process 1 has 11 rows (one image missing)
    assert [len(f.calls) for f in fakes] == [3, 3]
    got, rows = runner.merge_shards(spec, out, _opts(0, 2))
    assert got == want and [r["row_id"] for r in rows] == sorted(seen[0] | seen[1] - {7})
    assert _read(out) == _read(single)
    assert sorted(os.listdir(out)) == sorted(os.listdir(single))  # shard files removed


def test_resume_one_killed_process(tmp_path, spec):
    single = tmp_path / "single"
    runner.evaluate_dataset(spec, FailingFake(), single, _opts())
    out = tmp_path / "multi"
    runner.evaluate_shard(spec, FailingFake(), out, _opts(0, 2))
    with pytest.raises(KeyboardInterrupt):  # process 1 killed after one batch
        runner.evaluate_shard(spec, FailingFake(fail_after_calls=1), out, _opts(1, 2))
    shard = out / "predictions.1.jsonl"
    with open(shard, "a") as f:
        f.write('{"row_id": 9, "ima')  # a partial line left by the kill
    again = [FailingFake(), FailingFake()]
    for p in range(2):
        runner.evaluate_shard(spec, again[p], out, _opts(p, 2))
    assert again[0].calls == [[]] * len(again[0].calls)  # process 0 had nothing left
    done_before = {1, 3, 5, 7}  # the first batch of process 1 (7 failed: retried)
    assert set(again[1].rows_seen("KADID")) == set(range(1, 23, 2)) - (done_before - {7})
    runner.merge_shards(spec, out, _opts(0, 2))
    assert _read(out) == _read(single)


def test_shard_rows_disjoint_balanced_lockstep():
    records = [{"row_id": 100 + i} for i in range(37)]
    done = {100 + i: None for i in (0, 2, 4, 6, 8, 10, 30)}
    for count in (1, 2, 3, 8):
        parts, n = shards.shard_rows(records, done, count, 4)
        ids = [r["row_id"] for p in parts for r in p]
        assert sorted(ids) == sorted(r["row_id"] for r in records if r["row_id"] not in done)
        assert n == max(-(-len(p) // 4) for p in parts)
        lens = [len(p) for p in parts]
        assert max(lens) - min(lens) <= 7  # at most the done rows of one process apart


def test_run_eval_one_process_override_unchanged(tmp_path, spec):
    a = runner.run_eval([spec], FakePredictor(), tmp_path / "a", _opts())
    b = runner.run_eval([spec], FakePredictor(), tmp_path / "b", _opts(0, 1))
    assert a == b and _read(tmp_path / "a" / "KADID") == _read(tmp_path / "b" / "KADID")
    with pytest.raises(ValueError, match="process_index"):
        _opts(2, 2)


_PROCESS = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, out, spec = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from test_evaluation_multihost import FailingFake
from tatar_jax.data import manifest
from tatar_jax.evaluation import runner
fake = FailingFake()
opts = runner.EvalOptions(batch_size=4, progress=False, plots=False, is_writer=pid == 0)
res = runner.run_eval([manifest.DatasetSpec(**spec)], fake, out, opts)
seen = fake.rows_seen("KADID")
print(json.dumps({"metrics": res["KADID"], "rows": seen, "calls": len(fake.calls)}))
"""


def test_two_real_jax_processes(tmp_path, spec):
    """Two JAX processes (jax.distributed on localhost, CPU): real barriers, process 0 merges,
    both return the metrics of a one-process run and the files equal its files."""
    import json
    import socket
    import subprocess
    import sys

    single = tmp_path / "single"
    want = runner.run_eval([spec], FailingFake(), single, _opts())["KADID"]
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [
                here,
                os.path.join(os.path.dirname(here), "helpers"),
                os.path.dirname(os.path.dirname(here)),
            ]
        ),
    }
    desc = {"name": spec.name, "task": spec.task, "manifest": spec.manifest}
    desc["score_range"] = list(spec.score_range)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PROCESS,
                str(p),
                port,
                str(tmp_path / "multi"),
                json.dumps(desc),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["metrics"] for r in results] == [want, want]
    assert [r["calls"] for r in results] == [3, 3]
    assert set(results[0]["rows"]).isdisjoint(results[1]["rows"])
    assert _read(tmp_path / "multi" / "KADID") == _read(single / "KADID")
    assert not [f for f in os.listdir(tmp_path / "multi" / "KADID") if f.count(".") > 1]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("tatar_jax.generate") is None, reason="no rollout engine"
)
def test_real_predict_path_with_8_device_mesh_equals_one_device(tmp_path):
    """The real predict function (tiny random model, real tokenizer, greedy generate): the batch
    over an 8-device mesh gives the same completions as one device."""

    import jax
    import numpy as np
    import tiny_models
    from eval_settings import eval_settings
    from flax import nnx
    from PIL import Image

    from tatar_jax import sharding
    from tatar_jax.data.tokenizer import load_tokenizer
    from tatar_jax.evaluation.predict import make_predict_fn
    from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

    tok = load_tokenizer(None)
    cfg = tiny_models.tiny_config_for(tok)
    model = Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), init_std=0.08)
    ev = eval_settings(max_new_tokens=6, max_pixels=40_000)
    rng = np.random.default_rng(0)
    recs = [
        {
            "pil_image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
            "task": task,
            "gt_100": 50.0,
            "row_id": k,
        }
        for k, (w, h, task) in enumerate([(84, 56, "iqa"), (56, 84, "iaa"), (60, 60, "iqa")])
    ]
    one = sharding.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 4})
    outs = {}
    for name, mesh in (("one", one), ("eight", eight)):
        fn = make_predict_fn(model, tok, ev, mesh=mesh, rules=sharding.DEFAULT_RULES)
        outs[name] = fn(recs)
    print(f"[eval multihost] completions (1 vs 8 devices): {outs['one']}")
    assert outs["one"] == outs["eight"]
    assert all(isinstance(t, str) and t for t in outs["one"])
