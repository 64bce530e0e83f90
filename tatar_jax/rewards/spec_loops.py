"""The reward formulas of spec §8 as plain Python loops, one completion at a time (``math``,
lists, dictionaries of groups): not what training runs (that is :mod:`tatar_jax.rewards.functions`)
but the independent reference the jitted rewards are tested against
(tests/rewards/test_rewards.py) and the per-completion peer they are benchmarked against
(benchmarks/bench_rewards.py). NumPy only."""

from __future__ import annotations

import math

import numpy as np


def sig(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def bce(p: float, q: float, eps: float) -> float:
    q = min(max(q, eps), 1.0 - eps)
    return -(p * math.log(q) + (1.0 - p) * math.log(1.0 - q))


def clip100(x: float) -> float:
    return min(max(x, 0.0), 100.0)


def loop_gaussian(pred, gt, parsed, words, is_iaa, T=8.75, tgt=0.5, a_iqa=0.8, a_iaa=2.0,
                  max_w=65, min_w=125, s_iqa=1.0, s_iaa=1.5):  # fmt: skip
    out = []
    sigma0 = T / math.sqrt(-2.0 * math.log(tgt))
    for k in range(len(pred)):
        if not parsed[k]:
            out.append(0.0)
            continue
        d = abs(clip100(float(pred[k])) - clip100(float(gt[k])))
        alpha = a_iaa if is_iaa[k] else a_iqa
        s = sigma0 * (1.0 + alpha * d / 100.0)
        r = math.exp(-(d**2) / (2.0 * s**2))
        if not is_iaa[k] and words[k] > max_w:
            r = 0.0
        if is_iaa[k] and words[k] < min_w:
            r = 0.0
        out.append(min(1.0, (s_iaa if is_iaa[k] else s_iqa) * r))
    return np.array(out)


def loop_soft_rank(pred, gt, parsed, is_iaa, tau=0.08, m=0.12, eps=1e-4, call=None):
    n = len(pred)
    call = call or n
    out = [0.0] * n
    for start in range(0, n, call):
        idx = [k for k in range(start, min(start + call, n)) if is_iaa[k] and parsed[k]]
        if len(idx) < 2:
            continue
        for c in idx:
            pc, gc = clip100(float(pred[c])) / 100, clip100(float(gt[c])) / 100
            num = den = 0.0
            for d in idx:
                if d == c:
                    continue
                pd_, gd = clip100(float(pred[d])) / 100, clip100(float(gt[d])) / 100
                w = math.exp(-abs(gc - gd) / m)
                num += w * bce(sig((gc - gd) / tau), sig((pc - pd_) / tau), eps)
                den += w
            out[c] = min(max(1.0 - (num / den) / math.log(1.0 / eps), 0.0), 1.0)
    return np.array(out)


def loop_thurstone(pred, gt, parsed, gid, is_iaa, tau=0.08, m=0.12, eps=1e-6, call=None):
    n = len(pred)
    call = call or n
    out = [0.0] * n
    for start in range(0, n, call):
        ks = range(start, min(start + call, n))
        groups: dict[int, list[int]] = {}
        for k in ks:
            groups.setdefault(int(gid[k]), []).append(k)
        stats = {}
        for g, members in groups.items():
            ps = [clip100(float(pred[k])) / 100 for k in members if parsed[k]]
            if not ps or not is_iaa[members[0]]:
                continue
            mu = sum(ps) / len(ps)
            v = sum((x - mu) ** 2 for x in ps) / len(ps)
            stats[g] = (mu, v, clip100(float(gt[members[0]])) / 100)
        if len(stats) < 2:
            continue
        for i, (_, vi, gi) in stats.items():
            for k in groups[i]:
                if not parsed[k]:
                    continue
                pk = clip100(float(pred[k])) / 100
                num = den = 0.0
                for j, (mj, vj, gj) in stats.items():
                    if j == i:
                        continue
                    w = math.exp(-abs(gi - gj) / m)
                    q = sig((pk - mj) / math.sqrt(vi + vj + eps))
                    num += w * bce(sig((gi - gj) / tau), q, eps)
                    den += w
                out[k] = min(max(1.0 - (num / den) / math.log(1.0 / eps), 0.0), 1.0)
    return np.array(out)
