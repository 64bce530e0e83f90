"""AOT memory plan (tatar_jax.train.memory_plan, scripts/plan_memory.py) on a tiny config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tatar_jax.train import memory_plan as mp

TINY = dict(
    model="tiny",
    prompts=4,
    num_generations=2,
    prompt_len=48,
    completion_len=16,
    image_tokens=16,
    dtype="float32",
)


def test_parse_mesh():
    assert mp.parse_mesh("fsdp=4,tensor=2") == (("fsdp", 4), ("tensor", 2))
    assert mp.parse_mesh("fsdp=8") == (("fsdp", 8),)
    with pytest.raises(ValueError, match="axis=size"):
        mp.parse_mesh("fsdp8")


@pytest.fixture(scope="module")
def tiny_plan():
    spec = mp.PlanSpec(mesh=(("fsdp", 8),), programs=("update", "ref_logps"), **TINY)
    return mp.plan(spec)


def test_update_plan_fields_and_consistency(tiny_plan):
    upd, ref = tiny_plan
    assert (upd["program"], ref["program"]) == ("update", "ref_logps")
    m = upd["per_device_bytes"]
    assert set(m) >= {"arguments", "outputs", "temporaries", "total"}
    assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
    # the donated train state aliases the new one
    assert m["aliased"] >= upd["params_bytes_per_device"] + upd["opt_state_bytes_per_device"]
    # arguments = the sharded state + the batch: at least params + Adam moments on a device
    state = upd["params_bytes_per_device"] + upd["opt_state_bytes_per_device"]
    assert state <= m["arguments"]
    # parameters really are split over 8 devices (a few small ones replicated)
    full = upd["param_count"] * 4
    assert full / 8 <= upd["params_bytes_per_device"] < full / 4
    assert upd["opt_state_bytes_per_device"] == pytest.approx(
        2 * upd["params_bytes_per_device"], rel=0.01
    )
    assert upd["peak_bytes"] == m["total"] + upd["resident_other"]
    assert upd["resident_other"] == upd["ref_params_bytes_per_device"]
    assert upd["fits"] == {hw: True for hw in mp.HBM_GIB}
    json.dumps(upd)  # JSON-serialisable as the script prints it


def test_sharding_divides_the_state_bytes(tiny_plan):
    """The same step on one device: its arguments hold the whole state."""
    upd8 = tiny_plan[0]
    spec = mp.PlanSpec(mesh=(("fsdp", 1),), programs=("update",), **TINY)
    (upd1,) = mp.plan(spec, devices=jax.devices()[:1])
    assert upd1["params_bytes_per_device"] == upd1["param_count"] * 4
    # (the replicated images and layout are a large part of this tiny step)
    assert upd8["per_device_bytes"]["arguments"] < upd1["per_device_bytes"]["arguments"] / 2


def test_script_json_decode(repo_root):
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # the script sets the device count itself
    cmd = [
        sys.executable,
        str(repo_root / "scripts" / "plan_memory.py"),
        "--mesh=fsdp=4,tensor=2",
        "--programs=decode",
        "--json",
        *[f"--{k}={v}" for k, v in TINY.items()],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    r = lines[0]
    assert r["program"] == "decode" and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    pdb = r["per_device_bytes"]
    assert all(isinstance(pdb[k], int) and pdb[k] >= 0 for k in ("arguments", "outputs", "total"))
    # the KV cache (layers, rows, slots, kv_heads, head_dim) is an argument, split over the mesh
    cfg_layers, kv, hd = 2, 2, 16
    cache = 2 * cfg_layers * 8 * (48 + 16) * kv * hd * 4
    assert pdb["arguments"] < cache  # a device holds a part of it (and of the weights)
    assert r["fits"]["v5e"] is True
    assert math.isclose(r["peak_gib"], r["peak_bytes"] / 2**30, abs_tol=0.01)
    np.testing.assert_equal(sorted(r["fits"]), sorted(mp.HBM_GIB))


def test_chunked_attention_plans_less_memory_than_xla():
    """2,064-token rows: "xla" holds (rows, heads, L, L) float32 scores, "chunked" one block."""
    long = {**TINY, "prompts": 4, "num_generations": 2, "prompt_len": 2048}
    assert mp.PlanSpec().attention_impl == "chunked"  # the default: a flash kernel's stand-in
    temps = {}
    for impl in ("xla", "chunked"):
        spec = mp.PlanSpec(
            mesh=(("fsdp", 1),), programs=("ref_logps",), attention_impl=impl, **long
        )
        (r,) = mp.plan(spec, devices=jax.devices()[:1])
        assert r["attention_impl"] == impl
        temps[impl] = r["per_device_bytes"]["temporaries"]
    scores = 8 * 4 * 2064 * 2064 * 4  # one layer's float32 scores under "xla"
    assert temps["xla"] >= scores
    assert temps["chunked"] < temps["xla"] - scores / 2, temps
