"""A tiny GRPO run with the optimizer state, the reference copy and the float32 master weights in
host memory (tatar_jax.train.offload, ``config.offload.mode="always"``; mu = 2, so the pi_old pass
fetches the weights alone), killed with SIGKILL after a checkpoint and restarted, ends with the
train state and the losses of an uninterrupted run without offload, bit for bit. Each run is its
own process (``trainer.run``, tests/helpers/tiny_runs.py's config)."""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs
import train_runs

TOTAL = 3
PARTS = ("opt_state", "reference", "params")

_RUN = """
import os, sys, time
import tiny_runs
from tatar_jax.train import stages, trainer
cfg = tiny_runs.tiny_config()
cfg.total_steps = int(sys.argv[3])
cfg.grpo.beta = 0.04  # the reference pass runs (its copy is offloaded too)
cfg.grpo.num_iterations = 2  # a pi_old pass of the policy (offload "always": params only)
cfg.checkpoint.every_steps = 1
cfg.checkpoint.keep = 5
cfg.checkpoint.async_save = False
cfg.offload.mode = sys.argv[2]
cfg.offload.parts = tuple(sys.argv[4].split(","))
pause = float(os.environ.get("STEP_PAUSE", "0"))  # room for the test's SIGKILL
after = stages.GrpoStage.after_step
def after_step(self, step, batch):
    after(self, step, batch)
    print("STEP", step, flush=True)
    time.sleep(pause)
stages.GrpoStage.after_step = after_step
trainer.run(cfg, sys.argv[1])
"""


def _start(workdir: pathlib.Path, mode: str, pause: float = 0.0) -> subprocess.Popen:
    env = train_runs.worker_env(JAX_PLATFORMS="cpu", STEP_PAUSE=str(pause))  # one CPU device
    args = [str(workdir), mode, str(TOTAL), ",".join(PARTS)]
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, *args], cwd=train_runs.ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _final_state(wd: pathlib.Path) -> dict[str, np.ndarray]:
    with ocp.PyTreeCheckpointer() as c:
        tree = c.restore(wd / "checkpoints" / str(TOTAL) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(tree)}  # fmt: skip


@pytest.mark.slow
def test_offload_kill9_resume_equals_uninterrupted_run_without_offload(tmp_path):
    from tatar_jax.train import checkpointing

    never = _start(tmp_path / "never", "never")
    wd = tmp_path / "killed"
    proc = _start(wd, "always", pause=30.0)
    t0 = time.time()
    # SIGKILL once a checkpoint is on disk, while the run (offload on) waits before its next step
    while checkpointing.latest_step_on_disk(wd) in (None, 0):
        assert proc.poll() is None and time.time() - t0 < 1200, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    killed_after = checkpointing.latest_step_on_disk(wd)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 0 < killed_after < TOTAL
    train_runs.finish(never, 1800)
    out = train_runs.finish(_start(wd, "always"), 1800)
    assert re.search(rf"resumed grpo from \S+/{killed_after}\b", out), out[-3000:]
    want, got = _final_state(tmp_path / "never"), _final_state(wd)
    assert any("opt_state" in k for k in want) and len(want) > 20
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    full = {r["step"]: r for r in tiny_runs.records(tmp_path / "never")}
    assert len(full) == TOTAL and any(r.get("kl", 0.0) != 0.0 for r in full.values())
    resumed = [r for r in tiny_runs.records(wd) if r["step"] > killed_after]
    assert [r["step"] for r in resumed] == list(range(killed_after + 1, TOTAL + 1))
    for r in resumed:
        for key in ("loss", "kl", "grad_norm"):
            assert r[key] == full[r["step"]][key], (r["step"], key)
    print(f"[offload] SIGKILL after step {killed_after}, resumed to {TOTAL} with offload: "
          f"{len(want)} state leaves bit-identical to the run without offload")  # fmt: skip
