"""``--config.rewards.preset=NAME`` takes effect: the flags parsed the way scripts/train.py parses
them, then configs.rewards.resolve_overrides, give the weights, scope and constants of preset NAME
(other rewards overrides kept, whatever their order), and tatar_jax.rewards.total_reward computes
with them."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import rewards as rewards_configs
from tatar_jax import rewards


def _parsed(monkeypatch, *overrides: str):
    """configs/grpo.py:tiny with ``overrides``, as scripts/train.py's flags parse them."""
    argv = ["train.py", "--config=configs/grpo.py:tiny", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "run config", flag_values=fv)
    fv(argv)
    cfg = fv.config
    changed = rewards_configs.resolve_overrides(cfg, fv["config"].override_values)
    return cfg, changed


def _total(block):
    rng = np.random.default_rng(0)
    g, prompts = 4, 6
    is_iaa = np.repeat(np.arange(prompts) % 2 == 1, g)
    gt = np.repeat(rng.uniform(0, 100, prompts), g)
    pred = np.clip(gt + rng.normal(0, 8, prompts * g), 0, 100)
    words = np.where(is_iaa, 130, 40).astype(np.int32)  # inside both tasks' length rules
    total, parts = rewards.total_reward(
        pred, gt, np.ones(prompts * g, bool), words, is_iaa,
        np.repeat(np.arange(prompts), g).astype(np.int32), config=block, num_groups=prompts,
    )  # fmt: skip
    return np.asarray(total), {k: np.asarray(v) for k, v in parts.items()}


def test_preset_override_changes_the_weights_used(monkeypatch):
    base, changed = _parsed(monkeypatch)
    assert not changed and base.rewards.weights.iaa.thurstone == 1.0
    cfg, changed = _parsed(monkeypatch, "--config.rewards.preset=reference")
    assert changed
    ref = rewards_configs.get_config("reference")
    assert cfg.rewards.to_dict() == ref.to_dict()
    assert cfg.rewards.weights.iaa.to_dict() == {
        "format": 1.0, "accuracy": 1.0, "threshold": 0.0, "rank": 1.0, "thurstone": 0.0
    }  # fmt: skip
    assert cfg.rewards.scope == "device_local"
    # total_reward computes with the preset's functions: rank instead of thurstone on IAA
    t_ref, parts_ref = _total(cfg.rewards)
    t_tat, parts_tat = _total(base.rewards)
    assert set(parts_ref) == {"format", "accuracy", "rank"}
    assert set(parts_tat) == {"format", "accuracy", "thurstone"}
    iaa = np.repeat(np.arange(6) % 2 == 1, 4)
    want = parts_ref["format"] + parts_ref["accuracy"] + parts_ref["rank"]
    np.testing.assert_allclose(t_ref, want, rtol=1e-6)
    assert not np.allclose(t_ref[iaa], t_tat[iaa])
    np.testing.assert_allclose(t_ref[~iaa], t_tat[~iaa], rtol=1e-6)  # IQA: same in both


@pytest.mark.parametrize("order", ["preset_first", "preset_last"])
def test_other_rewards_overrides_are_kept(monkeypatch, order):
    more = ["--config.rewards.scope=global", "--config.rewards.threshold=10.0",
            "--config.rewards.weights.iqa.format=0.5"]  # fmt: skip
    preset = ["--config.rewards.preset=reference"]
    cfg, _ = _parsed(monkeypatch, *(preset + more if order == "preset_first" else more + preset))
    r = cfg.rewards
    assert r.preset == "reference" and r.scope == "global"  # scope: the override, not the preset's
    assert r.threshold == 10.0 and r.accuracy.threshold == 10.0  # the shared T still linked
    assert r.threshold_reward.threshold == 10.0
    assert r.weights.iqa.format == 0.5 and r.weights.iqa.rank == 1.0


def test_override_the_preset_lacks_is_an_error(monkeypatch):
    with pytest.raises(
        ValueError, match=r"rewards.iaa_gaussian_weight: rewards preset 'reference'"
    ):
        _parsed(monkeypatch, "--config.rewards.iaa_gaussian_weight=0.5",
                "--config.rewards.preset=reference")  # fmt: skip
    cfg, _ = _parsed(monkeypatch, "--config.rewards.preset=tatar")
    assert cfg.rewards.to_dict() == rewards_configs.get_config("tatar").to_dict()


def test_config_names_come_from_the_registry():
    """configs/rewards.py takes the built-ins' names from the rewards registry (one source), and
    every built-in has its block and a weight in both presets."""
    from tatar_jax.rewards import names

    assert rewards_configs.FUNCTIONS is names.BUILT_INS
    assert tuple(rewards.REGISTRY) == names.BUILT_INS == rewards.REWARD_FUNCTIONS
    assert rewards_configs.EXTRA_KINDS is names.EXTRA_KINDS
    for preset in rewards_configs.PRESETS:
        c = rewards_configs.get_config(preset)
        for name in names.BUILT_INS:
            assert names.CONFIG_BLOCK[name] in c and name in c.weights.iqa and name in c.weights.iaa
