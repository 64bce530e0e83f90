"""Sharded HF checkpoint loading: each array lands on its shards, read shard by shard."""

from __future__ import annotations

import dataclasses
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from tatar_jax import sharding
from tatar_jax.models import qwen2_5_vl as qvl
from tatar_jax.models.qwen2_5_vl import checkpoint as ckpt_mod


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model saved as an HF directory (bf16 tensors, several files); a 4k vocabulary
    makes the embedding and lm_head (1 MiB each in float32) large next to numpy's cast buffers."""
    cfg = qvl.tiny()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=4096))
    model = qvl.Qwen2_5_VLForConditionalGeneration(
        cfg, dtype=jnp.float32, param_dtype=jnp.float32, init_std=0.08, rngs=nnx.Rngs(3)
    )
    path = tmp_path_factory.mktemp("hf")
    qvl.save_hf_checkpoint(model, path, dtype=ml_dtypes.bfloat16, max_shard_size=1_000_000)
    return model, str(path)


class _Spy:
    """Wraps ``jax.make_array_from_callback``: per callback, the shard it returned and the peak
    host memory (tracemalloc: numpy allocations included) allocated while it ran."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, shape, sharding_, cb):
        def wrapped(index):
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            out = cb(index)
            _, peak = tracemalloc.get_traced_memory()
            full = int(np.prod(shape)) * out.dtype.itemsize
            self.calls.append((shape, out.shape, out.nbytes, peak - before, full))
            return out

        return self.real(shape, sharding_, wrapped)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}])
def test_load_onto_mesh_by_the_rules_shard_by_shard(saved, monkeypatch, mesh_shape):
    model, path = saved
    mesh = sharding.make_mesh(mesh_shape)
    spy = _Spy(jax.make_array_from_callback)
    monkeypatch.setattr(ckpt_mod.jax, "make_array_from_callback", spy)
    tracemalloc.start()
    try:
        loaded = qvl.load_hf_checkpoint(path, jnp.float32, mesh=mesh)
    finally:
        tracemalloc.stop()

    want = sharding.state_shardings(nnx.state(loaded), mesh)
    ref = dict(nnx.to_flat_state(nnx.state(model)))
    n_split = 0
    for (path_, var), (_, sh) in zip(
        nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(want), strict=True
    ):
        arr = var.get_raw_value()
        assert arr.sharding.is_equivalent_to(sh.get_raw_value(), arr.ndim), path_
        # the values are the saved (bf16-rounded) ones
        expect = np.asarray(ref[path_].get_raw_value()).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(arr), expect.astype(np.float32), err_msg=path_)
        n_split += arr.sharding.shard_shape(arr.shape) != arr.shape
    assert n_split >= 15

    assert len(spy.calls) >= len(ref)
    for shape, got, nbytes, peak, full in spy.calls:
        # each callback returns one shard, and allocates about that much, never the whole array
        assert nbytes <= full
        # (numpy's casting buffers add a few KiB)
        assert peak <= 1.25 * nbytes + 32768, (shape, got, nbytes, peak)
    split = [c for c in spy.calls if c[2] * 4 <= c[4]]
    assert len(split) >= 15
    biggest = max(c[4] for c in spy.calls)
    worst = max(c[3] - c[2] for c in spy.calls)
    print(
        f"{mesh_shape}: {len(spy.calls)} callbacks, largest array {biggest} B, "
        f"largest callback peak {max(c[3] for c in spy.calls)} B, peak-shard <= {worst} B"
    )
    assert max(c[3] for c in split) < biggest / 2
