"""Rewards + group advantages for one GRPO step: our jitted array path vs per-completion loops.

    python benchmarks/bench_rewards.py                      # N = 128 prompts x 8 = 1,024
    python benchmarks/bench_rewards.py --prompts=16 --repeats=100 --peer_repeats=10

The peer is what the reference does (spec §7.3, §8): each reward function is a Python loop over
the completions (lists of floats, ``math``), the rank rewards loop over pairs, the advantages loop
over groups with ``statistics.stdev``. Both compute the same numbers from the same per-completion
features (prediction, parsed flag, word count, task, group id, ground truth); the script checks
they agree, then times each (after a warm-up call that includes jit compilation) and prints the
median times and their ratio, for three reward presets:

* ``reference``: format + Gaussian + soft rank, soft rank device-local (8 completions per call),
  as the authors' launch script;
* ``reference_global``: the same functions with the soft rank over the whole batch (O(N^2));
* ``tatar``: IQA format + Gaussian, IAA format + Thurstone over the global batch.

Parsing (host side in both) is timed once separately for information.
"""

from __future__ import annotations

import functools
import statistics
import time

import numpy as np
from absl import app, flags

# The peer is the spec's per-completion Python loops, the tests' reference too.
from tatar_jax.rewards import spec_loops as loops

_PROMPTS = flags.DEFINE_integer("prompts", 128, "prompts per step")
_G = flags.DEFINE_integer("group_size", 8, "completions per prompt (G)")
_REPEATS = flags.DEFINE_integer("repeats", 50, "timed calls of ours (median reported)")
_PEER_REPEATS = flags.DEFINE_integer("peer_repeats", 5, "timed calls of the loop (median)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of the synthetic batch")



def _rewards_config(preset: str):
    from configs import rewards as rewards_configs

    return rewards_configs.get_config(preset)


# --- the peer: per-completion Python, the reference's way (tatar_jax/rewards/spec_loops.py) ---


def peer_format(parsed):
    return [1.0 if p else 0.0 for p in parsed]


def peer_step(feats, cfg, group_size):
    pred, gt, parsed, words, iaa, gid = (f.tolist() for f in feats)
    parts = {}
    w = cfg.weights
    names = [k for k in ("format", "accuracy", "rank", "thurstone") if w.iqa[k] or w.iaa[k]]
    for name in names:
        if name == "format":
            parts[name] = peer_format(parsed)
        elif name == "accuracy":
            a = cfg.accuracy
            parts[name] = loops.loop_gaussian(
                pred, gt, parsed, words, iaa, T=a.threshold, tgt=a.target, a_iqa=a.alpha_iqa,
                a_iaa=a.alpha_iaa, max_w=a.iqa_max_words, min_w=a.iaa_min_words,
                s_iqa=a.iqa_scale, s_iaa=a.iaa_scale,
            )  # fmt: skip
        elif name == "rank":
            call = cfg.local_size if cfg.scope == "device_local" else len(pred)
            r = cfg.rank
            parts[name] = loops.loop_soft_rank(
                pred, gt, parsed, iaa, tau=r.tau, m=r.m, eps=r.eps, call=call
            )
        else:
            t = cfg.thurstone
            parts[name] = loops.loop_thurstone(pred, gt, parsed, gid, iaa, t.tau, t.m, t.eps)
    total = [
        sum((w.iaa[n] if iaa[k] else w.iqa[n]) * parts[n][k] for n in names)
        for k in range(len(pred))
    ]
    adv = []
    for s in range(0, len(total), group_size):
        grp = total[s : s + group_size]
        mean, std = sum(grp) / len(grp), statistics.stdev(grp)
        adv += [(r - mean) / (std + 1e-4) for r in grp]
    return total, adv


# --- ours -----------------------------------------------------------------------------------


def make_ours(cfg, num_groups, group_size):
    import jax

    from tatar_jax import grpo, rewards

    @jax.jit
    def step(pred, gt, parsed, words, iaa, gid):
        total, _ = rewards.total_reward(
            pred, gt, parsed, words, iaa, gid, config=cfg, num_groups=num_groups
        )
        return total, grpo.group_advantages(total, group_size)

    def run(feats):
        out = step(*(jax.numpy.asarray(f) for f in feats))
        return jax.block_until_ready(out)

    return run


def synthetic_batch(prompts, g, seed):
    rng = np.random.default_rng(seed)
    n = prompts * g
    iaa = np.repeat(rng.random(prompts) < 0.55, g)
    gt = np.repeat(rng.uniform(5, 95, prompts), g).astype(np.float32)
    pred = np.clip(gt + rng.normal(0, 12, n), 0, 100).astype(np.float32)
    parsed = rng.random(n) < 0.93
    pred = np.where(parsed, pred, 0).astype(np.float32)
    words = np.where(iaa, rng.integers(90, 200, n), rng.integers(20, 90, n)).astype(np.int32)
    gid = np.repeat(np.arange(prompts), g).astype(np.int32)
    texts = [
        f"<think>{' w' * int(w - 3)}</think> <answer>{p:.2f}</answer>" if ok else "<answer>?"
        for p, ok, w in zip(pred, parsed, words, strict=True)
    ]
    return (pred, gt, parsed, words, iaa, gid), texts


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    import jax

    from tatar_jax import rewards

    prompts, g = _PROMPTS.value, _G.value
    feats, texts = synthetic_batch(prompts, g, _SEED.value)
    n = prompts * g
    print(f"N = {prompts} prompts x G = {g} = {n} completions; backend {jax.default_backend()}")
    t0 = time.perf_counter()
    f = rewards.completion_features(texts)
    print(f"host parsing + features (both paths): {1e3 * (time.perf_counter() - t0):.2f} ms")
    assert np.array_equal(f.parsed, feats[2])

    for preset in ("reference", "reference_global", "tatar"):
        cfg = _rewards_config("tatar" if preset == "tatar" else "reference")
        if preset == "reference_global":
            cfg.scope = "global"
        ours = make_ours(cfg, prompts, g)
        total, adv = ours(feats)  # warm-up incl. compilation
        p_total, p_adv = peer_step(feats, cfg, g)  # warm-up
        d_total = float(np.max(np.abs(np.asarray(total, np.float64) - np.array(p_total))))
        d_adv = float(np.max(np.abs(np.asarray(adv, np.float64) - np.array(p_adv))))
        t_ours = _median_time(functools.partial(ours, feats), _REPEATS.value)
        t_peer = _median_time(functools.partial(peer_step, feats, cfg, g), _PEER_REPEATS.value)
        print(
            f"{preset:17s} ours (jit) {1e3 * t_ours:8.3f} ms | per-completion loop "
            f"{1e3 * t_peer:9.2f} ms | ratio {t_peer / t_ours:8.1f}x | "
            f"max|d| total {d_total:.1e}, adv {d_adv:.1e}"
        )


if __name__ == "__main__":
    app.run(main)
