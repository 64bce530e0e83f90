"""The DAPO soft overlong penalty ("overlong" built-in reward) against the paper's formula, per
task through the rewards registry, off in both presets."""

from __future__ import annotations

import numpy as np
import pytest

from configs import rewards as rewards_configs
from tatar_jax import rewards
from tatar_jax.rewards import functions as fn


def dapo_r_length(y: int, l_max: int, l_cache: int) -> float:
    """DAPO (Yu et al. 2025, arXiv 2503.14476), eq. 13, "Soft Overlong Punishment":
    R_length(y) = 0                                 if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                = -1                                if L_max < |y|"""
    if y <= l_max - l_cache:
        return 0.0
    if y <= l_max:
        return ((l_max - l_cache) - y) / l_cache
    return -1.0


@pytest.mark.parametrize("l_max,l_cache,budget", [(96, 16, 96), (40, 40, 64), (0, 8, 30)])
def test_overlong_equals_dapo_formula(l_max, l_cache, budget):
    lengths = np.arange(0, budget + 10)
    got = np.asarray(fn.overlong_penalty_reward(
        lengths, np.full(len(lengths), budget), max_length=l_max, cache=l_cache
    ))  # fmt: skip
    eff = l_max or budget  # 0: the rollout's max_new_tokens
    want = np.array([dapo_r_length(int(y), eff, l_cache) for y in lengths])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.min() == -1.0 and got.max() == 0.0 and (got > -1).sum() > (got == 0).sum()
    with pytest.raises(ValueError, match="cache"):
        fn.overlong_penalty_reward(lengths, lengths, cache=0)


def test_overlong_per_task_through_the_registry():
    """Weighted for IAA only: IAA totals drop by the penalty, IQA totals do not change; the
    default presets leave it off (weight 0), so their totals are unchanged."""
    cfg = rewards_configs.get_config("tatar")
    assert cfg.weights.iqa.overlong == 0 and cfg.weights.iaa.overlong == 0
    assert rewards_configs.get_config("reference").weights.iaa.overlong == 0
    rng = np.random.default_rng(0)
    g, b = 4, 4
    n = g * b
    feats = dict(
        pred=rng.uniform(0, 100, n).astype(np.float32),
        gt=np.repeat(rng.uniform(0, 100, b), g).astype(np.float32),
        parsed=np.ones(n, bool), num_words=rng.integers(100, 200, n).astype(np.int32),
        is_iaa=np.repeat([False, False, True, True], g),
        group_ids=np.repeat(np.arange(b, dtype=np.int32), g),
        num_tokens=rng.integers(40, 65, n).astype(np.int32), max_tokens=np.full(n, 64, np.int32),
    )  # fmt: skip
    base, _ = rewards.RewardSet(cfg)(feats, num_groups=b)
    cfg.weights.iaa.overlong = 0.5
    cfg.overlong.cache = 16
    total, parts = rewards.RewardSet(cfg)(feats, num_groups=b)
    want = np.array([dapo_r_length(int(y), 64, 16) for y in feats["num_tokens"]])
    np.testing.assert_allclose(parts["overlong"], want, atol=1e-6)
    np.testing.assert_allclose(total, base + np.where(feats["is_iaa"], 0.5 * want, 0.0),
                               atol=1e-6)  # fmt: skip
    assert (want[feats["is_iaa"]] < 0).any()
    eager, _ = rewards.total_reward(
        *(feats[k] for k in ("pred", "gt", "parsed", "num_words", "is_iaa", "group_ids")),
        config=cfg, num_groups=b, num_tokens=feats["num_tokens"], max_tokens=feats["max_tokens"],
    )  # fmt: skip
    np.testing.assert_allclose(eager, total, atol=1e-5)
    with pytest.raises(ValueError, match="num_tokens"):
        rewards.total_reward(
            *(feats[k] for k in ("pred", "gt", "parsed", "num_words", "is_iaa", "group_ids")),
            config=cfg, num_groups=b,
        )  # fmt: skip
