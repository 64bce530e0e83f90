"""The TATAR rewards as array programs, and their inputs from decoded completions (spec §4, §7.3,
§8).

Two halves:

* **Host side** (plain Python / numpy, never jitted): :func:`parse_answer` (the strict training
  parser of spec §4) and :func:`parse_answer_lenient` (the reference *evaluation* parser), both
  defined in :mod:`tatar_jax.answer_format` and exported here; :func:`reference_rescale_prediction`
  (the reference evaluation's value-based rescaling, bug B2, for reference-compatible evaluation
  only); and :func:`completion_features`, which turns a list of decoded completions into the small
  per-completion arrays the rewards need. None of them raises on any string.
* **Device side** (pure ``jnp``, jittable, static shapes): :func:`format_reward`,
  :func:`threshold_reward`, :func:`gaussian_score_reward`, :func:`soft_rank_reward`,
  :func:`thurstone_rank_reward` and :func:`total_reward` (the per-task weighted sum of a
  ``configs/rewards.py`` preset). Every array is ``(N,)`` with ``N = prompts x G``; scores are on
  the 0-100 scale; ``parsed`` is a bool mask and unparsed completions get 0 from every reward (as
  the reference). Entries of ``pred`` where ``parsed`` is False are ignored (they may be NaN).

**The rewards see the global rollout batch.** The reference calls its reward functions on one
device's micro-batch (one prompt x G = 8 completions), so its ranking rewards can never compare
two images (bug B6: the soft-rank reward degenerates to a within-group consensus term and the
Thurstone reward is identically 0). Here the reward functions take the whole step's batch. On a
multi-host run the per-completion inputs are a handful of scalars per completion (prediction,
parsed flag, word count, task flag, group id, ground truth), so each host builds them for its own
completions and all-gathers them before the reward math, e.g.::

    from jax.experimental import multihost_utils
    feats = multihost_utils.process_allgather(local_feats, tiled=True)   # (N,) on every host
    total, parts = rewards.total_reward(..., config=cfg)                # identical on all hosts
    # each host then keeps the slice of advantages for its own completions

Group ids must then be globally unique (e.g. ``process_index * prompts_per_host + local_id``).
The reference's device-local behaviour is available only as an explicit switch
(``local_size=``: consecutive chunks of that many completions are separate reward calls), for
faithfulness experiments.

Numerics: every logistic and every BCE is evaluated in log-sigmoid form. Clipping a probability
``q = sigmoid(x)`` to ``[eps, 1 - eps]`` is done exactly as clipping ``x`` to
``[logit(eps), logit(1 - eps)]`` (sigmoid is monotone), so ``ln q'`` and ``ln(1 - q')`` are
``log_sigmoid(+-x_clipped)`` and no input overflows (fixes B7).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tatar_jax import answer_format
from tatar_jax.answer_format import parse_answer, parse_answer_lenient
from tatar_jax.data import prompts

__all__ = [
    "CompletionFeatures",
    "ExtraReward",
    "completion_features",
    "completion_records",
    "extra_rewards",
    "format_reward",
    "gaussian_score_reward",
    "parse_answer",
    "parse_answer_lenient",
    "reference_rescale_prediction",
    "REWARD_FUNCTIONS",
    "soft_rank_reward",
    "threshold_reward",
    "thurstone_rank_reward",
    "total_reward",
    "validate_extra_rewards",
]

# --------------------------------------------------------------------------------------------
# Completion features (host side)
# --------------------------------------------------------------------------------------------


def reference_rescale_prediction(value: float | None, task: str) -> float | None:
    """The reference evaluation's value-based rescaling of a prediction (spec §4 step 5, bug B2).

    Non-monotone by construction (IQA 4.5 → 87.5 but 5.01 → 5.01); use only in
    reference-compatible evaluation. ``task`` is ``"iqa"`` or ``"iaa"``.
    """
    if task not in ("iqa", "iaa"):
        raise ValueError(f"task must be 'iqa' or 'iaa', got {task!r}")
    if value is None or not math.isfinite(value):
        return None
    if 0.0 <= value <= 1.0:
        return 100.0 * value
    if task == "iqa" and 1.0 < value <= 5.0:
        return 25.0 * (value - 1.0)
    if task == "iaa" and 1.0 < value <= 10.0:
        return 10.0 * value
    return min(max(value, 0.0), 100.0)


@dataclasses.dataclass(frozen=True)
class CompletionFeatures:
    """Per-completion reward inputs, numpy arrays of shape (N,).

    prediction: float32, the parsed number clipped to [0, 100]; 0 where not parsed.
    parsed: bool, the parser returned a number.
    num_words: int32, whitespace-separated tokens of the whole completion (spec §8).
    think_len: int32, length of the first ``<think>`` block (tokens if a counter was given,
        otherwise whitespace words); 0 without a think block.
    has_think: bool, a ``<think>`` tag is present.
    """

    prediction: np.ndarray
    parsed: np.ndarray
    num_words: np.ndarray
    think_len: np.ndarray
    has_think: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def completion_features(
    texts: Sequence[str],
    *,
    count_tokens: Callable[[str], int] | None = None,
    think_token_counts: Sequence[int] | None = None,
    parser: str | Callable[[str], float | None] = "strict",
) -> CompletionFeatures:
    """Builds the reward inputs from decoded completions (special tokens already stripped).

    Think length: ``think_token_counts`` (precomputed per completion, e.g. from token ids and
    the think-tag positions) wins; else ``count_tokens(think_text)`` (e.g.
    ``lambda s: len(tokenizer.encode(s))``); else whitespace words of the think text. No model is
    needed for any of them. ``parser`` is ``"strict"`` (spec §4, the default), ``"lenient"`` or a
    callable. Non-``str`` entries count as unparsed, empty completions. Never raises on text.
    """
    parse = answer_format.get_parser(parser)
    n = len(texts)
    if think_token_counts is not None and len(think_token_counts) != n:
        raise ValueError(
            f"think_token_counts has {len(think_token_counts)} entries for {n} completions"
        )
    prediction = np.zeros(n, np.float32)
    parsed = np.zeros(n, bool)
    num_words = np.zeros(n, np.int32)
    think_len = np.zeros(n, np.int32)
    has_think = np.zeros(n, bool)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        value = parse(text)
        if value is not None and not math.isnan(value):
            parsed[i] = True
            prediction[i] = min(max(value, 0.0), 100.0)
        num_words[i] = len(text.split())
        has_think[i] = answer_format.has_think(text)
        if think_token_counts is not None:
            think_len[i] = int(think_token_counts[i])
        elif has_think[i]:
            think = answer_format.think_text(text)
            think_len[i] = int(count_tokens(think)) if count_tokens else len(think.split())
    return CompletionFeatures(prediction, parsed, num_words, think_len, has_think)


# --------------------------------------------------------------------------------------------
# Rewards (device side, pure jnp)
# --------------------------------------------------------------------------------------------


def _float_dtype(*xs: Any) -> jnp.dtype:
    """float64 only if x64 is on and some input is float64; else float32."""
    dt = jnp.result_type(*[jnp.asarray(x).dtype for x in xs], jnp.float32)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


def _clean_pred(pred: jax.Array, parsed: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Prediction clipped to [0, 100], and 0 where unparsed (so NaN/inf padding cannot leak)."""
    pred = jnp.asarray(pred, dtype)
    safe = jnp.where(parsed, pred, 0)
    safe = jnp.where(jnp.isnan(safe), 0, safe)
    return jnp.clip(safe, 0.0, 100.0)


def format_reward(parsed: jax.Array) -> jax.Array:
    """Spec §8.1: 1 where the strict parser returned a number, else 0. (N,) float32."""
    return jnp.asarray(parsed, bool).astype(jnp.float32)


def threshold_reward(
    pred: jax.Array, gt: jax.Array, parsed: jax.Array, *, threshold: float = 8.75
) -> jax.Array:
    """Spec §8.3 (old, unregistered in the reference): 1 if |clip(pred) - clip(gt)| < T."""
    parsed = jnp.asarray(parsed, bool)
    dtype = _float_dtype(pred, gt)
    d = jnp.abs(_clean_pred(pred, parsed, dtype) - jnp.clip(jnp.asarray(gt, dtype), 0.0, 100.0))
    return jnp.where(parsed & (d < threshold), 1.0, 0.0).astype(dtype)


def gaussian_score_reward(
    pred: jax.Array,
    gt: jax.Array,
    parsed: jax.Array,
    num_words: jax.Array,
    is_iaa: jax.Array,
    *,
    threshold: float = 8.75,
    target: float = 0.5,
    alpha_iqa: float = 0.8,
    alpha_iaa: float = 2.0,
    iqa_max_words: int | None = 65,
    iaa_min_words: int | None = 125,
    iqa_scale: float = 1.0,
    iaa_scale: float = 1.5,
) -> jax.Array:
    """Gaussian score reward with adaptive width, spec §8.2 (the reference's "accuracy").

    d = |clip(pred) - clip(gt)|, sigma0 = T / sqrt(-2 ln target), sigma = sigma0 (1 + alpha d /
    100) with alpha per task, r = exp(-d^2 / (2 sigma^2)); IQA completions with more than
    ``iqa_max_words`` words and IAA ones with fewer than ``iaa_min_words`` get 0 (``None``
    disables a rule); then r = min(1, scale_task * r). All args (N,); returns (N,) in [0, 1].
    """
    if isinstance(threshold, (int, float)) and not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if isinstance(target, (int, float)) and not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    parsed = jnp.asarray(parsed, bool)
    is_iaa = jnp.asarray(is_iaa, bool)
    dtype = _float_dtype(pred, gt)
    d = jnp.abs(_clean_pred(pred, parsed, dtype) - jnp.clip(jnp.asarray(gt, dtype), 0.0, 100.0))
    sigma0 = threshold / jnp.sqrt(-2.0 * jnp.log(jnp.asarray(target, dtype)))
    alpha = jnp.where(is_iaa, alpha_iaa, alpha_iqa).astype(dtype)
    sigma = sigma0 * (1.0 + alpha * d / 100.0)
    r = jnp.exp(-jnp.square(d) / (2.0 * jnp.square(sigma)))
    words = jnp.asarray(num_words)
    ok = parsed
    if iqa_max_words is not None:
        ok = ok & ~(~is_iaa & (words > iqa_max_words))
    if iaa_min_words is not None:
        ok = ok & ~(is_iaa & (words < iaa_min_words))
    scale = jnp.where(is_iaa, iaa_scale, iqa_scale).astype(dtype)
    return jnp.where(ok, jnp.minimum(1.0, scale * r), 0.0).astype(dtype)


def _bce_logits_clipped(target: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """BCE(target, clip(sigmoid(x), eps, 1 - eps)), exactly, in log-sigmoid form.

    With xc the clipped logit: ln q' = log_sigmoid(xc) and ln(1 - q') = log_sigmoid(xc) - xc,
    so BCE = (1 - target) xc - log_sigmoid(xc): one softplus per pair, finite for any x.
    """
    lo = math.log(eps) - math.log1p(-eps)  # logit(eps); logit(1 - eps) = -lo
    xc = jnp.clip(x, lo, -lo)
    return (1.0 - target) * xc - jax.nn.log_sigmoid(xc)


def _call_ids(n: int, local_size: int | None) -> jax.Array | None:
    if local_size is None:
        return None
    if local_size < 1:
        raise ValueError(f"local_size must be >= 1, got {local_size}")
    return jnp.arange(n) // local_size


def _soft_rank_block(p, gamma, member, tau, m, eps):
    """Soft rank over the last axis (one reward call per leading index). Shapes (..., n)."""
    n = p.shape[-1]
    pair = member[..., :, None] & member[..., None, :] & ~jnp.eye(n, dtype=bool)
    dg = gamma[..., :, None] - gamma[..., None, :]
    bce = _bce_logits_clipped(
        jax.nn.sigmoid(dg / tau), (p[..., :, None] - p[..., None, :]) / tau, eps
    )
    w = jnp.where(pair, jnp.exp(-jnp.abs(dg) / m), 0.0)
    wsum = w.sum(axis=-1)
    loss = (w * bce).sum(axis=-1) / jnp.where(wsum > 0, wsum, 1.0)
    r = jnp.clip(1.0 - loss / math.log(1.0 / eps), 0.0, 1.0)
    # A member without a partner: fewer than two members in its call.
    return jnp.where(member & (pair.sum(axis=-1) > 0), r, 0.0)


def _unit_scale_inputs(
    pred: jax.Array, gt: jax.Array, parsed: jax.Array, is_iaa: jax.Array
) -> tuple[jax.Array, jax.Array, jnp.dtype, jax.Array, jax.Array]:
    """The rank rewards' inputs: (parsed, is_iaa) as bool, the float dtype, and p = clean
    prediction / 100 and gamma = clip(gt) / 100 on the 0-1 scale. All arrays (N,)."""
    parsed = jnp.asarray(parsed, bool)
    is_iaa = jnp.asarray(is_iaa, bool)
    dtype = _float_dtype(pred, gt)
    p = _clean_pred(pred, parsed, dtype) / 100.0
    gamma = jnp.clip(jnp.asarray(gt, dtype), 0.0, 100.0) / 100.0
    return parsed, is_iaa, dtype, p, gamma


def soft_rank_reward(
    pred: jax.Array,
    gt: jax.Array,
    parsed: jax.Array,
    is_iaa: jax.Array,
    *,
    tau: float = 0.08,
    m: float = 0.12,
    eps: float = 1e-4,
    local_size: int | None = None,
) -> jax.Array:
    """Sample-level soft rank reward, spec §8.4 (the reference's "rank"), IAA only.

    I = IAA completions with a parsed prediction (over the whole batch, or, with ``local_size``,
    within each consecutive chunk of that many completions: the reference's device-local call,
    bug B6). On the 0-1 scale p = clip(pred)/100, gamma = clip(gt)/100; for c in I:
    L_c = sum_{d in I, d != c} w_cd BCE(sigmoid((gamma_c - gamma_d)/tau),
    clip(sigmoid((p_c - p_d)/tau), eps, 1 - eps)) / sum_{d != c} w_cd with
    w_cd = exp(-|gamma_c - gamma_d| / m); r_c = clip(1 - L_c / ln(1/eps), 0, 1). Fewer than two
    members in I (per call) → all 0; IQA and unparsed → 0. (N,) → (N,); work O(N^2) globally,
    O(N x local_size) device-local.
    """
    parsed, is_iaa, dtype, p, gamma = _unit_scale_inputs(pred, gt, parsed, is_iaa)
    n = parsed.shape[0]
    member = parsed & is_iaa
    if local_size is None:
        return _soft_rank_block(p, gamma, member, tau, m, eps).astype(dtype)
    _call_ids(n, local_size)  # validates
    pad = -n % local_size
    blocks = [jnp.pad(x, (0, pad)).reshape(-1, local_size) for x in (p, gamma, member)]
    r = _soft_rank_block(*blocks, tau, m, eps).reshape(-1)[:n]
    return r.astype(dtype)


def thurstone_rank_reward(
    pred: jax.Array,
    gt: jax.Array,
    parsed: jax.Array,
    group_ids: jax.Array,
    is_iaa: jax.Array,
    *,
    tau: float = 0.08,
    m: float = 0.12,
    eps: float = 1e-6,
    num_groups: int | None = None,
    local_size: int | None = None,
) -> jax.Array:
    """Completion-level Thurstone-style rank reward, spec §8.5 (the paper's IAA reward).

    Groups = prompts (``group_ids``, ints in [0, num_groups); gt and task constant within a
    group). Per group i over its parsed completions on the 0-1 scale: mu_i = mean, v_i =
    population variance; S = IAA groups with at least one parsed completion. For completion k of
    group i in S: L_k = sum_{j in S, j != i} w_ij BCE(sigmoid((gamma_i - gamma_j)/tau),
    clip(sigmoid((p_k - mu_j) / sqrt(v_i + v_j + eps)), eps, 1 - eps)) / sum_{j != i} w_ij,
    w_ij = exp(-|gamma_i - gamma_j| / m); r_k = clip(1 - L_k / ln(1/eps), 0, 1). |S| < 2 → all
    0; IQA and unparsed → 0. ``num_groups`` (static) makes the work (N, num_groups) instead of
    (N, N). ``local_size`` restricts S to each consecutive chunk of completions (device-local
    reference semantics, B6; chunks must not split a group). (N,) → (N,).
    """
    parsed, is_iaa, dtype, p, gamma_c = _unit_scale_inputs(pred, gt, parsed, is_iaa)
    group_ids = jnp.asarray(group_ids, jnp.int32)
    n = parsed.shape[0]
    ng = n if num_groups is None else int(num_groups)
    if not isinstance(group_ids, jax.core.Tracer) and n:
        lo, hi = int(group_ids.min()), int(group_ids.max())
        if lo < 0 or hi >= ng:  # segment ops would silently drop these completions
            raise ValueError(f"group_ids must lie in [0, {ng}), got min {lo}, max {hi}")
    valid = parsed.astype(dtype)
    seg = lambda x: jax.ops.segment_sum(x, group_ids, num_segments=ng)
    count = seg(valid)
    size = seg(jnp.ones_like(valid))
    safe_count = jnp.where(count > 0, count, 1.0)
    mu = seg(p * valid) / safe_count
    var = seg(jnp.square(p - mu[group_ids]) * valid) / safe_count  # two-pass: never < 0
    gamma = seg(gamma_c) / jnp.where(size > 0, size, 1.0)
    group_iaa = jax.ops.segment_max(is_iaa.astype(jnp.int32), group_ids, num_segments=ng) > 0
    in_s = group_iaa & (count > 0)  # (G,)
    # Everything that depends only on the pair of groups is computed on (G, G) and gathered.
    partner_gg = in_s[None, :] & ~jnp.eye(ng, dtype=bool)
    calls = _call_ids(n, local_size)
    if calls is not None:
        group_call = jax.ops.segment_max(calls, group_ids, num_segments=ng)
        partner_gg = partner_gg & (group_call[:, None] == group_call[None, :])
    dg = gamma[:, None] - gamma[None, :]
    target_gg = jax.nn.sigmoid(dg / tau)
    w_gg = jnp.where(partner_gg, jnp.exp(-jnp.abs(dg) / m), 0.0)
    inv_denom_gg = 1.0 / jnp.sqrt(var[:, None] + var[None, :] + eps)
    wsum_gg = w_gg.sum(axis=1)
    # Per completion (N, G): only the logit, its clip and one softplus.
    x = (p[:, None] - mu[None, :]) * inv_denom_gg[group_ids]
    bce = _bce_logits_clipped(target_gg[group_ids], x, eps)
    wsum = wsum_gg[group_ids]
    loss = (w_gg[group_ids] * bce).sum(axis=1) / jnp.where(wsum > 0, wsum, 1.0)
    r = jnp.clip(1.0 - loss / math.log(1.0 / eps), 0.0, 1.0)
    has_partner = partner_gg.any(axis=1)[group_ids]
    member = parsed & is_iaa & in_s[group_ids]
    return jnp.where(member & has_partner, r, 0.0).astype(dtype)


# --------------------------------------------------------------------------------------------
# Weighted total (per-task weights from a configs/rewards.py preset)
# --------------------------------------------------------------------------------------------

REWARD_FUNCTIONS = ("format", "accuracy", "threshold", "rank", "thurstone")
# Config block of each function (the top-level "threshold" is the shared T, so the threshold
# reward's block has another name) and the constants the block passes to the function; every
# block also holds the function's "scale".
_CONFIG_BLOCK = {
    "format": "format",
    "accuracy": "accuracy",
    "threshold": "threshold_reward",
    "rank": "rank",
    "thurstone": "thurstone",
}
_CONSTANTS = {
    "format": (),
    "accuracy": (
        "threshold", "target", "alpha_iqa", "alpha_iaa", "iqa_max_words", "iaa_min_words",
        "iqa_scale", "iaa_scale",
    ),
    "threshold": ("threshold",),
    "rank": ("tau", "m", "eps"),
    "thurstone": ("tau", "m", "eps"),
}  # fmt: skip


def _field(config: Any, *path: str) -> Any:
    """``config[path[0]][path[1]]…`` of a ConfigDict or nested mapping; a missing field is an
    error that names its dotted path."""
    node = config
    for i, key in enumerate(path):
        if key not in node:
            raise KeyError(f"rewards config has no field {'.'.join(path[: i + 1])!r}")
        node = node[key]
    return node


def _function_constants(config: Any, name: str) -> tuple[float, dict[str, Any]]:
    """(scale, constants) of reward function ``name`` from its block; a missing or an unknown
    field is an error."""
    block = _CONFIG_BLOCK[name]
    unknown = sorted(set(_field(config, block).keys()) - {"scale", *_CONSTANTS[name]})
    if unknown:
        raise ValueError(f"rewards config block {block!r} has unknown fields {unknown}")
    scale = float(_field(config, block, "scale"))
    return scale, {k: _field(config, block, k) for k in _CONSTANTS[name]}


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-task weighted sum of the reward functions of a rewards preset (spec §7.3, §8.6).

    ``config`` is a ``configs/rewards.py`` block (ConfigDict or nested mapping): ``weights.iqa``
    / ``weights.iaa`` map each name of :data:`REWARD_FUNCTIONS` to its weight (this is where the
    "asymmetric" in TATAR lives), one sub-block per function holds its constants, and ``scope`` /
    ``local_size`` choose the global batch or the reference's device-local calls for the rank
    rewards. Every field is read strictly: a missing one is a ``KeyError`` naming its dotted path,
    an unknown one in a function's block a ``ValueError``. A function whose weight is 0 for both
    tasks is not computed. Returns ``(total (N,), {name: unweighted reward (N,)})``. Jit it with
    the config closed over: ``jax.jit(functools.partial(total_reward, config=cfg))`` (host
    extra rewards cannot be jitted).

    ``config.extra`` names further reward functions (:func:`extra_rewards`), weighted by
    ``weights.<task>.<name>`` like the built-ins. Host ones need the decoded ``texts`` (N,) and
    per-completion ``records`` (:func:`completion_records`).
    """
    is_iaa_b = jnp.asarray(is_iaa, bool)
    dtype = _float_dtype(pred, gt)
    scope = _field(config, "scope")
    if scope not in ("global", "device_local"):
        raise ValueError(f"rewards scope must be 'global' or 'device_local', got {scope!r}")
    local = _field(config, "local_size") if scope == "device_local" else None
    total = jnp.zeros(is_iaa_b.shape, dtype)
    parts: dict[str, jax.Array] = {}
    for name in REWARD_FUNCTIONS:
        w_iqa = float(_field(config, "weights", "iqa", name))
        w_iaa = float(_field(config, "weights", "iaa", name))
        if w_iqa == 0.0 and w_iaa == 0.0:
            continue
        scale, kw = _function_constants(config, name)
        if name == "format":
            r = format_reward(parsed).astype(dtype)
        elif name == "accuracy":
            r = gaussian_score_reward(pred, gt, parsed, num_words, is_iaa_b, **kw)
        elif name == "threshold":
            r = threshold_reward(pred, gt, parsed, **kw)
        elif name == "rank":
            r = soft_rank_reward(pred, gt, parsed, is_iaa_b, local_size=local, **kw)
        else:
            r = thurstone_rank_reward(
                pred, gt, parsed, group_ids, is_iaa_b, num_groups=num_groups, local_size=local, **kw
            )
        r = (scale * r).astype(dtype)
        parts[name] = r
        total = total + jnp.where(is_iaa_b, w_iaa, w_iqa).astype(dtype) * r
    features = dict(pred=pred, gt=gt, parsed=parsed, num_words=num_words, is_iaa=is_iaa_b,
                    group_ids=group_ids)  # fmt: skip
    for name, extra in extra_rewards(config).items():
        w_iqa = float(_field(config, "weights", "iqa", name))
        w_iaa = float(_field(config, "weights", "iaa", name))
        if w_iqa == 0.0 and w_iaa == 0.0:
            continue
        r = extra(features, texts=texts, records=records).astype(dtype)
        parts[name] = r
        total = total + jnp.where(is_iaa_b, w_iaa, w_iqa).astype(dtype) * r
    return total, parts


# --------------------------------------------------------------------------------------------
# Extra reward functions named in the config ("package.module:function")
# --------------------------------------------------------------------------------------------

EXTRA_KINDS = ("features", "host")
_EXTRA_FIELDS = ("function", "kind", "scale", "kwargs")

def completion_records(batch: Mapping[str, Any], group_size: int) -> list[dict[str, Any]]:
    """The (N,) per-completion records a host reward receives, N = prompts x ``group_size``
    (prompt-major, as the rollout's rows): ``prompt`` (index in the step), ``task`` ("iqa" /
    "iaa"), ``gt_100``, ``valid`` and, where the batch has them, ``row_id``, ``dataset`` and
    ``image_path``. ``batch`` is a pipeline batch (``task_id``, ``gt_100``, ...). On a run over
    several processes the arrays are the global batch but ``meta`` holds this host's rows only:
    ``dataset`` / ``image_path`` are then left out."""
    names = {tid: task for task, tid in prompts.TASK_IDS.items()}
    task_ids = np.asarray(batch["task_id"])
    meta = batch.get("meta", {})
    strings = [k for k in ("dataset", "image_path") if len(meta.get(k, ())) == len(task_ids)]
    out = []
    for b in range(len(task_ids)):
        rec = {
            "prompt": b,
            "task": names[int(task_ids[b])],
            "gt_100": float(np.asarray(batch["gt_100"])[b]),
            "valid": bool(np.asarray(batch["valid"])[b]) if "valid" in batch else True,
        }
        if "row_id" in batch:
            rec["row_id"] = int(np.asarray(batch["row_id"])[b])
        for key in strings:
            rec[key] = meta[key][b]
        out.extend(dict(rec) for _ in range(group_size))
    return out


def _import(spec: str) -> Callable[..., Any]:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward function {spec!r} is not 'package.module:function'")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} is not callable")
    return fn


@dataclasses.dataclass(frozen=True)
class ExtraReward:
    """A reward function named in ``config.extra.<name>`` (see :func:`extra_rewards`)."""

    name: str
    spec: str  # "package.module:function"
    kind: str  # "features" | "host"
    scale: float
    kwargs: Mapping[str, Any]

    def where(self) -> str:
        return f"reward {self.name!r} ({self.spec}, kind {self.kind!r})"

    def __call__(
        self,
        features: Mapping[str, Any],
        *,
        texts: Sequence[str] | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> jax.Array:
        """``scale x fn(...)``, (N,) float; a wrong shape, a non-number or (outside jit) a
        non-finite value is a ValueError naming the reward."""
        fn = _import(self.spec)
        n = int(np.shape(features["is_iaa"])[0])
        if self.kind == "host":
            if texts is None or records is None:
                raise ValueError(f"{self.where()}: a host reward needs texts and records")
            if len(texts) != n or len(records) != n:
                raise ValueError(f"{self.where()}: {len(texts)} texts for {n} completions")
            r = fn(list(texts), list(records), **self.kwargs)
        else:
            r = fn(**features, **self.kwargs)
        return self.scale * self._checked(r, n)

    def _checked(self, r: Any, n: int) -> jax.Array:
        if not isinstance(r, jax.core.Tracer):
            try:
                r = np.asarray(r)
            except Exception as e:  # noqa: BLE001 - any conversion failure is the reward's
                raise ValueError(f"{self.where()} returned a {type(r).__name__}: {e}") from e
            if not (np.issubdtype(r.dtype, np.number) or r.dtype == bool):
                raise ValueError(f"{self.where()} returned dtype {r.dtype}, not numbers")
        if tuple(r.shape) != (n,):
            raise ValueError(f"{self.where()} returned shape {tuple(r.shape)}, want ({n},)")
        if not isinstance(r, jax.core.Tracer):
            bad = np.flatnonzero(~np.isfinite(r.astype(np.float64)))
            if bad.size:
                raise ValueError(
                    f"{self.where()} returned {bad.size} non-finite values (the first at "
                    f"completion {bad[0]}: {r[bad[0]]})"
                )
        r = jnp.asarray(r)
        return r if jnp.issubdtype(r.dtype, jnp.floating) else r.astype(jnp.float32)


def extra_rewards(config: Any) -> dict[str, ExtraReward]:
    """The reward functions named in ``config.extra`` (name -> block; absent or empty = none).

    Each block holds ``function`` (``"package.module:function"``), ``kind``, ``scale`` and
    ``kwargs`` (constants passed as keyword arguments); the reward's weights are
    ``weights.iqa.<name>`` and ``weights.iaa.<name>``. Kinds:

    * ``"features"``: a pure ``jnp`` function of the completion-feature arrays, the inputs of
      the built-ins: ``fn(pred, gt, parsed, num_words, is_iaa, group_ids, **kwargs) -> (N,)``;
      ``pred`` (N,) float, the parsed answer clipped to [0, 100] (any value, even NaN, where not
      ``parsed``), ``gt`` (N,) float 0-100, ``parsed`` and ``is_iaa`` (N,) bool, ``num_words``
      (N,) int (whitespace words of the completion), ``group_ids`` (N,) int32 (the prompt; its
      G completions are consecutive). It must trace under ``jax.jit``.
    * ``"host"``: plain Python, ``fn(texts, records, **kwargs) -> (N,)`` array-like, with the
      decoded completions (special tokens stripped) and :func:`completion_records`.
    """
    if "extra" not in config:
        return {}
    out = {}
    for name in config["extra"].keys():
        block = config["extra"][name]
        unknown = sorted(set(block.keys()) - set(_EXTRA_FIELDS))
        missing = [k for k in ("function", "kind") if k not in block]
        if unknown or missing:
            raise ValueError(
                f"rewards config block extra.{name}: unknown fields {unknown}, missing {missing}"
            )
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"rewards config extra.{name}: the name of a built-in reward")
        kind = str(block["kind"])
        if kind not in EXTRA_KINDS:
            raise ValueError(f"rewards config extra.{name}.kind {kind!r} not in {EXTRA_KINDS}")
        kwargs = dict(block["kwargs"]) if "kwargs" in block else {}
        scale = float(block["scale"]) if "scale" in block else 1.0
        out[name] = ExtraReward(name, str(block["function"]), kind, scale, kwargs)
    return out


def _probe_batch(group_size: int) -> tuple[dict[str, np.ndarray], list[str], list[dict]]:
    """Two IQA and two IAA prompts x ``group_size``: parsed and unparsed, short and long."""
    n = 4 * group_size
    rng = np.random.default_rng(0)
    is_iaa = np.repeat(np.array([False, False, True, True]), group_size)
    parsed = np.tile(np.arange(group_size) % 3 != 2, 4)
    pred = np.where(parsed, rng.uniform(0, 100, n), 0.0).astype(np.float32)
    gt = np.repeat(rng.uniform(0, 100, 4), group_size).astype(np.float32)
    words = rng.integers(5, 200, n).astype(np.int32)
    texts = [
        f"<think>{'word ' * int(w)}</think> <answer>{p:.2f}</answer>" if ok else "no answer"
        for w, p, ok in zip(words, pred, parsed, strict=True)
    ]
    words = np.array([len(t.split()) for t in texts], np.int32)
    batch = {"task_id": is_iaa[::group_size].astype(np.int32), "gt_100": gt[::group_size]}
    feats = dict(pred=pred, gt=gt, parsed=parsed, num_words=words, is_iaa=is_iaa,
                 group_ids=np.repeat(np.arange(4, dtype=np.int32), group_size))  # fmt: skip
    return feats, texts, completion_records(batch, group_size)


def validate_extra_rewards(config: Any, group_size: int = 4) -> None:
    """Imports every extra reward of ``config`` and calls it once on a probe batch (two IQA and
    two IAA prompts x ``group_size`` completions): it must return (N,) finite numbers, a
    ``features`` one also under ``jax.jit``, and its two weights must exist. Run it at start;
    a failure is a ValueError that names the reward."""
    extras = extra_rewards(config)
    if not extras:
        return
    feats, texts, records = _probe_batch(group_size)
    for name, extra in extras.items():
        for task in ("iqa", "iaa"):
            if name not in _field(config, "weights", task):
                raise ValueError(f"{extra.where()} has no weight rewards.weights.{task}.{name}")
        try:
            extra(feats, texts=texts, records=records)
            if extra.kind == "features":
                jax.jit(lambda f, e=extra: e(f))(feats)
        except ValueError as e:
            if extra.where() in str(e):
                raise
            raise ValueError(f"{extra.where()} failed on the probe batch: {e}") from e
        except Exception as e:  # noqa: BLE001 - whatever the user's function raises
            raise ValueError(
                f"{extra.where()} failed on the probe batch: {type(e).__name__}: {e}"
            ) from e
