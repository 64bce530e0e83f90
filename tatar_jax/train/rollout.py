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
from flax import nnx

from tatar_jax import generate, grpo, rewards, sharding
from tatar_jax.data import prompts
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import metrics

IAA_ID = prompts.TASK_IDS["iaa"]
# Share of a device's memory the rollout's weights may take before "auto" splits them
# tensor-parallel: the rest holds the KV cache, the training state and the activations.
WEIGHTS_MEMORY_FRACTION = 0.25


def rollout_layout(
    weights_bytes: int, num_devices: int, device_bytes: int | None, kv_heads: int
) -> tuple[dict[str, int], str]:
    """The rollout's default mesh shape and rules table (``rollout.mesh = rollout.rules =
    "auto"``): weights replicated (pure data parallelism, no collective in the decode loop)
    when they take at most :data:`WEIGHTS_MEMORY_FRACTION` of a device, else split over the
    smallest ``tensor`` axis (a power of two dividing the device count and the KV heads) that
    brings them under it, the rest of the devices splitting the batch. ``device_bytes`` None
    (host CPU devices report no limit) counts as enough memory."""
    t = 1
    if device_bytes:
        budget = WEIGHTS_MEMORY_FRACTION * device_bytes
        while weights_bytes / t > budget and num_devices % (2 * t) == 0 and kv_heads % (2 * t) == 0:
            t *= 2
    shape = {"data": num_devices // t, "tensor": t}
    return shape, "replicated" if t == 1 else "tensor"


def _parse_shape(text: str) -> dict[str, int]:
    """``"data=4,tensor=2"`` -> {"data": 4, "tensor": 2}."""
    shape = {}
    for part in text.split(","):
        name, eq, size = part.partition("=")
        if not eq or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"rollout.mesh {text!r}: {part!r} is not axis=size")
        shape[name.strip()] = int(size)
    return shape


def rollout_mesh(
    rollout_cfg: Any,
    model: Any,
    train_mesh: Any,
    train_rules: Any,
    *,
    device_bytes: int | None = None,
) -> tuple[Any, Any]:
    """(mesh, rules) of the rollout from the ``rollout`` config block, over the training mesh's
    devices. ``mesh``: "auto" (:func:`rollout_layout` from the weights' bytes in the compute
    dtype and the device memory), "train" (the training mesh and rules) or ``axis=size,...``;
    ``rules``: "auto" (replicated without a ``tensor`` axis, else "tensor") or a name of
    ``sharding.RULE_SETS``. ``device_bytes``: a device's memory (default: what the first device
    reports; AOT plans pass the target accelerator's)."""
    if train_mesh is None:
        return None, None
    text = str(rollout_cfg.mesh)
    devices = list(train_mesh.devices.flat)
    if text == "train":
        mesh = train_mesh
    else:
        if text == "auto":
            n_weights = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
            # this process's first device: another host's cannot report its memory (every host
            # has the same accelerators, so all processes choose the same layout)
            local = next(d for d in devices if d.process_index == jax.process_index())
            limit = device_bytes or (local.memory_stats() or {}).get("bytes_limit")
            itemsize = np.dtype(model.dtype).itemsize
            shape, _ = rollout_layout(
                n_weights * itemsize, len(devices), limit, model.config.text.num_key_value_heads
            )
        else:
            shape = _parse_shape(text)
        mesh = sharding.make_mesh(shape, devices=devices)
    if str(rollout_cfg.rules) != "auto":
        rules = sharding.get_rules(str(rollout_cfg.rules))
    elif text == "train":
        rules = train_rules
    else:
        rules = sharding.get_rules("tensor" if mesh.shape["tensor"] > 1 else "replicated")
    return mesh, rules


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
      mesh / rules: the training mesh and rules (None: one device).
      rollout_cfg: the ``rollout`` config block (:func:`rollout_mesh`: the rollout's own mesh
        and rules over the training devices); None = the training mesh and rules.
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
        rollout_cfg: Any = None,
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
        if rollout_cfg is not None:
            mesh, rules = rollout_mesh(rollout_cfg, model, mesh, rules)
        self.sampler = generate.Sampler(
            model, params, prompt_buckets=prompt_buckets, mesh=mesh, rules=rules
        )

    def generate(
        self, state: Any, batch: Mapping[str, Any], rng: jax.Array
    ) -> generate.GenerateOutput:
        """The G samples of every prompt of ``batch``, as host arrays (B*G, T). ``state``: the
        policy's parameters (any dtype / layout, e.g. the trainer's fp32 FSDP state), turned
        into the rollout's copy for this call (compute dtype, the rollout mesh's layout:
        ``Sampler.place_state``) and dropped after it, so it never sits beside the update."""
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
            texts=texts,
            records=rewards.completion_records(batch, g),
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
