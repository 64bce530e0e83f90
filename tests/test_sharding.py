"""Mesh construction and logical-axis rules (8 virtual CPU devices, see conftest)."""

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
