"""The training loop of both stages: only wiring (spec §6, §7).

    from tatar_jax.train import run as trainer
    trainer.run(config, workdir)     # config: configs/sft.py or configs/grpo.py get_config()

One loop, the stage chosen by ``config.stage``:

- ``sft``: pipeline batch -> ``sft_step`` (span cross-entropy, accumulation, AdamW) -> metrics.
- ``grpo``: prompts -> ``rollout`` (G samples per prompt, decode, parse, rewards over the global
  batch, group advantages) -> reference log-probs (skipped when beta = 0) -> mu x ``grpo_step``.

Around it: model source (HF directory, a previous stage's checkpoint, or the embedded tiny model
with the real Qwen2.5 vocabulary), the grain pipeline (checkpointable), orbax checkpoints with the
iterator state (``checkpointing``; restart with the same workdir resumes exactly), SIGTERM save,
non-finite update skipping, metrics (console / JSONL / TensorBoard), periodic evaluation on
held-out sets (greedy decoding, SRCC/PLCC through ``tatar_jax.evaluation``), HF export.

Embedded default: a GRPO config with no weights configured runs an SFT warm-up stage first (in
``<workdir>/sft``; the embedded random model has never seen the answer format) and starts GRPO
from its last checkpoint; the GRPO run itself lives in ``<workdir>``.

Everything a run writes is under ``workdir``: ``checkpoints/``, ``metrics.jsonl``,
``tensorboard/``, ``config.json`` (model architecture), ``run_config.json`` (this config),
``synthetic/`` (the embedded data set, when used), ``hf/`` (export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from tatar_jax import config_files, multihost, sharding
from tatar_jax.data import pipeline, prompts, synthetic
from tatar_jax.data import tokenizer as tokenizer_mod
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.train import checkpointing, grpo_step, metrics, optim, rollout, sft_step
from tatar_jax.train import inputs as step_inputs

PyTree = Any
EMBEDDED_VOCAB = 151_936  # Qwen2.5-VL-3B's padded vocabulary (>= the tokenizer's 151,665)
# Embedded SFT warm-up steps before GRPO when no weights are configured, per preset (the config
# field ``sft_warmup_steps`` overrides; 0 disables).
DEFAULT_WARMUP_STEPS = {"default": 200}


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive updates were non-finite."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    try:
        v = cfg[name]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if v is None else v


def _dtype(name: str) -> Any:
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]


# --------------------------------------------------------------------------------------------
# Model


def embedded_config(tok: Any, preset: str = "tiny") -> qvl.Qwen2_5_VLConfig:
    """The embedded random model: ``qvl.preset(preset)`` sizes with the real Qwen2.5 vocabulary
    and special-token ids of ``tok`` (so the real tokenizer, prompts and parser work), tied
    embeddings (the 152k x D table dominates the parameter count of a tiny model)."""
    base = qvl.preset(preset or "tiny")
    text = dataclasses.replace(
        base.text, vocab_size=max(EMBEDDED_VOCAB, len(tok)), tie_word_embeddings=True
    )
    return dataclasses.replace(
        base,
        text=text,
        image_token_id=tok.image_pad_id,
        video_token_id=tok.video_pad_id,
        vision_start_token_id=tok.vision_start_id,
        vision_end_token_id=tok.vision_end_id,
        bos_token_id=tok.pad_id,
        eos_token_id=tok.im_end_id,
        pad_token_id=tok.pad_id,
    )


def _arch_config(model_cfg: Any, tok: Any) -> qvl.Qwen2_5_VLConfig:
    """Architecture of the model source (HF dir > a previous run's config.json > embedded)."""
    if model_cfg.hf_dir:
        return qvl.load_config_json(model_cfg.hf_dir)
    init = model_cfg.init_checkpoint
    if init:
        for p in (pathlib.Path(init), *pathlib.Path(init).parents[:3]):
            if (p / "config.json").is_file():
                return qvl.load_config_json(str(p))
        raise FileNotFoundError(f"{init}: no config.json in the run directory (architecture)")
    return embedded_config(tok, model_cfg.preset or "tiny")


def _remat(model_cfg: Any) -> tuple[str | None, str | None]:
    """(decoder, vision) remat policies; ``remat=False`` disables both."""
    on = _get(model_cfg, "remat", True)
    if isinstance(on, str):  # older layout: the policy itself
        return on or None, _get(model_cfg, "vision_remat", None) or None
    if not on:
        return None, None
    return (
        _get(model_cfg, "remat_policy", "full") or None,
        _get(model_cfg, "vision_remat_policy", "full") or None,
    )


def build_model(
    model_cfg: Any, tok: Any, *, seed: int, mesh: Any = None, rules: Any = None
) -> tuple[nnx.Module, qvl.Qwen2_5_VLConfig]:
    """The policy (concrete, parameters placed on ``mesh``) from the configured source."""
    dtype, pdtype = _dtype(model_cfg.dtype), _dtype(model_cfg.param_dtype)
    remat, vremat = _remat(model_cfg)
    config = _arch_config(model_cfg, tok)
    if model_cfg.hf_dir and not model_cfg.init_checkpoint:
        model = qvl.load_hf_checkpoint(
            model_cfg.hf_dir, dtype, pdtype, mesh=mesh, rules=rules, remat=remat,
            vision_remat=vremat,
        )  # fmt: skip
        return model, config

    def make():
        return qvl.Qwen2_5_VLForConditionalGeneration(
            config, dtype=dtype, param_dtype=pdtype, remat=remat, vision_remat=vremat,
            init_std=float(model_cfg.init_std), rngs=nnx.Rngs(seed),
        )  # fmt: skip

    if model_cfg.init_checkpoint:
        model = nnx.eval_shape(make)
        target = nnx.state(model, nnx.Param)
        if mesh is not None:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                target,
                sharding.state_shardings(target, mesh, rules),
            )
        params, step = checkpointing.load_params(
            model_cfg.init_checkpoint, target, step=int(model_cfg.init_step)
        )
        nnx.update(model, params)
        logging.info("policy initialised from %s step %d", model_cfg.init_checkpoint, step)
        return model, config
    model = make()
    if mesh is not None:
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return model, config


# --------------------------------------------------------------------------------------------
# Data


def _ensure_synthetic(root: pathlib.Path, image_size: int) -> dict[str, Any]:
    """The embedded data set; with several processes sharing the workdir process 0 builds it
    and the others wait (two concurrent builds replace each other's folder while it is read)."""
    if jax.process_count() == 1:
        return synthetic.ensure_synthetic(root, image_size=image_size)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        synthetic.ensure_synthetic(root, image_size=image_size)
    multihost_utils.sync_global_devices(f"tatar_synthetic_{root}")
    return synthetic.ensure_synthetic(root, image_size=image_size)


def _specs(cfg: Any, names: Sequence[str], workdir: pathlib.Path, split: str) -> list[Any]:
    from tatar_jax.data import datasets, manifest

    out = []
    for name in names:
        if name in ("synthetic", "synthetic_test"):
            size = int(_get(cfg.data.synthetic, "image_size", 128))
            specs = _ensure_synthetic(workdir / "synthetic", size)
            sp = "test" if name == "synthetic_test" else split
            out += [specs[f"synthetic-{t}-{sp}"] for t in prompts.TASKS]
            continue
        src = cfg.data.sources[name]
        if _get(src, "builtin"):
            spec = datasets.get(
                src.builtin, cfg.data.root, manifest=src.manifest or None,
                image_root=src.image_root or None, sampling=src.sampling,
                label_field=src.label_field or None,
            )  # fmt: skip
            spec = dataclasses.replace(spec, score_range=tuple(src.score_range))
            if _get(src, "target_field"):
                spec = dataclasses.replace(spec, target_field=src.target_field)
            out.append(spec)
        else:
            out.append(manifest.spec_from_config(name, src))
    return out


def _sources(cfg: Any, names: Sequence[str], workdir: pathlib.Path, split: str = "train"):
    specs = _specs(cfg, names, workdir, split)
    return pipeline.sources_from_specs(
        specs, on_error="skip" if cfg.data.bad_record == "skip" else "error", seed=cfg.data.seed
    )


def _tokenizer_dir(cfg: Any) -> str | None:
    return cfg.data.tokenizer_dir or cfg.model.hf_dir or None


# --------------------------------------------------------------------------------------------
# Evaluation


def _subsample(records: Sequence[Any], n: int) -> list[Any]:
    """Evenly spaced ``n`` records (eval sets are ordered by photo: a prefix would be biased)."""
    if n <= 0 or n >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


class Evaluator:
    """Greedy decoding of the configured held-out sets; SRCC/PLCC per dataset."""

    def __init__(
        self,
        cfg: Any,
        model: nnx.Module,
        tok: Any,
        workdir: pathlib.Path,
        *,
        mesh: Any = None,
        rules: Any = None,
    ):
        """``mesh``: only for a mesh spanning several processes (the weights are global arrays):
        every process then reads every held-out row and decodes the same whole batches over
        the mesh (the sampler's multi-process mode); otherwise the sampler runs unsharded."""
        from tatar_jax import generate

        self.cfg, self.tok = cfg, tok
        ev = cfg.eval
        names = list(ev.datasets)
        self.sources = []
        if names:
            per = int(ev.max_examples) if int(ev.max_examples) > 0 else -1
            for s in _sources(cfg, names, workdir, split="test"):
                recs = _subsample(s.records, per // 2 if per > 0 else -1)
                self.sources.append(pipeline.Source(s.name, s.task, recs))
        # Training patch buckets are sized for the training batch; the sampler buckets eval's own.
        self.opts = pipeline.options_from_config(
            cfg.data, "eval", int(ev.batch_size), tokenizer_dir=_tokenizer_dir(cfg), num_epochs=1,
            patch_buckets=None,
            **({"process_index": 0, "process_count": 1} if mesh is not None else {}),
        )  # fmt: skip
        params = generate.SamplingParams(
            max_new_tokens=int(ev.max_new_tokens),
            temperature=0.0,
            stop_token_ids=tuple(tok.eos_ids),
            pad_token_id=int(tok.pad_id),
        )
        self.sampler = generate.Sampler(
            model, params, prompt_buckets=tuple(cfg.data.seq_buckets), mesh=mesh, rules=rules
        )

    def __call__(self, params: PyTree) -> dict[str, float]:
        from tatar_jax.evaluation import metrics_from_completions

        out: dict[str, float] = {}
        for src in self.sources:
            recs, comps = [], []
            for batch in pipeline.make_dataset([src], self.opts):
                n_patch = int(batch["patch_mask"].sum())
                gen = self.sampler.generate(
                    batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:n_patch],
                    batch["image_grid_thw"], state=params,
                )  # fmt: skip
                toks, mask = sharding.to_host(gen.tokens), sharding.to_host(gen.mask)
                for k in np.nonzero(batch["valid"])[0]:
                    recs.append({"gt_100": float(batch["gt_100"][k]), "task": src.task})
                    comps.append(self.tok.decode(toks[k][mask[k]].tolist()))
            m = metrics_from_completions(
                recs, comps, count_tokens=lambda s: len(self.tok.encode(s)), name=src.name
            )
            for k in ("srcc", "plcc", "frac_unparsed", "mean_think_tokens"):
                v = m.get(k)
                out[f"eval/{src.name}/{k}"] = float("nan") if v is None else float(v)
            out[f"eval/{src.name}/n"] = float(len(recs))
        return out


# --------------------------------------------------------------------------------------------
# The loop


def _put(tree: PyTree, mesh: Any, rules: Any) -> PyTree:
    """Host inputs (the global batch) -> device: ``rows`` sharded over the batch axes,
    ``shared`` replicated. On a mesh spanning several processes each process transfers only
    its own shards of the (identical) global host arrays."""
    if mesh is None or mesh.size == 1:
        return jax.tree.map(jnp.asarray, tree)
    rows = {
        k: sharding.put_global(v, sharding.batch_sharding(mesh, np.ndim(v), rules))
        for k, v in tree["rows"].items()
    }
    shared = sharding.put_tree_global(tree["shared"], sharding.replicated(mesh))
    return {"rows": rows, "shared": shared}


def _num_micro(cfg: Any, n_rows: int) -> int:
    if cfg.stage == "grpo" and int(cfg.grpo.mini_batch_size) > 0:
        mb = int(cfg.grpo.mini_batch_size)
        if n_rows % mb:
            raise ValueError(f"{n_rows} completions per step not divisible by mini_batch_size {mb}")
        return n_rows // mb
    a = int(cfg.optimizer.grad_accum_steps)
    if n_rows % a:
        raise ValueError(f"{n_rows} rows per step not divisible by grad_accum_steps {a}")
    return a


def _flops_per_token(config: qvl.Qwen2_5_VLConfig, seq_len: int, patches: int, train_vision: bool):
    try:
        return metrics.flops_per_token(
            dataclasses.asdict(config.text), dataclasses.asdict(config.vision), seq_len,
            patches_per_seq=patches, train_vision=train_vision,
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - MFU is an estimate; never stop training for it
        logging.warning("no FLOP count (%s): MFU not reported", err)
        return None


def _scalars(m: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in m.items() if np.ndim(v) == 0}


@dataclasses.dataclass
class StageResult:
    workdir: str
    step: int
    metrics: dict[str, float]
    eval_first: dict[str, float]
    eval_last: dict[str, float]
    stopped: str = ""


def train_stage(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> StageResult:
    """Runs (or resumes) one stage in ``workdir``; returns where it ended."""
    wd = pathlib.Path(workdir).absolute()
    wd.mkdir(parents=True, exist_ok=True)
    stage = cfg.stage
    if stage not in ("sft", "grpo"):
        raise ValueError(f"config.stage must be 'sft' or 'grpo', got {stage!r}")
    (wd / "run_config.json").write_text(cfg.to_json_best_effort(indent=1))
    t_start = time.time()

    n_dev = int(_get(cfg.mesh, "num_devices", 0))  # 0: all; n: the first n (one-process runs)
    mesh = sharding.make_mesh(
        dict(cfg.mesh.shape),
        dcn_shape=dict(cfg.mesh.dcn_shape),
        devices=jax.devices()[:n_dev] if n_dev > 0 else None,
    )
    multi = sharding.spans_processes(mesh)
    rules = sharding.get_rules(cfg.mesh.rules)

    # Activation constraints (``sharding.constrain``) apply only while the steps are traced inside
    # ``use_rules``; on one device they would be no-ops anyway.
    def rules_ctx() -> Any:
        return sharding.use_rules(mesh, rules) if mesh.size > 1 else contextlib.nullcontext()

    tok = tokenizer_mod.load_tokenizer(_tokenizer_dir(cfg))
    model, model_config = build_model(
        cfg.model, tok, seed=int(cfg.seed), mesh=mesh if mesh.size > 1 else None, rules=rules
    )
    model_config.to_json_file(str(wd / "config.json"))
    graphdef, params = nnx.split(model)
    # The train state owns a copy (its buffers are donated to the step); ``params`` stays as the
    # frozen reference model of GRPO and the initial weights.
    ref_params = params

    # Data.
    nproc = jax.process_count()
    name = "sft.global_batch_size" if stage == "sft" else "grpo.prompts_per_step"
    per_step = int(cfg.sft.global_batch_size if stage == "sft" else cfg.grpo.prompts_per_step)
    if per_step % nproc:
        raise ValueError(f"config.{name} = {per_step} is not divisible by {nproc} processes")
    per_host = per_step // nproc  # each process reads its rows; steps use the global batch
    sources = _sources(cfg, list(cfg.data.train), wd, "train")
    infinite = int(cfg.total_steps) > 0
    opts = pipeline.options_from_config(
        cfg.data, stage, per_host, tokenizer_dir=_tokenizer_dir(cfg),
        num_epochs=None if infinite else int(cfg.data.num_epochs),
    )  # fmt: skip
    total = int(cfg.total_steps) if infinite else pipeline.num_batches(sources, opts)
    data_iter = iter(pipeline.make_dataset(sources, opts))

    # Optimizer / state / checkpoints.
    mu = int(cfg.grpo.num_iterations) if stage == "grpo" else 1
    trainable = optim.trainable_mask(
        params, freeze_vision=bool(cfg.model.freeze_vision), freeze=tuple(cfg.optimizer.freeze)
    )
    tx, schedule = optim.optimizer_from_config(cfg.optimizer, total * mu, trainable)
    ck = cfg.checkpoint
    ckpt = checkpointing.Checkpointer(
        wd, every_steps=int(ck.every_steps), keep=int(ck.keep), async_save=bool(ck.async_save),
        with_data=True, handle_sigterm=True,
    )  # fmt: skip
    state, restored = ckpt.restore_or_init(
        # Every leaf its own buffer: the step donates the state (TrainState.create shares one
        # zero scalar between its counters).
        lambda: jax.tree.map(
            jnp.copy, optim.TrainState.create(params, tx, jax.random.key(int(cfg.seed)))
        ),
        data_iter=data_iter,
    )
    if mesh.size > 1:
        # The state's counters / key live on one device (fresh: the default device; restored:
        # orbax commits them to device 0, which jit refuses next to the mesh's parameters).
        state = sharding.replicate_stray_leaves(state, mesh)
    start = 0 if restored is None else int(restored)
    if restored is not None:
        print(f"[tatar-jax] resumed {stage} from {ckpt.directory}/{restored}", flush=True)

    chunk = int(cfg.model.logprob_chunk_size)
    if stage == "sft":
        step_fn = jax.jit(
            sft_step.make_sft_step(
                graphdef, tx, grad_accum_steps=int(cfg.optimizer.grad_accum_steps),
                trainable=trainable, normalization=cfg.sft.loss_normalization,
                chunk_size=chunk, schedule=schedule,
            ),
            donate_argnums=(0,),
        )  # fmt: skip
        engine = logps_fn = None
    else:
        g = cfg.grpo
        engine = rollout.RolloutEngine(
            model, tok, g, cfg.rewards, prompt_buckets=tuple(cfg.data.seq_buckets),
            mesh=mesh if mesh.size > 1 else None, rules=rules,
        )  # fmt: skip
        n_rows = per_host * nproc * int(g.num_generations)
        micro = _num_micro(cfg, n_rows)
        step_fn = jax.jit(
            grpo_step.make_grpo_step(
                graphdef, tx, num_micro=micro, epsilon=float(g.epsilon),
                epsilon_high=g.epsilon_high, beta=float(g.beta), aggregation=g.loss_aggregation,
                temperature=float(g.temperature), chunk_size=chunk, trainable=trainable,
                schedule=schedule,
            ),
            donate_argnums=(0,),
        )  # fmt: skip
        logps_fn = jax.jit(
            grpo_step.make_logps_fn(
                graphdef, temperature=float(g.temperature), chunk_size=chunk, num_micro=micro
            )
        )

    lg = cfg.logging
    writer = metrics.MetricsWriter(
        wd, every_steps=int(lg.every_steps), tensorboard=bool(lg.tensorboard),
        jsonl=bool(lg.jsonl), console=True,
    )  # fmt: skip
    evaluator = (
        Evaluator(cfg, model, tok, wd, mesh=mesh if multi else None, rules=rules)
        if list(cfg.eval.datasets)
        else None
    )
    eval_first: dict[str, float] = {}
    eval_last: dict[str, float] = {}
    if evaluator is not None and _get(cfg.eval, "at_start", False) and start == 0:
        eval_first = evaluator(state.params)
        writer.write(0, eval_first, force=True)
    inject = {int(s) for s in _get(cfg, "inject_nonfinite_steps", ())}
    timer = metrics.StepTimer()
    progress = metrics.Progress(total, initial=start, enabled=bool(lg.progress), desc=stage)
    flops_tok = None
    window = metrics.WindowMean()  # logged values: means over the logging window
    last: dict[str, float] = {}
    stopped = ""
    step = start
    print(
        f"[tatar-jax] {stage}: steps {start}->{total}, checkpoints in {ckpt.directory}, "
        f"metrics in {wd / 'metrics.jsonl'} and {wd / 'tensorboard'}",
        flush=True,
    )
    try:
        while step < total:
            with timer("data"):
                batch = next(data_iter)
                if nproc > 1:  # every host's rows: rewards and update over the global batch
                    batch = multihost.global_batch(
                        batch, pad_id=int(tok.pad_id), padding_side=opts.side,
                        patch_buckets=opts.patch_buckets,
                    )  # fmt: skip
            if stage == "sft":
                inputs = step_inputs.sft_inputs(
                    batch, model_config, num_micro=int(cfg.optimizer.grad_accum_steps),
                    pack_buckets=int(_get(cfg.sft, "pack_buckets", 0))
                    if cfg.sft.loss_normalization == "token_mean" else 0,
                )  # fmt: skip
                m_host: dict[str, float] = {}
            else:
                with timer("rollout"):
                    rng = optim.rng_for_step(state, salt=1)
                    toks, cmask, lps = engine.generate(state.params, batch, rng)
                with timer("reward"):
                    ro = engine.score(batch, toks, cmask, lps)
                inputs = ro.inputs
                rollout_logps = inputs["rows"].pop("rollout_logps")
                slots = step_inputs.pack_slots(
                    inputs["rows"]["completion_mask"], micro, int(_get(g, "pack_buckets", 0))
                )
                if slots is not None:  # only counted completion tokens through the lm_head
                    inputs["shared"]["pack_slots"] = slots
                m_host = dict(ro.metrics)
            if step + 1 in inject:  # test hook: a NaN pixel makes the loss non-finite
                inputs["shared"]["pixel_values"] = inputs["shared"]["pixel_values"].copy()
                inputs["shared"]["pixel_values"][0, 0] = np.nan
            dev = _put(inputs, mesh, rules)
            with timer("update"), rules_ctx():
                if stage == "grpo":
                    if float(cfg.grpo.beta) != 0.0:
                        dev["rows"]["ref_logps"] = logps_fn(ref_params, dev)
                    if mu > 1:
                        dev["rows"]["old_logps"] = logps_fn(state.params, dev)
                for _ in range(mu):
                    state, m = step_fn(state, dev)
                m = jax.tree.map(sharding.to_host, m)
            step += 1
            times = timer.metrics()
            rows = inputs["rows"]
            n_tok = float(np.asarray(rows["attention_mask"]).sum())
            upd = max(times.get("time/update", 0.0), 1e-9)
            out = {**_scalars(m), **m_host, **times}
            out["tokens_per_sec"] = n_tok * mu / upd
            if stage == "grpo":
                valid = np.asarray(rows["completion_mask"]).sum(axis=1) > 0
                lp = np.asarray(rollout_logps)
                out["rollout_logp_mean"] = float(
                    (lp * np.asarray(rows["completion_mask"])).sum()
                    / max(np.asarray(rows["completion_mask"]).sum(), 1.0)
                )
                out["reward_mean"] = float(ro.rewards[valid].mean()) if valid.any() else 0.0
            out["nonfinite_total"] = float(sharding.to_host(state.nonfinite_total))
            if flops_tok is None:
                seq = rows["input_ids"].shape[1]
                n_img = int(np.asarray(batch["patch_mask"]).sum())
                flops_tok = _flops_per_token(
                    model_config, seq, n_img // max(len(batch["valid"]), 1),
                    not bool(cfg.model.freeze_vision),
                ) or 0.0  # fmt: skip
            mfu = metrics.mfu(out["tokens_per_sec"], flops_tok, jax.device_count())
            if mfu is not None:
                out["mfu"] = mfu
            last = out
            window.add(out)
            if step == total or step % max(int(lg.every_steps), 1) == 0:
                writer.write(step, window.pop(), force=True)
            if stage == "grpo" and jax.process_index() == 0:
                _log_samples(wd, step, batch, ro, int(_get(lg, "samples", 0)), lg.every_steps)
            progress.update(1, loss=out.get("loss", math.nan))
            if optim.should_stop(state, int(cfg.optimizer.max_consecutive_nonfinite)):
                stopped = f"{int(state.nonfinite_count)} non-finite updates in a row"
                ckpt.save(step, state, data_iter=data_iter, force=True, meta={"stopped": stopped})
                raise TrainingStopped(f"{stage} stopped at step {step}: {stopped}")
            ckpt.save(step, state, data_iter=data_iter, meta={"stage": stage})
            if ckpt.reached_preemption(step):
                ckpt.save(step, state, data_iter=data_iter, force=True, meta={"preempted": True})
                stopped = "preempted"
                break
            ev_every = int(cfg.eval.every_steps)
            if evaluator is not None and ev_every > 0 and step % ev_every == 0 and step < total:
                eval_last = evaluator(state.params)
                writer.write(step, eval_last, force=True)
        if not stopped and step > start:  # (a finished stage that is resumed does nothing)
            if bool(ck.save_at_end):
                ckpt.save(step, state, data_iter=data_iter, force=True, meta={"stage": stage})
            if evaluator is not None and bool(cfg.eval.at_end):
                eval_last = evaluator(state.params)
                writer.write(step, eval_last, force=True)
            if bool(ck.export_hf):
                nnx.update(model, state.params)
                qvl.save_hf_checkpoint(model, wd / "hf")
                print(f"[tatar-jax] exported HF weights to {wd / 'hf'}", flush=True)
    finally:
        progress.close()
        ckpt.close()
        writer.close()
    print(
        f"[tatar-jax] {stage} {'stopped (' + stopped + ')' if stopped else 'done'} at step {step} "
        f"in {time.time() - t_start:.0f}s; checkpoints: {ckpt.directory}; "
        f"metrics: {wd / 'metrics.jsonl'}, TensorBoard: {wd / 'tensorboard'}",
        flush=True,
    )
    return StageResult(str(wd), step, last, eval_first, eval_last, stopped)


def _log_samples(
    wd: pathlib.Path, step: int, batch: Mapping[str, Any], ro: Any, n: int, every: int
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


# --------------------------------------------------------------------------------------------
# Entry point


def warmup_config(cfg: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    """The SFT warm-up of the embedded default: configs/sft.py with the GRPO run's model/data."""
    sft_cfg = config_files.get_config("sft", cfg.get("preset", "default"))
    sft_cfg.seed = cfg.seed
    sft_cfg.model = ml_collections.ConfigDict(cfg.model.to_dict())
    sft_cfg.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())
    sft_cfg.data.synthetic.image_size = cfg.data.synthetic.image_size
    sft_cfg.data.tokenizer_dir = cfg.data.tokenizer_dir
    sft_cfg.total_steps = int(steps)
    sft_cfg.eval.datasets = tuple(cfg.eval.datasets)
    sft_cfg.eval.max_examples = cfg.eval.max_examples
    sft_cfg.eval.max_new_tokens = cfg.eval.max_new_tokens
    sft_cfg.eval.batch_size = cfg.eval.batch_size
    sft_cfg.eval.at_end = True
    sft_cfg.eval.at_start = bool(_get(cfg.eval, "at_start", False))
    sft_cfg.logging.progress = cfg.logging.progress
    return sft_cfg


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, StageResult]:
    """Runs the configured stage (with the embedded SFT warm-up first when it applies)."""
    wd = pathlib.Path(workdir).absolute()
    sharding.maybe_initialize_distributed(
        bool(_get(cfg.mesh, "distributed", False)) or None,
        coordinator_address=_get(cfg.mesh, "coordinator_address", None) or None,
        num_processes=_get(cfg.mesh, "num_processes", None) or None,
        process_id=_get(cfg.mesh, "process_id", None),
    )
    results: dict[str, StageResult] = {}
    embedded = not cfg.model.hf_dir and not cfg.model.init_checkpoint
    default_warm = DEFAULT_WARMUP_STEPS.get(_get(cfg, "preset", "default"), 0) if embedded else 0
    warm = int(_get(cfg, "sft_warmup_steps", default_warm))
    if cfg.stage == "grpo" and embedded and warm > 0:
        results["sft"] = train_stage(warmup_config(cfg, warm), wd / "sft")
        if results["sft"].stopped:
            return results
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.model.init_checkpoint = str(wd / "sft")
        cfg.model.init_step = -1
        if results["sft"].eval_last:
            cfg.eval.at_start = False  # the warm-up's final evaluation already scored these weights
    results[cfg.stage] = train_stage(cfg, wd)
    _summary(results, wd)
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
        }
    (wd / "summary.json").write_text(json.dumps(rows, indent=1, default=float))
    print(f"[tatar-jax] summary: {wd / 'summary.json'}", flush=True)
