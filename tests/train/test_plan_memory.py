"""AOT memory plan (tatar_jax.train.memory_plan, scripts/plan_memory.py) on a tiny config."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tatar_jax.train import compile_targets as ct
from tatar_jax.train import hlo_stats
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
    # a cpu target: "auto" compiles the chunked attention; no device memory, no cost model
    assert (upd["attention"], upd["target"]["name"], upd["fits_target"]) == ("chunked", "cpu", None)
    assert np.isnan(upd["roofline_seconds"])
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
    # the rollout's own layout (auto): weights replicated over the 8 devices, no collective per
    # token; the KV cache (4 prompts padded to the 8 batch shards x 48 slots + 8 x G = 2 rows x
    # 16 slots, 2 layers, 2 kv heads of 16, f32) is an argument split over the devices
    assert (r["rollout_mesh"], r["rollout_rules"]) == (
        {"data": 8, "fsdp": 1, "tensor": 1},
        "replicated",
    )
    assert r["collective_bytes_per_step"] == 0
    assert r["kv_cache_bytes"] == 2 * 2 * (8 * 48 + 16 * 16) * 2 * 16 * 4
    # (decode's arguments: the language weights it reads, whole, and a device's share of the KV)
    kv_bytes = r["kv_cache_bytes"]
    assert kv_bytes / 8 < pdb["arguments"] < r["rollout_weights_bytes_per_device"] + kv_bytes / 4
    assert r["fits"]["v5e"] is True
    assert math.isclose(r["peak_gib"], r["peak_bytes"] / 2**30, abs_tol=0.01)
    np.testing.assert_equal(sorted(r["fits"]), sorted(mp.HBM_GIB))


def test_chunked_attention_plans_less_memory_than_xla():
    """2,064-token rows: "xla" holds (rows, heads, L, L) float32 scores, "chunked" one block."""
    long = {**TINY, "prompts": 4, "num_generations": 2, "prompt_len": 2048}
    # the default "auto" is "chunked" on cpu targets: a flash kernel's stand-in
    assert mp.PlanSpec().attention_impl == "auto"
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


def test_rollout_plan_layout_kv_bytes_collectives_and_hlo_dump(tmp_path):
    """The rollout as the trainer runs it: its own weights layout (auto: replicated, no
    collective in the token loop) vs the training mesh's FSDP weights (all-gathers per token);
    the KV cache holds one prompt copy + G generation slots per prompt; HLO dumped per program."""
    spec = dict(TINY, mesh=(("fsdp", 8),), programs=("prefill", "decode"))
    pre, dec = mp.plan(mp.PlanSpec(**spec), dump_hlo=str(tmp_path))
    (fsdp,) = mp.plan(mp.PlanSpec(**dict(spec, programs=("decode",), rollout_mesh="train")))
    assert dec["rollout_mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert (dec["rollout_rules"], fsdp["rollout_rules"]) == ("replicated", "default")
    assert dec["collective_bytes_per_step"] == 0
    # FSDP weights: every token step gathers the decoder's parameter shards (operands: at
    # least 1/8 of the decoder's f32 weights, at most all of them)
    assert 0 < fsdp["collective_bytes_per_step"] < 4 * dec["param_count"]
    assert dec["rollout_weights_bytes_per_device"] == 4 * dec["param_count"]  # f32, replicated
    # 4 prompts padded to the 8 batch shards: prompt KV (8 x 48 slots) + 16 rows x 16 slots
    layers, kv, hd = 2, 2, 16
    assert dec["kv_cache_bytes"] == 2 * layers * (8 * 48 + 16 * 16) * kv * hd * 4
    assert fsdp["kv_cache_bytes"] == dec["kv_cache_bytes"]
    # the policy's own params stay resident beside the rollout's copy
    assert dec["resident_other"] >= dec["params_bytes_per_device"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny_fsdp8_decode.hlo.txt",
        "tiny_fsdp8_prefill.hlo.txt",
    ]
    assert "HloModule" in (tmp_path / "tiny_fsdp8_decode.hlo.txt").read_text()[:200]
    assert pre["program"] == "prefill" and "kv_cache_bytes" not in pre


def test_fit_finds_the_smallest_micro_batch_count_that_fits():
    """--fit on a made-up 1-device target whose memory lies between the update's peak at 1 and
    at 2 micro-batches: the search answers 2; with too little memory it says why in one line."""
    spec = mp.PlanSpec(mesh=(("fsdp", 1),), programs=("update", "prefill"), **TINY)
    peaks = {}
    for n in (1, 2):
        (r,) = mp.plan(dataclasses.replace(spec, num_micro=n, programs=("update",)))
        peaks[n] = r["peak_bytes"]
    assert peaks[2] < peaks[1]
    memory = int((peaks[1] + peaks[2]) / 2 / (1 - mp.HEADROOM))
    target = ct.Target(name="cpu-test", platform="cpu", num_devices=1, memory_bytes=memory)
    found = mp.fit(spec, target, layouts=("auto",))
    if found["fits"]:  # (the rollout's prefill is smaller than the update here)
        assert (found["num_micro"], found["rollout_mesh"]) == (2, "auto")
        assert [r["program"] for r in found["results"]] == ["update", "prefill"]
        assert all(r["peak_bytes"] <= 0.9 * memory for r in found["results"])
    else:
        assert "prefill" in found["reason"], found
    small = ct.Target(name="cpu-tiny", platform="cpu", num_devices=1, memory_bytes=1 << 20)
    nothing = mp.fit(dataclasses.replace(spec, programs=("update",)), small)
    # 1 MiB: the resident state alone is larger, so no compile is tried
    assert not nothing["fits"] and nothing["reason"].startswith("the resident state alone")
    assert "\n" not in nothing["reason"]


def test_loop_collective_bytes_counts_operands_times_trip_counts():
    hlo = """HloModule m

%inner (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[2,8]{1,0} constant({...})
  %ag = f32[4,8]{1,0} all-gather(%x), dimensions={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ag)
}

%body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %y = bf16[16]{0} constant({...})
  %ar = bf16[16]{0} all-reduce(%y), to_apply=%add
  %w = (s32[], f32[4,8]{1,0}) while(%q), condition=%c, body=%inner, TRIPS
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %ag)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %big = f32[64,64]{1,0} all-gather(%a), dimensions={0}
  %loop = (s32[], f32[4,8]{1,0}) while(%t0), condition=%c, body=%body
  ROOT %o = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
""".replace("TRIPS", 'backend_config={"known_trip_count":{"n":"3"}}')
    # per token step: one all-reduce of 16 bf16 + 3 layer iterations x all-gather of 2x8 f32;
    # the all-gather outside the loop does not count
    assert hlo_stats.loop_collective_bytes(hlo) == 16 * 2 + 3 * 2 * 8 * 4


def test_lora_plan_holds_one_base():
    """LoRA (bf16 base, one device): the reference reads the policy's base (only the zero B's
    are its own), the rollout's weights are the policy's buffers, so no program has a second
    base resident; full fine-tuning on the same shape keeps a resident reference copy."""
    shape = dict(TINY, dtype="bfloat16", param_dtype="bfloat16", mesh=(("fsdp", 1),))
    spec = mp.PlanSpec(lora_rank=4, programs=("ref_logps", "prefill"), **shape)
    ref, pre = mp.plan(spec)
    base = ref["frozen_bytes_per_device"]
    params = ref["params_bytes_per_device"]
    assert ref["frozen_copies_in_rollout"] == 1.0 and 0 < base < params
    assert ref["ref_params_bytes_per_device"] == 0  # nothing of the reference stays resident
    adapters = params - base
    # the reference program reads the base the policy holds: resident beside it only the
    # adapters (and their moments), not the base again
    assert (
        ref["resident_other"]
        == params + ref["opt_state_bytes_per_device"] - (ref["ref_shared_bytes_per_device"])
    )
    assert ref["ref_shared_bytes_per_device"] >= base
    assert ref["resident_other"] <= 3 * adapters + 64
    # the rollout's argument is the base itself: resident beside it only what it does not read
    assert pre["rollout_shared_bytes_per_device"] >= base - 4  # (lora_scale: cast to bf16)
    assert pre["resident_other"] <= 3 * adapters + 64
    full = mp.plan(dataclasses.replace(spec, lora_rank=0, programs=("prefill",)))[0]
    assert full["frozen_copies_in_rollout"] == 0.0
    assert full["resident_other"] >= full["params_bytes_per_device"]  # the reference's copy


def test_offload_takes_the_optimizer_state_and_reference_out_of_the_rollout():
    spec = mp.PlanSpec(mesh=(("fsdp", 1),), programs=("ref_logps", "prefill"), **TINY)
    ref0, pre0 = mp.plan(spec)
    parts = ("opt_state", "reference")
    ref1, pre1 = mp.plan(dataclasses.replace(spec, offload="rollout", offload_parts=parts))
    ref2, _ = mp.plan(dataclasses.replace(spec, offload="always", offload_parts=parts))
    opt, ref = pre0["opt_state_bytes_per_device"], pre0["ref_params_bytes_per_device"]
    assert opt > 0 and ref > 0 and pre1["offloaded_bytes_per_device"] == opt + ref
    assert pre0["resident_other"] - pre1["resident_other"] == opt + ref
    assert pre0["peak_bytes"] - pre1["peak_bytes"] == opt + ref
    assert ref1["resident_other"] == ref0["resident_other"]  # back on the device for the pass
    assert ref0["resident_other"] - ref2["resident_other"] == opt  # "always": not even then


def test_offloaded_master_weights_and_a_bfloat16_first_moment_are_counted():
    """--offload_parts=params: the float32 master weights leave the device for the rollout
    (which reads its own bf16 copy) and, with "always", for the reference pass; --mu_dtype=
    bfloat16 halves the first moment's bytes."""
    spec = mp.PlanSpec(
        mesh=(("fsdp", 1),), programs=("ref_logps", "prefill"), **{**TINY, "dtype": "bfloat16"}
    )
    ref0, pre0 = mp.plan(spec)
    ref1, pre1 = mp.plan(
        dataclasses.replace(spec, offload="always", offload_parts=("opt_state", "params"))
    )
    params, opt = pre0["params_bytes_per_device"], pre0["opt_state_bytes_per_device"]
    assert params > 0 and pre0["rollout_shared_bytes_per_device"] == 0  # a bf16 copy of f32
    assert pre1["offloaded_bytes_per_device"] == params + opt
    assert pre0["resident_other"] - pre1["resident_other"] == params + opt
    assert ref0["resident_other"] - ref1["resident_other"] == params + opt
    mu = mp.plan(dataclasses.replace(spec, mu_dtype="bfloat16", programs=("prefill",)))[0]
    assert opt - mu["opt_state_bytes_per_device"] == params // 2
    assert pre0["resident_other"] - mu["resident_other"] == params // 2
    frozen_tower = mp.plan(dataclasses.replace(
        spec, freeze_vision=True, offload="rollout", offload_parts=("params",),
        programs=("prefill",),
    ))[0]  # fmt: skip
    # only the trainable master weights leave (a frozen tower is the model's own buffers)
    assert 0 < frozen_tower["offloaded_bytes_per_device"] < params
    with pytest.raises(ValueError, match="full-parameter"):
        mp.check_offload(dataclasses.replace(spec, lora_rank=4, offload="rollout",
                                             offload_parts=("params",)))  # fmt: skip
    with pytest.raises(ValueError, match="unknown"):
        mp.check_offload(dataclasses.replace(spec, offload="rollout", offload_parts=("x",)))
