"""A GRPO step's reward statistics per task, against numbers worked out here."""

from __future__ import annotations

import numpy as np
import pytest

from tatar_jax.train import reward_stats


def test_grpo_reward_metrics():
    tasks = ["iqa"] * 4 + ["iaa"] * 4  # two prompts, G = 4
    acc = [1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2]
    fmt = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    m = reward_stats.grpo_reward_metrics(
        {"accuracy": acc, "format": fmt},
        tasks,
        group_size=4,
        completion_lengths=[10, 20, 30, 40, 100, 100, 100, 100],
        parsed=[1, 1, 0, 1, 1, 1, 1, 1],
        weights={"iqa": {"accuracy": 2.0, "format": 1.0}, "iaa": {"accuracy": 1.0}},
    )
    iqa_total = 2 * np.array(acc[:4]) + np.array(fmt[:4])
    assert m["reward/accuracy/iqa"] == pytest.approx(0.5)
    assert m["reward/format/iaa"] == pytest.approx(1.0)
    assert m["reward_total/iqa"] == pytest.approx(iqa_total.mean())
    assert m["reward_total/iaa"] == pytest.approx(1.2)  # format weight defaults to 1
    assert m["reward_group_std/iqa"] == pytest.approx(iqa_total.std(ddof=1))
    assert m["zero_std_groups/iaa"] == 1.0 and m["zero_std_groups/iqa"] == 0.0
    assert m["zero_std_groups/all"] == 0.5
    assert m["completion_len/iqa"] == 25 and m["parsed_frac/iqa"] == 0.75
    assert m["parsed_frac/all"] == pytest.approx(7 / 8)
    # One task only: its statistics and "all", finite, nothing for the absent task.
    one = reward_stats.grpo_reward_metrics({"accuracy": acc[:4]}, tasks[:4], group_size=4)
    assert "reward/accuracy/iaa" not in one and all(np.isfinite(list(one.values())))
    assert one["reward/accuracy/all"] == one["reward/accuracy/iqa"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mixes tasks"):
        reward_stats.grpo_reward_metrics({"a": acc}, ["iqa", "iaa"] * 4, group_size=4)
    with pytest.raises(ValueError, match="multiple"):
        reward_stats.grpo_reward_metrics({"a": acc}, tasks, group_size=3)
