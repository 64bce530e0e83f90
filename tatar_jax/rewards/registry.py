"""The rewards of a ``configs/rewards.py`` preset by name: the built-ins' registry, the per-task
weighted total, and :class:`RewardSet` (built-ins + ``features`` plug-ins in one program jitted
once, ``host`` plug-ins called outside jit).

``R = sum_f weights[task][f] * scale_f * r_f`` over the functions with a non-zero weight for a
task (spec §7.3, §8.6), built-ins first in :data:`~tatar_jax.rewards.names.BUILT_INS` order,
then the plug-ins in config order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tatar_jax.rewards import functions as fn
from tatar_jax.rewards import names
from tatar_jax.rewards.plugins import config_field, extra_rewards

# pred, gt, parsed, num_words, is_iaa, group_ids (+ num_tokens, max_tokens for "overlong"): (N,)
Features = Mapping[str, Any]
# what a ``features`` plug-in receives (its documented signature)
PLUGIN_FEATURES = ("pred", "gt", "parsed", "num_words", "is_iaa", "group_ids")


def _plugin_features(f: Features) -> dict[str, Any]:
    return {k: f[k] for k in PLUGIN_FEATURES}


def _format(f: Features, **kw: Any) -> jax.Array:
    return fn.format_reward(f["parsed"])


def _accuracy(f: Features, *, local_size: Any, num_groups: Any, **kw: Any) -> jax.Array:
    return fn.gaussian_score_reward(
        f["pred"], f["gt"], f["parsed"], f["num_words"], f["is_iaa"], **kw
    )


def _threshold(f: Features, *, local_size: Any, num_groups: Any, **kw: Any) -> jax.Array:
    return fn.threshold_reward(f["pred"], f["gt"], f["parsed"], **kw)


def _rank(f: Features, *, local_size: Any, num_groups: Any, **kw: Any) -> jax.Array:
    return fn.soft_rank_reward(
        f["pred"], f["gt"], f["parsed"], f["is_iaa"], local_size=local_size, **kw
    )


def _thurstone(f: Features, *, local_size: Any, num_groups: Any, **kw: Any) -> jax.Array:
    return fn.thurstone_rank_reward(
        f["pred"], f["gt"], f["parsed"], f["group_ids"], f["is_iaa"], num_groups=num_groups,
        local_size=local_size, **kw,
    )  # fmt: skip


def _overlong(f: Features, *, local_size: Any, num_groups: Any, **kw: Any) -> jax.Array:
    if "num_tokens" not in f or "max_tokens" not in f:
        raise ValueError(
            "the overlong reward needs the completions' token counts (features num_tokens, "
            "max_tokens)"
        )
    return fn.overlong_penalty_reward(f["num_tokens"], f["max_tokens"], **kw)


# name -> fn(features, *, local_size, num_groups, **constants) -> (N,)
REGISTRY: dict[str, Callable[..., jax.Array]] = {
    "format": _format,
    "accuracy": _accuracy,
    "threshold": _threshold,
    "rank": _rank,
    "thurstone": _thurstone,
    "overlong": _overlong,
}
assert tuple(REGISTRY) == names.BUILT_INS
REWARD_FUNCTIONS = names.BUILT_INS


def function_constants(config: Any, name: str) -> tuple[float, dict[str, Any]]:
    """(scale, constants) of built-in ``name`` from its block; a missing or an unknown field is
    an error."""
    block = names.CONFIG_BLOCK[name]
    unknown = sorted(set(config_field(config, block).keys()) - {"scale", *names.CONSTANTS[name]})
    if unknown:
        raise ValueError(f"rewards config block {block!r} has unknown fields {unknown}")
    scale = float(config_field(config, block, "scale"))
    return scale, {k: config_field(config, block, k) for k in names.CONSTANTS[name]}


def _weights(config: Any, name: str) -> tuple[float, float]:
    return (
        float(config_field(config, "weights", "iqa", name)),
        float(config_field(config, "weights", "iaa", name)),
    )


def _local_size(config: Any) -> int | None:
    scope = config_field(config, "scope")
    if scope not in ("global", "device_local"):
        raise ValueError(f"rewards scope must be 'global' or 'device_local', got {scope!r}")
    return config_field(config, "local_size") if scope == "device_local" else None


def built_in_parts(
    features: Features, config: Any, *, num_groups: int | None = None
) -> dict[str, jax.Array]:
    """{name: scale x r (N,)} of the built-ins with a non-zero weight for some task (jittable
    with ``config`` and ``num_groups`` static)."""
    dtype = fn.float_dtype(features["pred"], features["gt"])
    local = _local_size(config)
    f = {**features, "is_iaa": jnp.asarray(features["is_iaa"], bool)}
    parts = {}
    for name, reward in REGISTRY.items():
        if _weights(config, name) == (0.0, 0.0):
            continue
        scale, kw = function_constants(config, name)
        r = reward(f, local_size=local, num_groups=num_groups, **kw).astype(dtype)
        parts[name] = (scale * r).astype(dtype)
    return parts


def _features(pred, gt, parsed, num_words, is_iaa, group_ids, **lengths) -> dict[str, Any]:
    out = dict(pred=pred, gt=gt, parsed=parsed, num_words=num_words,
               is_iaa=jnp.asarray(is_iaa, bool), group_ids=group_ids)  # fmt: skip
    out.update({k: v for k, v in lengths.items() if v is not None})
    return out


def total_reward(
    pred: jax.Array,
    gt: jax.Array,
    parsed: jax.Array,
    num_words: jax.Array,
    is_iaa: jax.Array,
    group_ids: jax.Array,
    *,
    config: Any,
    num_groups: int | None = None,
    texts: Sequence[str] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    num_tokens: jax.Array | None = None,
    max_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-task weighted sum of the reward functions of a rewards preset (spec §7.3, §8.6).

    ``config`` is a ``configs/rewards.py`` block (ConfigDict or nested mapping): ``weights.iqa``
    / ``weights.iaa`` map each name of :data:`REWARD_FUNCTIONS` to its weight (this is where the
    "asymmetric" in TATAR lives), one sub-block per function holds its constants, and ``scope`` /
    ``local_size`` choose the global batch or the reference's device-local calls for the rank
    rewards. Every field is read strictly: a missing one is a ``KeyError`` naming its dotted path,
    an unknown one in a function's block a ``ValueError``. A function whose weight is 0 for both
    tasks is not computed. Returns ``(total (N,), {name: unweighted reward (N,)})``. Eager (op by
    op); a training step uses :class:`RewardSet` (one jitted program).

    ``config.extra`` names further reward functions (``plugins.extra_rewards``), weighted by
    ``weights.<task>.<name>`` like the built-ins. Host ones need the decoded ``texts`` (N,) and
    per-completion ``records`` (``features.completion_records``). The ``overlong`` built-in needs
    ``num_tokens`` (N,) (completion tokens) and ``max_tokens`` (N,) (the generation budget).
    """
    f = _features(pred, gt, parsed, num_words, is_iaa, group_ids, num_tokens=num_tokens,
                  max_tokens=max_tokens)  # fmt: skip
    dtype = fn.float_dtype(pred, gt)
    parts = built_in_parts(f, config, num_groups=num_groups)
    for name, extra in extra_rewards(config).items():
        if _weights(config, name) != (0.0, 0.0):
            parts[name] = extra(_plugin_features(f), texts=texts, records=records).astype(dtype)
    total = jnp.zeros(f["is_iaa"].shape, dtype)
    for name, r in parts.items():
        w_iqa, w_iaa = _weights(config, name)
        total = total + jnp.where(f["is_iaa"], w_iaa, w_iqa).astype(dtype) * r
    return total, parts


class RewardSet:
    """The rewards of one preset, ready for every step of a run.

    The built-ins and the ``features`` plug-ins run as one program, jitted once (per batch
    size); ``host`` plug-ins are called outside jit on the decoded texts and records. The
    weighted sum (float32, built-ins first, plug-ins in config order) equals
    :func:`total_reward`'s up to the jitted program's rounding.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        _local_size(config)  # a bad scope fails here, not in the first step
        extras = extra_rewards(config)
        self.names = [n for n in (*REGISTRY, *extras) if _weights(config, n) != (0.0, 0.0)]
        self.weights = {n: _weights(config, n) for n in self.names}
        self.features_extras = {
            n: e for n, e in extras.items() if n in self.weights and e.kind == "features"
        }
        self.host_extras = {
            n: e for n, e in extras.items() if n in self.weights and e.kind == "host"
        }
        self._device = jax.jit(self._device_parts, static_argnames=("num_groups",))

    def _device_parts(self, f: Features, num_groups: int | None) -> dict[str, jax.Array]:
        parts = built_in_parts(f, self.config, num_groups=num_groups)
        dtype = fn.float_dtype(f["pred"], f["gt"])
        for name, extra in self.features_extras.items():
            parts[name] = extra(_plugin_features(f)).astype(dtype)
        return parts

    def __call__(
        self,
        features: Features,
        *,
        num_groups: int | None = None,
        texts: Sequence[str] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total (N,) float32, {name: scale x r (N,)}) of ``features`` (pred, gt, parsed,
        num_words, is_iaa, group_ids: host arrays (N,))."""
        f = {k: np.asarray(v) for k, v in features.items()}
        f["is_iaa"] = f["is_iaa"].astype(bool)
        device = jax.tree.map(np.asarray, self._device(f, num_groups=num_groups))
        host = {
            n: np.asarray(e(f, texts=texts, records=records), np.float32)
            for n, e in self.host_extras.items()
        }
        parts = {n: device[n] if n in device else host[n] for n in self.names}
        total = np.zeros(f["is_iaa"].shape, np.float32)
        for name, r in parts.items():
            w_iqa, w_iaa = self.weights[name]
            total = total + np.where(f["is_iaa"], np.float32(w_iaa), np.float32(w_iqa)) * r
        return total, parts
