"""Group advantages and the GRPO loss (spec §7.3) against plain loops written here, gradients
against the closed form (mu = 1) and central finite differences on a toy softmax policy."""

from __future__ import annotations

import math
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tatar_jax import grpo

MODES = ("grpo", "dr_grpo", "rloo", "batch_std")
MAX_ERR: dict[str, float] = {}


def _note(key, err):
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    print(f"max|d| so far: {MAX_ERR}", file=sys.stderr)


def loop_advantages(r, g, mode, eps=1e-4):
    r = [float(x) for x in r]
    out = []
    batch_std = statistics.stdev(r) if len(r) > 1 else 0.0
    for s in range(0, len(r), g):
        grp = r[s : s + g]
        mean = sum(grp) / g
        for x in grp:
            if mode == "grpo":
                std = statistics.stdev(grp) if g > 1 else 0.0  # unbiased (n - 1)
                out.append((x - mean) / (std + eps) if g > 1 else 0.0)
            elif mode == "dr_grpo":
                out.append(x - mean)
            elif mode == "rloo":
                out.append(x - (sum(grp) - x) / (g - 1))
            else:
                out.append((x - mean) / (batch_std + eps))
    return np.array(out)


def reward_batches(seed, g):
    rng = np.random.default_rng(seed)
    n = 6 * g
    yield rng.normal(size=n)  # random
    yield np.full(n, 1.7)  # all equal -> zero variance everywhere
    r = rng.uniform(0, 3, n)
    r[:g] = 0.4  # one zero-variance group among others
    yield r
    yield rng.choice([0.0, 1.0, 2.92], n)
    yield rng.normal(size=g)  # single group


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("g", [1, 2, 8])
def test_advantages_match_loop(mode, g):
    if mode == "rloo" and g == 1:
        with pytest.raises(ValueError, match="rloo"):
            grpo.group_advantages(np.zeros(4), 1, mode)
        return
    for seed in range(2):
        for r in reward_batches(seed, g):
            ref = loop_advantages(r, g, mode)
            with jax.enable_x64(True):
                a64 = np.asarray(grpo.group_advantages(r, g, mode))
            a32 = np.asarray(grpo.group_advantages(r.astype(np.float32), g, mode))
            e64 = float(np.max(np.abs(a64 - ref)))
            # float32 is relative to the advantage scale: (r - mean) / (std + 1e-4) divides
            # float32 rounding of r by std, so compare at 1e-5 relative to max(1, |A|).
            e32 = float(np.max(np.abs(a32 - ref) / np.maximum(1.0, np.abs(ref))))
            assert e64 <= 1e-6 and e32 <= 1e-5, (mode, g, e64, e32)
            _note(f"adv/{mode}/f64", e64)
            _note(f"adv/{mode}/f32", e32)


def test_advantage_errors():
    r = np.arange(8.0)
    with pytest.raises(ValueError, match="groups of 3"):
        grpo.group_advantages(r, 3)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        grpo.group_advantages(r, 4, "ppo")
    with pytest.raises(ValueError, match="unknown advantage mode"):
        grpo.group_advantages(r, 4, "group")  # no aliases
    # all-equal rewards give exactly zero advantages (no NaN)
    assert not np.any(np.asarray(grpo.group_advantages(np.full(8, 3.0), 4)))


@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=16, max_size=16),
    st.sampled_from([2, 4, 8, 16]),
    st.sampled_from(MODES),
)
def test_advantages_sum_to_zero_per_group(r, g, mode):
    a = np.asarray(grpo.group_advantages(np.array(r, np.float32), g, mode), np.float64)
    scale = np.abs(np.array(r)).max() + 1
    sums = a.reshape(-1, g).sum(axis=1)
    bound = 1e-4 * scale if mode in ("dr_grpo", "rloo") else 1e-4 * g
    assert np.all(np.abs(sums) <= bound)


# ------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------


def loop_loss(logp, old, ref, adv, mask, eps=0.2, eps_high=None, beta=0.001, agg="seq"):
    eh = eps if eps_high is None else eps_high
    n, t = logp.shape
    seq_terms, tok_sum, tok_cnt = [], 0.0, 0.0
    kls, ratios, low, high = [], [], 0, 0
    for i in range(n):
        s, c = 0.0, 0.0
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = math.exp(float(logp[i, j]) - float(old[i, j]))
            a = float(adv[i])
            ell = -min(rho * a, min(max(rho, 1 - eps), 1 + eh) * a)
            kl = 0.0
            if beta and ref is not None:
                d = float(ref[i, j]) - float(logp[i, j])
                kl = math.exp(d) - d - 1
                ell += beta * kl
            s += ell
            c += 1
            kls.append(kl)
            ratios.append(rho)
            low += rho < 1 - eps and a < 0
            high += rho > 1 + eh and a > 0
        seq_terms.append(s / c if c else 0.0)
        tok_sum += s
        tok_cnt += c
    if agg == "seq_mean_token_mean":
        loss = sum(seq_terms) / n
    elif agg in ("token_mean", "bnpo"):
        loss = tok_sum / max(tok_cnt, 1)
    else:
        loss = tok_sum / (n * t)
    k = max(len(ratios), 1)
    metrics = {
        "kl": sum(kls) / k,
        "clip_frac_low": low / k,
        "clip_frac_high": high / k,
        "clip_frac": (low + high) / k,
        "ratio_mean": sum(ratios) / k,
        "ratio_min": min(ratios) if ratios else 0.0,
        "ratio_max": max(ratios) if ratios else 0.0,
    }
    return loss, metrics


def loss_inputs(seed, n=6, t=7, spread=0.5):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.01, 5, (n, t))
    old = logp + rng.normal(0, spread, (n, t))  # ratios far outside [0.8, 1.2] too
    ref = logp + rng.normal(0, 1.0, (n, t))
    adv = rng.normal(size=n)
    mask = rng.random((n, t)) < 0.8
    mask[0] = False  # a completion with no tokens
    mask[1, :] = True
    logp[~mask] = -np.inf  # padding garbage must not leak
    return logp, old, ref, adv, mask


LOSS = jax.jit(grpo.grpo_loss, static_argnames=("epsilon", "epsilon_high", "beta", "aggregation"))
CASES = [
    dict(),
    dict(epsilon_high=0.28),
    dict(beta=0.0),
    dict(ref_none=True),
    dict(beta=0.04, epsilon=0.1),
]


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_metrics_match_loop(agg, case):
    kw = dict(CASES[case])
    ref_none = kw.pop("ref_none", False)
    for seed in range(3):
        logp, old, ref, adv, mask = loss_inputs(seed)
        ref_arg = None if ref_none else ref
        want, want_m = loop_loss(
            logp, old, ref_arg, adv, mask, kw.get("epsilon", 0.2), kw.get("epsilon_high"),
            kw.get("beta", 0.001), agg,
        )  # fmt: skip
        for x64, tol in ((False, 1e-5), (True, 1e-6)):
            with jax.enable_x64(x64):
                loss, metrics = LOSS(logp, old, ref_arg, adv, mask, aggregation=agg, **kw)
            dt = jnp.float64 if x64 else jnp.float32
            assert loss.dtype == dt and all(v.dtype == dt for v in metrics.values())
            err = abs(float(loss) - want)
            assert err <= tol * max(1.0, abs(want)), (agg, case, seed, x64, float(loss), want)
            _note(f"loss/{'f64' if x64 else 'f32'}", err)
            for k, v in want_m.items():
                e = abs(float(metrics[k]) - v)
                assert e <= tol * max(1.0, abs(v)), (k, x64, float(metrics[k]), v)
                _note(f"loss_metrics/{'f64' if x64 else 'f32'}", e)
        assert want_m["clip_frac"] > 0  # the clipping branches are exercised


def test_loss_errors():
    logp, old, ref, adv, mask = loss_inputs(0)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="sequence_mean")  # no aliases
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="sum")
    # bf16 log-probs are computed in float32
    lb = grpo.grpo_loss(jnp.asarray(np.where(mask, logp, 0), jnp.bfloat16), old, ref, adv, mask)
    assert lb[0].dtype == jnp.float32
    # empty mask: finite zeros
    loss, m = grpo.grpo_loss(logp, old, ref, adv, np.zeros_like(mask))
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_gradient_mu1_stop_gradient_closed_form(agg):
    """mu = 1: old = stop_gradient(logp), rho = 1, so dL/dlogp_it = c_it (-A_i + beta (1 -
    exp(ref - logp))) with c_it = mask / (n_i N) (seq mean), mask / sum(mask) (token mean),
    mask / (N T) (fixed length)."""
    logp, _, ref, adv, mask = loss_inputs(4)
    logp = np.where(mask, logp, -1.0)
    beta = 0.05
    with jax.enable_x64(True):

        def f(lp):
            return grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, beta=beta,
                                  aggregation=agg)[0]  # fmt: skip

        grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    n, t = mask.shape
    want = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            if agg == "seq_mean_token_mean":
                c = 1.0 / (mask[i].sum() * n)
            elif agg in ("token_mean", "bnpo"):
                c = 1.0 / mask.sum()
            else:
                c = 1.0 / (n * t)
            want[i, j] = c * (-adv[i] + beta * (1.0 - math.exp(ref[i, j] - logp[i, j])))
    err = float(np.max(np.abs(grad - want)))
    assert err <= 1e-12, err
    _note("grad_closed_form/f64", err)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_gradient_toy_policy_finite_differences(agg):
    """A toy softmax policy theta (N, T, V); loss through log_softmax + gather; ratios away from
    1 so both clip branches are active; float64 central differences."""
    rng = np.random.default_rng(7)
    n, t, v = 4, 5, 6
    theta = rng.normal(size=(n, t, v))
    tokens = rng.integers(0, v, (n, t))
    mask = rng.random((n, t)) < 0.85
    mask[:, 0] = True
    old = rng.normal(-1.8, 0.6, (n, t))
    ref = rng.normal(-1.8, 0.6, (n, t))
    adv = rng.normal(size=n)
    with jax.enable_x64(True):

        def loss(th):
            lp = jnp.take_along_axis(jax.nn.log_softmax(th, -1), tokens[..., None], -1)[..., 0]
            return grpo.grpo_loss(lp, old, ref, adv, mask, beta=0.1, epsilon=0.2,
                                  epsilon_high=0.3, aggregation=agg)  # fmt: skip

        val, metrics = loss(jnp.asarray(theta))
        assert float(metrics["clip_frac"]) > 0
        grad = np.asarray(jax.grad(lambda th: loss(th)[0])(jnp.asarray(theta)))
        f = jax.jit(lambda th: loss(th)[0])
        h = 1e-6
        fd = np.zeros_like(theta)
        flat = theta.reshape(-1)
        for k in range(flat.size):
            e = np.zeros_like(flat)
            e[k] = h
            fd.reshape(-1)[k] = (
                float(f((flat + e).reshape(theta.shape)))
                - float(f((flat - e).reshape(theta.shape)))
            ) / (2 * h)
    err = float(np.max(np.abs(grad - fd)))
    assert err <= 1e-7, err
    _note("grad_fd/f64", err)
