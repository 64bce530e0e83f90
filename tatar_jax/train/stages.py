"""The two training stages as objects the loop drives (Tunix-style): SFT and GRPO.

A stage supplies

- ``name`` ("sft" | "grpo") and ``updates_per_step`` (GRPO's mu);
- ``prepare(state, batch, timer) -> (step batch, host metrics)``: the host side of a step
  (SFT: the :class:`~tatar_jax.train.inputs.SftBatch` of a pipeline batch; GRPO: rollout, then
  scoring: rewards, group advantages, the :class:`~tatar_jax.train.inputs.GrpoBatch`);
- ``update(state, device_batch) -> (state, metrics)``: its compiled step(s);
- ``step_metrics(batch)`` and ``after_step(step, batch)``: extra metrics and records.

Step batches are frozen (:mod:`tatar_jax.train.inputs`); a stage returns new values and changes
none of its inputs.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

import jax
import numpy as np
import optax
from flax import nnx

from tatar_jax import generate, grpo, loading
from tatar_jax.data import prompts
from tatar_jax.models import lora
from tatar_jax.train import (
    dynamic_sampling,
    flop_model,
    frozen,
    grpo_step,
    offload,
    optim,
    rollout,
    scoring,
    sft_step,
)
from tatar_jax.train import inputs as step_inputs

PyTree = Any


class Stage(Protocol):
    name: str
    updates_per_step: int

    def prepare(self, state: optim.TrainState, batch: Mapping[str, Any], timer: Any) -> tuple[
        step_inputs.StepBatch, dict[str, float]
    ]: ...  # fmt: skip

    def update(
        self, state: optim.TrainState, inputs: step_inputs.StepBatch
    ) -> tuple[optim.TrainState, dict]: ...

    def step_metrics(self, inputs: step_inputs.StepBatch) -> dict[str, float]: ...

    def park(self, state: optim.TrainState) -> optim.TrainState: ...

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
        self.pixel_dtype = loading.to_dtype(cfg.model.dtype)
        self.num_micro = int(cfg.optimizer.grad_accum_steps)
        # Target packing sums tokens, so it serves token_mean only.
        token_mean = cfg.sft.loss_normalization == "token_mean"
        self.pack_buckets = int(cfg.sft.pack_buckets) if token_mean else 0
        self.step_fn = frozen.step_without_frozen(
            sft_step.make_sft_step(
                graphdef, tx, grad_accum_steps=self.num_micro, trainable=trainable,
                normalization=cfg.sft.loss_normalization,
                chunk_size=int(cfg.model.logprob_chunk_size), schedule=schedule,
            ),
            trainable,
        )  # fmt: skip

    def prepare(self, state, batch, timer):
        del state, timer
        inputs = step_inputs.sft_batch(
            batch, self.model_config, num_micro=self.num_micro, pack_buckets=self.pack_buckets
        )
        return inputs.replace(vision=inputs.vision.cast(self.pixel_dtype)), {}

    def update(self, state, inputs):
        return self.step_fn(state, inputs)

    def park(self, state: optim.TrainState) -> optim.TrainState:
        return state

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
        next_batch: Any = None,
        merge: Any = None,
    ) -> None:
        g = cfg.grpo
        self.beta, self.updates_per_step = float(g.beta), int(g.num_iterations)
        self.old_from_rollout = bool(g.get("old_logps_from_rollout", False))
        self.workdir = workdir
        # LoRA: the reference is the policy's own base with the adapters off, read from the
        # train state at each step (no second copy); ref_param_dtype does not apply.
        self.lora_reference = lora.is_adapted(model)
        self.ref_params = None
        self.offload = offload.from_config(cfg.get("offload"), trainable)
        if self.lora_reference and self.offload.on("params"):
            raise ValueError(
                "config.offload.parts: 'params' is for full-parameter runs (a LoRA run's base "
                "is the rollout's own weights)"
            )
        if not self.lora_reference:
            ref = reference_params(ref_params, g.ref_param_dtype, cfg.model.dtype)
            self.ref_params = self.offload.park_reference(ref)
        self.pixel_dtype = loading.to_dtype(cfg.model.dtype)
        self.model_config = model.config
        self.samples, self.samples_every = int(cfg.logging.samples), int(cfg.logging.every_steps)
        self.engine = rollout.RolloutEngine(
            model, tok, g, mesh=mesh, rules=rules, rollout_cfg=cfg.rollout
        )
        self.num_micro = num_micro(cfg, num_rows)
        self.scorer = scoring.Scorer(
            tok, g, cfg.rewards, model.config, num_micro=self.num_micro,
            pack_buckets=int(g.pack_buckets),
        )  # fmt: skip
        loss = grpo.LossConfig.from_config(g)
        chunk = int(cfg.model.logprob_chunk_size)
        self.step_fn = frozen.step_without_frozen(
            grpo_step.make_grpo_step(
                graphdef, tx, loss=loss, num_micro=self.num_micro, chunk_size=chunk,
                trainable=trainable, schedule=schedule, old_from_rollout=self.old_from_rollout,
            ),
            trainable,
        )  # fmt: skip
        self.logps_fn = jax.jit(
            grpo_step.make_logps_fn(
                graphdef, temperature=loss.temperature, chunk_size=chunk, num_micro=self.num_micro
            )
        )
        self.train_vision = step_inputs.vision_trains(trainable)
        self.last: scoring.ScoredRollout | None = None
        self.last_batch: Any = None  # the step's pipeline Batch
        self.dynamic = None
        if g.dynamic_sampling.enabled:
            self.dynamic = dynamic_sampling.DynamicSampler(
                g.dynamic_sampling, int(g.prompts_per_step), int(g.num_generations),
                next_batch=next_batch, score=self.scorer,
                make_prompts=self._prompts, merge=merge,
            )  # fmt: skip

    def _prompts(self, batch):
        # The batch's layout, once: the rollout samples from it and the update reads it as it
        # is; the pixels in the compute dtype once, before both transfers.
        prompts = generate.prompt_batch(batch, self.model_config)
        return prompts.replace(vision=prompts.vision.cast(self.pixel_dtype))

    def prepare(self, state, batch, timer):
        if self.dynamic is not None:
            return self._prepare_dynamic(state, batch, timer)
        prompts = self._prompts(batch)
        with timer("rollout"):
            # once per optimizer step: the policy -> the rollout's weights (compute dtype, own
            # layout), used for this step's generation only
            samples = self.engine.generate(state.params, prompts, optim.rng_for_step(state, 1))
        with timer("reward"):
            self.last = self.scorer(batch, prompts, samples)
        self.last_batch = batch
        return self.last.batch, dict(self.last.metrics)

    def _prepare_dynamic(self, state, batch, timer):
        """Dynamic sampling (``tatar_jax.train.dynamic_sampling``): rollouts of further batches
        of the stream until the step holds informative groups; rollout and scoring time
        together under ``time/rollout``."""

        def rollout_fn(prompts, rng):
            return self.engine.generate(state.params, prompts, rng)

        with timer("rollout"):
            filled = self.dynamic(batch, optim.rng_for_step(state, 1), rollout_fn)
        self.last, self.last_batch = filled.scored, filled.batch
        return self.last.batch, {**self.last.metrics, **filled.metrics}

    def update(self, state, inputs):
        """The reference / pi_old log-probs, then mu updates; each part timed on its own
        (``time/ref_logps``, ``time/old_logps``, ``time/policy_update``: the update MFU's
        denominator excludes the forward-only passes). ``inputs`` is not changed: the update
        runs on a new batch holding the log-probs."""
        logps, times = {}, {}
        state = self.offload.fetch(state, "update_start")
        t0 = time.perf_counter()
        if self.beta != 0.0:
            if self.lora_reference:
                ref = lora.adapters_off(state.params)
            else:  # (an offloaded reference is on the device for this pass only)
                ref = self.offload.fetch_reference(self.ref_params)
            logps["ref_logps"] = jax.block_until_ready(self.logps_fn(ref, inputs))
            del ref
            times["time/ref_logps"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if self.updates_per_step > 1 and not self.old_from_rollout:
            state = self.offload.fetch(state, "policy")
            logps["old_logps"] = jax.block_until_ready(self.logps_fn(state.params, inputs))
            times["time/old_logps"] = time.perf_counter() - t1
        batch = inputs.replace(rows=inputs.rows.replace(**logps))
        t2 = time.perf_counter()
        state = self.offload.fetch(state, "step")
        first = None
        for _ in range(self.updates_per_step):
            state, m = self.step_fn(state, batch)
            first = m if first is None else first
        # the mismatch is the sampler's against pi_old: measured at the step's first update
        m = {**m, **{k: v for k, v in first.items() if k.startswith("mismatch/")}}
        m = jax.block_until_ready(m)
        times["time/policy_update"] = time.perf_counter() - t2
        state = self.park(state)
        return state, {**m, **times, **self._mfu(inputs, times)}

    def park(self, state: optim.TrainState) -> optim.TrainState:
        """The state as it waits for the next update (``config.offload``: the optimizer state
        and / or the master weights in host memory)."""
        return self.offload.park(state)

    def _mfu(self, inputs, times):
        """``mfu/update`` (the mu policy updates) and ``mfu/<ref|old>_logps`` (forward-only
        passes), each over its own time; none where the device's peak is unknown (CPU)."""
        out, n_dev = {}, jax.device_count()
        flops = step_inputs.step_flops(
            self.model_config, inputs, num_micro=self.num_micro, train_vision=self.train_vision
        )
        u = flop_model.mfu(1.0 / times["time/policy_update"], flops * self.updates_per_step, n_dev)
        if u is None:
            return out
        out["mfu/update"] = u
        fwd = step_inputs.step_flops(self.model_config, inputs, training=False)
        for name in ("ref_logps", "old_logps"):
            if f"time/{name}" in times:
                out[f"mfu/{name}"] = flop_model.mfu(1.0 / times[f"time/{name}"], fwd, n_dev)
        return out

    def step_metrics(self, inputs):
        ro = self.last
        cm = np.asarray(ro.batch.rows.completion_mask)
        lp = (ro.rollout_logps * cm).sum() / max(cm.sum(), 1.0)
        reward = float(ro.rewards[ro.valid].mean()) if ro.valid.any() else 0.0
        return {"rollout_logp_mean": float(lp), "reward_mean": reward}

    def after_step(self, step, batch):
        del batch  # the step's own (dynamic sampling: rows of several batches)
        if jax.process_index() == 0:
            log_samples(
                self.workdir, step, self.last_batch, self.last, self.samples, self.samples_every
            )


def reference_params(params: PyTree, ref_param_dtype: str, compute_dtype: str) -> PyTree:
    """The frozen reference model's parameters: floating leaves in the compute dtype
    (``ref_param_dtype="compute"``: it only runs forward, as the policy's matmuls do) or in
    float32 (``"float32"``: the master weights, bit-exact reference log-probs)."""
    names = {"compute": compute_dtype, "float32": "float32"}
    if ref_param_dtype not in names:
        raise ValueError(
            f"config.grpo.ref_param_dtype must be 'compute' or 'float32', got {ref_param_dtype!r}"
        )
    dt = loading.to_dtype(names[ref_param_dtype])

    def cast(x):
        floating = jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
        return x.astype(dt) if floating and x.dtype != dt else x

    return jax.tree.map(cast, params)


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
    wd: pathlib.Path,
    step: int,
    batch: Mapping[str, Any],
    ro: scoring.ScoredRollout,
    n: int,
    every: int,
) -> None:
    """Appends ``n`` completions of the step (first prompts first) to ``samples.jsonl``: what
    the policy writes, its parse and reward, next to the label; every ``every`` steps."""
    if n <= 0 or step % max(int(every), 1):
        return
    g = len(ro.texts) // max(batch.num_rows, 1)
    tasks = prompts.task_names(batch.meta.task_id)
    with open(wd / "samples.jsonl", "a") as f:
        for k in range(min(n, len(ro.texts))):
            b = k // g
            rec = {
                "step": step,
                "prompt": b,
                "task": str(tasks[b]),
                "gt_100": float(batch.meta.gt_100[b]),
                "reward": float(ro.rewards[k]),
                "advantage": float(ro.advantages[k]),
                "completion": ro.texts[k],
            }
            f.write(json.dumps(rec) + "\n")
