"""Extra reward functions named in the rewards config ("package.module:function"): features and
host kinds inside ``total_reward``, per-task weights, validation at start, errors that name the
reward. The example functions live in tests/helpers/example_rewards.py."""

from __future__ import annotations

import functools

import example_rewards as ex
import jax
import numpy as np
import pytest

from configs import rewards as rewards_configs
from tatar_jax import rewards
from tatar_jax.data.batch import RowMeta


def _batch(g=4):
    """3 prompts (IQA, IAA, IQA) x g completions."""
    task_id = np.array([0, 1, 0], np.int32)
    gt = np.array([30.0, 70.0, 55.0], np.float32)
    texts = []
    for b in range(3):
        for k in range(g):
            words = " ".join(["sharp", "noise", "calm", "blur", "x"][: 1 + (b + k) % 5] * (k + 1))
            texts.append(f"<think>{words}</think> <answer>{gt[b] + 3 * k - 4:.1f}</answer>")
    texts[5] = "no answer at all"
    batch = RowMeta(task_id=task_id, gt_100=gt, valid=np.ones(3, bool),
                    row_id=np.array([7, 8, 9]), epoch=np.zeros(3, np.int32),
                    dataset=("a", "b", "a"), image_path=("p0", "p1", "p2"))  # fmt: skip
    feats = rewards.completion_features(texts)
    n = 3 * g
    args = dict(
        pred=feats.prediction, gt=np.repeat(gt, g), parsed=feats.parsed,
        num_words=feats.num_words, is_iaa=np.repeat(task_id == 1, g),
        group_ids=np.repeat(np.arange(3, dtype=np.int32), g),
    )  # fmt: skip
    assert len(texts) == n
    return batch, texts, args


def _config(**extra):
    c = rewards_configs.get_config("tatar")
    for name, (fn, kw) in extra.items():
        rewards_configs.add_extra(c, name, f"example_rewards:{fn}", **kw)
    return c


def test_extra_rewards_add_weighted_per_task():
    batch, texts, a = _batch()
    records = rewards.completion_records(batch, 4)
    base_total, base_parts = rewards.total_reward(**a, config=_config(), num_groups=3)
    cfg = _config(
        brev=("brevity", dict(iqa=0.5, iaa=2.0, max_words=6)),
        kw=("keywords", dict(kind="host", iqa=1.5, iaa=0.0, scale=2.0, words="sharp,noise")),
    )
    total, parts = rewards.total_reward(**a, config=cfg, num_groups=3, texts=texts, records=records)
    want_brev = np.asarray(ex.brevity(**a, max_words=6))
    want_kw = 2.0 * ex.keywords(texts, records, words="sharp,noise")
    np.testing.assert_allclose(parts["brev"], want_brev, rtol=0, atol=0)
    np.testing.assert_allclose(parts["kw"], want_kw, rtol=0, atol=0)
    w_brev = np.where(a["is_iaa"], 2.0, 0.5)
    w_kw = np.where(a["is_iaa"], 0.0, 1.5)
    np.testing.assert_allclose(total, base_total + w_brev * want_brev + w_kw * want_kw, atol=1e-6)
    assert set(parts) == set(base_parts) | {"brev", "kw"}
    assert want_brev[5] == 0 and 0 < np.delete(want_brev, 5).min() < 1  # unparsed, long, short
    assert want_kw.max() > 0 and want_kw[a["is_iaa"]].max() == 0
    # A features reward is jittable inside total_reward.
    cfg_f = _config(brev=("brevity", dict(iqa=0.5, iaa=2.0, max_words=6)))
    jitted = jax.jit(functools.partial(rewards.total_reward, config=cfg_f, num_groups=3))
    total_j, _ = jitted(**a)
    eager, _ = rewards.total_reward(**a, config=cfg_f, num_groups=3)
    np.testing.assert_allclose(total_j, eager, atol=1e-6)
    # Weight 0 for both tasks: not computed at all.
    cfg0 = _config(bad=("raises", dict(kind="host", iqa=0.0, iaa=0.0)))
    _, parts0 = rewards.total_reward(**a, config=cfg0, num_groups=3, texts=texts, records=records)
    assert "bad" not in parts0


def test_host_reward_needs_texts_and_records():
    batch, texts, a = _batch()
    records = rewards.completion_records(batch, 4)
    cfg = _config(kw=("keywords", dict(kind="host")))
    with pytest.raises(ValueError, match="'kw'.*needs texts and records"):
        rewards.total_reward(**a, config=cfg, num_groups=3)
    with pytest.raises(ValueError, match="'kw'.*11 texts for 12 completions"):
        rewards.total_reward(**a, config=cfg, num_groups=3, texts=texts[:-1], records=records)


def test_completion_records():
    batch, _, _ = _batch()
    recs = rewards.completion_records(batch, 2)
    assert len(recs) == 6
    assert recs[2] == {"prompt": 1, "task": "iaa", "gt_100": 70.0, "valid": True, "row_id": 8,
                       "dataset": "b", "image_path": "p1"}  # fmt: skip
    assert recs[3] == recs[2] and recs[3] is not recs[2]


@pytest.mark.parametrize(
    "fn, kind, match",
    [
        ("wrong_shape", "host", r"'bad' \(example_rewards:wrong_shape.*\(17,\), want \(16,\)"),
        ("not_finite", "features", r"'bad' \(example_rewards:not_finite.*non-finite"),
        ("raises", "host", r"'bad' \(example_rewards:raises.*RuntimeError: boom"),
        ("not_jittable", "features", r"'bad' \(example_rewards:not_jittable.*probe batch"),
        ("missing", "host", r"'bad'.*cannot be imported"),
    ],
)
def test_validation_names_the_failing_reward(fn, kind, match):
    cfg = _config(ok=("brevity", {}), bad=(fn, dict(kind=kind)))
    with pytest.raises(ValueError, match=match):
        rewards.validate_extra_rewards(cfg)


def test_validation_passes_and_config_errors():
    rewards.validate_extra_rewards(_config())  # no extras: nothing to do
    rewards.validate_extra_rewards(
        _config(brev=("brevity", {}), kw=("keywords", dict(kind="host", words="blur")))
    )
    c = _config(brev=("brevity", {}))
    del c.weights.iaa["brev"]
    with pytest.raises(ValueError, match="no weight rewards.weights.iaa.brev"):
        rewards.validate_extra_rewards(c)
    c = _config(brev=("brevity", {}))
    c.extra.brev.kind = "device"
    with pytest.raises(ValueError, match="extra.brev.kind 'device'"):
        rewards.validate_extra_rewards(c)
    c = _config(brev=("brevity", {}))
    c.extra.brev.functoin = "x:y"
    with pytest.raises(ValueError, match=r"extra.brev: unknown fields \['functoin'\]"):
        rewards.extra_rewards(c)
    c = _config(brev=("brevity", {}))
    c.extra.brev.function = "example_rewards.brevity"
    with pytest.raises(ValueError, match="not 'package.module:function'"):
        rewards.validate_extra_rewards(c)
    with pytest.raises(ValueError, match="already taken"):
        rewards_configs.add_extra(rewards_configs.get_config(), "rank", "example_rewards:brevity")
