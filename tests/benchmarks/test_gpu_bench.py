"""benchmarks/gpu/run.sh --dry_run: the one-shot accelerator benchmark's code runs on CPU with
tiny shapes and writes every JSON section (the real run is only possible on a GPU)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(RUN), *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--dry_run", f"--out={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["backend"] == "cpu"
    assert set(r["sections"]) == {"attention", "update", "rollout"}
    assert not any("error" in s for s in r["sections"].values()), r["sections"]

    att = r["sections"]["attention"]
    assert att["impls"] == ["xla", "chunked"]  # no cuDNN / splash on CPU
    assert {row["shape"]["name"] for row in att["results"]} == {"decoder_tiny", "vision_tiny"}
    for row in att["results"]:
        chunked = row["impls"]["chunked"]
        assert chunked["max_abs_diff_out"] < 1e-5 and chunked["max_abs_diff_grad"] < 1e-5
        assert chunked["fwd_s"] > 0 and chunked["fwd_bwd_s"] > 0
        assert row["impls"]["xla"]["fwd_speedup_vs_xla"] == 1.0

    upd = r["sections"]["update"]
    assert upd["rows"] == 4 and math.isfinite(upd["loss"]) and upd["step_s"] > 0
    assert upd["analytic_flops_per_step"] > 0 and upd["planned_bytes"] > 0
    assert upd["mfu_analytic"] is None  # no peak FLOP/s for a CPU: no made-up MFU

    (roll,) = r["sections"]["rollout"]["results"]
    assert roll["model"] == "tiny" and roll["rows"] == 2 and roll["weights_bytes"] > 0
    assert any(k.startswith("update/") for k in r["compile"])
    assert any(k.startswith("rollout/") for k in r["compile"])


def test_unknown_section_is_a_usage_error(tmp_path):
    proc = _run("--dry_run", "--sections=attention,nope", f"--out={tmp_path / 'x.json'}")
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr
