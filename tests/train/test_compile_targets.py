"""Deviceless compiles for TPU and NVIDIA targets (tatar_jax.train.compile_targets): the tiny
model's four GRPO programs compiled by the TPU compiler (libtpu) and the XLA GPU compiler (the
jax-cuda plugin, an H100 description) on 2-device meshes, with the attention kernels the trainer
picks there. Needs requirements-aot.txt (CI installs it); skipped with the reason without it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tatar_jax.train import compile_targets as ct
from tatar_jax.train import memory_plan as mp

GIB = 2**30
TINY = dict(
    model="tiny", prompts=4, num_generations=2, prompt_len=48, completion_len=16,
    image_tokens=16, dtype="bfloat16",
)  # fmt: skip


def _needs(platform: str) -> None:
    reason = ct.unavailable_reason(platform)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "text, topology, devices, memory_gib",
    [
        ("tpu:v5e-4", "v5e:2x2", 4, 16),
        ("tpu:v5e-16", "v5e:4x4", 16, 16),
        ("tpu:v5p-8", "v5p:2x2x2", 8, 95),
        ("tpu:v5p-4", "v5p:2x2x1", 4, 95),
        ("tpu:v5p-64", "v5p:4x4x4", 64, 95),
        ("tpu:v6e-8", "v6e:2x4", 8, 32),
        ("tpu:v5p:2x2x4", "v5p:2x2x4", 16, 95),
        ("gpu:h100x8", "1x1x8", 8, 81559 / 1024),
        ("gpu:h100x32", "1x4x8", 32, 81559 / 1024),
        ("gpu:a100-80x2", "1x1x2", 2, 80),
        ("gpu:l40sx1", "1x1x1", 1, 46068 / 1024),
        ("gpu:h200x8", "1x1x8", 8, 143771 / 1024),
    ],
)
def test_parse_target_names(text, topology, devices, memory_gib):
    t = ct.parse_target(text)
    assert (t.topology, t.num_devices) == (topology, devices)
    assert t.memory_bytes / GIB == pytest.approx(memory_gib)
    assert t.platform == ("tpu" if text.startswith("tpu") else "cuda")


def test_parse_target_slices_config_and_errors(tmp_path):
    t = ct.parse_target("tpu:v5e-8", num_slices=2)
    assert (t.num_devices, t.topology, t.num_slices) == (16, "v5e:2x4", 2)
    assert ct.parse_target("gpu:h100x8", num_slices=2).topology == "2x1x8"
    cfg = tmp_path / "mine.txtpb"
    cfg.write_text("gpu_device_info {\n  device_memory_size: 1073741824\n}\n")
    mine = ct.parse_target("gpu:minex4", target_config=str(cfg))
    assert (mine.memory_bytes, mine.num_devices, mine.peak_flops) == (GIB, 4, None)
    for bad, match in [
        ("tpu:v5e-6", "power of two"),
        ("tpu:v5p-2", "smallest v5p slice has 4 chips"),
        ("tpu:v9-8", "expected tpu:<gen>-<chips>"),
        ("gpu:h100", "expected gpu:<model>x<count>"),
        ("gpu:b300x8", "no GPU description 'b300'"),
        ("gpu:h100x12", "8 per host"),
        ("trn:x", "expected cpu"),
    ]:
        with pytest.raises(ValueError, match=match):
            ct.parse_target(bad)
    with pytest.raises(ValueError, match="no such file"):
        ct.parse_target("gpu:h100x1", target_config=str(tmp_path / "missing"))


def test_roofline_bound_is_the_slower_of_compute_and_memory():
    v5p = ct.parse_target("tpu:v5p-8")
    assert ct.roofline_seconds(v5p, 459e12, 0.0) == pytest.approx(1.0)
    assert ct.roofline_seconds(v5p, 1.0, 2 * 2765e9) == pytest.approx(2.0)
    assert math.isnan(ct.roofline_seconds(ct.parse_target("cpu"), 1.0, 1.0))


def _check_programs(results, impl, kernel_programs):
    """What a real compile for the target must show."""
    by = {r["program"]: r for r in results}
    assert sorted(by) == sorted(mp.PROGRAMS)
    for name, r in by.items():
        assert r["attention"] == impl
        # the fused kernel really compiled (not a fallback): its custom calls are in the HLO
        if name in kernel_programs:
            assert r["attention_kernel_calls"] > 0, name
        assert r["fits_target_headroom"] is True
        m = r["per_device_bytes"]
        assert 0 < m["arguments"] and m["total"] == (
            m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
        )
    # bf16 programs (the bf16 reference, the rollout's bf16 weights) hold no float32 copy of
    # their weights; the float32 update has none to check
    assert by["update"]["f32_weight_copies"] is None
    for name in ("ref_logps", "prefill", "decode"):
        assert by[name]["f32_weight_copies"] == 0, name
    return by


def test_cpu_plan_upcasts_bf16_weights_which_the_check_sees():
    """The check above can fail: CPU XLA computes bf16 dots in float32 (a float32 copy of the
    rollout's bf16 weights), which is why a cpu plan overstates bf16 programs."""
    (r,) = mp.plan(mp.PlanSpec(mesh=(("data", 1),), programs=("decode",), **TINY))
    assert r["attention"] == "chunked" and r["target"]["name"] == "cpu"
    assert r["f32_weight_copies"] > 0


def test_tpu_v5e_compiles_the_four_programs_with_splash():
    _needs("tpu")
    target = ct.parse_target("tpu:v5e-4")
    # (data=2: the weights' per-device shapes are their full shapes, which none of the tiny
    # model's activations share; a split weight's half can be an activation's shape)
    results = mp.plan(mp.PlanSpec(mesh=(("data", 2),), **TINY), target=target)
    by = _check_programs(results, "splash", ("update", "ref_logps", "prefill"))
    assert by["update"]["devices"] == 2 and by["update"]["target"]["topology"] == "v5e:2x2"
    for r in results:
        # the TPU compiler's cost analysis (a while body counted once) and the model's floor:
        # the bound is the larger of the two rooflines at v5e's peaks
        assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["model_flops"] > 0
        compiler = max(r["flops"] / 197e12, r["bytes_accessed"] / 819e9)
        model = max(r["model_flops"] / 197e12, r["min_bytes"] / 819e9)
        assert r["roofline_seconds"] == pytest.approx(max(compiler, model))
    # decode reads the rollout's (replicated, bf16) weights once per generated token
    dec = by["decode"]
    assert dec["min_bytes"] == dec["rollout_weights_bytes_per_device"] * TINY["completion_len"]
    bound = mp.step_bound(results)
    assert bound["seconds"] > by["update"]["roofline_seconds"] and "lower bound" in bound["label"]


def test_h100_compiles_with_cudnn_on_a_two_device_mesh():
    """The cuDNN fused-attention backward's partitioner needs q, k and v sharded alike; before
    layers._same_sharding the update failed to compile on every 2-device mesh (data / fsdp /
    tensor = 2)."""
    _needs("cuda")
    target = ct.parse_target("gpu:h100x2")
    results = mp.plan(mp.PlanSpec(mesh=(("data", 2),), **TINY), target=target)
    by = _check_programs(results, "cudnn", ("update", "ref_logps", "prefill"))
    assert by["update"]["target"]["topology"] == "1x1x2"


def test_script_target_json_and_usage_errors(repo_root):
    _needs("tpu")
    script = str(repo_root / "scripts" / "plan_memory.py")
    env = dict(os.environ, XLA_FLAGS="")
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    ok = subprocess.run(
        [sys.executable, script, "--target=tpu:v5p-4", "--mesh=data=2", "--programs=ref_logps",
         "--json", *flags],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = [json.loads(x) for x in ok.stdout.splitlines() if x.startswith("{")]
    (r,), bound = lines[:-1], lines[-1]["step_bound"]
    assert (r["program"], r["attention"], r["target"]["topology"]) == (
        "ref_logps",
        "splash",
        "v5p:2x2x1",
    )
    assert bound["seconds"] == pytest.approx(r["roofline_seconds"])
    for bad, match in [
        (["--target=tpu:v5p-3"], "power of two"),
        (["--target=tpu:v5p-4", "--mesh=fsdp=8"], "needs 8 devices; --target=tpu:v5p-4 has 4"),
    ]:
        out = subprocess.run(
            [sys.executable, script, *bad, *flags], capture_output=True, text=True, env=env,
            timeout=600, check=False,
        )  # fmt: skip
        assert out.returncode == 2 and match in out.stderr, out.stderr[-2000:]
