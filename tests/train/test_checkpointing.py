"""Checkpoints: bit-identical save/restore, exact resume after ``kill -9`` at a random step
(subprocess, async saves, grain iterator state), SIGTERM -> save + exit 0, params-only loading."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tatar_jax.train import checkpointing, optim

TOTAL_STEPS = 30

# A tiny training run: linear regression, AdamW + linear decay + clipping, a grain pipeline
# (shuffled, repeated, batched), per-step RNG noise on the gradient, async checkpoints every 3
# steps. Prints "STEP n" after each step.
TRAIN_SCRIPT = r"""
import os, sys, time
import numpy as np
import jax, jax.numpy as jnp
import grain
sys.path.insert(0, os.environ["REPO_ROOT"])
from tatar_jax.train import checkpointing, optim

workdir, total, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 8)).astype(np.float32)
Y = X @ rng.normal(size=8).astype(np.float32)
ds = (grain.MapDataset.range(64).repeat(100).shuffle(seed=7)
      .map(lambda i: {"x": X[i], "y": Y[i]}).batch(4).to_iter_dataset())
it = iter(ds)
sched = optim.make_schedule(0.05, total)
tx = optim.make_optimizer(sched, max_grad_norm=1.0)

def init():
    return optim.TrainState.create({"w": jnp.zeros(8), "b": jnp.zeros(())}, tx, jax.random.key(42))

@jax.jit
def train_step(state, batch):
    def loss_fn(p, b):
        return jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2), {}
    loss, grads, _ = optim.accumulate_gradients(loss_fn, state.params, batch, 2)
    noise = jax.random.normal(optim.rng_for_step(state), (8,)) * 0.01
    grads = {"w": grads["w"] + noise, "b": grads["b"]}
    return optim.apply_gradients(state, grads, tx, loss=loss)

ckpt = checkpointing.Checkpointer(workdir, every_steps=3, keep=2, async_save=True,
                                  handle_sigterm=True)
state, resumed = ckpt.restore_or_init(init, data_iter=it)
print("RESUMED", resumed, flush=True)
step = int(state.step)
while step < total:
    state, _ = train_step(state, next(it))
    step += 1
    ckpt.save(step, state, data_iter=it, meta={"note": "test"})
    print("STEP", step, flush=True)
    if ckpt.reached_preemption(step):
        ckpt.save(step, state, data_iter=it, force=True)
        ckpt.close()
        print("PREEMPTED", step, flush=True)
        sys.exit(0)
    time.sleep(sleep)
ckpt.save(step, state, data_iter=it, force=True)
ckpt.close()
np.save(os.path.join(workdir, "final_w.npy"), np.asarray(state.params["w"]))
np.save(os.path.join(workdir, "final_b.npy"), np.asarray(state.params["b"]))
print("DONE", step, flush=True)
"""


def _start(tmp_path, workdir, repo_root, sleep=0.0):
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    env = dict(os.environ, REPO_ROOT=str(repo_root), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(script), str(workdir), str(TOTAL_STEPS), str(sleep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_for_step(proc, step, timeout=120):
    lines, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("STEP ") and int(line.split()[1]) >= step:
            return lines
    raise AssertionError(f"never reached step {step}:\n{''.join(lines)}")


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _final(workdir):
    return (workdir / "final_w.npy").read_bytes(), (workdir / "final_b.npy").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, repo_root):
    tmp = tmp_path_factory.mktemp("full")
    rc, out = _finish(_start(tmp, tmp / "run", repo_root))
    assert rc == 0, out
    assert "RESUMED None" in out and f"DONE {TOTAL_STEPS}" in out
    return _final(tmp / "run")


def test_kill9_at_random_step_resumes_bit_identically(tmp_path, repo_root, uninterrupted):
    kill_at = random.Random().randint(4, TOTAL_STEPS - 4)
    workdir = tmp_path / "run"
    proc = _start(tmp_path, workdir, repo_root, sleep=0.05)
    _wait_for_step(proc, kill_at)
    # The first async save may still be in flight; kill once one checkpoint is complete, so the
    # restart really resumes (orbax renames a step directory to its number only when complete).
    ckdir = workdir / "checkpoints"
    while not any(d.name.isdigit() for d in ckdir.iterdir()):
        kill_at = int(_wait_for_step(proc, kill_at + 1)[-1].split()[1])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out = _finish(_start(tmp_path, workdir, repo_root))
    assert rc == 0, out
    resumed = int(out.split("RESUMED ")[1].split()[0])
    assert 3 <= resumed <= kill_at + 1, (kill_at, out)
    print(f"killed at step {kill_at}, resumed at {resumed}")
    assert _final(workdir) == uninterrupted, f"killed at step {kill_at}, resumed at {resumed}"


def test_sigterm_saves_and_exits_cleanly(tmp_path, repo_root, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(tmp_path, workdir, repo_root, sleep=0.05)
    _wait_for_step(proc, 5)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0, out
    stopped = int(out.split("PREEMPTED ")[1].split()[0])
    ckpt = checkpointing.Checkpointer(workdir, every_steps=3, handle_sigterm=False)
    assert ckpt.latest_step() == stopped
    ckpt.close()
    rc, out = _finish(_start(tmp_path, workdir, repo_root))
    assert rc == 0 and f"RESUMED {stopped}" in out, out
    assert _final(workdir) == uninterrupted


def _state(seed=0):
    params = {"visual": {"w": jnp.arange(6.0).reshape(2, 3) + seed}, "lm": {"w": jnp.ones((4,))}}
    tx = optim.make_optimizer(1e-2)
    s = optim.TrainState.create(params, tx, jax.random.key(seed))
    s, _ = optim.apply_gradients(s, jax.tree.map(jnp.ones_like, params), tx)
    return s, tx


def _iter():
    return iter(grain.MapDataset.range(20).shuffle(seed=3).batch(2).to_iter_dataset())


def test_save_restore_bit_identical_with_typed_key_and_data(tmp_path):
    state, _ = _state()
    tree = {"train": state, "key": jax.random.key(7), "bf16": jnp.ones(3, jnp.bfloat16) / 3}
    it = _iter()
    next(it)
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=5, keep=2)
    assert not ckpt.save(3, tree, data_iter=it)  # not a save step
    assert ckpt.save(5, tree, data_iter=it, meta={"cfg": "x"})
    expected_next = next(it)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    fresh = _iter()
    restored, meta = ckpt.restore(5, jax.eval_shape(lambda: tree), data_iter=fresh)
    assert meta == {"cfg": "x", "step": 5}
    np.testing.assert_array_equal(next(fresh), expected_next)  # data position restored
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype and isinstance(a, jax.Array)
        np.testing.assert_array_equal(a, b)
    for step in (10, 15):
        ckpt.save(step, tree, data_iter=it)
    ckpt.wait()
    assert ckpt.all_steps() == [10, 15]  # keep-N
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_restore_or_init_and_load_params(tmp_path):
    state, tx = _state(seed=1)
    ckpt = checkpointing.Checkpointer(tmp_path / "run", every_steps=1, with_data=False)
    init_calls = []

    def init():
        key = jax.random.key(0)
        if not isinstance(key, jax.core.Tracer):  # traced by eval_shape: not an init run
            init_calls.append(1)
        return optim.TrainState.create(state.params, tx, key)

    s0, step = ckpt.restore_or_init(init)
    assert step is None and len(init_calls) == 1
    ckpt.save(4, state)
    ckpt.close()
    ckpt = checkpointing.Checkpointer(tmp_path / "run", every_steps=1, with_data=False)
    # With an abstract state restoring never runs the init.
    s1, step = ckpt.restore_or_init(init, abstract_state=jax.eval_shape(init))
    assert step == 4 and len(init_calls) == 1
    s2, _ = ckpt.restore_or_init(init)  # default (runs init for shardings on > 1 device)
    ckpt.close()
    np.testing.assert_array_equal(s2.params["lm"]["w"], state.params["lm"]["w"])
    np.testing.assert_array_equal(s1.params["visual"]["w"], state.params["visual"]["w"])
    np.testing.assert_array_equal(
        s1.opt_state[1][0].mu["lm"]["w"], state.opt_state[1][0].mu["lm"]["w"]
    )
    target = jax.eval_shape(lambda: state.params)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "4"):
        params, step = checkpointing.load_params(path, target)
        assert step == 4
        np.testing.assert_array_equal(params["lm"]["w"], state.params["lm"]["w"])
    with pytest.raises(FileNotFoundError, match="step 9"):
        checkpointing.load_params(tmp_path / "run", target, step=9)
    with pytest.raises(FileNotFoundError):
        checkpointing.load_params(tmp_path / "nothing", target)


def test_sharded_restore_keeps_shardings(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from tatar_jax.sharding import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    shard = NamedSharding(mesh, P("fsdp", "tensor"))
    state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), shard), "s": jnp.int32(3)}
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, with_data=False)
    ckpt.save(1, state)
    ckpt.wait()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, _ = ckpt.restore(1, abstract)
    assert restored["w"].sharding == shard
    np.testing.assert_array_equal(restored["w"], state["w"])
    # Without an abstract state, restore_or_init takes the shardings of the init.
    resumed, step = ckpt.restore_or_init(lambda: jax.tree.map(jnp.zeros_like, state))
    ckpt.close()
    assert step == 1 and resumed["w"].sharding == shard
    np.testing.assert_array_equal(resumed["w"], state["w"])


def test_nnx_model_train_state_round_trip(tmp_path):
    """The real tiny Qwen2.5-VL parameter State (frozen vision) in a TrainState."""
    qvl = pytest.importorskip("tatar_jax.models.qwen2_5_vl")
    from flax import nnx

    # The real parameter State structure without a (slow, eager) random init: random values.
    abstract = nnx.eval_shape(
        lambda: qvl.Qwen2_5_VLForConditionalGeneration(qvl.tiny(), rngs=nnx.Rngs(0))
    )
    _, params_abs = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params_abs)
    mask = optim.trainable_mask(params, freeze_vision=True)
    tx = optim.make_optimizer(1e-3, trainable=mask)

    def init():
        return optim.TrainState.create(params, tx, jax.random.key(0))

    state = jax.jit(init)()
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, with_data=False)
    ckpt.save(1, state)
    ckpt.close()
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, with_data=False)
    restored, step = ckpt.restore_or_init(init)
    ckpt.close()
    assert step == 1
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    loaded, _ = checkpointing.load_params(tmp_path, jax.eval_shape(lambda: params))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _damage(step_dir, how):
    """Truncate the data files of a step's ``state`` item (half of each), or corrupt its
    manifest."""
    if how == "truncate":
        big = max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    else:
        (step_dir / "state" / "manifest.ocdbt").write_bytes(b"xx")


def test_damaged_latest_step_falls_back_and_is_moved_aside_not_deleted(tmp_path, caplog):
    tx = optim.make_optimizer(1e-2)
    # Arrays large enough to live in data files (orbax inlines tiny ones in its b-tree).
    params = {"visual": {"w": jnp.ones((2, 3))}, "lm": {"w": jnp.arange(50_000.0)}}

    def state(s):
        return optim.TrainState.create(jax.tree.map(lambda x: x + s, params), tx, jax.random.key(s))

    states = {s: state(s) for s in (1, 2, 3)}
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, keep=5, async_save=False)
    it = _iter()
    for s in (1, 2, 3):
        ckpt.save(s, states[s], data_iter=it)
        next(it)
    ckpt.close()
    d = tmp_path / "checkpoints"
    _damage(d / "3", "truncate")
    n_files = sum(1 for p in (d / "3").rglob("*") if p.is_file())
    # load_params (next stage / export) takes the newest readable step, read-only.
    target = jax.eval_shape(lambda: states[1].params)
    params, step = checkpointing.load_params(tmp_path, target)
    assert step == 2 and (d / "3").is_dir()
    np.testing.assert_array_equal(params["lm"]["w"], states[2].params["lm"]["w"])
    with pytest.raises(checkpointing.CheckpointError, match=r"step 3: .*OUT_OF_RANGE.*byte range"):
        checkpointing.load_params(tmp_path, target, step=3)

    caplog.clear()
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, keep=5, async_save=False)
    fresh = _iter()
    state, step = ckpt.restore_or_init(lambda: states[1], data_iter=fresh)
    assert step == 2
    np.testing.assert_array_equal(state.params["visual"]["w"], states[2].params["visual"]["w"])
    np.testing.assert_array_equal(next(fresh), next(_skip(_iter(), 1)))  # step 2's position
    warn = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warn) == 1 and f"{d}/3 is damaged: ValueError: OUT_OF_RANGE" in warn[0]
    # Moved, not deleted, so the run can write step 3 again.
    moved = tmp_path / "checkpoints_damaged" / "3"
    assert sum(1 for p in moved.rglob("*") if p.is_file()) == n_files and not (d / "3").exists()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, states[3], data_iter=fresh)
    assert ckpt.all_steps() == [1, 2, 3]
    ckpt.close()

    # Every step unreadable: an error listing each; all are moved aside as a single damaged
    # step is (issue 32 item 5), never deleted, so the next start is a fresh run.
    for s in (1, 2, 3):
        _damage(d / str(s), "manifest")
    ckpt = checkpointing.Checkpointer(tmp_path, every_steps=1, keep=5, async_save=False)
    with pytest.raises(checkpointing.CheckpointError) as err:
        ckpt.restore_or_init(lambda: states[1], data_iter=_iter())
    ckpt.close()
    msg = str(err.value)
    assert "step 3: ValueError: DATA_LOSS" in msg and "step 1: " in msg and "\n" not in msg
    assert "Encoded length (2) is less than minimum length" in msg
    assert msg.endswith(f"moved to {tmp_path / 'checkpoints_damaged'}: rerun to start the run "
                        "again from step 0")  # fmt: skip
    assert not [p for p in d.iterdir() if p.name.isdigit()]
    damaged = sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir())
    assert damaged == ["1", "2", "3", "3.1"]  # the earlier damaged 3 is kept beside


def _skip(it, n):
    for _ in range(n):
        next(it)
    return it
