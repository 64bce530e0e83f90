"""Ahead-of-time memory plan of a GRPO step: lower + compile with abstract shapes only.

Nothing is allocated: the model is built with ``nnx.eval_shape``, the train state with
``jax.eval_shape`` and every argument is a ``jax.ShapeDtypeStruct`` carrying its sharding
(:mod:`tatar_jax.sharding` rules). Each program is compiled for the given mesh (on a machine
without accelerators: virtual host-platform CPU devices, see ``scripts/plan_memory.py``) and
``compiled.memory_analysis()`` gives the per-device bytes of its arguments, outputs, temporaries.

Programs (the ones the trainer runs, not re-implementations):

- ``update``: ``grpo_step.make_grpo_step`` — policy forward + backward with chunked log-probs,
  ``grpo.grpo_loss``, AdamW (``optim``); the train state is donated (as in the trainer).
- ``ref_logps``: ``grpo_step.make_logps_fn`` on the frozen reference parameters.
- ``prefill`` / ``decode``: the rollout engine's programs (``generate.Sampler``): prompt prefill
  into the KV cache (vision tower included) and the ``while_loop`` of single-token decode steps.

Besides a program's own arguments, other buffers stay resident while it runs (the optimizer
state during rollout, the reference parameters during the update); ``resident_other`` adds them,
so ``peak = total + resident_other`` is what must fit in a device's memory.

CPU compilation differs from TPU/GPU in fusion and layout decisions (and CPU XLA may upcast bf16
dots to f32), so the figures are an estimate of the real devices' footprint, not a measurement.
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
from tatar_jax.models import lora
from tatar_jax.train import optim

__all__ = [
    "HBM_GIB",
    "PROGRAMS",
    "PlanSpec",
    "format_table",
    "loop_collective_bytes",
    "parse_mesh",
    "plan",
]

GIB = 1024**3
# Memory per device (GiB) of the accelerators the plan compares against.
HBM_GIB: dict[str, float] = {"v5e": 16.0, "v5p": 95.0, "H100": 80.0, "H200": 141.0}
PROGRAMS = ("update", "ref_logps", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """One configuration to plan (defaults: the issue's 7B example on 8 devices).

    Rows of the update are ``prompts * num_generations``; each prompt holds one image of
    ``image_tokens`` merged tokens (``4 * image_tokens`` patches) inside its ``prompt_len``
    tokens; completions are ``completion_len`` tokens.
    """

    model: str = "7b"  # preset name of qwen2_5_vl.config (3b / 7b / 32b / 72b / tiny)
    mesh: tuple[tuple[str, int], ...] = (("fsdp", 8),)
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
    ref_param_dtype: str = "compute"  # config.grpo.ref_param_dtype: "compute" | "float32"
    num_micro: int = 1
    chunk_size: int = 1024
    beta: float = 0.001
    freeze_vision: bool = False
    lora_rank: int = 0  # > 0: LoRA adapters on the decoder projections (only they train)
    programs: tuple[str, ...] = PROGRAMS
    # The memory-efficient path, the CPU stand-in for the fused kernels (cuDNN / splash) that
    # "auto" picks on GPU / TPU; "xla" plans the O(L^2) float32 scores.
    attention_impl: str = "chunked"
    # The rollout's weights (configs/grpo.py `rollout` block, tatar_jax.train.rollout): mesh
    # "auto" / "train" / axis=size,...; rules "auto" / a RULE_SETS name; device_gib: the device
    # memory "auto" sizes the layout for (H100).
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
_COLLECTIVES = (
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast", "ragged-all-to-all",
)  # fmt: skip
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _hlo_computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines} (ENTRY under "ENTRY")."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
        elif name is not None and line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _shape_bytes(text: str) -> int:
    """Bytes of the array shapes written in ``text`` (e.g. a tuple ``(f32[2,8], s32[])``)."""
    total = 0
    for dt, dims in _SHAPE.findall(text):
        if dt in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _operand_bytes(line: str, op: str, sizes: Mapping[str, int]) -> int:
    """Bytes of the operands of the ``op(...)`` call on an HLO instruction line (compiled HLO
    text names its operands without shapes: ``sizes`` maps instruction names to bytes)."""
    args = line.split(f" {op}(", 1)[1]
    depth, end = 1, 0
    while depth and end < len(args):
        depth += {"(": 1, ")": -1}.get(args[end], 0)
        end += 1
    names = re.findall(r"%([\w.\-]+)", args[:end])
    return sum(sizes.get(n, 0) for n in names) if names else _shape_bytes(args[:end])


def _called(line: str) -> list[str]:
    """Names of the computations an HLO instruction line calls."""
    names = re.findall(r"\b(?:body|condition|calls|to_apply)=%?([\w.\-]+)", line)
    for group in re.findall(r"\bbranch_computations=\{([^}]*)\}", line):
        names += [n.strip().lstrip("%") for n in group.split(",")]
    return names


def loop_collective_bytes(hlo_text: str) -> int:
    """Per-device bytes moved by collectives in one iteration of the decode token loop.

    The token loop is the ``while`` of the ENTRY computation whose body holds the most
    instructions (nested computations included); collectives (all-gather, all-reduce,
    reduce-scatter, all-to-all, collective-permute) count their operands' bytes (shard shapes:
    the compiled module is per device), nested loops (the layer scan) times their
    ``known_trip_count``.
    """
    comps = _hlo_computations(hlo_text)
    sizes = {}  # instruction / parameter name -> bytes of its (per-device) value
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s", line)
            if m:
                sizes[m.group(1)] = _shape_bytes(m.group(2))

    def callees(line: str) -> list[str]:
        return [c for c in _called(line) if c in comps]

    def cost(name: str, seen: tuple[str, ...] = ()) -> tuple[int, int]:
        """(collective bytes, instruction count) of one run of computation ``name``."""
        total = count = 0
        for line in comps.get(name, []):
            count += 1
            op = next((c for c in _COLLECTIVES if re.search(rf" {c}(-start)?\(", line)), None)
            if op is not None:
                call = op + ("-start" if f" {op}-start(" in line else "")
                total += _operand_bytes(line, call, sizes)
            trips = 1
            if re.search(r" while\(", line):
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = int(m.group(1)) if m else 1
            for callee in callees(line):
                if callee not in seen:
                    sub, n = cost(callee, seen + (name,))
                    total += trips * sub
                    count += n
        return total, count

    best = (-1, 0)
    for line in comps.get("ENTRY", []):
        if re.search(r" while\(", line):
            body = re.search(r"body=%?([\w.\-]+)", line).group(1)
            sub, n = cost(body)
            best = max(best, (n, sub))
    return best[1]


class _Builder:
    """Abstract model, state and inputs of one :class:`PlanSpec` on one mesh."""

    def __init__(self, spec: PlanSpec, devices: Sequence[jax.Device] | None = None) -> None:
        from tatar_jax.models import qwen2_5_vl as qvl

        self.spec = spec
        self.mesh = sharding.make_mesh(dict(spec.mesh), devices=devices)
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


def _plan_update(b: _Builder) -> tuple[dict[str, int], float, dict[str, int]]:
    from tatar_jax.train import grpo_step

    s = b.spec
    trainable = b.trainable
    tx = optim.make_optimizer(1e-6, trainable=trainable)
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
    fn = jax.jit(step, out_shardings=(state_sh, None), donate_argnums=(0,))
    compiled, secs = _compile(lambda: fn.lower(state, inputs), mesh=b.mesh, rules=b.rules)
    sizes = {
        "params": _per_device_bytes(state.params),
        "opt_state": _per_device_bytes(state.opt_state),
    }
    return _memory(compiled), secs, sizes


def _ref_params(b: _Builder) -> Any:
    """The reference parameters as ``stages.reference_params`` makes them."""
    from tatar_jax.train import stages

    s = b.spec
    ref = jax.eval_shape(lambda p: stages.reference_params(p, s.ref_param_dtype, s.dtype), b.params)
    return b.put(ref, b.param_shardings)


def _plan_ref_logps(b: _Builder) -> tuple[dict[str, int], float]:
    from tatar_jax.train import grpo_step

    s = b.spec
    fn = jax.jit(
        grpo_step.make_logps_fn(b.graphdef, chunk_size=s.chunk_size, num_micro=s.num_micro)
    )
    inputs = b.grpo_inputs()
    inputs = inputs.replace(rows=inputs.rows.replace(ref_logps=None))
    ref = _ref_params(b)
    compiled, secs = _compile(lambda: fn.lower(ref, inputs), mesh=b.mesh, rules=b.rules)
    return _memory(compiled), secs


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
    mesh, rules = rollout.rollout_mesh(
        cfg, b.model, b.mesh, b.rules, device_bytes=int(s.device_gib * GIB)
    )
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


def _plan_rollout(b: _Builder, program: int) -> tuple[dict[str, int], float, dict[str, Any]]:
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
        "rollout_mesh": dict(mesh.shape),
        "rollout_rules": next(k for k, v in sharding.RULE_SETS.items() if v == sampler.rules),
        "rollout_weights_bytes_per_device": _per_device_bytes(args[0]),
    }
    if program == 1:
        carry = lowered["x"].args_info[0][1]
        kv = (carry.cache.prompt_k, carry.cache.prompt_v, carry.cache.gen_k, carry.cache.gen_v)
        extra["kv_cache_bytes"] = _nbytes([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in kv])
        extra["collective_bytes_per_step"] = loop_collective_bytes(compiled.as_text())
    return _memory(compiled), secs, extra


def _plan_prefill(b: _Builder) -> tuple[dict[str, int], float, dict[str, Any]]:
    return _plan_rollout(b, 0)


def _plan_decode(b: _Builder) -> tuple[dict[str, int], float, dict[str, Any]]:
    return _plan_rollout(b, 1)


def plan(
    spec: PlanSpec, devices: Sequence[jax.Device] | None = None, *, dump_hlo: str | None = None
) -> list[dict[str, Any]]:
    """Compiles ``spec.programs`` for ``spec``; one result dict per program.

    Each dict: the configuration, ``program``, ``per_device_bytes`` (arguments, outputs,
    aliased, temporaries, total = arguments + outputs - aliased + temporaries), ``resident_other``
    (per-device bytes of buffers alive during the program but not its arguments), ``peak_bytes``
    (= total + resident_other), ``fits`` per accelerator of :data:`HBM_GIB`, ``compile_seconds``.
    ``prefill`` / ``decode`` add the rollout's ``rollout_mesh``, ``rollout_rules`` and
    ``rollout_weights_bytes_per_device``; ``decode`` adds ``kv_cache_bytes`` (total over the
    devices) and ``collective_bytes_per_step`` (per device, one step of the token loop:
    :func:`loop_collective_bytes`). ``dump_hlo``: a directory that receives each compiled
    program's HLO text as ``<model>_<mesh>_<program>.hlo.txt``.
    """
    unknown = set(spec.programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"unknown programs {sorted(unknown)}; choose from {PROGRAMS}")
    b = _Builder(spec, devices)
    missing = sharding.unknown_logical_names(b.params, b.rules)
    if missing and spec.rules != "replicated":
        raise ValueError(f"logical names missing from the {spec.rules!r} rules: {missing}")
    # Resident buffers: the train state (params + AdamW moments) lives through the whole step,
    # the reference parameters too when beta > 0.
    tx = optim.make_optimizer(1e-6, trainable=b.trainable)
    opt_abs = jax.eval_shape(tx.init, b.params)
    opt_bytes = _per_device_bytes(
        b.put(opt_abs, sharding.state_shardings(opt_abs, b.mesh, b.rules))
    )
    params_bytes = _per_device_bytes(b.put(b.params, b.param_shardings))
    ref_bytes = _per_device_bytes(_ref_params(b)) if spec.beta else 0
    other = {
        "update": ref_bytes,  # the state is the update's (donated) argument
        "ref_logps": params_bytes + opt_bytes,
        # the policy's parameters stay resident beside the rollout's copy (an argument)
        "prefill": params_bytes + opt_bytes + ref_bytes,
        "decode": params_bytes + opt_bytes + ref_bytes,
    }
    base = {
        "model": spec.model,
        "mesh": dict(b.mesh.shape),
        "rules": spec.rules,
        "devices": int(b.mesh.size),
        "prompts": spec.prompts,
        "num_generations": spec.num_generations,
        "rows": spec.rows,
        "prompt_len": spec.prompt_len,
        "completion_len": spec.completion_len,
        "image_tokens": spec.image_tokens,
        "remat": spec.remat,
        "vision_remat": spec.vision_remat,
        "dtype": spec.dtype,
        "param_dtype": spec.param_dtype,
        "ref_param_dtype": spec.ref_param_dtype,
        "num_micro": spec.num_micro,
        "beta": spec.beta,
        "freeze_vision": spec.freeze_vision,
        "attention_impl": spec.attention_impl,
        "lora_rank": spec.lora_rank,
        "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(b.params))),
        "trainable_count": _count(b.params, b.trainable),
        "params_bytes_per_device": params_bytes,
        "opt_state_bytes_per_device": opt_bytes,
        "ref_params_bytes_per_device": ref_bytes,
    }
    results = []
    for program in spec.programs:
        if program == "ref_logps" and not spec.beta:
            continue
        extra = {}
        mesh_name = "_".join(f"{k}{v}" for k, v in b.mesh.shape.items() if v > 1) or "1"
        _HLO_DUMP.set(
            None if dump_hlo is None else f"{dump_hlo}/{spec.model}_{mesh_name}_{program}.hlo.txt"
        )
        if program == "update":
            mem, secs, _ = _plan_update(b)
        elif program == "ref_logps":
            mem, secs = _plan_ref_logps(b)
        elif program == "prefill":
            mem, secs, extra = _plan_prefill(b)
        else:
            mem, secs, extra = _plan_decode(b)
        peak = mem["total"] + other[program]
        results.append(
            {
                **base,
                "program": program,
                "per_device_bytes": mem,
                "resident_other": other[program],
                "peak_bytes": peak,
                "peak_gib": round(peak / GIB, 2),
                "fits": {hw: bool(peak <= gib * GIB) for hw, gib in HBM_GIB.items()},
                "compile_seconds": round(secs, 1),
                **extra,
            }
        )
    return results


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable table (GiB per device) of :func:`plan` results."""
    hws = list(HBM_GIB)
    head = (
        f"{'model':>5} {'mesh':<22} {'program':<9} {'args':>7} {'outs':>7} {'temps':>7} "
        f"{'total':>7} {'+resid':>7} {'peak':>7}  " + " ".join(f"{h:>5}" for h in hws)
    )
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["per_device_bytes"]
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        fits = " ".join(f"{'yes' if r['fits'][h] else 'no':>5}" for h in hws)
        lines.append(
            f"{r['model']:>5} {mesh:<22} {r['program']:<9} "
            f"{m['arguments'] / GIB:7.2f} {m['outputs'] / GIB:7.2f} {m['temporaries'] / GIB:7.2f} "
            f"{m['total'] / GIB:7.2f} {r['resident_other'] / GIB:7.2f} {r['peak_gib']:7.2f}  "
            + fits
        )
    return "\n".join(lines)
