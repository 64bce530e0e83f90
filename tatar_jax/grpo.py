"""GRPO math: group advantages and the clipped-surrogate + k3-KL loss (spec §7.3).

Pure ``jnp`` functions with static shapes; the trainer's update step (rollout, log-probs,
optimizer) lives elsewhere and calls these. Layout: the ``N = prompts x G`` completions of a step
are ordered so that the G completions of one prompt are contiguous (rows ``g*G .. g*G+G-1``).
Reward statistics per task are ``tatar_jax.train.reward_stats.grpo_reward_metrics``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "LossConfig",
    "group_advantages",
    "grpo_loss",
    "masked_mean",
    "micro_batch_share",
    "rollout_importance_weights",
]

ADVANTAGE_MODES = ("grpo", "dr_grpo", "rloo", "batch_std")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "bnpo", "fixed_length")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Rollout/trainer mismatch correction (TRL 1.16 ``vllm_importance_sampling_mode``, "off" = none):
# *_truncate = truncated IS (TIS), *_mask = masked IS (MIS), per token or per sequence.
ROLLOUT_CORRECTIONS = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The GRPO objective's settings (:func:`grpo_loss`'s keywords) plus the sampling
    ``temperature`` the policy's log-probs are computed at (as the rollout sampled)."""

    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.001
    aggregation: str = "seq_mean_token_mean"
    importance_sampling_level: str = "token"
    kl_bias_correction: bool = False
    rollout_correction: str = "off"
    rollout_clip_min: float | None = None
    rollout_clip_max: float | None = 3.0
    temperature: float = 1.0

    @classmethod
    def from_config(cls, grpo_cfg: Any) -> LossConfig:
        """From the ``grpo`` block of configs/grpo.py."""
        eh = grpo_cfg.epsilon_high
        rc = grpo_cfg.get("rollout_correction")
        corr = {}
        if rc is not None:
            lo, hi = rc.clip_min, rc.clip_max
            corr = dict(
                rollout_correction=str(rc.mode),
                rollout_clip_min=None if lo is None else float(lo),
                rollout_clip_max=None if hi is None else float(hi),
            )
        return cls(
            epsilon=float(grpo_cfg.epsilon),
            epsilon_high=None if eh is None else float(eh),
            beta=float(grpo_cfg.beta),
            aggregation=str(grpo_cfg.loss_aggregation),
            importance_sampling_level=str(grpo_cfg.importance_sampling_level),
            kl_bias_correction=bool(grpo_cfg.kl_bias_correction),
            temperature=float(grpo_cfg.temperature),
            **corr,
        )

    def loss_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`grpo_loss`."""
        out = dataclasses.asdict(self)
        del out["temperature"]
        return out


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    mode: str = "grpo",
    eps: float = 1e-4,
    *,
    ddof: int = 1,
) -> jax.Array:
    """Per-completion advantages from rewards (N,), N = prompts x group_size, groups contiguous.

    Modes (G = group_size, mean/std over the G completions of a prompt):

    * ``grpo`` (reference): (r - mean) / (std + eps), std with ``ddof`` (1 = unbiased, as the
      reference's ``torch.std``). With G = 1 the advantage is 0.
    * ``dr_grpo``: r - mean (no std division, Dr. GRPO).
    * ``rloo``: r - mean of the *other* G - 1 completions = G/(G-1) (r - mean); needs G >= 2.
    * ``batch_std``: (r - group mean) / (std over the whole batch + eps).

    Returns (N,) in the rewards' float dtype (at least float32).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; choose one of {ADVANTAGE_MODES}")
    r = jnp.asarray(rewards)
    r = r.astype(jnp.result_type(r.dtype, jnp.float32))
    n = r.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")
    g = r.reshape(n // group_size, group_size)
    # Shifted by each group's first reward before averaging: a constant group then centres to
    # exactly 0 (a rounded mean would leave r - mean = 1 ulp, blown up by 1/(0 + eps)).
    shifted = g - g[:, :1]
    centred = shifted - shifted.mean(axis=1, keepdims=True)
    if mode == "dr_grpo":
        adv = centred
    elif mode == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs group_size >= 2")
        adv = centred * (group_size / (group_size - 1))
    elif mode == "grpo":
        dof = group_size - ddof
        var = jnp.square(centred).sum(axis=1, keepdims=True) / max(dof, 1)
        adv = centred / (jnp.sqrt(var) + eps) if dof > 0 else jnp.zeros_like(centred)
    else:
        dof = n - ddof
        shifted = r - r[0]
        var = jnp.square(shifted - shifted.mean()).sum() / max(dof, 1)
        adv = centred / (jnp.sqrt(var) + eps) if dof > 0 else jnp.zeros_like(centred)
    return adv.reshape(n)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x * mask) / max(sum(mask), 1): 0, never NaN, when the mask is empty."""
    x = jnp.asarray(x)
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))
    mask = jnp.asarray(mask).astype(x.dtype)
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(mask.sum(), 1.0)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.001,
    aggregation: str = "seq_mean_token_mean",
    importance_sampling_level: str = "token",
    kl_bias_correction: bool = False,
    rollout_logps: jax.Array | None = None,
    rollout_correction: str = "off",
    rollout_clip_min: float | None = None,
    rollout_clip_max: float | None = 3.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective of spec §7.3, in float32 (float64 if given float64 under x64).

    Args: ``logps``, ``old_logps``, ``ref_logps``: (N, T) per-token log-probs of the sampled
    completion tokens under the policy, the rollout policy and the frozen reference;
    ``advantages`` (N,); ``completion_mask`` (N, T) bool/0-1 (tokens up to and including EOS).

    Per token t of completion i (mask m_it, n_i = sum_t m_it):

    * ratio, ``importance_sampling_level="token"`` (reference): rho_it = exp(logp_it - old_it);
      ``"sequence"`` (GSPO, TRL's ``importance_sampling_level="sequence"``): one ratio per
      completion, rho_i = exp(sum_t m_it (logp_it - old_it) / max(n_i, 1)), the geometric mean
      of the token ratios, used for every token of the completion (gradient through all of them);
    * l_it = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta KL_it;
    * KL_it = exp(ref - logp) - (ref - logp) - 1 (k3, >= 0); with ``kl_bias_correction`` (TRL's
      ``use_bias_correction_kl``, its default; DeepSeek-V3.2) KL_it = rho k3_it, the ratio *not*
      detached: on-policy (rho = 1) the value is unchanged but the gradient gains k3 d logp,
      which makes it the unbiased gradient of KL(pi_theta || pi_ref).

    Rollout correction (``rollout_correction`` != "off", TRL 1.16's
    ``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_mode``): the clipped
    surrogate of each token is multiplied by the detached weight
    :func:`rollout_importance_weights` of ``old_logps`` (pi_old, the trainer's forward) against
    ``rollout_logps`` (N, T) (the sampler's log-probs of the same tokens), before the KL term
    is added. "off" ignores ``rollout_logps``: the objective is the one without it.

    The KL term is skipped when ``beta == 0`` or ``ref_logps is None``. With mu = 1, pass
    ``old_logps = jax.lax.stop_gradient(logps)`` (rho = 1, gradient = -A d logp).

    Aggregation over the arrays given (one micro-batch; :func:`micro_batch_share` says how the
    micro-batches of a step combine): ``seq_mean_token_mean`` (reference, TRL ``grpo``: token
    mean per completion, then mean over completions), ``token_mean`` (DAPO: sum over tokens /
    tokens; normalised by the whole step's tokens), ``bnpo`` (TRL ``bnpo``: the same formula
    normalised by each micro-batch's own tokens), ``fixed_length`` (Dr. GRPO: token sum / (N x
    T)). Completions with no tokens contribute 0.

    Returns ``(loss, metrics)``; metrics (masked over completion tokens): ``kl`` (mean of the KL
    term before beta, bias-corrected if asked; 0 if skipped), ``clip_frac_low`` (rho < 1 - eps
    with A < 0), ``clip_frac_high`` (rho > 1 + eps_high with A > 0), ``clip_frac``,
    ``ratio_mean``, ``ratio_min``, ``ratio_max`` (a sequence ratio counts once per token); with a
    rollout correction also ``is_weight_mean`` / ``_min`` / ``_max`` (over completion tokens)
    and ``is_masked_frac`` (completion tokens whose weight is 0: MIS rejections).
    """
    _check_options(aggregation, importance_sampling_level)
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    # float32 at least (bf16 log-probs are promoted); float64 only for float64 inputs under x64.
    dt = jnp.result_type(jnp.asarray(logps).dtype, jnp.asarray(old_logps).dtype, jnp.float32)
    logps = jnp.asarray(logps, dt)
    old = jnp.asarray(old_logps, dt)
    mask = jnp.asarray(completion_mask).astype(dt)
    adv = jnp.asarray(advantages, dt)[:, None]

    ratio = _policy_ratio(logps, old, mask, importance_sampling_level)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    is_weight = None
    if rollout_correction != "off":
        if rollout_logps is None:
            raise ValueError(f"rollout_correction {rollout_correction!r} needs rollout_logps")
        is_weight = rollout_importance_weights(
            old, rollout_logps, mask, rollout_correction, rollout_clip_min, rollout_clip_max
        )
        per_token = per_token * is_weight
    use_kl = ref_logps is not None and not (isinstance(beta, (int, float)) and beta == 0)
    if use_kl:
        kl = _k3_kl(jnp.asarray(ref_logps, dt), logps, mask, ratio if kl_bias_correction else None)
        per_token = per_token + beta * kl
    else:
        kl = jnp.zeros_like(per_token)
    per_token = jnp.where(mask > 0, per_token, 0.0) * mask

    loss = _aggregate(per_token, mask, aggregation)
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics = _loss_metrics(ratio, kl, low, high, mask)
    if is_weight is not None:
        metrics.update(_is_metrics(jnp.broadcast_to(is_weight, mask.shape), mask))
    return loss.astype(dt), {k: jax.lax.stop_gradient(v).astype(dt) for k, v in metrics.items()}


def _check_options(aggregation: str, level: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"unknown importance_sampling_level {level!r}; choose one of "
            f"{IMPORTANCE_SAMPLING_LEVELS}"
        )


def _policy_ratio(logps: jax.Array, old: jax.Array, mask: jax.Array, level: str) -> jax.Array:
    """(N, T) ratio pi/pi_old per token ("token") or the per-completion geometric mean of the
    token ratios broadcast over its tokens ("sequence", GSPO)."""
    # Padded positions may hold garbage log-probs; keep them out of exp and out of the gradient.
    log_ratio = jnp.where(mask > 0, logps - old, 0.0)
    if level == "sequence":
        seq = log_ratio.sum(axis=1, keepdims=True) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
        log_ratio = jnp.broadcast_to(seq, log_ratio.shape)
    return jnp.exp(log_ratio)


def _k3_kl(
    ref: jax.Array, logps: jax.Array, mask: jax.Array, ratio: jax.Array | None
) -> jax.Array:
    """(N, T) k3 = exp(ref - logp) - (ref - logp) - 1; times the (not detached) ``ratio`` when
    given (TRL's bias-corrected KL)."""
    delta = jnp.where(mask > 0, ref - logps, 0.0)
    kl = jnp.exp(delta) - delta - 1.0
    return kl if ratio is None else kl * ratio


def rollout_importance_weights(
    old_logps: jax.Array,
    rollout_logps: jax.Array,
    completion_mask: jax.Array,
    mode: str,
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> jax.Array:
    """Detached importance weights pi_old / pi_rollout of the sampled tokens (TRL 1.16's
    ``vllm_importance_sampling_mode``; verl's rollout correction).

    d_it = m_it (old_it - rollout_it) (0 off the mask; NaN rollout log-probs count as 0, as TRL);
    ``token_*``: w_it = exp(d_it), (N, T); ``sequence_*``: w_i = exp(sum_t d_it), (N, 1) (the
    product of the token ratios, not their geometric mean). ``*_truncate`` (TIS): w clipped to
    [clip_min, clip_max] (None: no bound on that side); ``*_mask`` (MIS): w set to 0 outside
    [clip_min, clip_max].
    """
    if mode not in ROLLOUT_CORRECTIONS or mode == "off":
        raise ValueError(
            f"unknown rollout correction {mode!r}; choose one of {ROLLOUT_CORRECTIONS[1:]}"
        )
    mask = jnp.asarray(completion_mask)
    dt = jnp.result_type(jnp.asarray(old_logps).dtype, jnp.float32)
    d = (jnp.asarray(old_logps, dt) - jnp.asarray(rollout_logps, dt)) * mask.astype(dt)
    d = jax.lax.stop_gradient(jnp.where(jnp.isnan(d), 0.0, d))
    if mode.startswith("sequence"):
        d = d.sum(axis=1, keepdims=True)
    w = jnp.exp(d)
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return jnp.clip(w, lo, hi)
    return jnp.where((w < lo) | (w > hi), 0.0, w)


def _is_metrics(w: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Mean / min / max of the rollout-correction weights over the completion tokens and the
    share of those tokens a mask rejected (weight 0)."""
    on = mask > 0
    any_on = on.any()
    return {
        "is_weight_mean": masked_mean(w, mask),
        "is_weight_min": jnp.where(any_on, jnp.min(jnp.where(on, w, jnp.inf)), 0.0),
        "is_weight_max": jnp.where(any_on, jnp.max(jnp.where(on, w, -jnp.inf)), 0.0),
        "is_masked_frac": masked_mean((w == 0).astype(mask.dtype), mask),
    }


def _aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
    """Scalar loss of the masked (N, T) per-token losses (see :func:`grpo_loss`)."""
    n, t = per_token.shape
    if aggregation == "seq_mean_token_mean":
        return (per_token.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)).mean()
    if aggregation in ("token_mean", "bnpo"):
        return per_token.sum() / jnp.maximum(mask.sum(), 1.0)
    return per_token.sum() / (n * t)


def _loss_metrics(
    ratio: jax.Array, kl: jax.Array, low: jax.Array, high: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """Token-masked KL, clip fractions and ratio statistics of :func:`grpo_loss`."""
    on = mask > 0
    any_on = on.any()
    dt = mask.dtype
    return {
        "kl": masked_mean(kl, mask),
        "clip_frac_low": masked_mean(low.astype(dt), mask),
        "clip_frac_high": masked_mean(high.astype(dt), mask),
        "clip_frac": masked_mean((low | high).astype(dt), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": jnp.where(any_on, jnp.min(jnp.where(on, ratio, jnp.inf)), 0.0),
        "ratio_max": jnp.where(any_on, jnp.max(jnp.where(on, ratio, -jnp.inf)), 0.0),
    }


def micro_batch_share(
    loss: jax.Array,
    tokens: jax.Array,
    tokens_step: jax.Array,
    num_micro: int,
    aggregation: str,
) -> jax.Array:
    """A micro-batch's share of the step loss, so that the shares sum to the step's objective.

    ``loss``: :func:`grpo_loss` of the micro-batch; ``tokens``: its completion tokens;
    ``tokens_step``: the step's (>= 1); ``num_micro``: equal-row micro-batches per step.

    * ``token_mean`` (DAPO): loss x tokens / tokens_step: one mean over every token of the step,
      whatever the split.
    * ``seq_mean_token_mean``, ``fixed_length``: loss / num_micro (equal rows, so the mean over
      micro-batches is the mean over completions).
    * ``bnpo``: loss / num_micro as well, but each micro-batch's loss is a mean over its *own*
      tokens: sum_b (sum_{t in b} l_t / |b|) / num_micro (TRL's ``bnpo`` with gradient
      accumulation); equal to ``token_mean`` with one micro-batch.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if aggregation == "token_mean":
        return loss * jnp.maximum(tokens, 1.0) / tokens_step
    return loss / num_micro
