"""The rollout/trainer mismatch correction of ``grpo.grpo_loss`` against TRL 1.16's own code.

TRL (``vllm_importance_sampling_correction=True``) computes a ratio pi_old / pi_sampler per
token or per sequence, truncates (TIS) or masks (MIS) it at ``vllm_importance_sampling_clip_*``
and multiplies the clipped surrogate by it before adding the KL term. Both halves are TRL's
installed code (tests/helpers/trl_rollout_is.py): the ratio block of
``_generate_and_score_completions`` and ``_compute_loss``; values, gradients and TRL's logged
``sampling/importance_sampling_ratio`` statistics are compared in float64.

Correspondence: ``rollout_correction`` <-> ``vllm_importance_sampling_mode``,
``rollout_clip_max`` / ``_min`` <-> ``vllm_importance_sampling_clip_max`` / ``_min``;
aggregation names as in test_grpo_trl.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_rollout_is import trl_is_ratio, trl_loss_with_is

from tatar_jax import grpo

TRL_LOSS = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "fixed_length": "dr_grpo",
            "bnpo": "bnpo"}  # fmt: skip
MODES = [m for m in grpo.ROLLOUT_CORRECTIONS if m != "off"]


def _inputs(seed: int, n: int = 6, t: int = 9):
    """Log-probs whose rollout copy differs by up to ~0.6 nats per token (so token ratios cross
    a cap of 1.5 and sequence ratios cross 3 on both sides), one empty and one full row."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, (n, t))
    old = logp + rng.normal(0, 0.2, (n, t))
    rollout = old + rng.normal(0, 0.35, (n, t))
    ref = logp + rng.normal(0, 0.7, (n, t))
    adv = rng.normal(size=n)
    mask = (rng.random((n, t)) < 0.75).astype(np.float64)
    mask[0], mask[1] = 0.0, 1.0
    return logp, old, rollout, ref, adv, mask


def _ours(logp, old, rollout, ref, adv, mask, **kw):
    with jax.enable_x64(True):

        def f(lp):
            o = jax.lax.stop_gradient(lp) if old is None else jnp.asarray(old)
            return grpo.grpo_loss(lp, o, ref, adv, mask, rollout_logps=rollout, **kw)

        (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float64))
        return float(loss), np.asarray(g), {k: float(v) for k, v in m.items()}


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
    assert err <= tol, err


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [(None, 1.5), (0.5, 1.5), (0.8, None)])
def test_weights_and_their_metrics_match_trl(mode, clip):
    lo, hi = clip
    bound, free = False, False
    for seed in range(3):
        logp, old, rollout, ref, adv, mask = _inputs(seed)
        want, want_m = trl_is_ratio(old, rollout, mask, mode, hi, lo)
        with jax.enable_x64(True):
            got = np.asarray(grpo.rollout_importance_weights(old, rollout, mask, mode, lo, hi))
        assert got.shape == want.shape
        _close(got, want)
        # the caps bind somewhere, and not everywhere
        raw = np.exp(((old - rollout) * mask).sum(1, keepdims=True) if mode[0] == "s"
                     else (old - rollout) * mask)  # fmt: skip
        bound, free = bound or np.any(got != raw), free or np.any(got == raw)
        if mode.startswith("token"):  # TRL's statistics over the completion tokens
            _, _, m = _ours(logp, old, rollout, ref, adv, mask, rollout_correction=mode,
                            rollout_clip_min=lo, rollout_clip_max=hi)  # fmt: skip
            _close(m["is_weight_mean"], want_m["sampling/importance_sampling_ratio/mean"])
            _close(m["is_weight_min"], want_m["sampling/importance_sampling_ratio/min"])
            _close(m["is_weight_max"], want_m["sampling/importance_sampling_ratio/max"])
    assert bound and free


@pytest.mark.parametrize("aggregation", list(TRL_LOSS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("on_policy", [False, True])
def test_corrected_loss_and_gradient_match_trl(aggregation, mode, on_policy):
    hi, lo = (1.8, 0.5) if mode.startswith("sequence") else (1.5, None)
    # seed 0: token ratio, plain KL; seed 1: GSPO sequence ratio with the bias-corrected KL (the
    # weight multiplies the surrogate only, never the KL term)
    for seed, (level, bias_kl) in enumerate([("token", False), ("sequence", True)]):
        if level == "sequence" and aggregation != "seq_mean_token_mean":
            continue  # TRL warns that sequence ratios with token-sum losses are not GSPO
        logp, old, rollout, ref, adv, mask = _inputs(seed)
        pi_old = logp if on_policy else old
        ratio, _ = trl_is_ratio(pi_old, rollout, mask, mode, hi, lo)
        want, want_g = trl_loss_with_is(
            logp, None if on_policy else old, ref, adv, mask, ratio,
            loss_type=TRL_LOSS[aggregation], beta=0.04, epsilon_high=0.28, level=level,
            bias_kl=bias_kl,
        )  # fmt: skip
        got, got_g, _ = _ours(
            logp, None if on_policy else old, rollout, ref, adv, mask, beta=0.04,
            epsilon_high=0.28, aggregation=aggregation, rollout_correction=mode,
            rollout_clip_min=lo, rollout_clip_max=hi, importance_sampling_level=level,
            kl_bias_correction=bias_kl,
        )  # fmt: skip
        _close(got, want)
        _close(got_g, want_g)
        plain, plain_g, _ = _ours(
            logp, None if on_policy else old, rollout, ref, adv, mask, beta=0.04,
            epsilon_high=0.28, aggregation=aggregation, importance_sampling_level=level,
            kl_bias_correction=bias_kl,
        )
        assert abs(got - plain) > 1e-4 and np.abs(got_g - plain_g).max() > 1e-4


def test_off_ignores_rollout_logps_and_equals_todays_loss():
    """The default ("off") is the objective without the correction, bit for bit, whatever
    ``rollout_logps`` holds (NaN included)."""
    logp, old, rollout, ref, adv, mask = _inputs(7)
    base = _ours(logp, old, None, ref, adv, mask, beta=0.04)
    off = _ours(logp, old, np.full_like(rollout, np.nan), ref, adv, mask, beta=0.04)
    assert base[0] == off[0] and np.array_equal(base[1], off[1])
    assert "is_weight_mean" not in off[2]
    with pytest.raises(ValueError, match="needs rollout_logps"):
        grpo.grpo_loss(logp, old, ref, adv, mask, rollout_correction="token_truncate")
    with pytest.raises(ValueError, match="unknown rollout correction"):
        grpo.rollout_importance_weights(old, rollout, mask, "token_clip")


def test_masked_is_rejects_and_counts():
    """MIS: a token outside [min, max] gets weight 0 (no gradient), and ``is_masked_frac``
    counts it among the completion tokens."""
    logp = np.full((1, 4), -1.0)
    rollout = logp + np.array([[0.0, -1.0, 1.0, 0.0]])  # ratios 1, e, 1/e, 1
    mask = np.array([[1.0, 1.0, 1.0, 0.0]])
    w = np.asarray(grpo.rollout_importance_weights(logp, rollout, mask, "token_mask", 0.5, 2.0))
    np.testing.assert_allclose(w, [[1.0, 0.0, 0.0, 1.0]])
    _, g, m = _ours(
        logp, None, rollout, None, np.array([1.0]), mask, beta=0.0,
        rollout_correction="token_mask", rollout_clip_min=0.5, rollout_clip_max=2.0,
    )  # fmt: skip
    assert g[0, 1] == 0 and g[0, 2] == 0 and g[0, 0] != 0
    assert m["is_masked_frac"] == pytest.approx(2 / 3)
