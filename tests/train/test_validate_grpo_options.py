"""Config checks of the GRPO options of issue 28 (rollout correction, pi_old from the rollout,
dynamic sampling, overlong penalty): a bad value is one line naming the flag, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from configs import grpo as grpo_config
from tatar_jax.train import validate


def _problems(**fields):
    cfg = grpo_config.get_config("tiny")
    for path, value in fields.items():
        *parents, name = path.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        setattr(node, name, value)
    return list(validate.problems(cfg))


def test_defaults_are_clean_and_off():
    cfg = grpo_config.get_config()
    assert list(validate.problems(cfg)) == []
    assert cfg.grpo.rollout_correction.mode == "off"
    assert not cfg.grpo.old_logps_from_rollout and not cfg.grpo.dynamic_sampling.enabled
    assert cfg.rewards.weights.iqa.overlong == cfg.rewards.weights.iaa.overlong == 0.0


@pytest.mark.parametrize("fields,line", [
    ({"grpo__rollout_correction__mode": "tis"},
     "--config.grpo.rollout_correction.mode: 'tis' is not one of off, token_truncate, token_mask, "
     "sequence_truncate, sequence_mask"),
    ({"grpo__rollout_correction__clip_max": 0.0},
     "--config.grpo.rollout_correction.clip_max: must be > 0, got 0.0"),
    ({"grpo__rollout_correction__clip_min": 2.0, "grpo__rollout_correction__clip_max": 1.5},
     "--config.grpo.rollout_correction.clip_min: 2.0 is above clip_max 1.5"),
    ({"grpo__rollout_correction__mode": "token_mask", "grpo__old_logps_from_rollout": True},
     "--config.grpo.rollout_correction.mode: 'token_mask' with "
     "--config.grpo.old_logps_from_rollout=True weights by pi_old / pi_rollout = 1 (the PPO ratio "
     "is already against the rollout): turn one off"),
    ({"grpo__dynamic_sampling__std_threshold": -0.1},
     "--config.grpo.dynamic_sampling.std_threshold: must be >= 0, got -0.1"),
    ({"grpo__dynamic_sampling__std_threshold_iaa": -1.0},
     "--config.grpo.dynamic_sampling.std_threshold_iaa: must be >= 0, got -1.0"),
    ({"grpo__dynamic_sampling__max_extra_batches": -1},
     "--config.grpo.dynamic_sampling.max_extra_batches: must be >= 0, got -1"),
    ({"grpo__dynamic_sampling__enabled": True, "total_steps": -1},
     "--config.grpo.dynamic_sampling.enabled: needs --config.total_steps > 0 (extra draws use up "
     "the data stream, so whole epochs do not say how many steps there are)"),
    ({"rewards__overlong__cache": 0}, "--config.rewards.overlong.cache: must be >= 1, got 0"),
    ({"rewards__overlong__max_length": -5},
     "--config.rewards.overlong.max_length: must be >= 0, got -5"),
])  # fmt: skip
def test_bad_values_are_one_line_naming_the_flag(fields, line):
    assert _problems(**fields) == [line]


def test_train_script_exit_2(repo_root):
    out = subprocess.run(
        [sys.executable, "scripts/train.py", "--config=configs/grpo.py:tiny",
         "--workdir=/tmp/never", "--config.grpo.rollout_correction.mode=tis"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--config.grpo.rollout_correction.mode: 'tis' is not one of" in out.stderr
