"""Load / save Qwen2.5-VL from / to Hugging Face checkpoint directories (safetensors), no torch.

Reading parses the safetensors header and memory-maps each file, so tensors are read one at a
time (bf16 and fp8 through ``ml_dtypes``; numpy has no bf16) and per-layer tensors are stacked
into our layer-stacked parameters. Both on-disk name layouts load:

====================  ==============================  ==================
part                  legacy (hub checkpoints)        transformers >= 5
====================  ==============================  ==================
decoder               ``model.``                      ``model.language_model.``
vision tower          ``visual.``                     ``model.visual.``
lm head               ``lm_head.``                    ``lm_head.``
====================  ==============================  ==================

Every parameter has one rule ``(hf_name_template, our_path, transform)`` (``{i}`` = layer index,
stacked on our leading axis); the vision rules come from :func:`vision.hf_vision_rules`.

Sharded loading: pass ``mesh`` (and optionally ``rules``, the logical-axis table of
:mod:`tatar_jax.sharding`) or a ``shardings(path, variable) -> jax.sharding.Sharding`` callable;
each parameter is then built with ``jax.make_array_from_callback`` and every device reads only
the layers (and slices) it holds.

A complete export (tokenizer, chat template, image processor config) is
:mod:`~tatar_jax.models.qwen2_5_vl.hf_export`; orbax parameter trees
:mod:`~tatar_jax.models.qwen2_5_vl.orbax_checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from tatar_jax.models import lora
from tatar_jax.models.qwen2_5_vl import vision as vision_mod
from tatar_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig, load_config_json
from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

__all__ = [
    "CheckpointError",
    "shardings_from_mesh",
    "SafetensorsReader",
    "hf_rules",
    "load_hf_checkpoint",
    "param_variables",
    "save_hf_checkpoint",
    "write_safetensors",
]

Rule = tuple[str, tuple[str, ...], str]

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

LAYOUTS: dict[str, dict[str, str]] = {
    "legacy": {"text": "model.", "vision": "visual.", "head": ""},
    "v5": {"text": "model.language_model.", "vision": "model.visual.", "head": ""},
}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the tensors."""


# --- rules ---------------------------------------------------------------------------------------


def _text_rules() -> list[Rule]:
    rules: list[Rule] = [("embed_tokens.weight", ("embed_tokens", "embedding"), "none")]
    for name, bias in (
        ("self_attn.q_proj", True),
        ("self_attn.k_proj", True),
        ("self_attn.v_proj", True),
        ("self_attn.o_proj", False),
        ("mlp.gate_proj", False),
        ("mlp.up_proj", False),
        ("mlp.down_proj", False),
    ):
        path = ("layers", *name.split("."))
        rules.append((f"layers.{{i}}.{name}.weight", (*path, "kernel"), "linear"))
        if bias:
            rules.append((f"layers.{{i}}.{name}.bias", (*path, "bias"), "none"))
    rules += [
        ("layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale"), "none"),
        (
            "layers.{i}.post_attention_layernorm.weight",
            ("layers", "post_attention_layernorm", "scale"),
            "none",
        ),
        ("norm.weight", ("norm", "scale"), "none"),
    ]
    return rules


def hf_rules(config: Qwen2_5_VLConfig, layout: str = "legacy") -> list[Rule]:
    """All (HF name template, our parameter path, transform) rules of the full model."""
    pre = LAYOUTS[layout]
    rules = [(pre["text"] + n, ("language_model", *p), t) for n, p, t in _text_rules()]
    rules += [(pre["vision"] + n, ("visual", *p), t) for n, p, t in vision_mod.hf_vision_rules()]
    if not config.text.tie_word_embeddings:
        rules.append(("lm_head.weight", ("lm_head", "kernel"), "linear"))
    return rules


def _num_layers(config: Qwen2_5_VLConfig, path: tuple[str, ...]) -> int:
    return config.vision.depth if path[0] == "visual" else config.text.num_hidden_layers


# --- safetensors reading -------------------------------------------------------------------------


class SafetensorsReader:
    """Lazy, torch-free access to the tensors of an HF directory (single or sharded)."""

    def __init__(self, hf_dir: str | os.PathLike[str]) -> None:
        self.dir = os.fspath(hf_dir)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.dir}")
        self._entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        for fname in files:
            path = os.path.join(self.dir, fname)
            header, data_start = _read_header(path)
            size = os.path.getsize(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                _check_entry(path, name, info, size - data_start)
                if name in self._entries:
                    raise CheckpointError(f"tensor {name} appears in two files ({fname})")
                self._entries[name] = (path, info, data_start)
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype code (``"F32"``, ``"BF16"``, ``"I32"``, ...)."""
        return str(self._entries[name][1]["dtype"])

    def __getitem__(self, name: str) -> np.ndarray:
        path, info, start = self._entries[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{name} in {path}: unsupported dtype {info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        a, b = info["data_offsets"]
        raw = self._maps[path][start + a : start + b]
        return np.frombuffer(raw, dtype=dtype).reshape(info["shape"])


def _read_header(path: str) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        size = os.path.getsize(path)
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                f"the file has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n


def _check_entry(path: str, name: str, info: Any, data_size: int) -> None:
    """A header entry's dtype, shape and byte range agree with each other and the file."""
    try:
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = [int(d) for d in info["shape"]]
        a, b = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name}: bad header entry {info!r} ({e!r})") from None
    if b > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} needs bytes {a}-{b} of the data section, "
            f"which has {data_size}"
        )
    if b - a != dtype.itemsize * int(np.prod(shape)):
        raise CheckpointError(
            f"{path}: tensor {name} has {b - a} bytes for shape {tuple(shape)} {info['dtype']}"
        )


def _detect_layout(names: list[str]) -> str:
    if any(n.startswith(("model.language_model.", "model.visual.")) for n in names):
        return "v5"
    return "legacy"


# --- loading -------------------------------------------------------------------------------------


def param_variables(model: nnx.Module) -> dict[tuple[str, ...], nnx.Variable]:
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            out[tuple(str(p) for p in path)] = var
    return out


def shardings_from_mesh(mesh: Any, rules: Any) -> Callable[[tuple[str, ...], Any], Any]:
    """``fn(path, variable) -> NamedSharding`` placing each parameter by its logical axis names
    (the ``shardings`` argument of the loaders)."""
    from jax.sharding import NamedSharding

    from tatar_jax import sharding as sh

    table = rules if rules is not None else sh.DEFAULT_RULES

    def fn(path: tuple[str, ...], var: Any) -> Any:
        names = var.get_metadata().get("out_sharding")
        return NamedSharding(mesh, sh.logical_to_pspec(names, table, mesh=mesh, shape=var.shape))

    return fn


def load_hf_checkpoint(
    hf_dir: str | os.PathLike[str],
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    *,
    config: Qwen2_5_VLConfig | None = None,
    mesh: Any = None,
    rules: Any = None,
    shardings: Callable[[tuple[str, ...], Any], Any] | None = None,
    remat: str | None = None,
    vision_remat: str | None = None,
    attention_impl: str | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Builds the model from an HF directory (``config.json`` + safetensors, sharded or not).

    Args:
      hf_dir: directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` + shards, in either name layout.
      dtype: activation dtype. param_dtype: parameter dtype (defaults to ``dtype``).
      config: overrides the directory's ``config.json``.
      mesh / rules: place each parameter by its logical axis names (:mod:`tatar_jax.sharding`).
      shardings: alternatively ``fn(path, abstract_variable) -> Sharding``.
      attention_impl: overrides the config's ``attention_impl`` ("auto", "xla", "chunked",
        "cudnn", "splash"; see :mod:`tatar_jax.models.layers`).
    Raises:
      CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    config = config or load_config_json(hf_dir)
    if attention_impl is not None:
        config = config.replace(attention_impl=attention_impl)
    reader = SafetensorsReader(hf_dir)
    names = reader.keys()
    layout = _detect_layout(names)
    rules_ = hf_rules(config, layout)
    if shardings is None and mesh is not None:
        shardings = shardings_from_mesh(mesh, rules)

    abstract = nnx.eval_shape(
        lambda: Qwen2_5_VLForConditionalGeneration(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            vision_remat=vision_remat,
            rngs=nnx.Rngs(0),
        )
    )
    variables = param_variables(abstract)

    used: set[str] = set()
    missing: list[str] = []
    bad_shape: list[str] = []
    non_float: list[str] = []
    plans = []
    for template, path, transform in rules_:
        if path not in variables:
            raise CheckpointError(f"internal: rule {template} names no parameter {path}")
        var = variables[path]
        stacked = "{i}" in template
        layer_names = (
            [template.format(i=i) for i in range(_num_layers(config, path))]
            if stacked
            else [template]
        )
        miss = [n for n in layer_names if n not in reader]
        missing += miss
        used.update(layer_names)
        if miss:
            continue
        want = tuple(var.shape[1:] if stacked else var.shape)
        for n in layer_names:
            if reader.dtype(n) not in _FLOAT_CODES:
                # never cast integers into weights (an int32 tensor read as float32 zeros)
                non_float.append(f"{n}: {reader.dtype(n)}")
                continue
            got = _transformed_shape(transform, reader.shape(n))
            if got != want:
                bad_shape.append(f"{n}: {reader.shape(n)} (expected {_hf_shape(transform, want)})")
        plans.append((path, var, layer_names, transform, stacked))
    unexpected = [n for n in names if n not in used]
    if config.text.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some exports write the tied head anyway
    if missing or unexpected or bad_shape or non_float:
        raise CheckpointError(
            f"checkpoint {os.fspath(hf_dir)} ({layout} names) does not match the config:"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("mis-shaped", bad_shape)
            + _listing("not floating-point", non_float)
        )

    for path, var, layer_names, transform, stacked in plans:
        sharding = None if shardings is None else shardings(path, var)
        var.set_value(_materialize(reader, var, layer_names, transform, stacked, sharding))
    return abstract


def _materialize(
    reader: SafetensorsReader,
    var: Any,
    layer_names: list[str],
    transform: str,
    stacked: bool,
    sharding: Any,
) -> jax.Array:
    """One parameter from its HF tensor(s); with ``sharding`` each device reads its part only.

    ``reader[name]`` is a view of the memory-mapped file and the transforms are views too
    (transpose / reshape), so slicing before ``astype`` copies exactly one shard: host memory
    holds a shard at a time, never a whole (stacked) parameter.
    """
    target = np.dtype(var.dtype)

    def load(index: tuple[slice, ...] | None = None) -> np.ndarray:
        if stacked:
            rows = (
                range(len(layer_names))
                if index is None
                else range(*index[0].indices(len(layer_names)))
            )
            rest = () if index is None else tuple(index[1:])
            out = np.empty((len(rows), *_sliced_shape(var.shape[1:], rest)), target)
            for k, i in enumerate(rows):
                view = vision_mod.hf_to_param(transform, reader[layer_names[i]])
                out[k] = view[rest]
            return out
        view = vision_mod.hf_to_param(transform, reader[layer_names[0]])
        return np.asarray(view[() if index is None else tuple(index)], dtype=target)

    if sharding is None:
        return jnp.asarray(load())
    return jax.make_array_from_callback(tuple(var.shape), sharding, load)


def _sliced_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


def _transformed_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == "linear":
        return tuple(reversed(shape))
    if transform == "conv_to_linear":
        return (math.prod(shape[1:]), shape[0])
    return tuple(shape)


def _hf_shape(transform: str, shape: tuple[int, ...]) -> str:
    if transform == "linear":
        return str(tuple(reversed(shape)))
    if transform == "conv_to_linear":
        return f"({shape[1]}, C, T, p, p)"
    return str(tuple(shape))


def _listing(kind: str, items: list[str], limit: int = 12) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {kind} ({len(items)}): " + ", ".join(items[:limit]) + more


# --- saving --------------------------------------------------------------------------------------


def write_safetensors(
    path: str, tensors: list[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]
) -> None:
    """Writes (name, shape, numpy dtype, producer) tensors, producing one at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt, _ in tensors:
        size = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {
            "dtype": _NP_TO_ST[np.dtype(dt)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dt, produce in tensors:
            arr = np.ascontiguousarray(produce(), dtype=dt)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{name}: produced {arr.shape}, planned {tuple(shape)}")
            f.write(arr.tobytes())


def _hf_tensors(
    model: Qwen2_5_VLForConditionalGeneration, layout: str, save_dtype: Any
) -> Iterator[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]:
    config = model.config
    variables = param_variables(model)
    for template, path, transform in hf_rules(config, layout):
        var = variables[path]
        dt = np.dtype(save_dtype if save_dtype is not None else var.dtype)
        stacked = "{i}" in template
        n = _num_layers(config, path) if stacked else 1
        for i in range(n):

            def produce(var=var, i=i, stacked=stacked, transform=transform, dt=dt):
                x = var[...][i] if stacked else var[...]
                x = np.asarray(jax.device_get(x)).astype(dt)
                return np.asarray(vision_mod.param_to_hf(transform, x, config.vision))

            one = var.shape[1:] if stacked else var.shape
            shape = _param_to_hf_shape(transform, tuple(one), config)
            yield (template.format(i=i) if stacked else template), shape, dt, produce


def _param_to_hf_shape(transform: str, shape: tuple[int, ...], config: Qwen2_5_VLConfig):
    if transform == "linear":
        return tuple(reversed(shape))
    if transform == "conv_to_linear":
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return shape


def save_hf_checkpoint(
    model: Qwen2_5_VLForConditionalGeneration,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: Any = None,
    layout: str = "legacy",
    generation_config: dict[str, Any] | None = None,
) -> list[str]:
    """Writes an HF directory that transformers' ``from_pretrained`` loads.

    Files: ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when larger than ``max_shard_size``, bytes or "5GB"),
    ``config.json`` (nested layout) and ``generation_config.json``.
    ``dtype`` converts tensors (default: each parameter's own dtype). ``layout`` picks the tensor
    names: "legacy" (what the hub and ``save_pretrained`` use) or "v5".
    LoRA adapters (:mod:`tatar_jax.models.lora`) are merged into full weights (on the host).
    Returns the written safetensors file names.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    model = lora.merge(model, on_host=True)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[list[Any]] = [[]]
    size = 0
    for t in _hf_tensors(model, layout, dtype):
        nbytes = math.prod(t[1]) * np.dtype(t[2]).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for fname in os.listdir(out_dir):  # stale shards of an earlier save would shadow ours
        if fname.endswith(".safetensors") or fname == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, fname))
    total = 0
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        write_safetensors(os.path.join(out_dir, fname), shard)
        for name, shape, dt, _ in shard:
            weight_map[name] = fname
            total += math.prod(shape) * np.dtype(dt).itemsize
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = model.config.to_hf_dict()
    first = np.dtype(dtype) if dtype is not None else np.dtype(model.lm_head_weight()[0].dtype)
    cfg["dtype"] = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(
        first, "float32"
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = generation_config or {
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": _jsonable(model.config.eos_token_id),
        "pad_token_id": model.config.pad_token_id,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return names


def _jsonable(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = s.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)
