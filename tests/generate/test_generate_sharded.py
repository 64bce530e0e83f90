"""Data-parallel rollout (``generate.Sampler(mesh=...)``) equals the one-device engine.

A tiny random fp32 model on the 8 virtual CPU devices of tests/conftest.py: greedy tokens equal
exactly and log-probs within 1e-5 with the batch over fsdp=8 and over data=2 x fsdp=4 (weights
FSDP-sharded); sampled tokens with the same key equal too (per-row keys do not depend on the
sharding); a batch the shards do not divide is padded and trimmed; rows, cache and weights are
really spread over the devices. Measured numbers are printed with ``-s``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models as tm
from flax import nnx

from tatar_jax import generate, sharding
from tatar_jax.models import qwen2_5_vl as qvl

STOP = (2,)
NEW = 8
# 8 prompts: text only and images of different sizes, left-padded to one length
ROWS = [
    [2, (1, 4, 8), 3],
    [1, (1, 8, 4), 5],
    [9],
    [3, (1, 4, 4), 2],
    [12],
    [1, (1, 4, 8), 1],
    [4],
    [2, (1, 8, 8), 2],
]


@pytest.fixture(scope="module")
def model():
    cfg = qvl.config.tiny()
    return qvl.Qwen2_5_VLForConditionalGeneration(cfg, rngs=nnx.Rngs(0), init_std=0.08)


def _mesh(shape):
    return sharding.make_mesh(shape)


def _run(model, batch, params, mesh=None, rng=None):
    s = generate.Sampler(model, params, mesh=mesh, prompt_multiple=32)
    out = s(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
        rng=rng,
    )
    return s, out


MESHES = {
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
}


GREEDY = generate.SamplingParams(max_new_tokens=NEW, num_samples=2, stop_token_ids=STOP)


@pytest.fixture(scope="module")
def greedy_ref(model):
    batch = tm.make_batch(ROWS, seed=4)
    return batch, _run(model, batch, GREEDY)[1]


@pytest.mark.parametrize("name", sorted(MESHES))
def test_greedy_sharded_equals_single_device(model, greedy_ref, name):
    batch, ref = greedy_ref
    s, out = _run(model, batch, GREEDY, mesh=_mesh(MESHES[name]))
    # the rows really are split: 16 rows over 8 devices, 2 each
    shards = out.tokens.addressable_shards
    assert len({sh.device for sh in shards}) == 8
    assert {sh.data.shape[0] for sh in shards} == {2}
    # the weights are FSDP-sharded (embed over fsdp): not one full copy per device
    emb = s.state["language_model"]["embed_tokens"]["embedding"][...]
    assert emb.addressable_shards[0].data.size < emb.size
    tok, ref_tok = np.asarray(out.tokens), np.asarray(ref.tokens)
    np.testing.assert_array_equal(tok, ref_tok)
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    d = float(np.abs(np.asarray(out.logps) - np.asarray(ref.logps)).max())
    print(f"[generate sharded] greedy {name}: tokens equal, max|Δ logp| {d:.2e}")
    assert d <= 1e-5
    assert len(np.unique(ref_tok)) > 3
    np.testing.assert_array_equal(tok[0::2], tok[1::2])  # G copies of one prompt stay together


def test_sampled_sharded_equals_single_device_and_padding(model):
    # 6 text prompts (the vision tower is covered above): padded to 8 rows for fsdp=8
    batch = tm.make_batch([[5], [9], [3], [12], [7], [2]], seed=7)
    params = generate.SamplingParams(
        max_new_tokens=NEW, num_samples=2, temperature=1.0, top_k=20, stop_token_ids=()
    )
    rng = jax.random.key(3)
    _, ref = _run(model, batch, params, rng=rng)
    s, out = _run(model, batch, params, mesh=_mesh(MESHES["fsdp8"]), rng=rng)
    assert s.num_batch_shards == 8 and out.tokens.shape == (12, NEW)
    tok = np.asarray(out.tokens)
    np.testing.assert_array_equal(tok, np.asarray(ref.tokens))
    d = float(np.abs(np.asarray(out.logps) - np.asarray(ref.logps)).max())
    print(f"[generate sharded] sampled fsdp8 (6 prompts padded to 8): max|Δ logp| {d:.2e}")
    assert d <= 1e-5
    assert not np.array_equal(tok[0], tok[1])  # the two samples of a prompt differ


def test_generate_function_with_mesh_and_presharded_state(model):
    batch = tm.make_batch([[4], [9], [2], [6]], seed=1)
    kw = dict(max_new_tokens=4, stop_token_ids=STOP)
    ref = generate.generate(model, batch["input_ids"], batch["attention_mask"], **kw)
    mesh = _mesh(MESHES["data2_fsdp4"])
    out = generate.generate(model, batch["input_ids"], batch["attention_mask"], mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    assert jnp.issubdtype(out.tokens.dtype, jnp.integer)
    # the rollout's weights are always in the sampler's own layout (its rules on its mesh),
    # whatever the layout they come in; weights already in it are used as given (no copy)
    s = generate.Sampler(model, generate.SamplingParams(**kw), mesh=mesh)
    want = jax.tree.leaves(s._state_shardings)
    for given in (nnx.state(model), jax.device_put(nnx.state(model), sharding.replicated(mesh))):
        placed = s.place_state(given)
        for x, sh in zip(jax.tree.leaves(placed), want, strict=True):
            assert x.sharding.is_equivalent_to(sh, x.ndim)
    assert s.place_state(placed) is not placed  # a new tree ...
    again = jax.tree.leaves(s.place_state(placed))
    assert all(a is b for a, b in zip(again, jax.tree.leaves(placed), strict=True))  # same arrays


def test_rollout_weights_in_compute_dtype_replicated_no_gather_in_decode(model):
    """fp32 FSDP training weights -> the rollout's bf16 replicated copy; the decode program then
    holds no all-gather (the parameters are never gathered per token) and greedy tokens equal
    those of a sampler handed the bf16-cast weights directly."""
    bf = qvl.Qwen2_5_VLForConditionalGeneration(
        qvl.config.tiny(), rngs=nnx.Rngs(0), init_std=0.08, dtype=jnp.bfloat16
    )
    mesh = _mesh({"fsdp": 8})
    fsdp = jax.device_put(nnx.state(bf), sharding.state_shardings(nnx.state(bf), mesh))
    kw = dict(max_new_tokens=4, stop_token_ids=STOP)
    rep = sharding.make_mesh({"data": 8})
    s = generate.Sampler(
        bf, generate.SamplingParams(**kw), mesh=rep, rules=sharding.get_rules("replicated")
    )
    w = s.place_state(fsdp)
    for x in jax.tree.leaves(w):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.bfloat16
        assert x.sharding.is_fully_replicated
    batch = tm.make_batch([[4], [9], [2], [6], [3], [5], [7], [8]], seed=1)
    args = s.prepare(batch["input_ids"], batch["attention_mask"]).arrays()
    with sharding.use_rules(rep, s.rules):
        _, decode = s.lower(w, *args, jax.random.key(0))
    hlo = decode.compile().as_text()
    assert "all-gather" not in hlo
    out = s.generate(batch["input_ids"], batch["attention_mask"], state=fsdp)
    ref = generate.Sampler(bf, generate.SamplingParams(**kw)).generate(
        batch["input_ids"],
        batch["attention_mask"],
        state=jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            nnx.state(bf),
        ),
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


_PROCESS = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tatar_jax import generate, sharding
from tatar_jax.models import qwen2_5_vl as qvl
model = qvl.Qwen2_5_VLForConditionalGeneration(qvl.config.tiny(), rngs=nnx.Rngs(0), init_std=0.08)
batch = {k: np.array(v) for k, v in json.loads(sys.argv[3]).items()}
params = generate.SamplingParams(
    max_new_tokens=5, num_samples=2, temperature=1.0, top_k=20, stop_token_ids=()
)
s = generate.Sampler(model, params, mesh=sharding.make_mesh({"fsdp": -1}), prompt_multiple=32)
out = s(batch["input_ids"], batch["attention_mask"], rng=jax.random.key(3))
tok, lp = (np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in out[::2])
print(json.dumps({"tokens": tok.tolist(), "logps": lp.tolist()}))
"""


@pytest.mark.slow
def test_mesh_over_two_processes_equals_single_device(model):
    """Two JAX processes x 2 CPU devices (jax.distributed on localhost), one fsdp=4 mesh over
    both: every process passes the same 3 text prompts (padded to 4 rows); the gathered samples
    equal the one-device engine's."""
    import json
    import os
    import socket
    import subprocess
    import sys

    batch = tm.make_batch([[7], [9], [4]], seed=4)  # text only: the vision tower is covered above
    params = generate.SamplingParams(
        max_new_tokens=5, num_samples=2, temperature=1.0, top_k=20, stop_token_ids=()
    )
    _, ref = _run(model, batch, params, rng=jax.random.key(3))
    arrays = json.dumps({k: batch[k].tolist() for k in ("input_ids", "attention_mask")})
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.join(tests, "helpers"), os.path.dirname(tests)]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(p), port, arrays],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        np.testing.assert_array_equal(np.array(got["tokens"]), np.asarray(ref.tokens))
        d = float(np.abs(np.array(got["logps"]) - np.asarray(ref.logps)).max())
        print(f"[generate sharded] 2 processes x 2 devices, sampled: max|Δ logp| {d:.2e}")
        assert d <= 1e-5
