"""LoRA adapters on the Qwen2.5-VL projections, computed by qwix; merge for export.

    spec = lora.LoraSpec(rank=16, alpha=32.0)            # or lora.spec_from_config(cfg.model.lora)
    model = lora.apply_lora(model, spec, seed=0)         # adds adapters; forward = W x + s·B(A x)
    mask = optim.trainable_mask(params, train_only=(lora.ADAPTER_PATTERN,))
    plain = lora.merge(model)                            # W + s·A B, a plain model (HF export)

Why qwix (0.1.8, what Tunix uses) and not flax's ``nnx.LoRA`` / ``nnx.LoRALinear``:

- qwix intercepts the ``dot_general`` of the targeted modules while their tower's ``__call__``
  is traced, so the model code is unchanged and the adapters live *beside* the base kernel
  (``.../q_proj/kernel_lora_a``, ``kernel_lora_b``): every base parameter keeps its path, so HF
  loading, sharding rules and checkpoints of the base are untouched. ``nnx.LoRA`` wraps the base
  module (the kernel moves to ``q_proj/base_module/kernel``); ``nnx.LoRALinear`` would have to
  replace ``nnx.Linear`` in the model's constructors. Neither has a scale ``alpha / rank``.
- the decoder layers are stacked on a leading ``layers`` axis and run under ``jax.lax.scan``
  (``nnx.split``/``merge`` per layer). qwix's own lazy creation of the adapters (on a first
  call) would happen on the per-layer module inside the scan and be lost, so :func:`apply_lora`
  creates them here, stacked like the kernel — (layers, d_in, r) and (layers, r, d_out) — and
  qwix finds each layer's slice by name inside the scan body (``skip_nnx_init``).
- qwix's LoRA provider is also its QLoRA path (``weight_qtype``); it is not wired here: qwix
  would quantise the base lazily inside the layer scan too, so the int8/int4 stacked weights would
  have to be pre-built the same way (not done).

Numerics: the adapters are float32 (master weights of the only trained parameters) whatever the
base dtype; the low-rank product runs in float32 and is added to the base output in the base
output's dtype (:class:`_Provider`), so a bfloat16 residual stream stays bfloat16. ``B`` starts at
zero: an adapted model computes exactly what the base computes until it trains.

The scale ``alpha / rank`` is also stored in the model (``lora_scale``, a :class:`LoraScale`
variable, never trained) so that a checkpoint alone tells :func:`merge` how to fold the adapters:
a LoRA run's checkpoint loaded as a policy (the next stage, evaluation, conversion;
``tatar_jax.loading.load_policy``) comes back merged (:func:`stored_spec`). No adapter dropout: qwix
draws its dropout keys from the module, which inside the layer scan has none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

__all__ = [
    "ADAPTER_PATTERN",
    "DEFAULT_TARGETS",
    "LoraScale",
    "LoraSpec",
    "adapter_state",
    "adapters_off",
    "apply_lora",
    "is_adapted",
    "merge",
    "spec_from_config",
    "stored_spec",
    "target_paths",
]

# Leaf-path regex of the adapter parameters (``optim.trainable_mask(train_only=...)``).
ADAPTER_PATTERN = r"_lora_[ab](/|$)"
# Every projection of the decoder layers (q/k/v/o, gate/up/down), as PEFT's usual targets.
DEFAULT_TARGETS = (r"language_model/layers/(self_attn|mlp)/\w+_proj",)
# Towers whose ``__call__`` runs every matmul of their modules (the interception point).
_TOWERS = ("language_model", "visual")
_QWIX_ATTRS = ("qwix_path", "qwix_rngs", "disable_quant_stats_update")


class LoraScale(nnx.Variable):
    """``alpha / rank`` of the adapters (a () float32; stored with them, never trained)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Rank, ``alpha`` (scale ``alpha / rank``, as PEFT and qwix) and target module regexes.

    ``targets``: regular expressions, each matched (``re.fullmatch``) against the '/'-joined
    module path of the model's ``nnx.Linear`` layers, e.g. ``language_model/layers/mlp/up_proj``
    or ``visual/blocks/attn/qkv``; every target must match at least one layer.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError("lora targets is empty: name at least one module regex")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as err:
                raise ValueError(f"lora target {t!r} is not a regular expression: {err}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(block: Any) -> LoraSpec | None:
    """The ``model.lora`` config block → a spec, or None when ``rank`` is 0 (LoRA off)."""
    rank = int(block.rank)
    if rank < 0:
        raise ValueError(f"config.model.lora.rank must be >= 0, got {rank}")
    if rank == 0:
        return None
    return LoraSpec(rank=rank, alpha=float(block.alpha), targets=tuple(block.targets))


def _linears(model: nnx.Module) -> dict[str, nnx.Linear]:
    return {
        "/".join(map(str, path)): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.Linear)
    }


def target_paths(model: nnx.Module, targets: Sequence[str]) -> list[str]:
    """'/'-joined paths of the ``nnx.Linear`` layers the ``targets`` regexes select (sorted).

    Raises ValueError naming a target that selects nothing, or a layer outside the towers whose
    forward qwix intercepts (``language_model``, ``visual``; e.g. ``lm_head``).
    """
    linears = _linears(model)
    chosen: set[str] = set()
    for t in targets:
        hits = [p for p in linears if re.fullmatch(t, p)]
        if not hits:
            raise ValueError(
                f"lora target {t!r} matches no linear layer; layers are e.g. "
                f"{sorted(linears)[:4]} ... (full '/'-joined module paths)"
            )
        chosen.update(hits)
    outside = sorted(p for p in chosen if p.split("/")[0] not in _TOWERS)
    if outside:
        raise ValueError(f"lora targets {outside} are outside the towers {_TOWERS}")
    return sorted(chosen)


class _Provider(qwix.LoraProvider):
    """qwix LoRA whose result keeps the base matmul's dtype (float32 adapters on a bfloat16
    model would otherwise promote the residual stream, and the layer scan's carry, to float32)."""

    def dot_general(
        self,
        lhs: jax.Array,
        rhs: Any,
        dimension_numbers: Any,
        precision: Any = None,
        preferred_element_type: Any = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        out = super().dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding
        )
        return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))


def _new_adapters(linear: nnx.Linear, rank: int, key: jax.Array) -> None:
    """kernel_lora_a (..., d_in, r) he-uniform per layer, kernel_lora_b (..., r, d_out) zeros."""
    shape = linear.kernel.shape
    lead = shape[:-2]
    batch_axes = tuple(range(len(lead)))
    init_a = jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=batch_axes)
    names = tuple(linear.kernel.get_metadata().get("out_sharding") or (None,) * len(shape))
    a = init_a(key, (*lead, shape[-2], rank), jnp.float32)
    b = jnp.zeros((*lead, rank, shape[-1]), jnp.float32)
    linear.kernel_lora_a = nnx.LoRAParam(a, out_sharding=(*names[:-1], None))
    linear.kernel_lora_b = nnx.LoRAParam(b, out_sharding=(*names[:-2], None, names[-1]))


def apply_lora(
    model: nnx.Module, spec: LoraSpec, *, seed: int = 0, mesh: Any = None, rules: Any = None
) -> nnx.Module:
    """Adds adapters to the layers ``spec.targets`` selects and routes their matmuls through
    qwix; returns the model (changed in place: its towers are replaced by intercepted clones).

    The base parameters are untouched (same arrays). ``mesh``/``rules``: place the new adapters
    by their logical names (:mod:`tatar_jax.sharding`), as the base is placed.
    """
    if is_adapted(model):
        raise ValueError("the model already has LoRA adapters")
    paths = target_paths(model, spec.targets)
    linears = _linears(model)
    key = jax.random.key(seed)
    with nnx.use_eager_sharding(False):
        for i, p in enumerate(paths):
            _new_adapters(linears[p], spec.rank, jax.random.fold_in(key, i))
        model.lora_scale = LoraScale(jnp.asarray(spec.scale, jnp.float32))
    for tower in _TOWERS:
        inner = [p.split("/", 1)[1] for p in paths if p.split("/")[0] == tower]
        if not inner:
            continue
        rule = "|".join(re.escape(p) for p in inner)
        provider = _Provider(module_path=rule, rank=spec.rank, alpha=spec.alpha)
        # Adapters exist already, so qwix's initialising call (which would create them lazily,
        # inside the layer scan) is skipped.
        adapted = qwix.quantize_model(getattr(model, tower), provider, skip_nnx_init=True)
        setattr(model, tower, adapted)
    if mesh is not None:
        from tatar_jax import sharding  # lazy: keeps the model package free of the mesh code

        state = adapter_state(model)
        nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh, rules)))
    return model


def is_adapted(model: nnx.Module) -> bool:
    """True when ``model`` carries LoRA adapters (:func:`apply_lora`)."""
    return isinstance(getattr(model, "lora_scale", None), LoraScale)


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapters and their scale: the parameters LoRA adds to the model."""
    return nnx.state(model, nnx.Any(nnx.LoRAParam, LoraScale))


def adapters_off(params: Any) -> Any:
    """``params`` (an adapted model's state, or a pytree with its leaf paths) with every ``B``
    zero: the base model's forward (``W x + s·(x A)·0 = W x`` exactly) on the *same* base
    buffers, no copy. Only the (..., r, d_out) zeros are new. The reference model of a LoRA run
    (:mod:`tatar_jax.train.frozen`)."""

    def one(path: Any, x: Any) -> Any:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "kernel_lora_b" not in names or isinstance(x, jax.ShapeDtypeStruct):
            return x  # (abstract B: memory plans; its shape is all they read)
        zeros = jnp.zeros(x.shape, x.dtype)
        return jax.device_put(zeros, x.sharding) if isinstance(x, jax.Array) else zeros

    return jax.tree_util.tree_map_with_path(one, params)


def _merged_kernel(w: Any, a: Any, b: Any, scale: float, on_host: bool) -> Any:
    """W (..., d_in, d_out) + scale · A (..., d_in, r) @ B (..., r, d_out), summed in float32
    and rounded once to W's dtype; numpy on the host or jax where W lives."""
    if on_host:
        w, a, b = (np.asarray(jax.device_get(x)) for x in (w, a, b))
        return (w.astype(np.float32) + scale * np.matmul(a, b)).astype(w.dtype)
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def stored_spec(shapes: Mapping[str, Sequence[int]]) -> LoraSpec | None:
    """The spec that recreates the adapters a checkpoint holds, from its parameters' shapes
    ('/'-joined leaf paths, e.g. ``checkpointing.param_shapes``); None when it holds none.

    Its targets are the adapted layers' exact paths; its ``alpha`` is a placeholder (the stored
    ``lora_scale``, restored with the adapters, is what :func:`merge` uses).
    """
    layers, ranks = [], set()
    for path, shape in shapes.items():
        parts = path.split("/")
        if "kernel_lora_a" in parts:
            layers.append("/".join(parts[: parts.index("kernel_lora_a")]))
            ranks.add(int(shape[-1]))
    if not layers:
        return None
    if len(ranks) != 1:
        raise ValueError(f"stored LoRA adapters of several ranks {sorted(ranks)}")
    return LoraSpec(rank=ranks.pop(), alpha=1.0, targets=tuple(re.escape(p) for p in layers))


def merge(model: nnx.Module, *, on_host: bool = False) -> nnx.Module:
    """A plain model (no adapters, no interception) whose kernels are ``W + s·A B``.

    ``model`` itself is unchanged (the merged model shares its other arrays); without adapters it
    is returned as is. ``on_host``: the merged kernels are numpy arrays computed in host memory
    (the HF export: no device memory beyond the training state's).
    """
    if not is_adapted(model):
        return model
    merged = nnx.clone(model)
    scale = float(merged.lora_scale[...])
    for tower in _TOWERS:
        sub = getattr(merged, tower)
        for _, m in nnx.iter_modules(sub):
            if isinstance(m, nnx.Linear) and hasattr(m, "kernel_lora_a"):
                w, a, b = m.kernel[...], m.kernel_lora_a[...], m.kernel_lora_b[...]
                m.kernel.set_value(_merged_kernel(w, a, b, scale, on_host))
                del m.kernel_lora_a, m.kernel_lora_b
            for attr in _QWIX_ATTRS:
                if attr in vars(m):
                    delattr(m, attr)
        plain = getattr(type(sub), "_unquantized_type", None)
        if plain is not None:
            sub.__class__ = plain
    del merged.lora_scale
    return merged
