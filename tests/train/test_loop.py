"""The training loop against a fake stage: it only wires (steps, window-mean metrics, periodic
evaluation, checkpoints, the non-finite stop), knowing nothing of SFT or GRPO."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from tatar_jax.data.batch import ReadStats
from tatar_jax.train import checkpointing, loop, metric_writers, optim


@struct.dataclass
class _Rows:
    attention_mask: Any


@struct.dataclass
class _Vision:
    pixel_values: Any


@struct.dataclass
class _Batch:
    """The loop reads a step batch's ``rows.attention_mask`` and ``vision.pixel_values``."""

    rows: _Rows
    vision: _Vision


class FakeStage:
    """Each step: gradient 1 on one scalar (SGD lr 0.5); the loss is the mean pixel, so a NaN
    pixel (the loop's test hook) makes the update non-finite."""

    name = "fake"
    updates_per_step = 1

    def __init__(self) -> None:
        self.tx = optax.sgd(0.5)
        self.after: list[int] = []

    def prepare(self, state, batch, timer):
        with timer("fake_host"):
            rows = _Rows(np.ones((2, 3), np.int32))
            inputs = _Batch(rows, _Vision(np.zeros((4, 2), np.float32)))
        return inputs, {"host/i": float(batch.i)}

    def update(self, state, inputs):
        loss = jnp.mean(inputs.vision.pixel_values)
        grads = {"w": jnp.ones(())}
        new, info = optim.apply_gradients(state, grads, self.tx, loss=loss)
        return new, {"loss": loss, **info}

    def step_metrics(self, inputs):
        return {"stage/rows": float(len(inputs.rows.attention_mask))}

    def after_step(self, step, batch):
        self.after.append(step)


@struct.dataclass
class _Data:
    """What the loop reads of a pipeline batch (``stats``) and the fake stage's counter."""

    i: int = struct.field(pytree_node=False)
    stats: ReadStats = struct.field(pytree_node=False)


def _env(tmp_path, *, total, inject=(), max_nonfinite=0, evaluator=None):
    stats = lambda i: ReadStats(skipped_by_dataset=(("a", i // 3),))  # noqa: E731
    batches = iter([_Data(i, stats(i)) for i in range(1, 100)])
    return loop.LoopEnv(
        data_iter=batches,
        next_batch=lambda: next(batches),
        put=lambda x: jax.tree.map(jnp.asarray, x),
        checkpointer=checkpointing.Checkpointer(
            tmp_path, every_steps=100, async_save=False, with_data=False
        ),
        writer=metric_writers.MetricsWriter(tmp_path, tensorboard=False, console=False),
        evaluator=evaluator,
        total=total,
        log_every=2,
        eval_every=2,
        max_consecutive_nonfinite=max_nonfinite,
        flops_per_token=lambda inputs, batch: 0.0,
        inject_nonfinite_steps=frozenset(inject),
        progress=False,
    )


def _state(stage):
    return optim.TrainState.create({"w": jnp.zeros(())}, stage.tx, jax.random.key(0))


def test_loop_runs_logs_window_means_and_evaluates(tmp_path):
    stage = FakeStage()
    calls = []
    env = _env(tmp_path, total=5, inject=(3,), evaluator=lambda p: calls.append(p) or {"eval/x": 1})
    res = loop.train_loop(stage, _state(stage), env, start=0)
    env.writer.close()
    env.checkpointer.close()
    assert res.step == 5 and res.stopped == "" and stage.after == [1, 2, 3, 4, 5]
    # 5 steps, one skipped (the NaN pixel at step 3): w = -0.5 * 4
    assert float(res.state.params["w"]) == -2.0 and int(res.state.nonfinite_total) == 1
    assert len(calls) == 2 and res.eval_last == {"eval/x": 1}  # steps 2 and 4, not the last
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "host/i" in r]
    assert [r["step"] for r in train] == [2, 4, 5]
    assert [r["host/i"] for r in train] == [1.5, 3.5, 5.0]  # window means
    assert [r["update_skipped"] for r in train] == [0.0, 0.5, 0.0]
    assert train[0]["stage/rows"] == 2.0 and train[0]["tokens_per_sec"] > 0
    assert "time/fake_host" in train[0] and "time/update" in train[0]
    assert res.last["host/i"] == 5.0
    # Skipped-record counts are running totals: the logged value is the latest, not a mean.
    assert [r["data/skipped/a"] for r in train] == [0.0, 1.0, 1.0]
    assert train[-1]["data/skipped_total"] == 1.0


def test_loop_stops_after_consecutive_nonfinite_updates_and_checkpoints(tmp_path):
    stage = FakeStage()
    env = _env(tmp_path, total=10, inject=(2, 3), max_nonfinite=2)
    with pytest.raises(loop.TrainingStopped, match="fake stopped at step 3: 2 non-finite"):
        loop.train_loop(stage, _state(stage), env, start=0)
    env.checkpointer.wait()
    assert env.checkpointer.all_steps() == [3]
    env.writer.close()
    env.checkpointer.close()
