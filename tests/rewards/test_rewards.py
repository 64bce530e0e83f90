"""Rewards (spec §8) against plain-Python transcriptions of the spec formulas, written here.

The loops below follow the spec text line by line (probabilities clipped in probability space,
``math.log``/``math.exp``, dictionaries of groups) — a different code path from the vectorised,
log-sigmoid implementation in ``tatar_jax.rewards``. float64 runs use ``jax.enable_x64``.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reward_loops import clip100, loop_gaussian, loop_soft_rank, loop_thurstone

from tatar_jax import rewards

HSET = settings(max_examples=60, derandomize=True, deadline=None)
_STATIC = ("threshold", "target", "alpha_iqa", "alpha_iaa", "iqa_max_words", "iaa_min_words",
           "iqa_scale", "iaa_scale", "tau", "m", "eps", "num_groups", "local_size")  # fmt: skip


def _jit(fn):
    import inspect

    names = [n for n in _STATIC if n in inspect.signature(fn).parameters]
    return jax.jit(fn, static_argnames=names)


# Jitted once per (shape, dtype, options): eager op-by-op dispatch is far slower in tests.
gaussian = _jit(rewards.gaussian_score_reward)
soft_rank = _jit(rewards.soft_rank_reward)
thurstone = _jit(rewards.thurstone_rank_reward)
threshold_r = _jit(rewards.threshold_reward)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------

KINDS = ("random", "single_group", "all_iqa", "all_equal", "zero_var", "extreme", "unparsed")


def make_batch(kind: str, seed: int, prompts: int = 6, g: int = 4):
    rng = np.random.default_rng(seed)
    if kind == "single_group":
        prompts = 1
    n = prompts * g
    gid = np.repeat(np.arange(prompts), g).astype(np.int32)
    task = rng.random(prompts) < 0.6
    if kind == "all_iqa":
        task[:] = False
    is_iaa = np.repeat(task, g)
    gt = np.repeat(rng.uniform(-5, 105, prompts), g)
    pred = rng.uniform(-10, 110, n)
    if kind == "all_equal":
        pred[:] = 55.5
        gt[:] = 40.0
    if kind == "zero_var":
        pred = np.repeat(rng.uniform(0, 100, prompts), g)
    if kind == "extreme":
        pred = rng.choice([-1e30, -1e6, 0.0, 1e-30, 100.0, 1e6, 1e30, 50.0], n)
        gt = np.repeat(rng.choice([0.0, 100.0, 50.0, 99.99], prompts), g)
    parsed = rng.random(n) < (0.35 if kind == "unparsed" else 0.85)
    pred = np.where(parsed, pred, np.nan)  # unparsed entries must be ignored, even NaN
    words = rng.integers(0, 300, n).astype(np.int32)
    words[::3] = rng.choice([64, 65, 66, 124, 125, 126], len(words[::3]))
    # Inputs exactly representable in float32, so float32 runs differ only by arithmetic.
    pred = pred.astype(np.float32).astype(np.float64)
    gt = gt.astype(np.float32).astype(np.float64)
    return dict(pred=pred, gt=gt, parsed=parsed, words=words, is_iaa=is_iaa, gid=gid)


def _max_err(ours, ref):
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape and np.all(np.isfinite(ours))
    return float(np.max(np.abs(ours - ref))) if ref.size else 0.0


def _run(fn, b, x64: bool, **kw):
    dt = np.float64 if x64 else np.float32
    pred, gt = b["pred"].astype(dt), b["gt"].astype(dt)
    with jax.enable_x64(x64):
        out = fn(pred, gt, b, **kw)
        assert out.dtype == dt
        return np.asarray(out, np.float64)


FNS = {
    "gaussian": (
        lambda p, g, b, **kw: gaussian(p, g, b["parsed"], b["words"], b["is_iaa"], **kw),
        lambda b, **kw: loop_gaussian(b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"]),
    ),
    "soft_rank": (
        lambda p, g, b, **kw: soft_rank(p, g, b["parsed"], b["is_iaa"], **kw),
        lambda b, local_size=None: loop_soft_rank(
            b["pred"], b["gt"], b["parsed"], b["is_iaa"], call=local_size
        ),
    ),
    "thurstone": (
        lambda p, g, b, **kw: thurstone(p, g, b["parsed"], b["gid"], b["is_iaa"], **kw),
        lambda b, local_size=None, num_groups=None: loop_thurstone(
            b["pred"], b["gt"], b["parsed"], b["gid"], b["is_iaa"], call=local_size
        ),
    ),
}
MAX_ERR: dict[str, float] = {}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(FNS))
def test_reward_matches_spec_loop(name, kind):
    ours, loop = FNS[name]
    for seed in range(3):
        b = make_batch(kind, seed)
        extra = [{}]
        if name == "thurstone":
            extra += [{"num_groups": int(b["gid"].max()) + 1}, {"local_size": 8}]
        if name == "soft_rank":
            extra += [{"local_size": 4}, {"local_size": 8}]
        for kw in extra:
            ref = loop(b, **kw)
            e64 = _max_err(_run(ours, b, True, **kw), ref)
            e32 = _max_err(_run(ours, b, False, **kw), ref)
            assert e64 <= 1e-6, (name, kind, seed, kw, e64)
            assert e32 <= 1e-5, (name, kind, seed, kw, e32)
            key = f"{name}"
            MAX_ERR[key + "/f64"] = max(MAX_ERR.get(key + "/f64", 0.0), e64)
            MAX_ERR[key + "/f32"] = max(MAX_ERR.get(key + "/f32", 0.0), e32)
    print(f"max|d| so far: {MAX_ERR}", file=sys.stderr)


def test_rank_rewards_degenerate_cases():
    b = make_batch("all_iqa", 1)
    for fn in ("soft_rank", "thurstone"):
        assert not np.any(_run(FNS[fn][0], b, False))
    b = make_batch("single_group", 2)
    b["is_iaa"][:] = True
    assert not np.any(_run(FNS["thurstone"][0], b, False))  # |S| < 2
    # B6: one prompt per reward call (device-local) => Thurstone is identically zero, while the
    # global batch gives a ranking signal.
    b = make_batch("random", 3)
    b["is_iaa"][:] = True
    b["parsed"][:] = True
    b["pred"] = np.nan_to_num(b["pred"], nan=50.0)
    assert not np.any(_run(FNS["thurstone"][0], b, False, local_size=4))
    assert np.all(_run(FNS["thurstone"][0], b, False) > 0)


def test_thurstone_rejects_out_of_range_group_ids():
    b = make_batch("random", 0)
    with pytest.raises(ValueError, match="group_ids"):
        rewards.thurstone_rank_reward(
            b["pred"], b["gt"], b["parsed"], b["gid"], b["is_iaa"], num_groups=2
        )


def test_threshold_and_format():
    b = make_batch("random", 5)
    with jax.enable_x64(True):
        r = np.asarray(threshold_r(b["pred"], b["gt"], b["parsed"], threshold=8.75))
    ref = [
        float(p and abs(clip100(x) - clip100(g)) < 8.75)
        for x, g, p in zip(b["pred"], b["gt"], b["parsed"], strict=True)
    ]
    np.testing.assert_array_equal(r, ref)
    np.testing.assert_array_equal(np.asarray(rewards.format_reward(b["parsed"])), b["parsed"] * 1.0)
    # Strict "<": exactly at T gives 0.
    assert float(threshold_r(np.array([58.75]), np.array([50.0]), np.array([True]))[0]) == 0


# ------------------------------------------------------------------------------------------
# Worked values of the spec
# ------------------------------------------------------------------------------------------


def test_spec_8_2_table():
    d = np.array([0, 2, 5, 7.73, 8.75, 10, 15, 20, 30, 50.0])
    iqa = [1, 0.966, 0.811, 0.619, 0.546, 0.460, 0.197, 0.068, 0.005, 0.000]
    iaa = [1, 1, 1, 1, 0.908, 0.800, 0.449, 0.236, 0.062, 0.005]
    n = len(d)
    for flag, want, words in ((False, iqa, 60), (True, iaa, 200)):
        r = gaussian(
            50 - d, np.full(n, 50.0), np.ones(n, bool), np.full(n, words), np.full(n, flag)
        )
        np.testing.assert_allclose(np.asarray(r), want, atol=5e-4)
    # sigma0 and the 0.5 crossings quoted in §8.2.
    assert abs(8.75 / math.sqrt(-2 * math.log(0.5)) - 7.4316) < 1e-4
    for flag, d_half in ((False, 9.41), (True, 14.13)):
        r = gaussian(
            np.array([50 + d_half - 0.01, 50 + d_half + 0.01]),
            np.full(2, 50.0),
            np.ones(2, bool),
            np.full(2, 60 if not flag else 200),
            np.full(2, flag),
        )
        assert r[0] > 0.5 > r[1]
    # Length rules: IQA > 65 words and IAA < 125 words get 0.
    r = gaussian(
        np.full(4, 50.0), np.full(4, 50.0), np.ones(4, bool), np.array([65, 66, 125, 124]),
        np.array([False, False, True, True]),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(r), [1, 0, 1, 0])


def test_spec_8_4_numbers():
    # A completion the same distance from its 7 group-mates (one image per call, B6).
    for dist, want in ((0, 0.9247), (2, 0.9239), (10, 0.9048), (20, 0.8557)):
        pred = np.array([50.0 + dist] + [50.0] * 7)
        r = soft_rank(pred, np.full(8, 50.0), np.ones(8, bool), np.ones(8, bool))
        assert abs(float(r[0]) - want) < 5e-5, (dist, float(r[0]))
    # Range [0.5, 0.9247] within one image; max_bce = ln 1e4.
    pred = np.array([0.0, 100.0] * 4)
    r = np.asarray(soft_rank(pred, np.full(8, 50.0), np.ones(8, bool), np.ones(8, bool)))
    assert np.all(r >= 0.5 - 1e-6) and np.all(r <= 0.9247 + 1e-4)


def test_b7_no_overflow():
    # Two zero-variance groups far apart: the reference's sigmoid overflows here (B7).
    pred = np.array([0.0] * 4 + [100.0] * 4)
    gt = np.array([10.0] * 4 + [90.0] * 4)
    gid = np.repeat([0, 1], 4)
    r = thurstone(pred, gt, np.ones(8, bool), gid, np.ones(8, bool))
    assert np.all(np.isfinite(np.asarray(r)))
    ref = loop_thurstone(pred, gt, np.ones(8, bool), gid, np.ones(8, bool))
    np.testing.assert_allclose(np.asarray(r), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
PAD_N = 20


@st.composite
def batches(draw):
    prompts = draw(st.integers(1, 5))
    g = draw(st.integers(1, 4))
    n = prompts * g
    pred = np.array(draw(st.lists(finite, min_size=n, max_size=n)), np.float32)
    gt = np.repeat(np.array(draw(st.lists(finite, min_size=prompts, max_size=prompts))), g)
    parsed = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    is_iaa = np.repeat(
        np.array(draw(st.lists(st.booleans(), min_size=prompts, max_size=prompts))), g
    )
    words = np.array(draw(st.lists(st.integers(0, 400), min_size=n, max_size=n)), np.int32)
    gid = np.repeat(np.arange(prompts), g).astype(np.int32)
    return dict(pred=pred, gt=gt.astype(np.float32), parsed=parsed, is_iaa=is_iaa, words=words,
                gid=gid, g=g)  # fmt: skip


def padded(b, n=PAD_N):
    """Pads a batch to a fixed N with unparsed filler (one compile for all examples); the filler
    are their own groups and, unparsed, must not change any real completion's reward."""
    k = n - len(b["pred"])
    out = dict(b)
    out["pred"] = np.concatenate([b["pred"], np.full(k, np.nan, np.float32)])
    out["gt"] = np.concatenate([b["gt"], np.linspace(0, 100, k).astype(np.float32)])
    out["parsed"] = np.concatenate([b["parsed"], np.zeros(k, bool)])
    out["is_iaa"] = np.concatenate([b["is_iaa"], np.arange(k) % 2 == 0])
    out["words"] = np.concatenate([b["words"], np.full(k, 130, np.int32)])
    out["gid"] = np.concatenate([b["gid"], np.arange(k, dtype=np.int32) + b["gid"].max() + 1])
    return out


@HSET
@given(batches())
def test_rewards_in_range_and_masked(b):
    real = len(b["pred"])
    b = padded(b)
    outs = {
        "format": rewards.format_reward(b["parsed"]),
        "threshold": threshold_r(b["pred"], b["gt"], b["parsed"]),
        "gaussian": gaussian(b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"]),
        "soft_rank": soft_rank(b["pred"], b["gt"], b["parsed"], b["is_iaa"]),
        "thurstone": thurstone(b["pred"], b["gt"], b["parsed"], b["gid"], b["is_iaa"]),
    }
    for name, r in outs.items():
        r = np.asarray(r)
        assert r.shape == b["parsed"].shape and np.all(np.isfinite(r)), name
        assert not np.any(r[real:]), name
        assert np.all((r >= 0) & (r <= 1)), name
        assert not np.any(r[~b["parsed"]]), name  # unparsed get 0 from every reward
    for name in ("soft_rank", "thurstone"):
        assert not np.any(np.asarray(outs[name])[~b["is_iaa"]])


@HSET
@given(
    st.floats(0, 100, width=32),
    st.floats(0, 100, width=32),
    st.floats(0, 100, width=32),
    st.booleans(),
)
def test_gaussian_non_increasing_in_error(gt, e1, e2, iaa):
    lo, hi = sorted((e1, e2))
    pred = np.array([gt + lo, gt - hi, gt - lo, gt + hi], np.float32)
    gts = np.full(4, gt, np.float32)
    r = np.asarray(gaussian(pred, gts, np.ones(4, bool), np.full(4, 130), np.full(4, iaa)))
    # Errors are measured after clipping to [0, 100]; compare by the effective error.
    d = np.abs(np.clip(pred, 0, 100) - gt)
    order = np.argsort(d, kind="stable")
    assert np.all(np.diff(r[order]) <= 1e-7)


@HSET
@given(batches(), st.randoms(use_true_random=False))
def test_thurstone_invariant_to_group_permutation(b, rnd):
    real = len(b["pred"])
    prompts = real // b["g"]
    perm = list(range(prompts))
    rnd.shuffle(perm)
    rows = np.concatenate([np.arange(p * b["g"], (p + 1) * b["g"]) for p in perm])
    rows = np.concatenate([rows, np.arange(real, PAD_N)])
    b = padded(b)
    relabel = np.array(rnd.sample(range(PAD_N * 3), PAD_N), np.int32)  # other ids too
    base = thurstone(b["pred"], b["gt"], b["parsed"], b["gid"], b["is_iaa"])
    perm_r = thurstone(
        b["pred"][rows], b["gt"][rows], b["parsed"][rows], relabel[b["gid"][rows]],
        b["is_iaa"][rows], num_groups=PAD_N * 3,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(perm_r), np.asarray(base)[rows], atol=1e-6)


# ------------------------------------------------------------------------------------------
# Weighted total and presets
# ------------------------------------------------------------------------------------------


def _rewards_config(arg):
    from configs import rewards as rewards_configs

    return rewards_configs.get_config(arg)


def test_presets_constants():
    ref = _rewards_config("reference")
    assert ref.threshold == 8.75 and ref.accuracy.threshold == 8.75
    assert (ref.accuracy.alpha_iqa, ref.accuracy.alpha_iaa) == (0.8, 2.0)
    assert (ref.accuracy.iqa_max_words, ref.accuracy.iaa_min_words) == (65, 125)
    assert (ref.accuracy.iqa_scale, ref.accuracy.iaa_scale, ref.accuracy.target) == (1.0, 1.5, 0.5)
    assert (ref.rank.tau, ref.rank.m, ref.rank.eps) == (0.08, 0.12, 1e-4)
    assert (ref.thurstone.tau, ref.thurstone.m, ref.thurstone.eps) == (0.08, 0.12, 1e-6)
    assert ref.scope == "device_local" and ref.local_size == 8
    for t in ("iqa", "iaa"):
        assert {k for k, v in ref.weights[t].items() if v} == {"format", "accuracy", "rank"}
    tat = _rewards_config("tatar")
    assert tat.scope == "global"
    assert {k for k, v in tat.weights.iqa.items() if v} == {"format", "accuracy"}
    assert {k for k, v in tat.weights.iaa.items() if v} == {"format", "thurstone"}
    tat.iaa_gaussian_weight = 0.25
    tat.threshold = 10.0
    assert tat.weights.iaa.accuracy == 0.25 and tat.accuracy.threshold == 10.0
    assert _rewards_config(None).preset == "tatar"
    with pytest.raises(ValueError, match="unknown rewards preset"):
        _rewards_config("nope")


def test_grpo_config_embeds_rewards_presets():
    from configs import grpo as module

    assert module.get_config("reference").rewards.preset == "reference"
    assert module.get_config("tiny").rewards.preset == "tatar"
    assert module.get_config("reference").rewards.scope == "device_local"


@pytest.mark.parametrize("preset", ["reference", "tatar"])
def test_total_reward_is_per_task_weighted_sum(preset):
    cfg = _rewards_config(preset)
    cfg.weights.iqa.format = 0.5  # asymmetric weights must be honoured per task
    if preset == "tatar":
        cfg.iaa_gaussian_weight = 0.3
    b = make_batch("random", 11, prompts=8, g=4)
    fn = jax.jit(functools.partial(rewards.total_reward, config=cfg, num_groups=8))
    total, parts = fn(b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"], b["gid"])
    local = 8 if cfg.scope == "device_local" else None
    want = {
        "format": b["parsed"].astype(float),
        "accuracy": loop_gaussian(b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"]),
        "rank": loop_soft_rank(b["pred"], b["gt"], b["parsed"], b["is_iaa"], call=local),
        "thurstone": loop_thurstone(b["pred"], b["gt"], b["parsed"], b["gid"], b["is_iaa"]),
    }
    expect = np.zeros(len(b["pred"]))
    for name, r in want.items():
        w = np.where(b["is_iaa"], cfg.weights.iaa[name], cfg.weights.iqa[name])
        if np.any(w):
            np.testing.assert_allclose(np.asarray(parts[name]), r, atol=1e-5)
        else:
            assert name not in parts
        expect += w * r
    np.testing.assert_allclose(np.asarray(total), expect, atol=2e-5)


def test_total_reward_rejects_bad_scope():
    cfg = _rewards_config("tatar")
    cfg.scope = "per_device"
    b = make_batch("random", 0)
    with pytest.raises(ValueError, match="scope"):
        rewards.total_reward(
            b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"], b["gid"], config=cfg
        )


@pytest.mark.parametrize(
    "path,error,match",
    [
        (("weights", "iaa", "thurstone"), KeyError, "weights.iaa.thurstone"),
        (("thurstone", "eps"), KeyError, "thurstone.eps"),
        (("accuracy", "scale"), KeyError, "accuracy.scale"),
        (("scope",), KeyError, "scope"),
    ],
)
def test_total_reward_missing_field_is_an_error(path, error, match):
    cfg = _rewards_config("tatar").to_dict()
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    b = make_batch("random", 0)
    with pytest.raises(error, match=match):
        rewards.total_reward(
            b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"], b["gid"], config=cfg
        )


def test_total_reward_unknown_block_field_is_an_error():
    cfg = _rewards_config("tatar").to_dict()
    cfg["thurstone"]["temperature"] = 0.1
    b = make_batch("random", 0)
    with pytest.raises(ValueError, match="temperature"):
        rewards.total_reward(
            b["pred"], b["gt"], b["parsed"], b["words"], b["is_iaa"], b["gid"], config=cfg
        )


def test_total_reward_on_sharded_global_batch():
    """The per-completion arrays sharded over the devices (as after a gather onto a data-parallel
    mesh): the jitted rewards still rank across the whole batch and equal the unsharded result."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices())
    if len(devices) < 2:
        pytest.skip("needs several (virtual) devices")
    cfg = _rewards_config("tatar")
    b = make_batch("random", 21, prompts=len(devices), g=4)
    args = [b["pred"].astype(np.float32), b["gt"].astype(np.float32), b["parsed"], b["words"],
            b["is_iaa"], b["gid"]]  # fmt: skip
    fn = jax.jit(functools.partial(rewards.total_reward, config=cfg, num_groups=len(devices)))
    want, _ = fn(*args)
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    got, parts = fn(*[jax.device_put(a, sharding) for a in args])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert np.any(np.asarray(parts["thurstone"]) > 0)
