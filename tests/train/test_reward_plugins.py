"""A tiny GRPO run of scripts/train.py with two extra rewards named in a config file (a jittable
features reward and a host reward, tests/helpers/example_rewards.py), one weight overridden on
the command line: they are validated at start, computed every step and logged per task; a
failing one stops the run at start with an error that names it."""

from __future__ import annotations

import json

import numpy as np
from train_runs import run_script, train_env

CONFIG = """
from configs import grpo, rewards


def get_config(arg=None):
    c = grpo.get_config("tiny")
    rewards.add_extra(c.rewards, "brevity", "example_rewards:brevity", iqa=0.5, iaa=0.25,
                      max_words=8)
    rewards.add_extra(c.rewards, "keywords", "example_rewards:{host}", kind="host", iqa=1.0,
                      iaa=0.0, words="a,e,o")
    return c
"""


def _run(tmp_path, xla_cache, host="keywords", steps=2):
    cfg = tmp_path / "plugin_config.py"
    cfg.write_text(CONFIG.format(host=host))
    env = train_env(tmp_path / "tok_cache", xla_cache, helpers=True)
    args = [
        f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
        f"--config.total_steps={steps}", "--config.eval.datasets=()",
        "--config.model.remat=False", "--config.logging.every_steps=1",
        "--config.rewards.weights.iaa.keywords=0.0", "--config.rewards.weights.iqa.brevity=0.75",
    ]  # fmt: skip
    return run_script("train.py", args, env)


def test_tiny_grpo_run_with_extra_rewards(tmp_path, xla_cache_dir):
    r = _run(tmp_path, xla_cache_dir)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    recs = [json.loads(x) for x in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    for x in steps:
        for key in ("reward/brevity/all", "reward/keywords/all", "entropy/all",
                    "zero_std_groups/all"):  # fmt: skip
            assert key in x and np.isfinite(x[key]), key
        assert 0.0 <= x["reward/brevity/all"] <= 1.0 and 0.0 <= x["reward/keywords/all"] <= 1.0
        assert x.get("reward/keywords/iaa", 0.0) == 0.0  # the example gives IAA 0
        assert x["entropy/all"] > 0


def test_failing_extra_reward_stops_the_run_at_start(tmp_path, xla_cache_dir):
    r = _run(tmp_path, xla_cache_dir, host="raises", steps=1)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    want = "reward 'keywords' (example_rewards:raises, kind 'host') failed on the probe batch"
    assert want in out
    metrics = tmp_path / "wd" / "metrics.jsonl"
    assert not metrics.exists() or "loss" not in metrics.read_text()
