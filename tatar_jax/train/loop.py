"""The training loop: batch -> stage.prepare -> device -> stage.update -> metrics, checkpoint, eval.

It knows no stage: a :class:`tatar_jax.train.stages.Stage` supplies how a batch becomes step
inputs (GRPO: the rollout and rewards), its compiled update and its extra metrics; a
:class:`LoopEnv` supplies the data, the device placement, the checkpointer, the metrics writer
and the evaluator. Resume is the caller's (the checkpointer restored ``state`` and the data
iterator before the loop starts at ``start``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from tatar_jax import sharding
from tatar_jax.train import checkpointing, flop_model, metric_writers, optim

Batch = Any  # a pipeline batch (tatar_jax.data.batch.Batch); test loops feed others


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive updates were non-finite."""


@dataclasses.dataclass
class LoopEnv:
    """What the loop needs besides the stage and the state.

    ``next_batch()`` returns the step's global host batch; ``put`` moves step inputs to the
    devices; ``rules`` is entered around the update (activation sharding constraints);
    ``flops_per_token(inputs, batch)`` gives the MFU numerator (0: unknown).
    """

    data_iter: Iterator[Batch]
    next_batch: Callable[[], Batch]
    put: Callable[[Any], Any]
    checkpointer: checkpointing.Checkpointer
    writer: metric_writers.MetricsWriter
    evaluator: Callable[[Any], dict[str, float]] | None
    total: int
    log_every: int
    eval_every: int
    max_consecutive_nonfinite: int
    flops_per_token: Callable[[Any, Batch], float]
    rules: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    inject_nonfinite_steps: frozenset[int] = frozenset()  # test hook: NaN pixels at these steps
    progress: bool = True


@dataclasses.dataclass
class LoopResult:
    state: optim.TrainState
    step: int
    last: dict[str, float]  # the last step's metrics
    eval_last: dict[str, float]
    stopped: str = ""  # "" | "preempted" | why it stopped


def _poison(inputs: Any) -> Any:
    """The non-finite test hook: a copy of the step batch with one NaN pixel (the step's loss
    is then non-finite)."""
    pv = np.array(inputs.vision.pixel_values)
    pv[0, 0] = np.nan
    return inputs.replace(vision=inputs.vision.replace(pixel_values=pv))


def data_metrics(batch: Batch) -> dict[str, float]:
    """``data/skipped/<dataset>``: records skipped so far (manifest rows the loader rejected +
    records that could not be read; this host's) and ``data/skipped_total``."""
    stats = getattr(batch, "stats", None)  # a pipeline batch's (test loops feed others)
    if stats is None:
        return {}
    counts = dict(stats.skipped_by_dataset)
    out = {f"data/skipped/{k}": float(v) for k, v in counts.items()}
    out["data/skipped_total"] = float(sum(counts.values()))
    return out


def _scalars(m: Any) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in m.items() if np.ndim(v) == 0}


def train_loop(stage: Any, state: optim.TrainState, env: LoopEnv, start: int) -> LoopResult:
    """Runs steps ``start + 1 .. env.total`` of ``stage``; returns where it ended."""
    timer, window = metric_writers.StepTimer(), metric_writers.WindowMean()
    progress = metric_writers.Progress(
        env.total, initial=start, enabled=env.progress, desc=stage.name
    )
    ckpt, step, last, eval_last, flops_tok = env.checkpointer, start, {}, {}, None
    if env.writer.total is None:
        env.writer.total = env.total  # the console's ETA
    try:
        while step < env.total:
            with timer("data"):
                batch = env.next_batch()
            inputs, host_metrics = stage.prepare(state, batch, timer)
            if step + 1 in env.inject_nonfinite_steps:
                inputs = _poison(inputs)
            dev = env.put(inputs)
            with timer("update"), env.rules():
                state, m = stage.update(state, dev)
                m = jax.tree.map(sharding.to_host, m)
            step += 1
            times = timer.metrics()
            out = {**_scalars(m), **host_metrics, **times, **stage.step_metrics(inputs)}
            out.update(data_metrics(batch))
            n_tok = float(np.asarray(inputs.rows.attention_mask).sum())
            out["tokens_per_sec"] = n_tok * stage.updates_per_step / max(times["time/update"], 1e-9)
            out["nonfinite_total"] = float(sharding.to_host(state.nonfinite_total))
            if flops_tok is None:
                flops_tok = env.flops_per_token(inputs, batch)
            mfu = flop_model.mfu(out["tokens_per_sec"], flops_tok, jax.device_count())
            if mfu is not None:
                out["mfu"] = mfu
            last = out
            window.add(out)
            if step == env.total or step % max(env.log_every, 1) == 0:
                env.writer.write(step, window.pop())
            stage.after_step(step, batch)
            progress.update(1, loss=out.get("loss", math.nan))
            if optim.should_stop(state, env.max_consecutive_nonfinite):
                why = f"{int(state.nonfinite_count)} non-finite updates in a row"
                ckpt.save(step, state, data_iter=env.data_iter, force=True, meta={"stopped": why})
                raise TrainingStopped(f"{stage.name} stopped at step {step}: {why}")
            ckpt.save(step, state, data_iter=env.data_iter, meta={"stage": stage.name})
            if ckpt.reached_preemption(step):
                meta = {"preempted": True}
                ckpt.save(step, state, data_iter=env.data_iter, force=True, meta=meta)
                return LoopResult(state, step, last, eval_last, "preempted")
            if env.evaluator is not None and env.eval_every > 0 and step % env.eval_every == 0:
                if step < env.total:
                    eval_last = env.evaluator(state.params)
                    env.writer.write(step, eval_last)
    finally:
        progress.close()
    return LoopResult(state, step, last, eval_last)
