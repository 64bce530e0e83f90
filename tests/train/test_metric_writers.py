"""The run's metric writers (JSONL + TensorBoard, process 0 only), step timer, progress bar and
windowed means."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tatar_jax.train import metric_writers


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = metric_writers.MetricsWriter(tmp_path, console=False, process_index=0)
    assert w.write(2, {"loss": np.float32(0.5), "lr": np.asarray([1e-6])})
    assert w.write(3, {"loss": float("nan")})
    w.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 3]
    assert recs[0]["loss"] == 0.5 and recs[0]["lr"] == pytest.approx(1e-6)
    assert np.isnan(recs[1]["loss"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="scalar"):
        w = metric_writers.MetricsWriter(tmp_path, console=False, process_index=0)
        w.write(0, {"x": [1, 2]})
    other = tmp_path / "other"
    w1 = metric_writers.MetricsWriter(other, process_index=1)
    assert not w1.write(0, {"loss": 1.0})
    assert not other.exists()  # non-zero processes write nothing


def test_step_timer_and_progress():
    timer = metric_writers.StepTimer()
    with timer("rollout"):
        pass
    with timer("update"):
        pass
    m = timer.metrics()
    assert set(m) == {"time/rollout", "time/update", "time/step"}
    assert m["time/step"] == pytest.approx(m["time/rollout"] + m["time/update"])
    assert timer.metrics() == {"time/step": 0.0}
    bar = metric_writers.Progress(10, initial=3, enabled=False)
    bar.update(1, loss=np.float32(0.1))
    bar.close()


def test_window_mean_averages_each_key_over_the_steps_that_have_it():
    w = metric_writers.WindowMean()
    w.add({"reward_total/iaa": 1.0, "reward_total/iqa": 0.5, "lr": 3e-4, "loss": 2.0})
    w.add({"reward_total/iqa": 1.5, "lr": 2e-4, "loss": np.float32(4.0)})
    out = w.pop()
    assert out == {"reward_total/iaa": 1.0, "reward_total/iqa": 1.0, "loss": 3.0, "lr": 2e-4}
    assert w.pop() == {}
