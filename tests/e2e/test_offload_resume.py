"""A tiny GRPO run with the optimizer state and the reference copy in host memory
(tatar_jax.train.offload, config.offload) ends with the train state of the run without offload, bit
for bit, uninterrupted and resumed from its step-1 checkpoint."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_runs

from tatar_jax.train import trainer


def _config(mode):
    cfg = tiny_runs.tiny_config()
    cfg.grpo.beta = 0.04  # the reference pass runs (its copy is offloaded too)
    cfg.checkpoint.every_steps = 1
    cfg.checkpoint.keep = 5
    cfg.offload.mode = mode
    cfg.offload.parts = ("opt_state", "reference")
    return cfg


def _final_state(wd, step=2):
    with ocp.PyTreeCheckpointer() as c:
        tree = c.restore(wd / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(tree)}  # fmt: skip


@pytest.mark.slow
def test_grpo_with_offload_equals_without_and_resumes_bit_identically(tmp_path):
    trainer.run(_config("never"), tmp_path / "never")
    trainer.run(_config("always"), tmp_path / "always")
    # a run killed after its step-1 checkpoint (step 2 never written), restarted with offload
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "always", resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    trainer.run(_config("always"), resumed)
    want = _final_state(tmp_path / "never")
    assert any("opt_state" in k for k in want) and len(want) > 20
    for name in ("always", "resumed"):
        got = _final_state(tmp_path / name)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    losses = [r["loss"] for r in tiny_runs.records(tmp_path / "never")]
    assert losses == [r["loss"] for r in tiny_runs.records(tmp_path / "always")]
    assert any(r.get("kl", 0.0) != 0.0 for r in tiny_runs.records(tmp_path / "never"))
