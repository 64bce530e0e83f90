"""Ahead-of-time memory plan of a GRPO step: lower + compile with abstract shapes only.

Nothing is allocated: the model is built with ``nnx.eval_shape``, the train state with
``jax.eval_shape`` and every argument is a ``jax.ShapeDtypeStruct`` carrying its sharding
(:mod:`tatar_jax.sharding` rules). Each program is compiled for the given mesh on the target's
devices (:mod:`tatar_jax.train.compile_targets`: a TPU slice or NVIDIA GPUs compiled for without
them, by their own compilers, or this host's virtual CPU devices) and
``compiled.memory_analysis()`` gives the per-device bytes of its arguments, outputs, temporaries;
``compiled.cost_analysis()`` its FLOPs and bytes accessed (TPU and GPU compilers).

Programs (the ones the trainer runs, not re-implementations):

- ``update``: ``grpo_step.make_grpo_step`` — policy forward + backward with chunked log-probs,
  ``grpo.grpo_loss``, AdamW (``optim``); the train state is donated (as in the trainer).
- ``ref_logps``: ``grpo_step.make_logps_fn`` on the frozen reference parameters.
- ``prefill`` / ``decode``: the rollout engine's programs (``generate.Sampler``): prompt prefill
  into the KV cache (vision tower included) and the ``while_loop`` of single-token decode steps.

Besides a program's own arguments, other buffers stay resident while it runs (the optimizer
state during rollout, the reference parameters during the update); ``resident_other`` adds them,
so ``peak = total + resident_other`` is what must fit in a device's memory.

CPU compilation differs from TPU/GPU in fusion and layout decisions and CPU XLA upcasts bf16
dots to f32: a ``cpu`` plan overstates a bf16 rollout about 2x. Plans for ``tpu:`` / ``gpu:``
targets come from the compilers that run on those devices (what they would allocate; the
programs are not run). :func:`fit` searches the micro-batch count and rollout layout that fit.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tatar_jax import grpo, loading, sharding
from tatar_jax.models import layers, lora
from tatar_jax.train import compile_targets, frozen, hlo_stats, optim
from tatar_jax.train.compile_targets import Target

__all__ = [
    "HBM_GIB",
    "HEADROOM",
    "PROGRAMS",
    "PlanSpec",
    "fit",
    "format_table",
    "mesh_text",
    "parse_mesh",
    "plan",
    "step_bound",
]

GIB = 1024**3
# Memory per device (GiB) of the accelerators the plan compares against.
HBM_GIB: dict[str, float] = {"v5e": 16.0, "v5p": 95.0, "H100": 80.0, "H200": 141.0}
PROGRAMS = ("update", "ref_logps", "prefill", "decode")
HEADROOM = 0.10  # share of a device's memory a plan keeps free (--fit, "fits_target_headroom")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One configuration to plan (defaults: the issue's 7B example on 8 devices).

    Rows of the update are ``prompts * num_generations``; each prompt holds one image of
    ``image_tokens`` merged tokens (``4 * image_tokens`` patches) inside its ``prompt_len``
    tokens; completions are ``completion_len`` tokens.
    """

    model: str = "7b"  # preset name of qwen2_5_vl.config (3b / 7b / 32b / 72b / tiny)
    mesh: tuple[tuple[str, int], ...] = (("fsdp", 8),)
    # Multi-slice: each axis's factor over the data-center network (e.g. (("data", 2),)); the
    # mesh above is then one slice's (ICI) shape.
    dcn: tuple[tuple[str, int], ...] = ()
    rules: str = "default"
    prompts: int = 16
    num_generations: int = 8
    prompt_len: int = 2048
    completion_len: int = 256
    image_tokens: int = 1024
    remat: str | None = "full"
    vision_remat: str | None = "full"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    mu_dtype: str = "params"  # config.optimizer.mu_dtype: AdamW's first moment (optim.MU_DTYPES)
    ref_param_dtype: str = "compute"  # config.grpo.ref_param_dtype: "compute" | "float32"
    num_micro: int = 1
    chunk_size: int = 1024
    beta: float = 0.001
    freeze_vision: bool = False
    lora_rank: int = 0  # > 0: LoRA adapters on the decoder projections (only they train)
    programs: tuple[str, ...] = PROGRAMS
    # "auto": what the trainer picks on the target's devices: splash (TPU), cuDNN (NVIDIA, bf16),
    # else the memory-efficient "chunked" (the CPU stand-in); "xla" plans O(L^2) float32 scores.
    attention_impl: str = "auto"
    # The rollout's weights (configs/grpo.py `rollout` block, tatar_jax.train.rollout): mesh
    # "auto" / "train" / axis=size,...; rules "auto" / a RULE_SETS name; device_gib: the device
    # memory "auto" sizes the layout for when the target does not say (cpu: an H100's).
    # config.offload (tatar_jax.train.offload): "never" | "rollout" | "always", and its parts
    offload: str = "never"
    offload_parts: tuple[str, ...] = ("opt_state",)
    rollout_mesh: str = "auto"
    rollout_rules: str = "auto"
    device_gib: float = 80.0

    @property
    def rows(self) -> int:
        return self.prompts * self.num_generations


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """``"fsdp=4,tensor=2"`` → (("fsdp", 4), ("tensor", 2)); "x" also separates axes."""
    out = []
    for part in text.replace("x", ",").replace("×", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"mesh entry {part!r} is not axis=size (e.g. fsdp=8)")
        name, size = part.split("=", 1)
        out.append((name.strip(), int(size)))
    if not out:
        raise ValueError(f"empty mesh {text!r}")
    return tuple(out)


def _image_grid(image_tokens: int, merge: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image with ``image_tokens`` merged tokens, near square."""
    a = int(math.isqrt(image_tokens))
    while image_tokens % a:
        a -= 1
    return 1, a * merge, (image_tokens // a) * merge


def _nbytes(tree: Any) -> int:
    """Global bytes of the array leaves of ``tree`` (abstract or concrete)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(params: Any, trainable: Any = None) -> int:
    """Parameters in ``params``; only the ``trainable`` (bool pytree) ones when given."""
    leaves = jax.tree.leaves(params)
    flags = jax.tree.leaves(trainable) if trainable is not None else [True] * len(leaves)
    return int(sum(math.prod(x.shape) for x, t in zip(leaves, flags, strict=True) if t))


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of the (sharded) leaves of ``tree`` (the largest device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        s = getattr(x, "sharding", None)
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    args = int(m.argument_size_in_bytes)
    outs = int(m.output_size_in_bytes)
    alias = int(m.alias_size_in_bytes)
    temps = int(m.temp_size_in_bytes)
    return {
        "arguments": args,
        "outputs": outs,
        "aliased": alias,
        "temporaries": temps,
        "total": args + outs - alias + temps,
    }


# Where _compile writes the program being planned (plan(dump_hlo=...)); None = nowhere.
_HLO_DUMP: contextvars.ContextVar[str | None] = contextvars.ContextVar("hlo_dump", default=None)


class _Builder:
    """Abstract model, state and inputs of one :class:`PlanSpec` on one mesh."""

    def __init__(
        self,
        spec: PlanSpec,
        devices: Sequence[jax.Device] | None = None,
        device_bytes: int | None = None,
    ) -> None:
        from tatar_jax.models import qwen2_5_vl as qvl

        self.spec = spec
        # the device memory the rollout's "auto" layout is sized for
        self.device_bytes = device_bytes or int(spec.device_gib * GIB)
        self.mesh = sharding.make_mesh(
            dict(spec.mesh), dcn_shape=dict(spec.dcn) or None, devices=devices
        )
        self.rules = sharding.get_rules(spec.rules)
        self.config = qvl.preset(spec.model)
        self.dtype = loading.to_dtype(spec.dtype)
        kw = dict(
            dtype=self.dtype, param_dtype=loading.to_dtype(spec.param_dtype),
            remat=spec.remat, vision_remat=spec.vision_remat,
            attention_impl=spec.attention_impl,
        )  # fmt: skip
        if spec.lora_rank:
            adapters = lora.LoraSpec(rank=spec.lora_rank, alpha=2.0 * spec.lora_rank)
            self.model = nnx.eval_shape(
                lambda: lora.apply_lora(loading.build_model(self.config, **kw), adapters)
            )
        else:
            self.model = loading.build_model(self.config, abstract=True, **kw)
        self.graphdef, self.params = nnx.split(self.model)
        # What the trainer trains: the adapters only with LoRA, else all but a frozen vision tower.
        self.trainable = None
        if spec.lora_rank or spec.freeze_vision:
            self.trainable = optim.trainable_mask(
                self.params, freeze_vision=spec.freeze_vision,
                train_only=(lora.ADAPTER_PATTERN,) if spec.lora_rank else (),
            )  # fmt: skip
        self.param_shardings = sharding.state_shardings(self.params, self.mesh, self.rules)

    # --- shardings ------------------------------------------------------------------------------
    def put(self, tree: Any, shardings: Any) -> Any:
        return sharding.abstract_with_shardings(tree, shardings)

    def batch(self, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
        # (a batch dimension that the batch axes do not divide is replicated, and logged)
        names = ("batch",) + (None,) * (len(shape) - 1)
        s = sharding.named_sharding(self.mesh, names, self.rules, shape)
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=s)

    def repl(self, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding.replicated(self.mesh))

    # --- inputs ---------------------------------------------------------------------------------
    def vision(self, num_images: int, pixel_dtype: Any = jnp.float32) -> tuple[Any, Any]:
        """Abstract (pixel_values, layout) of ``num_images`` images (replicated); the update
        gets its pixels in the compute dtype (``stages``), the sampler in float32."""
        from tatar_jax.models.qwen2_5_vl import vision as vmod

        v = self.config.vision
        t, h, w = _image_grid(self.spec.image_tokens, v.spatial_merge_size)
        grid = np.asarray([[t, h, w]] * num_images, np.int64)
        # The exact bucket of these images (what the rollout engine uses). A run-wide
        # ``fixed_bucket`` without ``max_patches_per_frame`` pads every full-attention segment to
        # the whole patch budget: num_images times the attention memory of this one.
        bucket = vmod.vision_bucket(grid, v)
        layout = vmod.vision_layout(grid, v, bucket)
        pv = self.repl((bucket.num_patches, vmod.patch_dim(v)), pixel_dtype)
        layout = jax.tree.map(lambda a: self.repl(np.shape(a), np.asarray(a).dtype), layout)
        return pv, layout

    def grpo_inputs(self) -> Any:
        s = self.spec
        n, t = s.rows, s.completion_len
        length = s.prompt_len + t
        from tatar_jax.train import inputs as step_inputs

        rows = step_inputs.GrpoRows(
            input_ids=self.batch((n, length), jnp.int32),
            attention_mask=self.batch((n, length), jnp.int32),
            position_ids=self.batch((n, 3, length), jnp.int32),
            feat_index=self.batch((n, length), jnp.int32),
            completion_mask=self.batch((n, t), jnp.float32),
            advantages=self.batch((n,), jnp.float32),
            task_id=self.batch((n,), jnp.int32),
            ref_logps=self.batch((n, t), jnp.float32) if s.beta else None,
            # the trainer always hands the update the sampler's log-probs (mismatch metrics)
            rollout_logps=self.batch((n, t), jnp.float32),
        )
        pv, layout = self.vision(s.prompts, self.dtype)
        return step_inputs.GrpoBatch(rows, step_inputs.Vision(pv, layout))


def _compile(lower: Any, *, mesh: Any, rules: Any) -> tuple[Any, float]:
    """Compiles ``lower()`` (a ``jax.stages.Lowered``) under the plan's rules; (compiled, s).
    Writes the compiled HLO text where :func:`plan`'s ``dump_hlo`` asks for it."""
    t0 = time.perf_counter()
    with sharding.use_rules(mesh, rules), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        compiled = lower().compile()
    path = _HLO_DUMP.get()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(compiled.as_text())
    return compiled, time.perf_counter() - t0


def _plan_update(b: _Builder) -> tuple[Any, float, dict[str, int]]:
    from tatar_jax.train import grpo_step

    s = b.spec
    trainable = b.trainable
    tx = optim.make_optimizer(1e-6, trainable=trainable, mu_dtype=s.mu_dtype)
    state = jax.eval_shape(lambda p: optim.TrainState.create(p, tx, jax.random.key(0)), b.params)
    state_sh = sharding.state_shardings(state, b.mesh, b.rules)
    state = b.put(state, state_sh)
    inputs = b.grpo_inputs()
    step = grpo_step.make_grpo_step(
        b.graphdef,
        tx,
        loss=grpo.LossConfig(beta=s.beta),
        num_micro=s.num_micro,
        chunk_size=s.chunk_size,
        trainable=trainable,
    )
    # As the trainer compiles it: frozen parameters (a LoRA base, a frozen tower) are an
    # argument the update neither donates nor returns (train.frozen).
    out_sh = state_sh if trainable is None else frozen.split(state_sh, trainable)[0]
    fn = frozen.step_without_frozen(step, trainable, out_shardings=(out_sh, None))
    compiled, secs = _compile(lambda: fn.lower(state, inputs), mesh=b.mesh, rules=b.rules)
    sizes = {
        "params": _per_device_bytes(state.params),
        "opt_state": _per_device_bytes(state.opt_state),
    }
    return compiled, secs, sizes


def _ref_params(b: _Builder) -> Any:
    """The reference parameters as the GRPO stage makes them: with LoRA the policy's own
    parameters with the adapters off (``lora.adapters_off``: the same base buffers), else
    ``stages.reference_params`` (a copy in the reference dtype)."""
    from tatar_jax.train import stages

    s = b.spec
    if s.lora_rank:
        return lora.adapters_off(b.put(b.params, b.param_shardings))
    ref = jax.eval_shape(lambda p: stages.reference_params(p, s.ref_param_dtype, s.dtype), b.params)
    return b.put(ref, b.param_shardings)


def _same_buffer_bytes(policy: Any, other: Any, eligible: Any = None) -> int:
    """Per-device bytes of the leaves of ``other`` that are the policy's own buffers: same dtype
    and an equivalent sharding (what ``Sampler.place_state`` and the reference keep without a
    copy), among the ``eligible`` leaves (bool pytree; default all)."""
    pl, ol = jax.tree.leaves(policy), jax.tree.leaves(other)
    el = jax.tree.leaves(eligible) if eligible is not None else [True] * len(pl)
    total = 0
    for p, o, e in zip(pl, ol, el, strict=True):
        same = e and p.dtype == o.dtype and p.sharding.is_equivalent_to(o.sharding, len(p.shape))
        total += _per_device_bytes(o) if same else 0
    return total


def _plan_ref_logps(b: _Builder) -> tuple[Any, float, dict[str, Any]]:
    from tatar_jax.train import grpo_step

    s = b.spec
    fn = jax.jit(
        grpo_step.make_logps_fn(b.graphdef, chunk_size=s.chunk_size, num_micro=s.num_micro)
    )
    inputs = b.grpo_inputs()
    inputs = inputs.replace(rows=inputs.rows.replace(ref_logps=None))
    ref = _ref_params(b)
    compiled, secs = _compile(lambda: fn.lower(ref, inputs), mesh=b.mesh, rules=b.rules)
    return compiled, secs, {"_weights": ref}


def _sampler(b: _Builder) -> Any:
    """The rollout engine as the trainer builds it: its own mesh and rules over the plan's
    devices (``rollout.rollout_mesh``), batch and KV cache over its batch axes."""
    import ml_collections

    from tatar_jax import generate
    from tatar_jax.train import rollout

    s = b.spec
    params = generate.SamplingParams(
        max_new_tokens=s.completion_len, num_samples=s.num_generations, temperature=1.0
    )
    cfg = ml_collections.ConfigDict({"mesh": s.rollout_mesh, "rules": s.rollout_rules})
    mesh, rules = rollout.rollout_mesh(cfg, b.model, b.mesh, b.rules, device_bytes=b.device_bytes)
    return generate.Sampler(b.model, params, mesh=mesh, rules=rules)


def _prefill_args(b: _Builder, sampler: Any) -> tuple[Any, ...]:
    """Abstract prefill arguments; the prompts are padded to a multiple of the batch shards as
    the engine does on the host. The weights are the rollout's copy (compute dtype, the
    sampler's layout: ``Sampler.place_state`` of the policy's abstract state); the engine's
    jits declare the shardings of the other arguments."""
    s = b.spec
    shards = sampler.num_batch_shards
    p, lp = -(-s.prompts // shards) * shards, s.prompt_len
    params = sampler.place_state(b.put(b.params, b.param_shardings))
    pv, layout = b.vision(s.prompts)
    plain = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    i32 = jnp.int32
    return (
        params,
        jax.ShapeDtypeStruct((p, lp), i32),
        jax.ShapeDtypeStruct((p, lp), i32),
        jax.ShapeDtypeStruct((3, p, lp), i32),
        jax.ShapeDtypeStruct((p, 1), i32),
        plain(pv),
        jax.tree.map(plain, layout),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
    )


def _plan_rollout(b: _Builder, program: int) -> tuple[Any, float, dict[str, Any]]:
    """Program 0 = prefill, 1 = decode, lowered by the sampler exactly as it runs them. The
    extra fields: the rollout's layout and weights bytes; for decode the KV cache's bytes
    (total over devices) and the collective bytes of one token step (per device)."""
    sampler = _sampler(b)
    args = _prefill_args(b, sampler)
    mesh = sampler.mesh
    lowered = {}

    def lower() -> Any:
        lowered["x"] = sampler.lower(*args)[program]
        return lowered["x"]

    compiled, secs = _compile(lower, mesh=mesh, rules=sampler.rules)
    extra: dict[str, Any] = {
        "_weights": args[0],
        "rollout_mesh": dict(mesh.shape),
        "rollout_rules": next(k for k, v in sharding.RULE_SETS.items() if v == sampler.rules),
        "rollout_weights_bytes_per_device": _per_device_bytes(args[0]),
    }
    if program == 1:
        carry = lowered["x"].args_info[0][1]
        kv = (carry.cache.prompt_k, carry.cache.prompt_v, carry.cache.gen_k, carry.cache.gen_v)
        extra["kv_cache_bytes"] = _nbytes([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in kv])
        extra["collective_bytes_per_step"] = hlo_stats.loop_collective_bytes(compiled.as_text())
    return compiled, secs, extra


def _plan_prefill(b: _Builder) -> tuple[Any, float, dict[str, Any]]:
    return _plan_rollout(b, 0)


def _plan_decode(b: _Builder) -> tuple[Any, float, dict[str, Any]]:
    return _plan_rollout(b, 1)


def _cost(compiled: Any) -> dict[str, float | None]:
    """FLOPs and bytes accessed per device from the compiler's cost analysis (None: not given;
    a ``while`` loop's body is counted once, as the compiler reports it)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        cost = None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    cost = cost or {}
    flops = cost.get("flops")
    nbytes = cost.get("bytes accessed")
    return {
        "flops": None if flops is None else float(flops),
        "bytes_accessed": None if nbytes is None else float(nbytes),
    }


# custom-call targets that mean a fused attention kernel compiled (splash: Mosaic on TPU)
_KERNEL_CALLS = {"splash": ("tpu_custom_call",), "cudnn": ("__cudnn$fmha",)}


def _kernel_calls(impl: str, hlo_text: str) -> int:
    """Custom calls of the fused attention kernel ``impl`` in a compiled program (0 for the
    pure-JAX implementations)."""
    prefixes = _KERNEL_CALLS.get(impl, ())
    calls = hlo_stats.custom_call_targets(hlo_text)
    return sum(n for name, n in calls.items() if name.startswith(prefixes)) if prefixes else 0


def _model_floor(
    b: _Builder, program: str, sizes: Mapping[str, int], extra: Mapping[str, Any]
) -> tuple[float, float]:
    """(model FLOPs, bytes that must move) per device of one run of ``program``: the trainer's
    FLOP model (``inputs.step_flops`` / ``flop_model.flops_per_token``: no rematerialisation, no
    elementwise work) and the weights / state the program reads (and the update writes) at least
    once; decode reads the rollout's weights once per token. Both are lower bounds, unlike the
    compiler's cost analysis, which counts a ``while`` body (the layer scan, the token loop)
    once."""
    from tatar_jax.train import flop_model
    from tatar_jax.train import inputs as step_inputs

    s, n_dev = b.spec, b.mesh.size
    if program in ("update", "ref_logps"):
        flops = step_inputs.step_flops(
            b.config, b.grpo_inputs(), num_micro=s.num_micro, training=program == "update",
            train_vision=not s.freeze_vision,
        )  # fmt: skip
        state = sizes["params_bytes_per_device"] + sizes["opt_state_bytes_per_device"]
        nbytes = 2 * state if program == "update" else sizes["ref_read_bytes_per_device"]
        return flops / n_dev, float(nbytes)
    weights = float(extra["rollout_weights_bytes_per_device"])
    if program == "prefill":
        pv, layout = b.vision(s.prompts)
        per_token = flop_model.flops_per_token(
            b.config.text, b.config.vision, s.prompt_len, training=False,
            patches_per_seq=pv.shape[0] / s.prompts,
            patches_per_image=np.shape(layout.segment_rows)[1],
            lm_head_tokens=1 / s.prompt_len,
        )  # fmt: skip
        return per_token * s.prompts * s.prompt_len / n_dev, weights
    per_token = flop_model.flops_per_token(
        b.config.text, None, s.prompt_len + s.completion_len // 2, training=False,
        causal_discount=False, lm_head_tokens=1.0,
    )  # fmt: skip
    return per_token * s.rows * s.completion_len / n_dev, weights * s.completion_len


def _f32_weight_copies(weights: Any, hlo_text: str) -> int | None:
    """Float32 values shaped like the program's bf16 decoder-layer weights (per-device shapes
    of the stacked kernels, whole and one layer's slice): a float32 copy of weights the program
    reads in bf16. None: the program's weights are not bf16 (the update's float32 master
    weights)."""
    if weights is None:
        return None
    shapes = set()
    for path, x in jax.tree_util.tree_leaves_with_path(weights):
        # The decoder layers' kernels: the bulk of the weights. The vision tower's matrices and
        # the embedding / lm_head share shapes with activations (patches x width, a logits
        # chunk) in small models.
        if x.dtype != jnp.bfloat16 or x.ndim < 3 or "visual" in jax.tree_util.keystr(path):
            continue
        s = getattr(x, "sharding", None)
        shape = tuple(s.shard_shape(x.shape) if s is not None else x.shape)
        shapes.update({shape, shape[1:]})
    if not shapes:
        return None
    return len(hlo_stats.upcast_weight_buffers(hlo_text, shapes, min_elements=4096))


def plan(
    spec: PlanSpec,
    devices: Sequence[jax.Device] | None = None,
    *,
    target: Target | None = None,
    dump_hlo: str | None = None,
) -> list[dict[str, Any]]:
    """Compiles ``spec.programs`` for ``spec`` on ``target``; one result dict per program.

    ``target`` (:mod:`~tatar_jax.train.compile_targets`): the hardware the programs compile
    for, deviceless; None = this host's CPU devices. ``devices``: the devices of the mesh
    (default: the target's first ``mesh size`` devices). Model building and lowering run
    inside ``layers.compile_target(target.platform)``: ``attention_impl="auto"`` becomes splash
    on TPU, cuDNN on NVIDIA (bf16), "chunked" on CPU.

    Each dict: the configuration, ``target`` (its description), ``program``, ``attention`` (the
    implementation compiled) and ``attention_kernel_calls`` (its custom calls in the HLO),
    ``f32_weight_copies`` (float32 buffers shaped like the bf16 weights of a bf16 program: CPU
    XLA makes them, a TPU / GPU compile should not; None for the float32 update),
    ``per_device_bytes`` (arguments, outputs, aliased, temporaries, total = arguments + outputs
    - aliased + temporaries), ``resident_other`` (per-device bytes of buffers alive during the
    program but not its arguments), ``peak_bytes`` (= total + resident_other), ``fits`` per
    accelerator of :data:`HBM_GIB`, ``fits_target`` / ``fits_target_headroom`` (peak <= the
    target's memory / 90% of it; None when unknown), ``flops`` / ``bytes_accessed`` (the
    compiler's cost analysis, per device; XLA counts a ``while`` body once, so for the layer
    scans and the token loop these are far below one run's work), ``model_flops`` /
    ``min_bytes`` (per device, one run: the trainer's FLOP model and the weights / state the
    program must read, decode once per token), ``roofline_seconds`` (the larger of the two
    roofline bounds at the target's peaks: a lower bound of one run), ``compile_seconds``.
    ``prefill`` / ``decode`` add the rollout's
    ``rollout_mesh``, ``rollout_rules`` and ``rollout_weights_bytes_per_device``; ``decode`` adds
    ``kv_cache_bytes`` (total over the devices) and ``collective_bytes_per_step`` (per device,
    one step of the token loop: :func:`hlo_stats.loop_collective_bytes`). ``dump_hlo``: a
    directory that receives each compiled program's HLO text as
    ``<model>_<mesh>_<program>.hlo.txt``.
    """
    unknown = set(spec.programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
    size = math.prod(n for _, n in spec.mesh) * math.prod(n for _, n in spec.dcn)
    if target is None:
        target = Target(name="cpu", platform="cpu", num_devices=len(devices or jax.devices()))
    if size > target.num_devices:
        raise ValueError(
            f"mesh {mesh_text(spec)} needs {size} devices; --target={target.name} has "
            f"{target.num_devices}"
        )
    with layers.compile_target(target.platform):
        devices = list(devices) if devices is not None else target.devices()[:size]
        b = _Builder(spec, devices, target.memory_bytes)
        return _plan_programs(spec, b, target, dump_hlo)


def mesh_text(spec: PlanSpec) -> str:
    """``fsdp=8`` (``fsdp=8 dcn data=2`` for a multi-slice spec)."""
    text = ",".join(f"{k}={v}" for k, v in spec.mesh)
    return text + ("" if not spec.dcn else " dcn " + ",".join(f"{k}={v}" for k, v in spec.dcn))


def _resident(spec: PlanSpec, b: _Builder) -> tuple[dict[str, int], dict[str, Any]]:
    """Per program, the per-device bytes resident beside its arguments; the plan's sizes."""
    missing = sharding.unknown_logical_names(b.params, b.rules)
    if missing and spec.rules != "replicated":
        raise ValueError(f"logical names missing from the {spec.rules!r} rules: {missing}")
    # Resident buffers: the train state (params + AdamW moments) lives through the whole step,
    # the reference parameters too when beta > 0.
    tx = optim.make_optimizer(1e-6, trainable=b.trainable, mu_dtype=spec.mu_dtype)
    opt_abs = jax.eval_shape(tx.init, b.params)
    opt_bytes = _per_device_bytes(
        b.put(opt_abs, sharding.state_shardings(opt_abs, b.mesh, b.rules))
    )
    policy = b.put(b.params, b.param_shardings)
    params_bytes = _per_device_bytes(policy)
    # The reference: LoRA reads the policy's buffers but the zero B's; otherwise a resident
    # copy, sharing only the frozen leaves whose dtype it keeps.
    ref = _ref_params(b)
    ref_args = _per_device_bytes(ref) if spec.beta else 0
    frozen_mask = [not t for t in _flags(b)]
    if not spec.beta:
        ref_shared = 0
    elif spec.lora_rank:
        ref_shared = _same_buffer_bytes(policy, ref, _lora_b_mask(b.params, negate=True))
    else:
        ref_shared = _same_buffer_bytes(policy, ref, frozen_mask)
    ref_resident = 0 if spec.lora_rank else ref_args - ref_shared
    # The rollout's weights: the policy's own buffers where dtype and layout are the rollout's.
    rollout_w = _sampler(b).place_state(policy)
    rollout_shared = _same_buffer_bytes(policy, rollout_w)
    # Host offload: the optimizer state (and the master weights) leave the device outside the
    # update ("always": also during the reference pass), the reference copy outside its own pass.
    opt_off, ref_off, params_off = _offloaded(  # (trainable master weights only)
        spec, opt_bytes, ref_resident, _masked_bytes(policy, _flags(b))
    )
    in_ref_pass = opt_off + params_off if spec.offload == "always" else 0
    if params_off:  # the rollout's copy is cast from the host copy: only frozen leaves shared
        rollout_shared = _same_buffer_bytes(policy, rollout_w, frozen_mask)
    away = opt_off + ref_off + params_off  # in host memory during the rollout
    other = {
        "update": ref_resident - ref_off,  # the state is the update's (donated) argument
        "ref_logps": params_bytes + opt_bytes - ref_shared - in_ref_pass,
        # the policy's parameters stay resident beside the rollout's weights (an argument)
        "prefill": params_bytes + opt_bytes + ref_resident - rollout_shared - away,
        "decode": params_bytes + opt_bytes + ref_resident - rollout_shared - away,
    }
    frozen_bytes = _masked_bytes(policy, frozen_mask)
    # Copies of the frozen parameters alive during the rollout, in units of the policy's frozen
    # bytes: the policy's (1), the reference's own (a resident copy), the rollout's own (a cast
    # / re-layout; a bf16 copy of a float32 base is 0.5).
    own = 0
    for tree, resident in ((ref, spec.beta and not spec.lora_rank), (rollout_w, True)):
        if resident:
            own += _masked_bytes(tree, frozen_mask) - _same_buffer_bytes(policy, tree, frozen_mask)
    copies = round(1 + own / frozen_bytes, 2) if frozen_bytes else 0.0
    sizes = {
        "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(b.params))),
        "trainable_count": _count(b.params, b.trainable),
        "params_bytes_per_device": params_bytes,
        "opt_state_bytes_per_device": opt_bytes,
        "ref_params_bytes_per_device": ref_resident,
        "ref_shared_bytes_per_device": ref_shared,
        "ref_read_bytes_per_device": ref_args,
        "rollout_shared_bytes_per_device": rollout_shared,
        "frozen_bytes_per_device": frozen_bytes,
        "frozen_copies_in_rollout": copies,
        "offloaded_bytes_per_device": away,
    }
    return other, sizes


def check_offload(spec: PlanSpec) -> None:
    """ValueError (one line) for an offload mode / part the trainer would refuse."""
    from tatar_jax.train import offload

    unknown = sorted(set(spec.offload_parts) - set(offload.PARTS))
    if spec.offload not in offload.MODES or unknown:
        raise ValueError(
            f"--offload={spec.offload} --offload_parts: unknown {unknown}; modes "
            f"{offload.MODES}, parts {offload.PARTS}"
        )
    if spec.offload != "never" and "params" in spec.offload_parts and spec.lora_rank:
        raise ValueError("--offload_parts=params is for full-parameter plans (with LoRA the base "
                         "is the rollout's own weights)")  # fmt: skip


def _offloaded(
    spec: PlanSpec, opt_bytes: int, ref_resident: int, params_bytes: int
) -> tuple[int, int, int]:
    """Per-device bytes ``config.offload`` moves to host memory: (optimizer state, reference
    copy, trainable master weights ``params_bytes``: the frozen ones, which a reference may
    share, stay on the device)."""
    check_offload(spec)
    if spec.offload == "never":
        return 0, 0, 0
    parts = spec.offload_parts
    return (
        opt_bytes if "opt_state" in parts else 0,
        ref_resident if "reference" in parts else 0,
        params_bytes if "params" in parts else 0,
    )


def _masked_bytes(tree: Any, mask: Sequence[bool]) -> int:
    """Per-device bytes of the leaves of ``tree`` where ``mask`` (a flat list) is True."""
    leaves = jax.tree.leaves(tree)
    return _per_device_bytes([x for x, m in zip(leaves, mask, strict=True) if m])


def _flags(b: _Builder) -> list[bool]:
    """Per parameter leaf: trains (True) or frozen."""
    n = len(jax.tree.leaves(b.params))
    return jax.tree.leaves(b.trainable) if b.trainable is not None else [True] * n


def _lora_b_mask(params: Any, *, negate: bool = False) -> Any:
    """Bool pytree like ``params``: True at the adapters' B leaves (``negate``: elsewhere)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: ("kernel_lora_b" in optim.path_str(p)) != negate, params
    )


def _plan_programs(
    spec: PlanSpec, b: _Builder, target: Target, dump_hlo: str | None
) -> list[dict[str, Any]]:
    other, sizes = _resident(spec, b)
    fields = dataclasses.asdict(spec)
    for key in ("programs", "mesh", "dcn", "rollout_mesh", "rollout_rules", "device_gib"):
        fields.pop(key)
    impl = layers.resolve_attention_impl(spec.attention_impl, b.dtype, target.platform)
    base = {
        **fields,
        "mesh": dict(b.mesh.shape),
        "dcn": dict(spec.dcn),
        "devices": int(b.mesh.size),
        "rows": spec.rows,
        "target": target.describe(),
        "attention": impl,
        **sizes,
    }
    mem_limit = target.memory_bytes
    results = []
    for program in spec.programs:
        if program == "ref_logps" and not spec.beta:
            continue
        extra = {}
        mesh_name = "_".join(f"{k}{v}" for k, v in b.mesh.shape.items() if v > 1) or "1"
        _HLO_DUMP.set(
            None if dump_hlo is None else f"{dump_hlo}/{spec.model}_{mesh_name}_{program}.hlo.txt"
        )
        try:
            if program == "update":
                compiled, secs, _ = _plan_update(b)
            elif program == "ref_logps":
                compiled, secs, extra = _plan_ref_logps(b)
            else:
                compiled, secs, extra = _plan_rollout(b, 0 if program == "prefill" else 1)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # the TPU compiler refuses a program that cannot fit the device: a verdict too
            results.append(_out_of_memory(base, program, str(e), other[program]))
            continue
        weights = extra.pop("_weights", None)
        mem = _memory(compiled)
        cost = _cost(compiled)
        model_flops, min_bytes = _model_floor(b, program, sizes, extra)
        bound = compile_targets.roofline_seconds(target, model_flops, min_bytes)
        if cost["flops"] is not None:  # either floor is a lower bound: keep the larger
            bound = max(bound, compile_targets.roofline_seconds(
                target, cost["flops"], cost["bytes_accessed"]
            ))  # fmt: skip
        peak = mem["total"] + other[program]
        results.append(
            {
                **base,
                "program": program,
                "attention_kernel_calls": _kernel_calls(impl, compiled.as_text()),
                "f32_weight_copies": _f32_weight_copies(weights, compiled.as_text()),
                "per_device_bytes": mem,
                "resident_other": other[program],
                "peak_bytes": peak,
                "peak_gib": round(peak / GIB, 2),
                "fits": {hw: bool(peak <= gib * GIB) for hw, gib in HBM_GIB.items()},
                "fits_target": None if mem_limit is None else bool(peak <= mem_limit),
                "fits_target_headroom": (
                    None if mem_limit is None else bool(peak <= (1 - HEADROOM) * mem_limit)
                ),
                **cost,
                "model_flops": model_flops,
                "min_bytes": min_bytes,
                "roofline_seconds": bound,
                "compile_seconds": round(secs, 1),
                **extra,
            }
        )
    return results


def _out_of_memory(base: Mapping[str, Any], program: str, error: str, resident: int) -> dict:
    """The result of a program the target's compiler refused for lack of device memory: no
    memory analysis; ``peak_bytes`` is the temporaries the compiler said it needs (a lower
    bound of the peak) plus the resident buffers."""
    line = next((x for x in error.splitlines() if "RESOURCE_EXHAUSTED" in x), error)
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", line)
    temps = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))) if m else 0
    peak = temps + resident
    return {
        **base,
        "program": program,
        "compile_error": line.strip()[:300],
        "per_device_bytes": None,
        "resident_other": resident,
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 2),
        "fits": {hw: bool(peak <= gib * GIB) for hw, gib in HBM_GIB.items()},
        "fits_target": False,
        "fits_target_headroom": False,
        "flops": None,
        "bytes_accessed": None,
        "roofline_seconds": float("nan"),
    }


def step_bound(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A lower bound of one GRPO step's time on the target: the programs' roofline bounds
    summed (reference log-probs + rollout prefill and decode + update, each once; decode's
    bound covers its whole token loop). NaN when the target's peaks are unknown (cpu)."""
    total = 0.0
    parts = {}
    for r in results:
        t = float(r["roofline_seconds"])
        parts[r["program"]] = t
        total += t
    return {
        "label": "lower bound (roofline at published peaks; not a measurement)",
        "seconds": total,
        "per_program_seconds": parts,
    }


def fit(
    spec: PlanSpec, target: Target, *, layouts: Sequence[str] = ("auto", "train")
) -> dict[str, Any]:
    """The smallest micro-batch count (then rollout layout) for which every program fits the
    target with :data:`HEADROOM`: ``num_micro`` tries the divisors of the rows (each micro-batch
    still split over the batch axes) from 1 up; the rollout tries ``layouts`` in order (its
    programs do not depend on ``num_micro``). Returns {"fits": True, "num_micro", "rollout_mesh",
    "results"} or {"fits": False, "reason": one line}."""
    if target.memory_bytes is None:
        raise ValueError(f"--fit needs a target with a known device memory, not {target.name}")
    limit = (1 - HEADROOM) * target.memory_bytes
    with layers.compile_target(target.platform):
        size = math.prod(n for _, n in spec.mesh) * math.prod(n for _, n in spec.dcn)
        _, sizes = _resident(spec, _Builder(spec, target.devices()[:size], target.memory_bytes))
    state = sum(sizes[f"{k}_bytes_per_device"] for k in ("params", "opt_state", "ref_params"))
    if state > limit:  # no micro-batching helps: skip the compiles
        return {
            "fits": False,
            "reason": f"the resident state alone (parameters + optimizer moments + reference) "
            f"needs {state / GIB:.1f} GiB per device on {size} devices; {target.name} allows "
            f"{limit / GIB:.1f} GiB (90% of {target.memory_bytes / GIB:.1f}): shard it over more "
            "devices, or train LoRA adapters / a frozen vision tower",
        }
    train_progs = tuple(p for p in ("update", "ref_logps") if p in spec.programs)
    roll_progs = tuple(p for p in ("prefill", "decode") if p in spec.programs)
    smallest: dict[str, float] = {}

    def fits(results: Sequence[Mapping[str, Any]]) -> bool:
        for r in results:
            smallest[r["program"]] = min(smallest.get(r["program"], math.inf), r["peak_bytes"])
        return all(r["fits_target_headroom"] for r in results)

    found = None
    for n in [d for d in range(1, spec.rows + 1) if spec.rows % d == 0]:
        trial = dataclasses.replace(spec, num_micro=n, programs=train_progs)
        results = plan(trial, target=target) if train_progs else []
        if fits(results):
            found = (n, results)
            break
    if found is None:
        worst = max(train_progs, key=lambda p: smallest[p])
        return {
            "fits": False,
            "reason": f"{worst} needs {smallest[worst] / GIB:.1f} GiB per device even with "
            f"num_micro={spec.rows} (one row per micro-batch); {target.name} allows "
            f"{limit / GIB:.1f} GiB (90% of {target.memory_bytes / GIB:.1f}): use more devices "
            "or a larger mesh axis, LoRA, or a smaller shape",
        }
    n, train_results = found
    for layout in layouts:
        trial = dataclasses.replace(spec, num_micro=n, programs=roll_progs, rollout_mesh=layout)
        results = plan(trial, target=target) if roll_progs else []
        if fits(results):
            return {
                "fits": True,
                "num_micro": n,
                "rollout_mesh": layout,
                "results": train_results + results,
            }
    worst = max(roll_progs, key=lambda p: smallest[p])
    return {
        "fits": False,
        "reason": f"the rollout's {worst} needs {smallest[worst] / GIB:.1f} GiB per device in "
        f"every layout tried ({', '.join(layouts)}) with num_micro={n}; {target.name} allows "
        f"{limit / GIB:.1f} GiB: use more devices, fewer prompts per step or shorter sequences",
    }


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable table (GiB per device) of :func:`plan` results: the verdict against the
    target's memory (10% headroom) and, where the target has peaks, the roofline bound (ms)."""
    head = (
        f"{'model':>5} {'mesh':<18} {'target':<12} {'program':<9} {'attn':<7} {'args':>7} "
        f"{'outs':>7} {'temps':>7} {'+resid':>7} {'peak':>7} {'of':>7}  {'verdict':<11} "
        f"{'TFLOP':>8} {'bound ms':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["per_device_bytes"] or dict.fromkeys(("arguments", "outputs", "temporaries"), 0)
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        mem = r["target"]["memory_gib"]
        if r["fits_target"] is None:
            verdict = "n/a (cpu)"
        elif r["per_device_bytes"] is None:
            verdict = "NO (OOM)"  # the compiler refused it; peak >= its stated temporaries
        else:
            verdict = "fits" if r["fits_target_headroom"] else "tight" if r["fits_target"] else "NO"
        flops = r.get("model_flops")
        bound = r.get("roofline_seconds", float("nan"))
        lines.append(
            f"{r['model']:>5} {mesh:<18} {r['target']['name']:<12} {r['program']:<9} "
            f"{r['attention']:<7} {m['arguments'] / GIB:7.2f} {m['outputs'] / GIB:7.2f} "
            f"{m['temporaries'] / GIB:7.2f} {r['resident_other'] / GIB:7.2f} "
            f"{r['peak_gib']:7.2f} {'-' if mem is None else f'{mem:.1f}':>7}  {verdict:<11} "
            f"{'-' if flops is None else f'{flops / 1e12:.2f}':>8} "
            f"{'-' if bound != bound else f'{bound * 1e3:.1f}':>9}"
        )
    for r in results[:1]:
        if r.get("frozen_bytes_per_device"):
            lines.append(
                f"frozen parameters: {r['frozen_bytes_per_device'] / GIB:.2f} GiB per device, "
                f"{r['frozen_copies_in_rollout']:g} copies during the rollout (1 = the policy, "
                "the reference and the rollout's weights read the same buffers)"
            )
    lines.append(
        "(GiB per device; peak = program total + resident buffers; verdict: fits = within 90% "
        "of the device memory, tight = within 100%; bound = roofline lower bound per program "
        "run; TFLOP: model FLOPs per device)"
    )
    return "\n".join(lines)
