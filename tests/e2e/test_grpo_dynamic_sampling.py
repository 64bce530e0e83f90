"""GRPO dynamic sampling end to end (scripts' ``trainer.run`` in subprocesses, tiny model): the
IAA rewards are switched off, so every IAA group has zero reward variance; with
``grpo.dynamic_sampling.enabled`` no IAA group is trained on, the drops and extra draws are in
metrics.jsonl, a ``kill -9`` resume ends bit-identical to an uninterrupted run (the data
iterator's position includes the extra draws), and 2 processes make the choices of 1.
Configs and readers: tests/helpers/tiny_runs.py."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from tiny_runs import final_params, max_diff, records, tiny_config
from train_runs import finish, start_workers, worker_env

TOTAL = 4

_RUN = """
import os, sys, time
import train_runs
cfg = train_runs.worker_config()
cfg.total_steps = int(sys.argv[6])
cfg.grpo.prompts_per_step = int(sys.argv[7])
cfg.checkpoint.every_steps = int(sys.argv[8])
cfg.grpo.dynamic_sampling.enabled = True
for k in list(cfg.rewards.weights.iaa.keys()):
    cfg.rewards.weights.iaa[k] = 0.0  # every IAA group: reward 0 for all G completions
from tatar_jax.train import stages, trainer
pause = float(os.environ.get("STEP_PAUSE", "0"))  # room for the test's kill -9
after = stages.GrpoStage.after_step
def after_step(self, step, batch):
    after(self, step, batch)
    print("STEP", step, flush=True)
    time.sleep(pause)
stages.GrpoStage.after_step = after_step
trainer.run(cfg, sys.argv[5])
"""


def _start(workdir, *, nproc=1, devices=1, prompts=2, env=None, every=1):
    """The ``nproc`` workers of one run (argv: ..., workdir, total steps, prompts, ckpt every)."""
    return start_workers(_RUN, nproc, devices, workdir, TOTAL, prompts, every, env=env)


def _ds(recs):
    return [{k: v for k, v in r.items() if k.startswith("dynamic_sampling/")} for r in recs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("full") / "run"
    finish(*_start(wd), timeout=2400)
    return wd


@pytest.mark.slow
def test_no_zero_variance_group_is_trained_and_counts_are_logged(uninterrupted):
    recs = records(uninterrupted)
    assert [r["step"] for r in recs] == list(range(1, TOTAL + 1))
    for r in recs:
        assert "reward_total/iaa" not in r  # no valid IAA row in any update batch
        assert r["valid_prompts"] + r["dynamic_sampling/empty_slots"] == 2
        assert r["dynamic_sampling/extra_rollouts"] == r["dynamic_sampling/extra_batches"] * 2 * 4
    dropped = sum(r["dynamic_sampling/dropped_groups/iaa"] for r in recs)
    assert dropped > 0 and sum(r["dynamic_sampling/extra_batches"] for r in recs) > 0
    assert all(r["dynamic_sampling/dropped_groups/iqa"] == 0 for r in recs)


@pytest.mark.slow
def test_kill9_resume_is_bit_identical(uninterrupted, tmp_path):
    from tatar_jax.train import checkpointing

    wd = tmp_path / "run"
    (proc,) = _start(wd, env=worker_env(STEP_PAUSE="5"))
    t0 = time.time()
    while checkpointing.latest_step_on_disk(wd) in (None, 0):
        assert proc.poll() is None and time.time() - t0 < 900, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    killed_after = checkpointing.latest_step_on_disk(wd)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_after < TOTAL
    out = finish(*_start(wd), timeout=2400)
    assert "resumed grpo" in out
    cfg = tiny_config(num_devices=1)
    want, got = final_params(uninterrupted, cfg), final_params(wd, cfg)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the resumed steps drew the same extra batches and dropped the same groups
    full = {r["step"]: r for r in records(uninterrupted)}
    resumed = [r for r in records(wd) if r["step"] > killed_after]
    assert resumed and _ds(resumed) == _ds([full[r["step"]] for r in resumed])
    for r in resumed:
        assert r["loss"] == full[r["step"]]["loss"]
    print(f"[dynamic sampling] killed after step {killed_after}, resumed to {TOTAL}: "
          "parameters bit-identical")  # fmt: skip


@pytest.mark.slow
def test_two_processes_choose_as_one(tmp_path):
    """2 processes x 1 device (2 prompts each) == 1 process x 2 devices (4 prompts): same
    drops, extra draws and parameters."""
    two = _start(tmp_path / "two", nproc=2, prompts=4, every=100)
    one = _start(tmp_path / "one", devices=2, prompts=4, every=100)
    for p in [*two, *one]:
        finish(p, timeout=2400)
    rec_one, rec_two = records(tmp_path / "one"), records(tmp_path / "two")
    assert _ds(rec_two) == _ds(rec_one)
    assert sum(r["dynamic_sampling/dropped_groups/iaa"] for r in rec_one) > 0
    cfg = tiny_config(num_devices=1)
    d = max_diff(final_params(tmp_path / "two", cfg), final_params(tmp_path / "one", cfg))
    print(f"[dynamic sampling] 2 processes vs 1: max|Δ params| {d:.2e}")
    assert d < 1e-6
