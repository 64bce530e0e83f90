"""Two real JAX processes x 2 CPU devices (``jax.distributed`` on localhost, gloo collectives)
end a GRPO and an SFT run with the parameters of one process with 4 devices (same global batch).
The one-process meshes are tests/train/test_train_mesh.py; configs and readers (why the rewards
move and Adam's eps is raised): tests/helpers/tiny_runs.py.
"""

from __future__ import annotations

import pytest
from tiny_runs import (
    eval_records,
    final_params,
    final_params_init,
    max_diff,
    records,
    tiny_config,
)
from train_runs import finish, start_workers

# --------------------------------------------------------------------------------------------
# Two real processes

_PROCESS = """
import sys
import train_runs
cfg = train_runs.worker_config()
cfg.grpo.prompts_per_step = 4  # 2 prompts per process
import jax
import tiny_runs as t
from tatar_jax.train import trainer
trainer.run(cfg, sys.argv[5] + "/grpo")
sft = t.tiny_sft_config(fsdp=-1)
sft.mesh = cfg.mesh
trainer.run(sft, sys.argv[5] + "/sft")
nproc = int(sys.argv[3])
assert jax.process_count() == nproc and jax.device_count() == 4, jax.devices()
"""


@pytest.mark.slow
def test_grpo_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 CPU devices (fsdp=4 over both, 2 prompts per process) == 1 process x 4
    devices with the same 4-prompt global batch: same parameters after 2 GRPO steps, same
    (global-batch) reward metrics on both processes."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    procs = start_workers(_PROCESS, 2, 2, two) + start_workers(_PROCESS, 1, 4, one)
    for p in procs:
        finish(p, timeout=900)
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
    rec_one, rec_two = records(f"{one}/grpo"), records(f"{two}/grpo")
    assert [r["step"] for r in rec_two] == [1, 2]
    for r, w in zip(rec_two, rec_one, strict=True):
        assert r["valid_prompts"] == w["valid_prompts"] == 4  # the global batch
        for k in ("reward_mean", "reward_total/all", "completion_len/all", "loss"):
            assert r[k] == pytest.approx(w[k], abs=1e-5), k
    sft_one, sft_two = records(f"{one}/sft"), records(f"{two}/sft")
    for r, w in zip(sft_two, sft_one, strict=True):
        assert r["loss"] == pytest.approx(w["loss"], abs=1e-5)
    ev_one, ev_two = eval_records(f"{one}/sft"), eval_records(f"{two}/sft")
    assert ev_two and ev_two.keys() == ev_one.keys()
    assert ev_two["eval/synthetic-iqa-test/n"] == 2  # every held-out row once, not per process
    for k, v in ev_one.items():
        assert v == pytest.approx(ev_two[k], abs=1e-6, nan_ok=True), k
