"""``grpo.grpo_loss`` (+ ``grpo.micro_batch_share``) against TRL's own ``GRPOTrainer`` loss code.

The reference is TRL 1.16's ``GRPOTrainer._compute_loss``, called as it is: a trainer object
holding the attributes that method reads (set from a real ``GRPOConfig`` exactly as
``GRPOTrainer.__init__`` sets them) and a stub policy whose forward returns the per-token
log-probs as a leaf tensor, so ``loss.backward()`` gives TRL's gradient w.r.t. the log-probs
(tests/helpers/trl_stub_trainer.py).
Everything in float64; values, gradients and TRL's logged metrics (kl, clip ratios) are compared.

Correspondence (ours <-> TRL ``loss_type``): seq_mean_token_mean <-> grpo, bnpo <-> bnpo,
token_mean <-> dapo, fixed_length <-> dr_grpo; ``importance_sampling_level`` <->
``importance_sampling_level``; ``kl_bias_correction`` <-> ``use_bias_correction_kl``.
"""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl import GRPOConfig
from trl_stub_trainer import StubPolicy, loss_inputs, stub_trainer

from tatar_jax import grpo

TRL_LOSS = {
    "seq_mean_token_mean": "grpo",
    "bnpo": "bnpo",
    "token_mean": "dapo",
    "fixed_length": "dr_grpo",
}


def trl_loss(logp, old, ref, adv, mask, *, aggregation, beta, epsilon=0.2, epsilon_high=None,
             level="token", bias_kl=False, accum=1, items=None):  # fmt: skip
    """TRL's (loss, d loss / d logp, metrics) for one micro-batch, float64."""
    t = logp.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(
            output_dir="/tmp/trl_unused", report_to=[], use_cpu=True,
            loss_type=TRL_LOSS[aggregation], beta=beta, epsilon=epsilon,
            epsilon_high=epsilon_high, importance_sampling_level=level,
            use_bias_correction_kl=bias_kl, max_completion_length=t,
            gradient_accumulation_steps=accum, steps_per_generation=accum,
        )  # fmt: skip
    leaf = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    tr = stub_trainer(args, StubPolicy(leaf), accum)
    inputs = loss_inputs(mask, adv, ref, old)  # old None: on-policy
    if items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(items), dtype=torch.float64)
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return float(loss.detach()), leaf.grad.numpy().copy(), metrics


def ours(logp, old, ref, adv, mask, *, aggregation, beta, epsilon=0.2, epsilon_high=None,
         level="token", bias_kl=False):  # fmt: skip
    """(loss, d loss / d logp, metrics) of grpo.grpo_loss in float64."""
    with jax.enable_x64(True):

        def f(lp):
            o = jax.lax.stop_gradient(lp) if old is None else jnp.asarray(old)
            return grpo.grpo_loss(
                lp, o, ref, adv, mask, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
                aggregation=aggregation, importance_sampling_level=level,
                kl_bias_correction=bias_kl,
            )  # fmt: skip

        (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float64))
        assert loss.dtype == jnp.float64
        return float(loss), np.asarray(g), {k: float(v) for k, v in m.items()}


def inputs(seed, n=6, t=9, spread=0.3):
    """Off-policy log-probs (ratios on both sides of the clip range), a completion without
    tokens, a full one; padded positions hold finite values (TRL multiplies by the mask)."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, (n, t))
    old = logp + rng.normal(0, spread, (n, t))
    ref = logp + rng.normal(0, 0.7, (n, t))
    adv = rng.normal(size=n)
    mask = (rng.random((n, t)) < 0.75).astype(np.float64)
    mask[0] = 0.0
    mask[1] = 1.0
    return logp, old, ref, adv, mask


MAX_ERR = [0.0]


def _close(a, b, tol=1e-12):
    """|a - b| <= tol x max(1, |b|); the worst relative error seen is printed (pytest -s)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
    MAX_ERR[0] = max(MAX_ERR[0], err)
    print(f"max scaled |ours - TRL| so far: {MAX_ERR[0]:.2e}", file=sys.stderr)
    assert err <= tol, err


VARIANTS = [
    dict(level="token", bias_kl=False),
    dict(level="token", bias_kl=True),
    dict(level="sequence", bias_kl=False),
    dict(level="sequence", bias_kl=True),
]


@pytest.mark.parametrize("aggregation", list(TRL_LOSS))
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("on_policy", [False, True])
def test_loss_and_gradient_match_trl(aggregation, variant, on_policy):
    kw = dict(VARIANTS[variant], aggregation=aggregation, beta=0.04, epsilon_high=0.28)
    for seed in range(2):
        logp, old, ref, adv, mask = inputs(seed)
        old = None if on_policy else old
        items = mask.sum() if aggregation == "token_mean" else None
        want, want_g, want_m = trl_loss(logp, old, ref, adv, mask, items=items, **kw)
        got, got_g, got_m = ours(logp, old, ref, adv, mask, **kw)
        _close(got, want)
        _close(got_g, want_g)
        assert np.abs(want_g).max() > 0
        _close(got_m["kl"], want_m["kl"])
        if kw["level"] == "token":  # TRL averages a sequence ratio's clip flags per sequence
            _close(got_m["clip_frac_low"], want_m["clip_ratio/low_mean"])
            _close(got_m["clip_frac_high"], want_m["clip_ratio/high_mean"])
            _close(got_m["clip_frac"], want_m["clip_ratio/region_mean"])
        if not on_policy and kw["level"] == "token":
            assert got_m["clip_frac_low"] > 0 and got_m["clip_frac_high"] > 0


def test_variants_change_the_objective():
    """Each variant is a different objective on the same inputs (so the tests above can fail):
    sequence ratios change value and gradient off-policy, the bias-corrected KL changes the
    gradient even on-policy, and bnpo differs from the step-global token mean once split."""
    logp, old, ref, adv, mask = inputs(3)
    base = ours(logp, old, ref, adv, mask, aggregation="seq_mean_token_mean", beta=0.04)
    seq = ours(logp, old, ref, adv, mask, aggregation="seq_mean_token_mean", beta=0.04,
               level="sequence")  # fmt: skip
    assert abs(seq[0] - base[0]) > 1e-3 and np.abs(seq[1] - base[1]).max() > 1e-3
    on = ours(logp, None, ref, adv, mask, aggregation="seq_mean_token_mean", beta=0.04)
    on_bc = ours(logp, None, ref, adv, mask, aggregation="seq_mean_token_mean", beta=0.04,
                 bias_kl=True)  # fmt: skip
    assert on[0] == pytest.approx(on_bc[0], abs=1e-15)
    assert np.abs(on[1] - on_bc[1]).max() > 1e-4


@pytest.mark.parametrize("aggregation", list(TRL_LOSS))
def test_gradient_accumulation_matches_trl(aggregation):
    """Two micro-batches: the sum of our shares (grpo.micro_batch_share) equals the sum of TRL's
    micro-batch losses under gradient accumulation 2 (bnpo: per-micro-batch token normaliser;
    dapo/token_mean: the whole step's tokens), value and gradient."""
    logp, old, ref, adv, mask = inputs(5, n=8)
    mask[4:] *= np.random.default_rng(1).random(mask[4:].shape) < 0.5  # unequal token counts
    kw = dict(aggregation=aggregation, beta=0.04, level="token", bias_kl=True)
    items = mask.sum()
    halves = (slice(0, 4), slice(4, 8))
    want = sum(
        trl_loss(logp[h], old[h], ref[h], adv[h], mask[h], accum=2,
                 items=items if aggregation == "token_mean" else None, **kw)[0]
        for h in halves
    )  # fmt: skip
    want_g = np.concatenate(
        [trl_loss(logp[h], old[h], ref[h], adv[h], mask[h], accum=2,
                  items=items if aggregation == "token_mean" else None, **kw)[1]
         for h in halves]
    )  # fmt: skip
    with jax.enable_x64(True):

        def step(lp):
            total = 0.0
            for h in halves:
                loss, _ = grpo.grpo_loss(
                    lp[h], old[h], ref[h], adv[h], mask[h], beta=0.04, aggregation=aggregation,
                    kl_bias_correction=True,
                )  # fmt: skip
                total = total + grpo.micro_batch_share(
                    loss, jnp.sum(mask[h]), jnp.maximum(jnp.sum(mask), 1.0), 2, aggregation
                )
            return total

        got, got_g = jax.value_and_grad(step)(jnp.asarray(logp))
    _close(float(got), want)
    _close(np.asarray(got_g), want_g)
    if aggregation in ("bnpo", "token_mean"):  # they differ when micro-batches differ in tokens
        other = "token_mean" if aggregation == "bnpo" else "bnpo"
        with jax.enable_x64(True):
            alt = sum(
                float(grpo.micro_batch_share(
                    grpo.grpo_loss(logp[h], old[h], ref[h], adv[h], mask[h], beta=0.04,
                                   aggregation=other, kl_bias_correction=True)[0],
                    jnp.sum(mask[h]), jnp.sum(mask), 2, other))
                for h in halves
            )  # fmt: skip
        assert abs(alt - want) > 1e-4


def test_unknown_level_is_an_error():
    logp, old, ref, adv, mask = inputs(0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.grpo_loss(logp, old, ref, adv, mask, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="aggregation"):
        grpo.micro_batch_share(1.0, 1.0, 1.0, 1, "sum")
