"""Device meshes, logical-axis sharding rules and multi-host start-up.

Every parameter (and the key activations) carries *logical* axis names in its
``out_sharding`` metadata, e.g. ``("layers", "embed", "mlp")``. One rules table maps logical names
to mesh axes; FSDP, tensor parallelism or both are chosen by changing the table only (MaxText /
flax ``logical_axis_rules`` style). Mesh axes:

- ``data``   — pure data parallelism (parameters replicated), usually the DCN / multi-slice axis;
- ``fsdp``   — data parallelism with parameters and optimizer state sharded (ZeRO-3 style);
- ``tensor`` — tensor (model) parallelism over heads / MLP / vocabulary.

The batch is split over ``("data", "fsdp")``. A rule maps to a mesh axis name, a tuple of names,
or ``None`` (replicated). A dimension that a rule would shard over axes whose size does not divide
it is replicated instead, and this is logged: tiny test models and odd head counts still run, and
the AOT memory plan shows what that costs.

Tables (:data:`RULE_SETS`, config ``mesh.rules``): ``default`` (FSDP over ``fsdp``, tensor
parallelism over ``tensor``), ``fsdp`` (both axes shard parameters and batch: ZeRO-3 over every
device), ``tensor`` (Megatron-style data x tensor parallelism, parameters replicated over
``fsdp``/``data``) and ``replicated`` (pure data parallelism).

Models are built with ``nnx.use_eager_sharding(False)``: variables carry their logical names as
metadata only, and placement goes through ``state_shardings`` (one mechanism for init, loading,
optimizer state — optax moments are ``nnx.Param`` copies carrying the same names — and the jitted
steps' in/out shardings). Activations are constrained with :func:`constrain` inside the model;
those constraints act only while :func:`use_rules` is active when the step is traced:

    mesh = make_mesh({"fsdp": -1, "tensor": 2}, dcn_shape={"data": num_slices})
    rules = get_rules("default")
    state_sh = state_shardings(state, mesh, rules)
    with use_rules(mesh, rules):
        step = jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        state, metrics = step(state, batch)

Multi-host: call :func:`maybe_initialize_distributed` before anything touches devices (TPU pods:
``enabled=True``; GPU clusters: coordinator address, process count and id), then build the mesh
from all ``jax.devices()``; the DCN factor puts the slow inter-slice / inter-node links on the
``data`` axis (or ``fsdp`` for multi-slice FSDP).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP over `fsdp`, tensor parallelism over `tensor`. With tensor=1 this is plain FSDP, with fsdp=1
# plain tensor parallelism: the table does not change, only the mesh does.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("norm", None),
    ("vision_patch", None),
    ("vision_tokens", ("data", "fsdp")),  # patch rows of the vision tower's activations
    ("vision_groups", ("data", "fsdp")),  # attention windows / frames
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_qkv", "tensor"),
    ("vision_merge", "fsdp"),
)

# Pure data parallelism: everything replicated, batch over every axis.
REPLICATED_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("vision_tokens", ("data", "fsdp", "tensor")),
    ("vision_groups", ("data", "fsdp", "tensor")),
)


def _override(base: LogicalRules, **changes: Any) -> LogicalRules:
    return tuple((name, changes.get(name, target)) for name, target in base)


# FSDP over every non-data device: the `tensor` axis shards parameters and the batch as well
# (no tensor-parallel collectives inside a layer). Same mesh, a different table.
FSDP_RULES: LogicalRules = _override(
    DEFAULT_RULES,
    batch=("data", "fsdp", "tensor"),
    vision_tokens=("data", "fsdp", "tensor"),
    vision_groups=("data", "fsdp", "tensor"),
    vocab=None,
    embed=("fsdp", "tensor"),
    mlp=None,
    q_heads=None,
    kv_heads=None,
    heads=None,
    vision_embed=("fsdp", "tensor"),
    vision_mlp=None,
    vision_heads=None,
    vision_qkv=None,
    vision_merge=("fsdp", "tensor"),
)

# Data x tensor parallelism (Megatron style): parameters sharded over `tensor` only, replicated
# over `data`/`fsdp`, which both split the batch.
TENSOR_RULES: LogicalRules = _override(
    DEFAULT_RULES, embed=None, vision_embed=None, vision_merge=None
)

RULE_SETS: dict[str, LogicalRules] = {
    "default": DEFAULT_RULES,
    "fsdp": FSDP_RULES,
    "tensor": TENSOR_RULES,
    "replicated": REPLICATED_RULES,
}


def get_rules(name: str) -> LogicalRules:
    """The rules table called ``name`` in :data:`RULE_SETS` (config ``mesh.rules``)."""
    if name not in RULE_SETS:
        raise ValueError(f"unknown sharding rules {name!r}; choose one of {sorted(RULE_SETS)}")
    return RULE_SETS[name]


def make_mesh(
    shape: Mapping[str, int],
    *,
    dcn_shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a ``Mesh`` with axes ``MESH_AXES``.

    Args:
      shape: per-host-slice (ICI) size of each axis; one entry may be -1 (inferred from the device
        count). Missing axes default to 1.
      dcn_shape: multi-slice / multi-node factor per axis (DCN). The full mesh size of an axis is
        ``shape[a] * dcn_shape[a]``. ``None`` means a single slice.
      devices: defaults to ``jax.devices()``.
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    dcn = {a: int((dcn_shape or {}).get(a, 1)) for a in MESH_AXES}
    n_dcn = math.prod(dcn.values())
    if len(devices) % n_dcn:
        raise ValueError(f"{len(devices)} devices cannot be split into {n_dcn} DCN groups")
    per_slice = len(devices) // n_dcn
    ici = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    inferred = [a for a, s in ici.items() if s == -1]
    if len(inferred) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {inferred}")
    known = math.prod(s for s in ici.values() if s != -1)
    if inferred:
        if per_slice % known:
            raise ValueError(f"cannot infer axis {inferred[0]!r}: {per_slice} devices / {known}")
        ici[inferred[0]] = per_slice // known
    if math.prod(ici.values()) != per_slice:
        raise ValueError(
            f"mesh {ici} x dcn {dcn} needs {math.prod(ici.values()) * n_dcn} devices, "
            f"have {len(devices)}"
        )
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if n_dcn > 1:
        dev = _hybrid_devices(devices, ici_shape, tuple(dcn[a] for a in MESH_AXES))
    elif devices == list(jax.devices()):
        return jax.make_mesh(ici_shape, MESH_AXES, axis_types=auto, devices=devices)
    else:
        dev = np.asarray(devices).reshape(ici_shape)
    return Mesh(dev, MESH_AXES, axis_types=auto)


def _hybrid_devices(
    devices: list[jax.Device], ici_shape: tuple[int, ...], dcn_shape: tuple[int, ...]
) -> np.ndarray:
    """Device array whose axis ``a`` is ``dcn_shape[a]`` granules of ``ici_shape[a]`` devices.

    Granules are TPU slices (``slice_index``) or, on GPU clusters, processes. Virtual CPU devices
    have neither: they are cut into equal consecutive groups, which is what tests need.
    """
    from jax.experimental import mesh_utils

    if hasattr(devices[0], "slice_index"):
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
    if jax.process_count() > 1:
        return mesh_utils.create_hybrid_device_mesh(
            ici_shape, dcn_shape, devices=devices, process_is_granule=True
        )
    n = len(ici_shape)
    grid = np.asarray(devices).reshape(dcn_shape + ici_shape)
    # interleave (dcn_a, ici_a) per axis, then merge each pair
    grid = grid.transpose([i for a in range(n) for i in (a, n + a)])
    return grid.reshape(tuple(d * i for d, i in zip(dcn_shape, ici_shape, strict=True)))


def maybe_initialize_distributed(
    enabled: bool | None = None,
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Calls ``jax.distributed.initialize`` for multi-host runs; a no-op on one host.

    ``enabled=None`` initialises only when the arguments are given (GPU clusters) — on TPU pods call
    with ``enabled=True`` and no arguments (JAX discovers the pod itself).
    """
    if enabled is False:
        return
    explicit = coordinator_address is not None or num_processes is not None
    if enabled is None and not explicit:
        return
    if jax.distributed.is_initialized():  # e.g. a second stage run in the same process
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _mesh_axes_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def logical_to_pspec(
    names: Sequence[str | None] | None,
    rules: LogicalRules = DEFAULT_RULES,
    *,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` through ``rules``.

    A mesh axis is used at most once per spec (the first dimension that asks for it wins), mesh
    axes of size 1 are dropped, and with ``mesh`` and ``shape`` given a dimension that is not
    divisible by its mesh axes is replicated (logged).
    """
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None and axes:
            size = _mesh_axes_size(mesh, axes)
            if shape[dim] % size:
                logging.warning(
                    "dim %d (%s) of size %d is not divisible by mesh axes %s (%d): replicated",
                    dim,
                    name,
                    shape[dim],
                    axes,
                    size,
                )
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _logical_names(variable: Any) -> tuple[str | None, ...] | None:
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = metadata.get("out_sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of an nnx ``State`` (concrete or abstract).

    Leaves are the ``nnx.Variable`` objects of the state; the result has the same structure with
    each variable's value replaced by its sharding, so it can be passed to ``jax.device_put`` or as
    ``in_shardings``/``out_shardings`` of a jitted step.
    """
    from flax import nnx

    def one(v: Any) -> Any:
        if isinstance(v, nnx.Variable):
            value = v.get_raw_value() if hasattr(v, "get_raw_value") else v.value
            if not hasattr(value, "shape"):  # e.g. optax.MaskedNode of a frozen leaf: no arrays
                return v
            spec = logical_to_pspec(_logical_names(v), rules, mesh=mesh, shape=value.shape)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (same structure): the abstract
    arguments of ``jit(...).lower`` or an orbax restore target — no memory allocated."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def unknown_logical_names(state: Any, rules: LogicalRules = DEFAULT_RULES) -> dict[str, str]:
    """{variable path: logical name} for every name of ``state`` that ``rules`` does not list.

    A name missing from the table silently means "replicated"; tables meant to cover a model
    (``DEFAULT_RULES`` and the other :data:`RULE_SETS`) are checked with this in the tests.
    """
    from flax import nnx

    table = dict(rules)
    out: dict[str, str] = {}
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, v in leaves:
        if not isinstance(v, nnx.Variable):
            continue
        for name in _logical_names(v) or ():
            if name is not None and name not in table:
                out[jax.tree_util.keystr(path)] = name
    return out


def shard_module(module: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """Moves every variable of an ``nnx.Module`` onto ``mesh`` by its logical names (in place)."""
    from flax import nnx

    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module


# --- activation constraints ----------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "tatar_sharding_active", default=None
)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context ``constrain`` applies sharding constraints on ``mesh`` via ``rules``."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, LogicalRules] | None:
    """The (mesh, rules) of the enclosing :func:`use_rules`, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity outside ``use_rules``."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_pspec(names, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, ndim: int, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major array: leading dim over the batch axes, the rest replicated."""
    return NamedSharding(
        mesh, logical_to_pspec(("batch",) + (None,) * (ndim - 1), rules, mesh=mesh)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def named_sharding(
    mesh: Mesh,
    names: Sequence[str | None],
    rules: LogicalRules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """``NamedSharding`` of an array whose dimensions carry logical ``names``."""
    return NamedSharding(mesh, logical_to_pspec(names, rules, mesh=mesh, shape=shape))


# Logical names of the decoder's KV cache (language.KVCache k / v).
KV_CACHE_NAMES: tuple[str, ...] = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


# --- host <-> global arrays (several processes) --------------------------------------------------


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Host array -> ``jax.Array`` with ``sharding``; on a mesh spanning several processes every
    process passes the same whole array and transfers only its addressable shards
    (``make_array_from_callback``: no cross-host traffic, no equality check)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree_global(tree: Any, shardings: Any) -> Any:
    """:func:`put_global` over a pytree (``shardings``: one sharding or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put_global(x, shardings), tree)
    return jax.tree.map(put_global, tree, shardings)


def to_host(x: Any) -> np.ndarray:
    """Numpy value of a (possibly global) array. An array with shards on other processes is
    all-gathered (``process_allgather``: a collective, every process must call it); a fully
    replicated one is read from a local copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` has devices of other processes (host arrays need :func:`put_global`)."""
    return mesh is not None and not NamedSharding(mesh, PartitionSpec()).is_fully_addressable


def replicate_stray_leaves(tree: Any, mesh: Mesh) -> Any:
    """Leaves that are not arrays over ``mesh``'s devices (e.g. a train state's counters, created
    on the local default device) replicated over ``mesh`` (from this process's value: every
    process must hold the same); leaves already on the mesh are kept."""
    devices = set(mesh.devices.flat)
    rep = NamedSharding(mesh, PartitionSpec())

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
            return x
        if not hasattr(x, "shape"):
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put_global(np.asarray(jax.random.key_data(x)), rep)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return put_global(np.asarray(x), rep)

    return jax.tree.map(one, tree)
