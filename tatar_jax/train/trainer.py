"""A training run: the SFT warm-up of the embedded default, then the configured stage.

    from tatar_jax import train
    train.run(config, workdir)     # config: configs/sft.py or configs/grpo.py get_config()

:func:`train_stage` builds one stage's parts from its config — mesh, tokenizer, policy
(HF directory, a previous stage's checkpoint, or the embedded tiny model with the real Qwen2.5
vocabulary), the grain pipeline (checkpointable), optimizer, orbax checkpointer (restart with
the same workdir resumes exactly; SIGTERM saves), metrics writer (console / JSONL /
TensorBoard), held-out evaluator — and hands them to :func:`tatar_jax.train.loop.train_loop`
with a :mod:`tatar_jax.train.stages` object. After the loop: the final checkpoint, evaluation
and HF export.

Embedded default: a GRPO config with no weights configured runs its SFT warm-up stage
(``config.warmup``, built in configs/grpo.py) first in ``<workdir>/sft`` (the embedded random
model has never seen the answer format) and starts GRPO from its last checkpoint; the GRPO run
itself lives in ``<workdir>``.

Everything a run writes is under ``workdir``: ``checkpoints/``, ``metrics.jsonl``,
``tensorboard/``, ``config.json`` (model architecture), ``run_config.json`` (this config),
``synthetic/`` (the embedded data set, when used), ``hf/`` (export), ``summary.json``, and
when they happen ``config_changes.jsonl`` (accepted config changes on resume) and
``checkpoints_damaged/`` (unreadable steps moved aside); see :mod:`run_records`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tatar_jax import loading, multihost, rewards, sharding
from tatar_jax.data import pipeline
from tatar_jax.data import tokenizer as tokenizer_mod
from tatar_jax.evaluation.in_training import Evaluator
from tatar_jax.models import lora
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import (
    checkpointing,
    dynamic_sampling,
    frozen,
    loop,
    metric_writers,
    optim,
    run_plots,
    run_records,
    sources,
    stages,
)
from tatar_jax.train import inputs as step_inputs

PyTree = Any


def policy_source(model_cfg: Any) -> loading.PolicySource:
    """The ``model`` block's weights: ``init_checkpoint`` (a previous stage), ``hf_dir``, or the
    embedded ``preset``."""
    return loading.PolicySource(
        hf_dir=model_cfg.hf_dir, checkpoint=model_cfg.init_checkpoint,
        step=int(model_cfg.init_step), preset=model_cfg.preset,
    )  # fmt: skip


def remat_policies(model_cfg: Any) -> tuple[str | None, str | None]:
    """(decoder, vision) remat policies of the ``model`` block; ``remat=False`` disables both."""
    if not model_cfg.remat:
        return None, None
    return model_cfg.remat_policy or None, model_cfg.vision_remat_policy or None


def load_policy(cfg: Any, tok: Any, mesh: Any = None, rules: Any = None) -> loading.Policy:
    """The policy a stage trains, from its config."""
    remat, vremat = remat_policies(cfg.model)
    policy = loading.load_policy(
        policy_source(cfg.model), tokenizer=tok, dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype, remat=remat, vision_remat=vremat,
        init_std=float(cfg.model.init_std), seed=int(cfg.seed), mesh=mesh, rules=rules,
        attention_impl=cfg.model.attention_impl,
    )  # fmt: skip
    if policy.step is not None:
        logging.info("policy initialised from %s", policy.name)
    spec = lora.spec_from_config(cfg.model.lora)
    if spec is not None:  # fresh adapters (B = 0) on the loaded weights
        lora.apply_lora(policy.model, spec, seed=int(cfg.seed), mesh=mesh, rules=rules)
    return policy


# --------------------------------------------------------------------------------------------
# One stage


@dataclasses.dataclass
class StageResult:
    workdir: str
    step: int
    metrics: dict[str, float]
    eval_first: dict[str, float]
    eval_last: dict[str, float]
    stopped: str = ""


@dataclasses.dataclass
class _Placement:
    """The stage's mesh and logical rules; ``mesh`` is None when it has one device."""

    mesh: Any
    rules: Any
    multi: bool  # the mesh spans several processes

    def rules_ctx(self) -> contextlib.AbstractContextManager:
        # Activation constraints apply only while the steps are traced inside ``use_rules``.
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.use_rules(self.mesh, self.rules)


def _placement(cfg: Any) -> _Placement:
    n_dev = int(cfg.mesh.num_devices)  # 0: all; n: the first n (one-process runs)
    mesh = sharding.make_mesh(
        dict(cfg.mesh.shape),
        dcn_shape=dict(cfg.mesh.dcn_shape),
        devices=jax.devices()[:n_dev] if n_dev > 0 else None,
    )
    rules = sharding.get_rules(cfg.mesh.rules)
    return _Placement(mesh if mesh.size > 1 else None, rules, sharding.spans_processes(mesh))


def _data(cfg: Any, wd: pathlib.Path, vision: Any) -> tuple[Any, Any, int, int]:
    """(data iterator, pipeline options, total steps, rows per step over all processes);
    ``vision``: the model's vision config (each batch carries its vision layout)."""
    nproc = jax.process_count()
    sft = cfg.stage == "sft"
    name = "sft.global_batch_size" if sft else "grpo.prompts_per_step"
    per_step = int(cfg.sft.global_batch_size if sft else cfg.grpo.prompts_per_step)
    if per_step % nproc:
        raise ValueError(f"config.{name} = {per_step} is not divisible by {nproc} processes")
    srcs = sources.sources(cfg, list(cfg.data.train), wd, "train")
    infinite = int(cfg.total_steps) > 0
    opts = pipeline.options_from_config(
        cfg.data, cfg.stage, per_step // nproc, tokenizer_dir=sources.tokenizer_dir(cfg),
        num_epochs=None if infinite else int(cfg.data.num_epochs), vision=vision,
    )  # fmt: skip
    total = int(cfg.total_steps) if infinite else pipeline.num_batches(srcs, opts)
    return iter(pipeline.make_dataset(srcs, opts)), opts, total, per_step


def _next_batch_fn(data_iter: Any, opts: Any, tok: Any) -> Any:
    def next_batch() -> dict[str, Any]:
        batch = next(data_iter)
        if jax.process_count() > 1:  # every host's rows: rewards and update over the global batch
            batch = multihost.global_batch(
                batch, pad_id=int(tok.pad_id), padding_side=opts.side,
                patch_buckets=opts.patch_buckets,
            )  # fmt: skip
        return batch

    return next_batch


def _flops_fn(model_config: Any, train_vision: bool, cfg: Any) -> Any:
    """The loop's MFU numerator: the SFT update's FLOPs per real token. GRPO: 0 (no loop MFU);
    its stage reports ``mfu/update`` and ``mfu/ref_logps`` over their own times."""

    def flops_per_token(inputs: Any, batch: Mapping[str, Any]) -> float:
        if cfg.stage != "sft":
            return 0.0
        del batch
        n_tok = float(np.asarray(inputs.rows.attention_mask).sum())
        try:
            flops = step_inputs.step_flops(
                model_config, inputs, num_micro=int(cfg.optimizer.grad_accum_steps),
                train_vision=train_vision,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - MFU is an estimate; never stop training for it
            logging.warning("no FLOP count (%s): MFU not reported", err)
            return 0.0
        return flops / max(n_tok, 1.0)

    return flops_per_token


def _make_stage(cfg, model, tok, params, tx, schedule, trainable, per_step, wd, place, data):
    """The stage object; ``data`` = (next_batch, pipeline options): GRPO's dynamic sampling
    draws further batches of the same stream and merges rows with the pipeline's padding."""
    graphdef = nnx.graphdef(model)
    next_batch, opts = data
    if cfg.stage == "sft":
        return stages.SftStage(
            cfg, model.config, graphdef, tx, trainable=trainable, schedule=schedule
        )
    return stages.GrpoStage(
        cfg, model, tok, graphdef, tx, trainable=trainable, schedule=schedule,
        ref_params=params, num_rows=per_step * int(cfg.grpo.num_generations), workdir=wd,
        mesh=place.mesh, rules=place.rules, next_batch=next_batch,
        merge=functools.partial(
            dynamic_sampling.merge_rows, pad_id=int(tok.pad_id), padding_side=opts.side,
            patch_buckets=opts.patch_buckets,
        ),
    )  # fmt: skip


def train_stage(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> StageResult:
    """Runs (or resumes) one stage in ``workdir``; returns where it ended."""
    wd = pathlib.Path(workdir).absolute()
    wd.mkdir(parents=True, exist_ok=True)
    if cfg.stage not in ("sft", "grpo"):
        raise ValueError(f"config.stage must be 'sft' or 'grpo', got {cfg.stage!r}")
    run_records.check_run_config(cfg, wd, checkpointing.latest_step_on_disk(wd))
    t_start = time.time()
    place = _placement(cfg)
    tok = tokenizer_mod.load_tokenizer(sources.tokenizer_dir(cfg))
    policy = load_policy(cfg, tok, place.mesh, place.rules)
    model, model_config = policy.model, policy.config
    model_config.to_json_file(str(wd / "config.json"))
    # The train state owns a copy (its buffers are donated to the step); ``params`` stays as the
    # frozen reference model of GRPO and the initial weights.
    params = nnx.state(model)
    data_iter, opts, total, per_step = _data(cfg, wd, model_config.vision)
    mu = int(cfg.grpo.num_iterations) if cfg.stage == "grpo" else 1
    trainable = optim.trainable_mask(
        params, freeze_vision=bool(cfg.model.freeze_vision), freeze=tuple(cfg.optimizer.freeze),
        train_only=(lora.ADAPTER_PATTERN,) if lora.is_adapted(model) else (),
    )  # fmt: skip
    tx, schedule = optim.optimizer_from_config(cfg.optimizer, total * mu, trainable)
    ck = cfg.checkpoint
    ckpt = checkpointing.Checkpointer(
        wd, every_steps=int(ck.every_steps), keep=int(ck.keep), async_save=bool(ck.async_save),
        with_data=True, handle_sigterm=True,
    )  # fmt: skip
    state, restored = ckpt.restore_or_init(
        # Every trainable leaf its own buffer (the step donates them); frozen leaves (a LoRA
        # base, a frozen tower) stay the model's buffers: one copy in device memory.
        lambda: frozen.init_state(params, tx, jax.random.key(int(cfg.seed)), trainable),
        data_iter=data_iter,
    )
    if restored is not None and frozen.frozen_leaves(trainable):
        # The restored frozen leaves replace the model's (equal values): one copy again.
        keep = jax.tree.map(lambda s, t, p: p if t else s, state.params, trainable, params)
        nnx.update(model, keep)
        params = nnx.state(model)
    if place.mesh is not None:
        # The state's counters / key live on one device (fresh: the default device; restored:
        # orbax commits them to device 0, which jit refuses next to the mesh's parameters).
        state = sharding.replicate_stray_leaves(state, place.mesh)
    start = 0 if restored is None else int(restored)
    if restored is not None:
        print(f"[tatar-jax] resumed {cfg.stage} from {ckpt.directory}/{restored}", flush=True)
    next_batch = _next_batch_fn(data_iter, opts, tok)
    stage = _make_stage(
        cfg, model, tok, params, tx, schedule, trainable, per_step, wd, place, (next_batch, opts)
    )
    state = stage.park(state)  # config.offload: what waits in host memory between updates
    lg = cfg.logging
    writer = metric_writers.MetricsWriter(
        wd, tensorboard=bool(lg.tensorboard),
        jsonl=bool(lg.jsonl), console=True, resume_step=start,
    )  # fmt: skip
    evaluator = None
    if list(cfg.eval.datasets):
        mesh = place.mesh if place.multi else None
        evaluator = Evaluator(cfg, model, tok, wd, mesh=mesh, rules=place.rules)
    env = loop.LoopEnv(
        data_iter=data_iter, next_batch=next_batch,
        put=lambda x: step_inputs.put_inputs(x, place.mesh, place.rules), checkpointer=ckpt,
        writer=writer, evaluator=evaluator, total=total, log_every=int(lg.every_steps),
        eval_every=int(cfg.eval.every_steps),
        max_consecutive_nonfinite=int(cfg.optimizer.max_consecutive_nonfinite),
        flops_per_token=_flops_fn(model_config, not bool(cfg.model.freeze_vision), cfg),
        rules=place.rules_ctx, inject_nonfinite_steps=frozenset(cfg.inject_nonfinite_steps),
        progress=bool(lg.progress),
    )  # fmt: skip
    eval_first: dict[str, float] = {}
    try:
        if evaluator is not None and bool(cfg.eval.at_start) and start == 0:
            eval_first = evaluator(state.params)
            writer.write(0, eval_first)
        print(
            f"[tatar-jax] {cfg.stage}: steps {start}->{total}, checkpoints in {ckpt.directory}, "
            f"metrics in {wd / 'metrics.jsonl'} and {wd / 'tensorboard'}",
            flush=True,
        )
        res = loop.train_loop(stage, state, env, start)
        if not res.stopped and res.step > start:  # (a finished stage that is resumed does nothing)
            res.eval_last = _finish(cfg, res, env, model, wd) or res.eval_last
    finally:
        ckpt.close()
        writer.close()
    done = f"stopped ({res.stopped})" if res.stopped else "done"
    print(
        f"[tatar-jax] {cfg.stage} {done} at step {res.step} in {time.time() - t_start:.0f}s; "
        f"checkpoints: {ckpt.directory}; metrics: {wd / 'metrics.jsonl'}, "
        f"TensorBoard: {wd / 'tensorboard'}",
        flush=True,
    )
    return StageResult(str(wd), res.step, res.last, eval_first, res.eval_last, res.stopped)


def _finish(
    cfg: Any, res: loop.LoopResult, env: loop.LoopEnv, model: nnx.Module, wd: pathlib.Path
) -> dict[str, float]:
    """End of a stage that ran: final checkpoint, final evaluation, HF export."""
    if bool(cfg.checkpoint.save_at_end):
        meta = {"stage": cfg.stage}
        env.checkpointer.save(res.step, res.state, data_iter=env.data_iter, force=True, meta=meta)
    eval_last: dict[str, float] = {}
    if env.evaluator is not None and bool(cfg.eval.at_end):
        eval_last = env.evaluator(res.state.params)
        env.writer.write(res.step, eval_last)
    if bool(cfg.checkpoint.export_hf):
        nnx.update(model, res.state.params)
        # weights + config + tokenizer + chat template + image processor: loads as it is
        qvl.export_hf(model, wd / "hf", tokenizer_dir=sources.tokenizer_dir(cfg))
        print(f"[tatar-jax] exported HF directory to {wd / 'hf'}", flush=True)
    return eval_last


# --------------------------------------------------------------------------------------------
# Entry point


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, StageResult]:
    """Runs the configured stage (with the embedded SFT warm-up first when it applies)."""
    wd = pathlib.Path(workdir).absolute()
    m = cfg.mesh
    sharding.maybe_initialize_distributed(
        m.distributed or None,
        coordinator_address=m.coordinator_address or None,
        num_processes=m.num_processes or None,
        process_id=m.process_id,
    )
    results: dict[str, StageResult] = {}
    if cfg.stage == "grpo":  # a broken plug-in reward fails now, not after the SFT warm-up
        rewards.validate_extra_rewards(cfg.rewards, int(cfg.grpo.num_generations))
    embedded = not cfg.model.hf_dir and not cfg.model.init_checkpoint
    if cfg.stage == "grpo" and embedded and int(cfg.warmup.total_steps) > 0:
        results["sft"] = train_stage(cfg.warmup, wd / "sft")
        if results["sft"].stopped:
            return results
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.model.init_checkpoint = str(wd / "sft")
        cfg.model.init_step = -1
        if results["sft"].eval_last:
            cfg.eval.at_start = False  # the warm-up's final evaluation already scored these weights
    results[cfg.stage] = train_stage(cfg, wd)
    _summary(results, wd)
    _plots(wd)
    return results


def _summary(results: Mapping[str, StageResult], wd: pathlib.Path) -> None:
    rows = {}
    for name, r in results.items():
        rows[name] = {
            "workdir": r.workdir,
            "step": r.step,
            "stopped": r.stopped,
            "eval_first": r.eval_first,
            "eval_last": r.eval_last,
            "last_metrics": {k: v for k, v in r.metrics.items() if not k.startswith("time/")},
            "skipped_records": {
                k.removeprefix("data/skipped/"): int(v)
                for k, v in r.metrics.items()
                if k.startswith("data/skipped/")
            },
        }
    run_records.merge_summary(rows, {n: bool(r.metrics) for n, r in results.items()}, wd)
    print(f"[tatar-jax] summary: {wd / 'summary.json'}", flush=True)


def _plots(wd: pathlib.Path) -> None:
    """``<workdir>/plots/`` (tatar_jax.train.run_plots) and the held-out before/after table."""
    if jax.process_index() != 0:
        return
    try:
        figs = run_plots.write_plots([wd], wd / "plots")
        print(run_plots.eval_table(run_plots.read_run(wd)), flush=True)
    except Exception as err:  # noqa: BLE001 - a finished run is never lost to a figure
        logging.warning("plots not written to %s: %s", wd / "plots", err)
        return
    print(f"[tatar-jax] plots ({', '.join(figs)}): {wd / 'plots'}", flush=True)
