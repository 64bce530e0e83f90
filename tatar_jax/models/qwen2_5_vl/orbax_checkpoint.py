"""Our parameter tree with orbax: ``save_orbax`` writes ``<dir>/params`` (the pure dict of
``nnx.state(model, nnx.Param)``, our parameter paths) and ``<dir>/config.json``; ``load_orbax``
restores it, optionally straight onto a mesh's shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tatar_jax.models.qwen2_5_vl.config import load_config_json
from tatar_jax.models.qwen2_5_vl.hf_checkpoint import param_variables, shardings_from_mesh
from tatar_jax.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

__all__ = ["ORBAX_PARAMS", "load_orbax", "save_orbax"]

ORBAX_PARAMS = "params"


def save_orbax(model: Qwen2_5_VLForConditionalGeneration, out_dir: str | os.PathLike[str]) -> str:
    """Writes the parameters with orbax (``out_dir/params``) and ``out_dir/config.json``.

    The tree is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (our parameter paths).
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, ORBAX_PARAMS)
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists; choose an empty output directory")
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree)
        ckptr.wait_until_finished()
    model.config.to_json_file(os.path.join(out_dir, "config.json"))
    return target


def load_orbax(
    orbax_dir: str | os.PathLike[str],
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    *,
    mesh: Any = None,
    rules: Any = None,
    shardings: Callable[[tuple[str, ...], Any], Any] | None = None,
    attention_impl: str | None = None,
) -> Qwen2_5_VLForConditionalGeneration:
    """Inverse of :func:`save_orbax`; parameters are cast to ``param_dtype`` (default ``dtype``).

    ``mesh``/``rules``/``shardings``/``attention_impl`` as in :func:`load_hf_checkpoint`.
    """
    import orbax.checkpoint as ocp

    orbax_dir = os.path.abspath(os.fspath(orbax_dir))
    param_dtype = dtype if param_dtype is None else param_dtype
    if shardings is None and mesh is not None:
        shardings = shardings_from_mesh(mesh, rules)
    config = load_config_json(orbax_dir)
    if attention_impl is not None:
        config = config.replace(attention_impl=attention_impl)
    abstract = nnx.eval_shape(
        lambda: Qwen2_5_VLForConditionalGeneration(
            config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)
        )
    )
    variables = param_variables(abstract)
    state = nnx.state(abstract, nnx.Param)
    template = nnx.to_pure_dict(state)

    def target(path, leaf):
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        sharding = None if shardings is None else shardings(keys, variables[keys])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    template = jax.tree_util.tree_map_with_path(target, template)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(orbax_dir, ORBAX_PARAMS), template)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
    return abstract
