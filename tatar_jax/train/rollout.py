"""GRPO rollout: prompts -> G sampled completions each, nothing else.

Tunix-style separation: this engine samples (``tatar_jax.generate.Sampler``, compiled once, new
weights swapped in each step) and returns :class:`Samples`; scoring them (decode, rewards,
advantages, the update's rows) is the GRPO side's job (:mod:`tatar_jax.train.scoring`).

Rows are prompt-major: completion ``g`` of prompt ``b`` is row ``b * G + g``. Prompts flagged
``valid = False`` by the pipeline (skipped records, padding) are still generated for (static
shapes); the scorer gives them no loss and no reward statistics.

Several processes (hosts): the trainer passes every host the step's *global* batch
(``tatar_jax.multihost.global_batch``) and the sampler's outputs are gathered, so every host
holds all completions (the rewards are functions of the whole batch: spec §8.4-8.5, B6).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx, struct

from tatar_jax import generate, sharding

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


@struct.dataclass
class Samples:
    """The rollout's output (host numpy): ``group_size`` completions per prompt, prompt-major
    (N = prompts x group_size rows, T = max new tokens)."""

    tokens: np.ndarray  # (N, T) int32, pad after the stop token
    mask: np.ndarray  # (N, T) bool, up to and including the stop token
    logps: np.ndarray  # (N, T) float32, the sampler's log-probs of its tokens
    group_size: int = struct.field(pytree_node=False, default=1)


def sampling_params(grpo_cfg: Any, tokenizer: Any) -> generate.SamplingParams:
    """The rollout's sampling settings from the ``grpo`` config block (tempered log-probs: what
    the loss computes for pi_theta)."""
    return generate.SamplingParams.from_config(
        grpo_cfg, tokenizer, num_samples=int(grpo_cfg.num_generations), logprobs="tempered"
    )


class RolloutEngine:
    """Samples G completions per prompt of a step batch.

    Args:
      model: the policy module (its graph is compiled once; weights come per call).
      tokenizer: ``tatar_jax.data.tokenizer.Tokenizer`` (stop and pad ids).
      grpo_cfg: the ``grpo`` block of configs/grpo.py (sampling settings, G).
      mesh / rules: the training mesh and rules (None: one device).
      rollout_cfg: the ``rollout`` config block (:func:`rollout_mesh`: the rollout's own mesh
        and rules over the training devices); None = the training mesh and rules.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        grpo_cfg: Any,
        *,
        mesh: Any = None,
        rules: Any = None,
        rollout_cfg: Any = None,
    ) -> None:
        params = sampling_params(grpo_cfg, tokenizer)
        self.group_size = params.num_samples
        if rollout_cfg is not None:
            mesh, rules = rollout_mesh(rollout_cfg, model, mesh, rules)
        self.sampler = generate.Sampler(model, params, mesh=mesh, rules=rules)

    def generate(self, state: Any, prompts: generate.PromptBatch, rng: jax.Array) -> Samples:
        """The G samples of every prompt of ``prompts`` (their layout as the batch was made:
        nothing is re-bucketed), as host arrays (B*G, T). ``state``: the policy's parameters
        (any dtype / layout, e.g. the trainer's fp32 FSDP state), turned into the rollout's copy
        for this call (compute dtype, the rollout mesh's layout: ``Sampler.place_state``) and
        dropped after it, so it never sits beside the update."""
        out = self.sampler.generate_prompts(prompts, rng=rng, state=state)
        # On a mesh spanning several processes the outputs are global arrays: gathered, so that
        # every host scores the whole step batch (rewards are batch functions).
        tokens, mask, logps = (sharding.to_host(x) for x in out)
        return Samples(tokens, mask, logps, self.group_size)
