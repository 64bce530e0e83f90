"""Reward presets for Stage 2 (spec §7.3, §8, §14): which functions, per-task weights, constants.

    python scripts/train.py --config=configs/grpo.py:reference --config.rewards.threshold=10
    python -c "from configs import rewards; print(rewards.get_config('tatar'))"

``tatar_jax.rewards.total_reward(..., config=c)`` computes
``R = sum_f weights[task][f] * scale_f * r_f`` over the functions with a non-zero weight.

Presets (``get_config(arg)``):

* ``reference``: what the authors' launch script optimises (spec §7.3,
  §8.6): format + Gaussian "accuracy" + sample-level soft "rank", unweighted sum for both tasks,
  T = 8.75. The reference computes rewards on one device's micro-batch (one prompt x 8), so its
  soft rank only sees one image (bug B6); ``scope = "device_local"`` with ``local_size = 8``
  reproduces that. Set ``scope = "global"`` to rank across the whole batch instead.
* ``tatar`` (the default): what the paper describes: IQA = format +
  Gaussian score shaping; IAA = format + Thurstone completion ranking over the gathered global
  batch (``iaa_gaussian_weight`` optional, 0 by default).

Every constant of spec §8 is a field with the reference's value.

Extra reward functions (``tatar_jax.rewards.extra_rewards``): ``extra.<name>`` names a function
``"package.module:function"`` of kind ``"features"`` (jittable, the built-ins' feature arrays) or
``"host"`` (decoded texts + records); its per-task weights are ``weights.iqa.<name>`` /
``weights.iaa.<name>``. Add one in a config file with :func:`add_extra`, e.g.::

    from configs import grpo, rewards
    def get_config(arg=None):
        c = grpo.get_config(arg)
        rewards.add_extra(c.rewards, "brevity", "my_rewards:brevity", iqa=0.5, iaa=0.0,
                          max_words=60)
        return c

after which ``--config.rewards.weights.iqa.brevity=0.2`` or
``--config.rewards.extra.brevity.kwargs.max_words=40`` override it on the command line.

A run's ``--config.rewards.preset=NAME`` takes effect through :func:`resolve_overrides` (called
by scripts/train.py once the flags are parsed): the block is rebuilt from preset NAME and every
other ``--config.rewards.<field>`` of the command line is applied on top, whatever its order.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

from configs import common
from tatar_jax.rewards import names

PRESETS = ("tatar", "reference")
FUNCTIONS = names.BUILT_INS  # the built-in reward functions (tatar_jax/rewards/names.py)
EXTRA_KINDS = names.EXTRA_KINDS


def _weights(**nonzero: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({f: float(nonzero.get(f, 0.0)) for f in FUNCTIONS})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS, "rewards preset")

    c = ml_collections.ConfigDict()
    c.preset = preset
    c.parser = "strict"  # spec §4; "lenient" = the reference evaluation parser (compat only)
    # score_reward_threshold T on the 0-100 scale (spec §7.4: 8.75 in the script, 10 in code);
    # shared by the Gaussian and the threshold reward.
    c.threshold = 8.75
    # "global": rank rewards over the whole (gathered) step batch; "device_local": consecutive
    # chunks of `local_size` completions are separate reward calls (the reference, bug B6).
    c.scope = "global"
    c.local_size = 8  # reference per-device batch (one prompt x G) when scope = device_local

    c.format = ml_collections.ConfigDict({"scale": 1.0})  # §8.1

    a = ml_collections.ConfigDict()  # §8.2 Gaussian score reward ("accuracy")
    a.threshold = c.get_ref("threshold")
    a.target = 0.5  # reward value at d = T when alpha = 0
    a.alpha_iqa = 0.8
    a.alpha_iaa = 2.0
    a.iqa_max_words = 65  # IQA completions longer than this (whitespace words) get 0
    a.iaa_min_words = 125  # IAA completions shorter than this get 0
    a.iqa_scale = 1.0
    a.iaa_scale = 1.5  # then clipped at 1
    a.scale = 1.0
    c.accuracy = a

    t = ml_collections.ConfigDict()  # §8.3 old binary reward (unregistered in the reference)
    t.threshold = c.get_ref("threshold")
    t.scale = 1.0
    c.threshold_reward = t  # the block of function "threshold"

    r = ml_collections.ConfigDict()  # §8.4 sample-level soft rank ("rank")
    r.tau = 0.08
    r.m = 0.12
    r.eps = 1e-4
    r.scale = 1.0  # rank_scale
    c.rank = r

    th = ml_collections.ConfigDict()  # §8.5 completion-level Thurstone rank
    th.tau = 0.08
    th.m = 0.12
    th.eps = 1e-6
    th.scale = 1.0  # rank_scale
    c.thurstone = th

    ov = ml_collections.ConfigDict()  # DAPO soft overlong penalty ("overlong"), in [-1, 0]
    # L_max in tokens; 0 = the rollout's grpo.max_new_tokens. The penalty ramps from 0 at
    # L_max - cache to -1 at L_max. Off (weight 0) in both presets; e.g.
    # --config.rewards.weights.iaa.overlong=1.0 for the long IAA narratives.
    ov.max_length = 0
    ov.cache = 64
    ov.scale = 1.0
    c.overlong = ov

    c.extra = ml_collections.ConfigDict()  # name -> add_extra block; none by default
    c.weights = ml_collections.ConfigDict()
    if preset == "reference":
        c.scope = "device_local"
        c.weights.iqa = _weights(format=1.0, accuracy=1.0, rank=1.0)
        c.weights.iaa = _weights(format=1.0, accuracy=1.0, rank=1.0)
    else:
        c.iaa_gaussian_weight = 0.0
        c.weights.iqa = _weights(format=1.0, accuracy=1.0)
        c.weights.iaa = _weights(format=1.0, thurstone=1.0)
        c.weights.iaa.accuracy = c.get_ref("iaa_gaussian_weight")
    return c


def add_extra(
    rewards: ml_collections.ConfigDict,
    name: str,
    function: str,
    *,
    iqa: float = 1.0,
    iaa: float = 1.0,
    kind: str = "features",
    scale: float = 1.0,
    **kwargs: float | int | str | bool,
) -> None:
    """Adds reward ``name`` = ``function`` ("package.module:function") to a rewards block with
    per-task weights ``iqa`` / ``iaa``; ``kwargs`` are its constants (keyword arguments)."""
    if name in FUNCTIONS or name in rewards.extra:
        raise ValueError(f"reward name {name!r} is already taken")
    if kind not in EXTRA_KINDS:
        raise ValueError(f"reward kind {kind!r} not in {EXTRA_KINDS}")
    rewards.extra[name] = ml_collections.ConfigDict(
        {"function": function, "kind": kind, "scale": float(scale),
         "kwargs": ml_collections.ConfigDict(dict(kwargs))}
    )  # fmt: skip
    rewards.weights.iqa[name] = float(iqa)
    rewards.weights.iaa[name] = float(iaa)


def resolve(
    block: ml_collections.ConfigDict, keep: Iterable[str] = ()
) -> ml_collections.ConfigDict:
    """The rewards block of preset ``block.preset`` with the fields named in ``keep`` (dotted
    paths inside the block, e.g. ``"scope"``, ``"weights.iaa.accuracy"``) taken from ``block``.
    A kept field the preset does not have is a ``ValueError`` naming it."""
    fresh = get_config(block.preset)
    for name, extra in block.extra.items():  # plug-in rewards a config file added stay
        fresh.extra[name] = extra
        for task in ("iqa", "iaa"):
            fresh.weights[task][name] = block.weights[task][name]
    for path in keep:
        if path == "preset":
            continue
        *parents, name = path.split(".")
        src, dst = block, fresh
        for key in parents:
            src, dst = src[key], (dst[key] if key in dst else None)
            if dst is None:
                break
        if dst is None or name not in dst:
            raise ValueError(
                f"--config.rewards.{path}: rewards preset {block.preset!r} has no such field"
            )
        setattr(dst, name, src[name])
    return fresh


def resolve_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> bool:
    """Makes a command-line ``rewards.preset`` override of a run config take effect: ``overrides``
    are the dotted paths given as ``--config.<path>=...`` (``FLAGS["config"].override_values``).
    Without ``rewards.preset`` among them nothing changes. Returns whether the block was rebuilt."""
    paths = [p for p in overrides if p.startswith("rewards.")]
    if "rewards.preset" not in paths:
        return False
    config.rewards = resolve(config.rewards, [p[len("rewards.") :] for p in paths])
    return True
