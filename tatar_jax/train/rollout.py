"""GRPO rollout on the host side: prompts -> G completions -> decode + parse -> rewards over the
global batch -> group advantages -> the inputs of the jitted update (``grpo_step``).

Tunix-style separation: the sampler (``tatar_jax.generate.Sampler``, compiled once, new weights
swapped in each step), the rewards (``tatar_jax.rewards``, pure functions of a few per-completion
scalars) and the learner (``grpo_step``) only meet through plain arrays here.

Rows of a step are prompt-major: completion ``g`` of prompt ``b`` is row ``b * G + g``. Prompts
flagged ``valid = False`` by the pipeline (skipped records, padding) are still generated for
(static shapes) but get completion mask 0 and advantage 0: no loss, no reward statistics.

Several processes (hosts): the trainer passes every host the step's *global* batch
(``tatar_jax.multihost.global_batch``) and the sampler's outputs are gathered, so every host
decodes and scores all completions and computes the same rewards, advantages and metrics (the
IAA Thurstone reward and the soft rank are functions of the whole batch: spec §8.4-8.5, B6);
each host then transfers only its own shards of the update rows (``sharding.put_global``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from tatar_jax import generate, grpo, rewards, sharding
from tatar_jax.data import prompts
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import metrics

IAA_ID = prompts.TASK_IDS["iaa"]


@dataclasses.dataclass
class Rollout:
    """One step's rollout. ``inputs`` feeds ``grpo_step`` (numpy); the rest is for logging."""

    inputs: dict[str, Any]
    texts: list[str]
    rewards: np.ndarray  # (N,) total reward
    advantages: np.ndarray  # (N,)
    metrics: dict[str, float]
    rollout_logps: np.ndarray  # (N, T) the sampler's log-probs of its tokens


class RolloutEngine:
    """Generates, scores and packs one GRPO step.

    Args:
      model: the policy module (its graph is compiled once; weights come per call).
      tokenizer: ``tatar_jax.data.tokenizer.Tokenizer`` (decoding, stop ids).
      grpo_cfg: the ``grpo`` block of configs/grpo.py. rewards_cfg: a configs/rewards.py block.
      prompt_buckets: the pipeline's sequence buckets (prompts are already padded to one).
      mesh / rules: shard the sampler's batch over the mesh (None: one device).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        grpo_cfg: Any,
        rewards_cfg: Any,
        *,
        prompt_buckets: tuple[int, ...] | None = None,
        mesh: Any = None,
        rules: Any = None,
    ) -> None:
        self.tok = tokenizer
        self.g = int(grpo_cfg.num_generations)
        self.cfg = grpo_cfg
        self.rewards_cfg = rewards_cfg
        self.image_token_id = model.config.image_token_id
        self.vision_cfg = model.config.vision
        params = generate.SamplingParams(
            max_new_tokens=int(grpo_cfg.max_new_tokens),
            num_samples=self.g,
            temperature=float(grpo_cfg.temperature),
            top_k=int(grpo_cfg.top_k),
            top_p=float(grpo_cfg.top_p),
            stop_token_ids=tuple(tokenizer.eos_ids),
            pad_token_id=int(tokenizer.pad_id),
            logprobs="tempered",
        )
        self.sampler = generate.Sampler(
            model, params, prompt_buckets=prompt_buckets, mesh=mesh, rules=rules
        )

    def generate(
        self, state: Any, batch: Mapping[str, Any], rng: jax.Array
    ) -> generate.GenerateOutput:
        """The G samples of every prompt of ``batch``, as host arrays (B*G, T)."""
        n_patch = int(np.asarray(batch["patch_mask"]).sum())
        out = self.sampler.generate(
            batch["input_ids"],
            batch["attention_mask"],
            np.asarray(batch["pixel_values"])[:n_patch],
            batch["image_grid_thw"],
            rng=rng,
            state=state,
        )
        # On a mesh spanning several processes the outputs are global arrays: gathered, so that
        # every host decodes and scores the whole step batch (rewards are batch functions).
        return generate.GenerateOutput(*(sharding.to_host(x) for x in out))

    def score(self, batch: Mapping[str, Any], out: generate.GenerateOutput) -> Rollout:
        """Decode, parse, rewards over the batch, group advantages, the update's inputs."""
        g = self.g
        b = len(batch["valid"])
        tokens, cmask, logps = out
        texts = generate.decode_completions(self.tok, out)
        feats = rewards.completion_features(texts, parser=self.rewards_cfg.parser)
        valid = np.repeat(np.asarray(batch["valid"], bool), g)
        is_iaa = np.repeat(np.asarray(batch["task_id"]) == IAA_ID, g)
        gt = np.repeat(np.asarray(batch["gt_100"], np.float32), g)
        gt = np.where(valid, gt, 50.0).astype(np.float32)  # invalid rows: any finite value
        groups = np.repeat(np.arange(b, dtype=np.int32), g)
        total, parts = rewards.total_reward(
            feats.prediction,
            gt,
            feats.parsed & valid,
            feats.num_words,
            is_iaa,
            groups,
            config=self.rewards_cfg,
            num_groups=b,
        )
        total = np.asarray(total, np.float32)
        adv = np.asarray(
            grpo.group_advantages(
                total,
                g,
                self.cfg.advantage,
                self.cfg.advantage_eps,
                ddof=int(self.cfg.advantage_std_ddof),
            ),
            np.float32,
        )
        adv = np.where(valid, adv, 0.0).astype(np.float32)
        comp_mask = (cmask & valid[:, None]).astype(np.float32)
        if self.cfg.mask_truncated_completions:
            stopped = np.isin(tokens, self.tok.eos_ids) & cmask
            comp_mask *= stopped.any(axis=1, keepdims=True)
        rows = step_inputs.expand_prompts(batch, tokens, cmask, g, self.image_token_id)
        rows.update(completion_mask=comp_mask, advantages=adv)
        inputs = {"rows": rows, "shared": step_inputs.shared_vision(batch, self.vision_cfg)}

        sel = valid
        tasks = np.where(is_iaa, "iaa", "iqa")
        weights = {
            t: {k: float(self.rewards_cfg.weights[t][k]) for k in parts} for t in prompts.TASKS
        }
        m: dict[str, float] = {}
        if sel.any():
            m = metrics.grpo_reward_metrics(
                {k: np.asarray(v)[sel] for k, v in parts.items()},
                tasks[sel],
                group_size=g,
                completion_lengths=cmask.sum(axis=1)[sel],
                parsed=feats.parsed[sel],
                weights=weights,
            )
            m["think_len/all"] = float(feats.think_len[sel].mean())
        m["valid_prompts"] = float(np.asarray(batch["valid"]).sum())
        return Rollout(inputs, texts, total, adv, m, np.asarray(logps))

    def __call__(self, state: Any, batch: Mapping[str, Any], rng: jax.Array) -> Rollout:
        return self.score(batch, self.generate(state, batch, rng))
