"""The built-in TATAR rewards as pure ``jnp`` programs (spec §8; jittable, static shapes).

Every array is ``(N,)`` with ``N = prompts x G``; scores are on the 0-100 scale; ``parsed`` is
a bool mask and unparsed completions get 0 from every score reward (as the reference); the
overlong penalty reads only the length (a cut completion rarely parses). Entries of
``pred`` where ``parsed`` is False are ignored (they may be NaN).

The rewards see the whole step's batch: the reference calls its reward functions on one device's
micro-batch (one prompt x G = 8 completions), so its ranking rewards can never compare two
images (bug B6: the soft-rank reward degenerates to a within-group consensus term and the
Thurstone reward is identically 0). On a multi-host run every host scores the gathered global
batch (:mod:`tatar_jax.train.scoring`). The reference's device-local behaviour is available only
as an explicit switch (``local_size=``: consecutive chunks of that many completions are separate
reward calls), for faithfulness experiments.

Numerics: every logistic and every BCE is evaluated in log-sigmoid form. Clipping a probability
``q = sigmoid(x)`` to ``[eps, 1 - eps]`` is done exactly as clipping ``x`` to
``[logit(eps), logit(1 - eps)]`` (sigmoid is monotone), so ``ln q'`` and ``ln(1 - q')`` are
``log_sigmoid(+-x_clipped)`` and no input overflows (fixes B7).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def float_dtype(*xs: Any) -> jnp.dtype:
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
    dtype = float_dtype(pred, gt)
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
    dtype = float_dtype(pred, gt)
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
    dtype = float_dtype(pred, gt)
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


def overlong_penalty_reward(
    num_tokens: jax.Array, max_tokens: jax.Array, *, max_length: int = 0, cache: int = 64
) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), a length-shaped reward
    in [-1, 0]: with L = ``num_tokens`` (completion tokens, the stop token included), L_max =
    ``max_length`` (0: ``max_tokens``, the rollout's ``max_new_tokens``) and L_cache = ``cache``:
    0 for L <= L_max - L_cache, ((L_max - L_cache) - L) / L_cache up to L_max (-1 at a
    completion cut at the budget), -1 beyond. (N,) -> (N,) float32."""
    if isinstance(cache, (int, float)) and not cache >= 1:
        raise ValueError(f"overlong cache must be >= 1 token, got {cache}")
    n = jnp.asarray(num_tokens, jnp.float32)
    l_max = jnp.asarray(max_tokens, jnp.float32) if not max_length else jnp.float32(max_length)
    start = l_max - cache
    r = jnp.where(n <= start, 0.0, (start - n) / cache)
    return jnp.where(n > l_max, -1.0, r).astype(jnp.float32)
