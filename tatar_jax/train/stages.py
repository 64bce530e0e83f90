"""The two training stages as objects the loop drives (Tunix-style): SFT and GRPO.

A stage supplies

- ``name`` ("sft" | "grpo") and ``updates_per_step`` (GRPO's mu);
- ``prepare(state, batch, timer) -> (StepInputs, host metrics)``: the host side of a step
  (SFT: the step inputs of a pipeline batch; GRPO: rollout, rewards, group advantages);
- ``update(state, device_inputs) -> (state, metrics)``: its compiled step(s);
- ``step_metrics(inputs)`` and ``after_step(step, batch)``: extra metrics and records.

Batches follow :mod:`tatar_jax.train.inputs`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
import optax
from flax import nnx

from tatar_jax.train import grpo_step, optim, rollout, sft_step
from tatar_jax.train import inputs as step_inputs

PyTree = Any


class Stage(Protocol):
    name: str
    updates_per_step: int

    def prepare(self, state: optim.TrainState, batch: Mapping[str, Any], timer: Any) -> tuple[
        step_inputs.StepInputs, dict[str, float]
    ]: ...  # fmt: skip

    def update(self, state: optim.TrainState, inputs: Any) -> tuple[optim.TrainState, dict]: ...

    def step_metrics(self, inputs: step_inputs.StepInputs) -> dict[str, float]: ...

    def after_step(self, step: int, batch: Mapping[str, Any]) -> None: ...


class SftStage:
    """Stage 1 (spec §6): span cross-entropy on teacher rationales (``config.sft``)."""

    name = "sft"
    updates_per_step = 1

    def __init__(
        self,
        cfg: Any,
        model_config: Any,
        graphdef: nnx.GraphDef,
        tx: optax.GradientTransformation,
        *,
        trainable: PyTree,
        schedule: optax.Schedule,
    ) -> None:
        self.model_config = model_config
        self.num_micro = int(cfg.optimizer.grad_accum_steps)
        # Target packing sums tokens, so it serves token_mean only.
        token_mean = cfg.sft.loss_normalization == "token_mean"
        self.pack_buckets = int(cfg.sft.pack_buckets) if token_mean else 0
        self.step_fn = jax.jit(
            sft_step.make_sft_step(
                graphdef, tx, grad_accum_steps=self.num_micro, trainable=trainable,
                normalization=cfg.sft.loss_normalization,
                chunk_size=int(cfg.model.logprob_chunk_size), schedule=schedule,
            ),
            donate_argnums=(0,),
        )  # fmt: skip

    def prepare(self, state, batch, timer):
        del state, timer
        inputs = step_inputs.sft_inputs(
            batch, self.model_config, num_micro=self.num_micro, pack_buckets=self.pack_buckets
        )
        return inputs, {}

    def update(self, state, inputs):
        return self.step_fn(state, inputs)

    def step_metrics(self, inputs):
        return {}

    def after_step(self, step, batch):
        pass


class GrpoStage:
    """Stage 2 (spec §7): G samples per prompt, TATAR rewards over the global batch, group
    advantages, the reference log-probs (beta > 0), pi_old (mu > 1), mu clipped updates."""

    name = "grpo"

    def __init__(
        self,
        cfg: Any,
        model: nnx.Module,
        tok: Any,
        graphdef: nnx.GraphDef,
        tx: optax.GradientTransformation,
        *,
        trainable: PyTree,
        schedule: optax.Schedule,
        ref_params: PyTree,
        num_rows: int,
        workdir: pathlib.Path,
        mesh: Any = None,
        rules: Any = None,
    ) -> None:
        g = cfg.grpo
        self.beta, self.updates_per_step = float(g.beta), int(g.num_iterations)
        self.ref_params, self.workdir = ref_params, workdir
        self.pack_buckets = int(g.pack_buckets)
        self.samples, self.samples_every = int(cfg.logging.samples), int(cfg.logging.every_steps)
        self.engine = rollout.RolloutEngine(
            model, tok, g, cfg.rewards, prompt_buckets=tuple(cfg.data.seq_buckets),
            mesh=mesh, rules=rules, rollout_cfg=cfg.rollout,
        )  # fmt: skip
        self.num_micro = num_micro(cfg, num_rows)
        chunk, temp = int(cfg.model.logprob_chunk_size), float(g.temperature)
        self.step_fn = jax.jit(
            grpo_step.make_grpo_step(
                graphdef, tx, num_micro=self.num_micro, epsilon=float(g.epsilon),
                epsilon_high=g.epsilon_high, beta=self.beta, aggregation=g.loss_aggregation,
                temperature=temp, chunk_size=chunk, trainable=trainable, schedule=schedule,
            ),
            donate_argnums=(0,),
        )  # fmt: skip
        self.logps_fn = jax.jit(
            grpo_step.make_logps_fn(
                graphdef, temperature=temp, chunk_size=chunk, num_micro=self.num_micro
            )
        )
        self.last: rollout.Rollout | None = None

    def prepare(self, state, batch, timer):
        with timer("rollout"):
            # once per optimizer step: the policy -> the rollout's weights (compute dtype, own
            # layout), used for this step's generation only
            out = self.engine.generate(state.params, batch, optim.rng_for_step(state, 1))
        with timer("reward"):
            ro = self.engine.score(batch, out)
        self.last = ro
        inputs = ro.inputs
        slots = step_inputs.pack_slots(
            inputs["rows"]["completion_mask"], self.num_micro, self.pack_buckets
        )
        if slots is not None:  # only counted completion tokens through the lm_head
            inputs["shared"]["pack_slots"] = slots
        return inputs, dict(ro.metrics)

    def update(self, state, inputs):
        rows = inputs["rows"]
        if self.beta != 0.0:
            rows["ref_logps"] = self.logps_fn(self.ref_params, inputs)
        if self.updates_per_step > 1:
            rows["old_logps"] = self.logps_fn(state.params, inputs)
        for _ in range(self.updates_per_step):
            state, m = self.step_fn(state, inputs)
        return state, m

    def step_metrics(self, inputs):
        ro = self.last
        cm = np.asarray(inputs["rows"]["completion_mask"])
        valid = cm.sum(axis=1) > 0
        lp = (ro.rollout_logps * cm).sum() / max(cm.sum(), 1.0)
        reward = float(ro.rewards[valid].mean()) if valid.any() else 0.0
        return {"rollout_logp_mean": float(lp), "reward_mean": reward}

    def after_step(self, step, batch):
        if jax.process_index() == 0:
            log_samples(self.workdir, step, batch, self.last, self.samples, self.samples_every)


def num_micro(cfg: Any, n_rows: int) -> int:
    """Row micro-batches of a GRPO update: ``grpo.mini_batch_size`` rows each (0: accumulate
    over ``optimizer.grad_accum_steps`` slices)."""
    mb = int(cfg.grpo.mini_batch_size)
    if mb > 0:
        if n_rows % mb:
            raise ValueError(f"{n_rows} completions per step not divisible by mini_batch_size {mb}")
        return n_rows // mb
    a = int(cfg.optimizer.grad_accum_steps)
    if n_rows % a:
        raise ValueError(f"{n_rows} rows per step not divisible by grad_accum_steps {a}")
    return a


def log_samples(
    wd: pathlib.Path, step: int, batch: Mapping[str, Any], ro: rollout.Rollout, n: int, every: int
) -> None:
    """Appends ``n`` completions of the step (first prompts first) to ``samples.jsonl``: what
    the policy writes, its parse and reward, next to the label; every ``every`` steps."""
    if n <= 0 or step % max(int(every), 1):
        return
    g = len(ro.texts) // max(len(batch["valid"]), 1)
    tasks = np.asarray(batch["task_id"])
    with open(wd / "samples.jsonl", "a") as f:
        for k in range(min(n, len(ro.texts))):
            b = k // g
            rec = {
                "step": step,
                "prompt": b,
                "task": "iaa" if int(tasks[b]) == rollout.IAA_ID else "iqa",
                "gt_100": float(np.asarray(batch["gt_100"])[b]),
                "reward": float(ro.rewards[k]),
                "advantage": float(ro.advantages[k]),
                "completion": ro.texts[k],
            }
            f.write(json.dumps(rec) + "\n")
