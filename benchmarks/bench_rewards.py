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
import math
import pathlib
import statistics
import sys
import time

import numpy as np
from absl import app, flags

_PROMPTS = flags.DEFINE_integer("prompts", 128, "prompts per step")
_G = flags.DEFINE_integer("group_size", 8, "completions per prompt (G)")
_REPEATS = flags.DEFINE_integer("repeats", 50, "timed calls of ours (median reported)")
_PEER_REPEATS = flags.DEFINE_integer("peer_repeats", 5, "timed calls of the loop (median)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of the synthetic batch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rewards_config(preset: str):
    from configs import rewards as rewards_configs

    return rewards_configs.get_config(preset)


# --- the peer: per-completion Python, the reference's way ---------------------------------


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _bce(p, q, eps):
    q = min(max(q, eps), 1 - eps)
    return -(p * math.log(q) + (1 - p) * math.log(1 - q))


def _c(x):
    return min(max(x, 0.0), 100.0)


def peer_format(parsed):
    return [1.0 if p else 0.0 for p in parsed]


def peer_gaussian(pred, gt, parsed, words, iaa, a):
    out = []
    s0 = a.threshold / math.sqrt(-2 * math.log(a.target))
    for p, g, ok, w, t in zip(pred, gt, parsed, words, iaa, strict=True):
        if not ok:
            out.append(0.0)
            continue
        d = abs(_c(p) - _c(g))
        s = s0 * (1 + (a.alpha_iaa if t else a.alpha_iqa) * d / 100)
        r = math.exp(-d * d / (2 * s * s))
        if (not t and w > a.iqa_max_words) or (t and w < a.iaa_min_words):
            r = 0.0
        out.append(min(1.0, (a.iaa_scale if t else a.iqa_scale) * r))
    return out


def peer_soft_rank(pred, gt, parsed, iaa, c, call):
    n = len(pred)
    out = [0.0] * n
    for s in range(0, n, call):
        idx = [k for k in range(s, min(s + call, n)) if iaa[k] and parsed[k]]
        if len(idx) < 2:
            continue
        for i in idx:
            num = den = 0.0
            for j in idx:
                if i == j:
                    continue
                gi, gj = _c(gt[i]) / 100, _c(gt[j]) / 100
                w = math.exp(-abs(gi - gj) / c.m)
                q = _sig((_c(pred[i]) - _c(pred[j])) / 100 / c.tau)
                num += w * _bce(_sig((gi - gj) / c.tau), q, c.eps)
                den += w
            out[i] = min(max(1 - num / den / math.log(1 / c.eps), 0.0), 1.0)
    return out


def peer_thurstone(pred, gt, parsed, gid, iaa, c):
    groups = {}
    for k, g in enumerate(gid):
        groups.setdefault(g, []).append(k)
    stats = {}
    for g, ks in groups.items():
        ps = [_c(pred[k]) / 100 for k in ks if parsed[k]]
        if ps and iaa[ks[0]]:
            mu = sum(ps) / len(ps)
            stats[g] = (mu, sum((x - mu) ** 2 for x in ps) / len(ps), _c(gt[ks[0]]) / 100)
    out = [0.0] * len(pred)
    if len(stats) < 2:
        return out
    for i, (_, vi, gi) in stats.items():
        for k in groups[i]:
            if not parsed[k]:
                continue
            num = den = 0.0
            for j, (mj, vj, gj) in stats.items():
                if j == i:
                    continue
                w = math.exp(-abs(gi - gj) / c.m)
                q = _sig((_c(pred[k]) / 100 - mj) / math.sqrt(vi + vj + c.eps))
                num += w * _bce(_sig((gi - gj) / c.tau), q, c.eps)
                den += w
            out[k] = min(max(1 - num / den / math.log(1 / c.eps), 0.0), 1.0)
    return out


def peer_step(feats, cfg, group_size):
    pred, gt, parsed, words, iaa, gid = (f.tolist() for f in feats)
    parts = {}
    w = cfg.weights
    names = [k for k in ("format", "accuracy", "rank", "thurstone") if w.iqa[k] or w.iaa[k]]
    for name in names:
        if name == "format":
            parts[name] = peer_format(parsed)
        elif name == "accuracy":
            parts[name] = peer_gaussian(pred, gt, parsed, words, iaa, cfg.accuracy)
        elif name == "rank":
            call = cfg.local_size if cfg.scope == "device_local" else len(pred)
            parts[name] = peer_soft_rank(pred, gt, parsed, iaa, cfg.rank, call)
        else:
            parts[name] = peer_thurstone(pred, gt, parsed, gid, iaa, cfg.thurstone)
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
