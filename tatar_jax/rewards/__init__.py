"""The TATAR rewards (spec §4, §7.3, §8), by job:

- :mod:`~tatar_jax.rewards.names`: the built-ins' names and config tables (pure Python; the
  configs read them);
- :mod:`~tatar_jax.rewards.features`: host-side inputs from decoded completions
  (``completion_features``, ``completion_records``, the reference's rescaling);
- :mod:`~tatar_jax.rewards.functions`: the built-in rewards as pure ``jnp`` programs;
- :mod:`~tatar_jax.rewards.registry`: the rewards of a preset by name, their weighted total and
  :class:`RewardSet` (built-ins jitted once, host plug-ins outside jit);
- :mod:`~tatar_jax.rewards.plugins`: plug-in rewards named in a config;
- :mod:`~tatar_jax.rewards.spec_loops`: the spec's formulas as per-completion Python loops (the
  tests' reference and the benchmark's peer; not used by training).

Every public name is importable from ``tatar_jax.rewards``; submodules load on first use, so
``tatar_jax.rewards.names`` stays free of JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "parse_answer": "tatar_jax.answer_format",
    "parse_answer_lenient": "tatar_jax.answer_format",
    "CompletionFeatures": "tatar_jax.rewards.features",
    "completion_features": "tatar_jax.rewards.features",
    "completion_records": "tatar_jax.rewards.features",
    "reference_rescale_prediction": "tatar_jax.rewards.features",
    "format_reward": "tatar_jax.rewards.functions",
    "gaussian_score_reward": "tatar_jax.rewards.functions",
    "soft_rank_reward": "tatar_jax.rewards.functions",
    "threshold_reward": "tatar_jax.rewards.functions",
    "thurstone_rank_reward": "tatar_jax.rewards.functions",
    "REGISTRY": "tatar_jax.rewards.registry",
    "REWARD_FUNCTIONS": "tatar_jax.rewards.registry",
    "RewardSet": "tatar_jax.rewards.registry",
    "total_reward": "tatar_jax.rewards.registry",
    "EXTRA_KINDS": "tatar_jax.rewards.names",
    "ExtraReward": "tatar_jax.rewards.plugins",
    "extra_rewards": "tatar_jax.rewards.plugins",
    "validate_extra_rewards": "tatar_jax.rewards.plugins",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
