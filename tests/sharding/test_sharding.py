"""Mesh construction and logical-axis rules (8 virtual CPU devices, see conftest)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tatar_jax import sharding


def test_eight_virtual_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "shape,expected",
    [
        ({"fsdp": -1}, {"data": 1, "fsdp": 8, "tensor": 1}),
        ({"fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}),
        ({"data": 2, "fsdp": -1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({}, None),
    ],
)
def test_make_mesh_shapes(shape, expected):
    if expected is None:
        with pytest.raises(ValueError, match="needs 1 devices"):
            sharding.make_mesh(shape)
        return
    mesh = sharding.make_mesh(shape)
    assert dict(mesh.shape) == expected
    assert mesh.axis_names == sharding.MESH_AXES


def test_make_mesh_dcn():
    mesh = sharding.make_mesh({"fsdp": -1}, dcn_shape={"data": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # each data group is a contiguous granule of 4 devices
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0]
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"fsdp": -1, "tensor": -1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="cannot infer"):
        sharding.make_mesh({"fsdp": -1, "tensor": 3})


def test_logical_to_pspec_fsdp_and_tensor():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    spec = sharding.logical_to_pspec(("layers", "embed", "mlp"), mesh=mesh, shape=(2, 64, 128))
    assert spec == P(None, "fsdp", "tensor")
    # batch over data+fsdp, data has size 1 and is dropped
    assert sharding.logical_to_pspec(("batch", "length"), mesh=mesh) == P("fsdp", None)
    # a mesh axis is used once per spec
    assert sharding.logical_to_pspec(("embed", "vision_embed"), mesh=mesh) == P("fsdp", None)
    # not divisible -> replicated
    assert sharding.logical_to_pspec(("embed", "mlp"), mesh=mesh, shape=(6, 3)) == P(None, None)


def test_fsdp_only_table_change():
    mesh = sharding.make_mesh({"fsdp": 8})
    # same rules, a different mesh: tensor has size 1 so only fsdp shards
    assert sharding.logical_to_pspec(("embed", "mlp"), mesh=mesh, shape=(16, 32)) == P("fsdp", None)
    # pure data parallel table
    assert sharding.logical_to_pspec(("embed", "mlp"), sharding.REPLICATED_RULES, mesh=mesh) == P(
        None, None
    )


class _Toy(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(0.02)
        self.w = nnx.Param(init(rngs.params(), (16, 32)), out_sharding=("embed", "mlp"))
        self.b = nnx.Param(jnp.zeros((32,)), out_sharding=("mlp",))
        self.n = nnx.Param(jnp.ones((5,)))


def test_state_shardings_walks_tree():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    with nnx.use_eager_sharding(False):  # shard through our rules, not flax's eager path
        state = nnx.state(_Toy(nnx.Rngs(0)))
    sh = sharding.state_shardings(state, mesh)
    placed = jax.device_put(state, sh)
    assert placed["w"].value.sharding.spec == P("fsdp", "tensor")
    assert placed["b"].value.sharding.spec == P("tensor")
    assert placed["n"].value.sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(placed["w"].value), np.asarray(state["w"].value))


def test_constrain_is_identity_without_rules_and_shards_with():
    x = jnp.arange(64.0).reshape(8, 8)
    assert sharding.constrain(x, ("batch", None)) is x
    mesh = sharding.make_mesh({"fsdp": -1})

    @jax.jit
    def f(a):
        return sharding.constrain(a * 2, ("batch", None))

    with sharding.use_rules(mesh):
        y = f(x)
    assert y.sharding.spec in (P("fsdp", None), P("fsdp"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_initialize_distributed_noop_single_host():
    sharding.maybe_initialize_distributed()  # no arguments: nothing to do
    sharding.maybe_initialize_distributed(False)
    assert jax.process_count() == 1


# --- the Qwen2.5-VL model on three meshes ---------------------------------------------------

import tiny_models as tm  # noqa: E402

from tatar_jax import logprobs  # noqa: E402
from tatar_jax.models import qwen2_5_vl as qvl  # noqa: E402
from tatar_jax.train import optim  # noqa: E402

MESHES = {
    "1x1": {},
    "fsdp=8": {"fsdp": 8},
    "fsdp=4,tensor=2": {"fsdp": 4, "tensor": 2},
}


def _mesh(name):
    shape = MESHES[name]
    return sharding.make_mesh(shape, devices=jax.devices()[:1] if not shape else None)


def _tiny_model(seed=0):
    return qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.tiny(), dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(seed)
    )


@pytest.fixture(scope="module")
def vl_batch():
    """8 left-padded rows with one 4x4-patch image each (8 rows: fsdp=8 splits the batch)."""
    cfg = qvl.tiny()
    rows = [[2 + i % 3, (1, 4, 4), 4 + i % 4] for i in range(8)]
    b = tm.make_batch(rows, seed=1)
    ids = b["input_ids"].astype(np.int32)
    mask = b["attention_mask"].astype(np.int32)
    grid = b["image_grid_thw"]
    pos, _ = qvl.get_rope_index(ids, grid, mask, cfg)
    layout = qvl.vision_layout(grid, cfg.vision)
    pv = np.zeros((layout.patch_index.shape[0], b["pixel_values"].shape[1]), np.float32)
    pv[: len(b["pixel_values"])] = b["pixel_values"]
    targets = np.where(mask[:, 1:] > 0, ids[:, 1:], -1).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.asarray(pos, np.int32),
        "pixel_values": pv,
        "layout": layout,
        "targets": targets,
    }


def _forward(model, batch):
    return model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        position_ids=batch["position_ids"],
        vision_layout=batch["layout"],
    )


def _train_step(graphdef, tx):
    """One AdamW update on the mean next-token log-likelihood (chunked log-probs)."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        h, _ = model.hidden_states(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            position_ids=batch["position_ids"],
            vision_layout=batch["layout"],
        )
        w, layout = model.lm_head_weight()
        lp = logprobs.token_logprobs(
            h[:, :-1], w, batch["targets"], chunk_size=16, weight_layout=layout
        )
        return -jnp.sum(lp) / jnp.sum(batch["targets"] >= 0)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        new_state, _ = optim.apply_gradients(state, grads, tx, loss=loss)
        return new_state, loss

    return step


def _run_on_mesh(mesh_name, batch):
    """(logits, loss, updated params) of the tiny model on ``mesh_name``, jitted with in/out
    shardings from the rules (parameters, optimizer state and batch placed by logical names)."""
    mesh = _mesh(mesh_name)
    rules = sharding.DEFAULT_RULES
    model = _tiny_model()
    graphdef, params = nnx.split(model)
    # eps 1e-6, not 1e-8: AdamW's first update is lr * g / (|g| + eps), so with eps = 1e-8 a
    # gradient entry that is exactly 0 on one mesh and 1e-10 (reduction-order noise) on another
    # moves by lr / 100 - the optimizer's conditioning, not a sharding difference.
    tx = optim.make_optimizer(1e-3, eps=1e-6, weight_decay=0.01)
    state = jax.tree.map(jnp.copy, optim.TrainState.create(params, tx, jax.random.key(0)))
    state_sh = sharding.state_shardings(state, mesh, rules)
    state = jax.device_put(state, state_sh)
    rows = ("input_ids", "attention_mask", "targets")
    batch_sh = {
        k: (
            sharding.batch_sharding(mesh, np.ndim(v), rules)
            if k in rows
            else sharding.named_sharding(mesh, (None, "batch", None), rules)
            if k == "position_ids"
            else jax.tree.map(lambda _: sharding.replicated(mesh), v)
        )
        for k, v in batch.items()
    }
    dev_batch = jax.device_put(batch, batch_sh)
    with sharding.use_rules(mesh, rules):
        fwd = jax.jit(
            lambda p, b: _forward(nnx.merge(graphdef, p), b),
            in_shardings=(state_sh.params, batch_sh),
        )
        logits = fwd(state.params, dev_batch)
        step = jax.jit(
            _train_step(graphdef, tx),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
        )
        new_state, loss = step(state, dev_batch)
    return mesh, logits, loss, new_state


@pytest.fixture(scope="module")
def mesh_runs(vl_batch):
    return {name: _run_on_mesh(name, vl_batch) for name in MESHES}


@pytest.mark.parametrize("mesh_name", ["fsdp=8", "fsdp=4,tensor=2"])
def test_logits_and_update_equal_across_meshes(mesh_runs, mesh_name):
    _, logits1, loss1, state1 = mesh_runs["1x1"]
    mesh, logits, loss, state = mesh_runs[mesh_name]
    assert len(logits.sharding.device_set) == mesh.size
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits1), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(loss1), atol=1e-6, rtol=1e-6)
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        state.params,
        state1.params,
    )
    worst = max(jax.tree.leaves(diffs))
    dlogits = float(np.max(np.abs(np.asarray(logits) - np.asarray(logits1))))
    print(f"{mesh_name}: max |dlogits| {dlogits:.2e}, max |dparam| {worst:.2e}")
    assert worst <= 1e-5, worst
    # the update really moved the parameters (lr 1e-3): equality is not trivially of unchanged
    moved = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        state1.params,
        nnx.state(_tiny_model()),
    )
    assert min(jax.tree.leaves(moved)) > 1e-4


def _expected_spec(names, shape, mesh, rules):
    """The rules applied by hand: each name's mesh axes, minus axes already used, of size 1, or
    not dividing the dimension."""
    table = dict(rules)
    used, out = set(), []
    for dim, name in zip(shape, names or (None,) * len(shape), strict=True):
        axes = table.get(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


@pytest.mark.parametrize("mesh_name", ["fsdp=8", "fsdp=4,tensor=2"])
def test_every_parameter_and_moment_sharded_by_the_rules(mesh_runs, mesh_name):
    mesh, _, _, state = mesh_runs[mesh_name]
    rules = sharding.DEFAULT_RULES
    n_sharded = 0
    trees = {"params": state.params}
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's (ScaleByAdamState, ...)
    trees.update({"mu": adam.mu, "nu": adam.nu})
    for tree_name, tree in trees.items():
        for path, var in nnx.to_flat_state(tree):
            names = var.get_metadata().get("out_sharding")
            want = _expected_spec(names, var.shape, mesh, rules)
            got = var.get_raw_value().sharding.spec
            assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), (
                tree_name,
                path,
                names,
                got,
                want,
            )
            n_sharded += any(a is not None for a in want)
    assert n_sharded > 30  # most parameters (and both Adam moments) are actually split


def test_rule_tables_name_every_parameter_of_every_preset():
    for preset in ("tiny", "3b", "7b", "32b", "72b"):
        cfg = qvl.tiny() if preset == "tiny" else qvl.preset(preset)
        abstract = nnx.eval_shape(
            lambda cfg=cfg: qvl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        )
        state = nnx.state(abstract)
        for rules_name in ("default", "fsdp", "tensor"):
            rules = sharding.get_rules(rules_name)
            assert sharding.unknown_logical_names(state, rules) == {}, (preset, rules_name)
    with pytest.raises(ValueError, match="unknown sharding rules"):
        sharding.get_rules("zero3")


def test_fsdp_and_tensor_tables_on_one_mesh():
    """FSDP or tensor parallelism is a change of table only (same mesh, same model)."""
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    shape = (2, 64, 128)  # (layers, embed, mlp) of a gate_proj kernel
    names = ("layers", "embed", "mlp")
    assert sharding.logical_to_pspec(names, mesh=mesh, shape=shape) == P(None, "fsdp", "tensor")
    fsdp = sharding.logical_to_pspec(names, sharding.FSDP_RULES, mesh=mesh, shape=shape)
    assert fsdp == P(None, ("fsdp", "tensor"), None)
    tp = sharding.logical_to_pspec(names, sharding.TENSOR_RULES, mesh=mesh, shape=shape)
    assert tp == P(None, None, "tensor")
    batch = ("batch", "length")
    assert sharding.logical_to_pspec(batch, sharding.FSDP_RULES, mesh=mesh) == P(
        ("fsdp", "tensor"), None
    )
    assert sharding.logical_to_pspec(batch, sharding.TENSOR_RULES, mesh=mesh) == P("fsdp", None)


def test_optimizer_state_follows_parameters_with_frozen_leaves():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    abstract = nnx.eval_shape(lambda: _tiny_model())
    params = nnx.state(abstract)
    mask = optim.trainable_mask(params, freeze_vision=True)
    tx = optim.make_optimizer(1e-3, trainable=mask)
    state = jax.eval_shape(lambda p: optim.TrainState.create(p, tx, jax.random.key(0)), params)
    sh = sharding.state_shardings(state, mesh)
    flat = dict(jax.tree_util.tree_leaves_with_path(sh))
    by_path = {jax.tree_util.keystr(k): v for k, v in flat.items()}
    q = [v for k, v in by_path.items() if "q_proj" in k and "kernel" in k]
    # params, mu and nu of the trainable q_proj kernel: the same sharding
    assert len(q) == 3 and all(s.spec == P(None, "fsdp", "tensor") for s in q), q
    # frozen vision leaves have no moments (MaskedNode) and no sharding leaves
    assert not any("visual" in k and ".mu" in k for k in by_path)
    placed = sharding.abstract_with_shardings(state, sh)
    assert placed.params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("remat", [None, "full", "dots_saveable"])
def test_program_size_flat_in_depth(remat):
    """Layers are scanned: the compiled-program text of a decoder's forward + backward does not
    grow with the number of layers (compile time follows program size), for each remat policy."""
    from tatar_jax.models.qwen2_5_vl.language import TextModel

    def hlo_lines(layers):
        cfg = dataclasses.replace(qvl.tiny().text, num_hidden_layers=layers)
        abstract = nnx.eval_shape(lambda: TextModel(cfg, remat=remat, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(abstract)
        x = jax.ShapeDtypeStruct((2, 8, cfg.hidden_size), jnp.float32)
        cs = jax.ShapeDtypeStruct((2, 8, cfg.head_dim), jnp.float32)
        mask = jax.ShapeDtypeStruct((2, 8), jnp.int32)

        def loss(p, x, cos, sin, m):
            h, _ = nnx.merge(graphdef, p)(x, cos, sin, m)
            return jnp.sum(h)

        text = jax.jit(jax.grad(loss)).lower(params, x, cs, cs, mask).as_text()
        return len(text.splitlines())

    assert hlo_lines(2) == hlo_lines(12)
