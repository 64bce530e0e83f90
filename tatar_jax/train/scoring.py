"""The GRPO side of a step after the rollout: decode + parse -> rewards over the global batch ->
group advantages -> the update's frozen :class:`~tatar_jax.train.inputs.GrpoBatch`.

The rollout engine only samples (:class:`tatar_jax.train.rollout.Samples`); :class:`Scorer`
turns a step's prompt batch and its samples into a :class:`ScoredRollout` (a new value: neither
input is changed). Rows are prompt-major (completion ``g`` of prompt ``b`` is row ``b * G + g``);
rows of prompts flagged ``valid = False`` (skipped records, padding) have ``valid`` False,
completion mask 0 and advantage 0: no loss, no reward statistics.

Every host scores the whole (global) batch and computes the same rewards, advantages and metrics
(the IAA Thurstone reward and the soft rank are functions of the whole batch: spec §8.4-8.5,
B6); each host then transfers only its own shards of the update rows (``inputs.put_inputs``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tatar_jax import generate, grpo, rewards
from tatar_jax.data.batch import Batch
from tatar_jax.data.prompts import TASKS, task_names
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import reward_stats
from tatar_jax.train.rollout import Samples


@dataclasses.dataclass(frozen=True)
class ScoredRollout:
    """One GRPO step's scored rollout: ``batch`` feeds ``grpo_step``; the rest is for logging.

    N = prompts x G rows: ``texts`` (N,) decoded completions, ``rewards`` / ``advantages`` (N,)
    float32, ``valid`` (N,) bool (the row's prompt is real: the one row-validity field),
    ``rollout_logps`` (N, T) (the sampler's log-probs), ``metrics`` the reward statistics.
    """

    batch: step_inputs.GrpoBatch
    texts: tuple[str, ...]
    rewards: np.ndarray
    advantages: np.ndarray
    valid: np.ndarray
    rollout_logps: np.ndarray
    metrics: Mapping[str, float]


class Scorer:
    """Decode, rewards, group advantages and the update's batch of one GRPO step.

    Args:
      tokenizer: decoding (special tokens stripped) and the stop ids.
      grpo_cfg: the ``grpo`` block (advantage mode, truncated-completion masking).
      rewards_cfg: a configs/rewards.py block.
      model_cfg: the policy's config (its image token id).
      num_micro / pack_buckets: the update's row micro-batches and lm_head packing buckets.
    """

    def __init__(
        self,
        tokenizer: Any,
        grpo_cfg: Any,
        rewards_cfg: Any,
        model_cfg: Any,
        *,
        num_micro: int = 1,
        pack_buckets: int = 0,
    ) -> None:
        self.tok = tokenizer
        self.cfg = grpo_cfg
        self.rewards_cfg = rewards_cfg
        self.rewards = rewards.RewardSet(rewards_cfg)
        self.model_cfg = model_cfg
        self.num_micro = int(num_micro)
        self.pack_buckets = int(pack_buckets)

    def __call__(
        self, batch: Batch, prompts: generate.PromptBatch, samples: Samples
    ) -> ScoredRollout:
        """``batch``: the step's pipeline batch (``batch.meta``: validity, tasks, labels,
        records); ``prompts``: its prompts as the rollout sampled them; ``samples``: theirs."""
        g = samples.group_size
        texts = generate.decode_completions(self.tok, generate.GenerateOutput(
            samples.tokens, samples.mask, samples.logps
        ))  # fmt: skip
        valid = np.repeat(batch.meta.valid, g)
        feats = rewards.completion_features(texts, parser=self.rewards_cfg.parser)
        total, parts = self._rewards(batch, feats, texts, valid, g)
        adv = np.asarray(
            grpo.group_advantages(
                total, g, self.cfg.advantage, self.cfg.advantage_eps,
                ddof=int(self.cfg.advantage_std_ddof),
            ),
            np.float32,
        )  # fmt: skip
        adv = np.where(valid, adv, 0.0).astype(np.float32)
        cmask = samples.mask
        comp_mask = (cmask & valid[:, None]).astype(np.float32)
        if self.cfg.mask_truncated_completions:
            stopped = np.isin(samples.tokens, self.tok.eos_ids) & cmask
            comp_mask *= stopped.any(axis=1, keepdims=True)
        update = step_inputs.grpo_batch(
            prompts, batch.meta.task_id, samples.tokens, cmask, comp_mask, adv,
            self.model_cfg.image_token_id, num_micro=self.num_micro,
            pack_buckets=self.pack_buckets,
        )  # fmt: skip
        m = self._metrics(batch, parts, feats, cmask, valid, g)
        return ScoredRollout(update, tuple(texts), total, adv, valid, samples.logps, m)

    def _rewards(
        self, batch: Batch, feats: Any, texts: list[str], valid: np.ndarray, g: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """(total (N,) float32, {name: (N,)}) over the whole batch."""
        b = batch.num_rows
        is_iaa = np.repeat(task_names(batch.meta.task_id) == "iaa", g)
        gt = np.repeat(batch.meta.gt_100, g)
        gt = np.where(valid, gt, 50.0).astype(np.float32)  # invalid rows: any finite value
        features = dict(
            pred=feats.prediction, gt=gt, parsed=feats.parsed & valid, num_words=feats.num_words,
            is_iaa=is_iaa, group_ids=np.repeat(np.arange(b, dtype=np.int32), g),
        )  # fmt: skip
        total, parts = self.rewards(
            features, num_groups=b, texts=texts, records=rewards.completion_records(batch.meta, g)
        )
        return np.asarray(total, np.float32), parts

    def _metrics(self, batch, parts, feats, cmask, valid, g) -> dict[str, float]:
        """Reward statistics per task over the valid rows, think length, valid prompts."""
        tasks = np.repeat(task_names(batch.meta.task_id), g)
        weights = {
            t: {k: float(self.rewards_cfg.weights[t][k]) for k in parts} for t in TASKS
        }
        m: dict[str, float] = {}
        if valid.any():
            m = reward_stats.grpo_reward_metrics(
                {k: np.asarray(v)[valid] for k, v in parts.items()},
                tasks[valid],
                group_size=g,
                completion_lengths=cmask.sum(axis=1)[valid],
                parsed=feats.parsed[valid],
                weights=weights,
            )
            m["think_len/all"] = float(feats.think_len[valid].mean())
        m["valid_prompts"] = float(batch.meta.valid.sum())
        return m
