"""The jitted GRPO update (spec §7.3): policy forward on prompt + completion -> chunked token
log-probs -> ``grpo.grpo_loss`` -> gradients -> optimizer update; and the log-prob function used
for the reference model (and for pi_old when mu > 1).

Inputs: a frozen :class:`tatar_jax.train.inputs.GrpoBatch` (N = prompts x G rows, L = Lp + T,
T = max new tokens):

- ``rows``: ``input_ids``, ``attention_mask``, ``feat_index`` (N, L), ``position_ids`` (N, 3, L),
  ``completion_mask`` (N, T) float (tokens up to and including the stop token; 0 for invalid
  prompts), ``advantages`` (N,), ``task_id`` (N,), ``old_logps`` (N, T) (mu > 1; None: pi_old is
  the detached policy, rho = 1) and ``ref_logps`` (N, T) (beta > 0; else None).
- ``vision``: ``pixel_values`` + ``layout`` of the step's B images. The vision tower runs once
  per step (once per image, never once per completion or per micro-batch): the update computes
  the features, every micro-batch gathers them, the micro-batches' gradients w.r.t. the features
  are summed and go back through the tower in one backward; the reference / pi_old pass runs it
  once without gradient.

Only the T completion positions go through the lm_head (``hidden[:, Lp-1 : L-1]``), in chunks of
``chunk_size`` tokens (``tatar_jax.logprobs``): no (tokens x vocab) array is ever whole.
With ``pack_size`` K > 0 (a static field of the batch; ``inputs.pack_size``), only the
completion tokens that count (mask 1) go through it, packed into K slots: completions stop well
before ``max_new_tokens`` (a short IQA rationale in a 256-token budget), and the lm_head over the
152k vocabulary is most of a small model's update.
Log-probs, ratios, KL and the loss are float32 whatever the compute dtype.

The loss settings are one frozen :class:`tatar_jax.grpo.LossConfig`.

Micro-batches (``num_micro``: row slices, summed by ``optim.accumulate_gradients``): each
micro-batch contributes its *share* of the step loss, so the step's loss and gradient equal the
whole-batch ones (``grpo.micro_batch_share``): ``seq_mean_token_mean`` / ``fixed_length`` /
``bnpo`` shares are ``loss_mb / num_micro`` (equal row counts; bnpo's loss_mb is its own token
mean), ``token_mean`` shares are ``token_sum_mb / tokens_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tatar_jax import grpo
from tatar_jax.data import prompts
from tatar_jax.logprobs import token_logprobs
from tatar_jax.train import inputs as step_inputs
from tatar_jax.train import optim

PyTree = Any
_MEAN_METRICS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean")
_IS_MEAN_METRICS = ("is_weight_mean", "is_masked_frac")


def _packed_logps(hc, tgt, mask, w, k, layout, chunk_size, temperature):
    """(n, T) log-probs and entropies computing only the mask tokens, packed into ``k`` slots
    (k >= count)."""
    n, t, d = hc.shape
    idx, valid = step_inputs.pack_index(mask, k)
    h_k = hc.reshape(n * t, d)[idx]
    t_k = jnp.where(valid, tgt.reshape(-1)[idx], -1)
    lp, ent = token_logprobs(
        h_k, w, t_k, chunk_size=chunk_size, weight_layout=layout, temperature=temperature,
        return_entropy=True,
    )  # fmt: skip
    unpack = lambda x: (  # noqa: E731
        jnp.zeros((n * t,), jnp.float32).at[idx].add(jnp.where(valid, x, 0.0)).reshape(n, t)
    )
    return unpack(lp), unpack(ent)


def completion_logps(
    model: nnx.Module,
    rows: step_inputs.GrpoRows,
    vision: step_inputs.Vision,
    *,
    pack_size: int = 0,
    features: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """(N, T) float32 log-probs of the completion tokens (0 where ``completion_mask`` is 0), and
    with ``return_entropy`` the (N, T) entropies of the tempered next-token distributions there.

    ``features``: the step's image features (``inputs.image_features``); None runs the vision
    tower here. ``pack_size`` > 0: only the counted tokens, packed into that many slots."""
    h = step_inputs.hidden_states(model, rows, vision, features)
    t = rows.completion_mask.shape[1]
    length = h.shape[1]
    hc = h[:, length - t - 1 : length - 1]  # position i predicts token i + 1
    tgt = jnp.where(rows.completion_mask > 0, rows.input_ids[:, length - t :], -1)
    w, layout = step_inputs.lm_head(model)
    if pack_size:
        out = _packed_logps(
            hc, tgt, rows.completion_mask, w, pack_size, layout, chunk_size, temperature
        )
    else:
        out = token_logprobs(
            hc, w, tgt, chunk_size=chunk_size, weight_layout=layout, temperature=temperature,
            return_entropy=True,
        )  # fmt: skip
    return out if return_entropy else out[0]


def make_logps_fn(
    graphdef: nnx.GraphDef, *, temperature: float = 1.0, chunk_size: int = 1024, num_micro: int = 1
) -> Callable[[PyTree, step_inputs.GrpoBatch], jax.Array]:
    """Pure ``fn(params, batch) -> (N, T)`` log-probs (reference model / pi_old); jit it.

    The vision tower runs once (no gradient); rows are then processed ``num_micro`` slices at a
    time (``lax.map``) to bound activation memory. ``batch.rows``' ``old_logps`` / ``ref_logps``
    are not read.
    """

    def fn(params: PyTree, batch: step_inputs.GrpoBatch) -> jax.Array:
        model = nnx.merge(graphdef, params)
        rows = batch.rows.replace(old_logps=None, ref_logps=None, rollout_logps=None)
        feats = jax.lax.stop_gradient(step_inputs.image_features(model, batch.vision))

        def logps(mb):
            return completion_logps(
                model, mb, batch.vision, pack_size=batch.pack_size, features=feats,
                temperature=temperature, chunk_size=chunk_size,
            )  # fmt: skip

        if num_micro <= 1:
            return logps(rows)
        n = rows.input_ids.shape[0]
        micro = jax.tree.map(lambda x: x.reshape((num_micro, n // num_micro) + x.shape[1:]), rows)
        out = jax.lax.map(logps, micro)
        return out.reshape((n,) + out.shape[2:])

    return fn


def grpo_grads(
    graphdef: nnx.GraphDef,
    params: PyTree,
    batch: step_inputs.GrpoBatch,
    loss: grpo.LossConfig,
    *,
    num_micro: int = 1,
    train_vision: bool = True,
    chunk_size: int = 1024,
    old_from_rollout: bool = False,
) -> tuple[jax.Array, PyTree, dict[str, jax.Array]]:
    """(loss, float32 grads, aux sums) of the step's GRPO loss, summed over ``num_micro`` row
    micro-batches (each contributes its share; see the module docstring).

    Aux also holds ``entropy_sum`` (summed token entropies over completion tokens),
    ``entropy_sum/<task>`` and ``completion_tokens/<task>`` (``rows.task_id``,
    ``tatar_jax.data.prompts.TASK_IDS``); with ``rows.rollout_logps``, the per-row (N,) sums
    :func:`mismatch_metrics` reads.

    pi_old: ``rows.old_logps`` when given; ``old_from_rollout``: ``rows.rollout_logps`` (the
    sampler's log-probs; no pi_old forward); else the detached policy (rho = 1).

    The vision tower runs once per step: its features are an input of every micro-batch's
    loss, whose gradients w.r.t. them are summed and sent back through the tower once.
    ``train_vision=False`` (a frozen tower): no backward through it, zero ``visual`` grads.
    """
    rows, vision = batch.rows, batch.vision
    tokens_step = jnp.maximum(jnp.sum(rows.completion_mask), 1.0)
    beta = loss.beta
    if old_from_rollout and rows.rollout_logps is None:
        raise ValueError("old_from_rollout needs rows.rollout_logps")
    n_rows = rows.input_ids.shape[0]

    def loss_fn(p, f, mb_and_index):
        mb, index = mb_and_index
        model = nnx.merge(graphdef, p)
        logps, ent = completion_logps(
            model, mb, vision, pack_size=batch.pack_size, features=f,
            temperature=loss.temperature, chunk_size=chunk_size, return_entropy=True,
        )  # fmt: skip
        trainer_old = mb.old_logps if mb.old_logps is not None else jax.lax.stop_gradient(logps)
        old = mb.rollout_logps if old_from_rollout else trainer_old
        ref = mb.ref_logps if beta else None
        value, m = grpo.grpo_loss(
            logps, old, ref, mb.advantages, mb.completion_mask,
            rollout_logps=mb.rollout_logps, **loss.loss_kwargs(),
        )  # fmt: skip
        tokens_mb = jnp.sum(mb.completion_mask)
        share = grpo.micro_batch_share(
            value, tokens_mb, tokens_step, num_micro, loss.aggregation
        )
        weight = tokens_mb / tokens_step  # token-weighted means over micro-batches
        aux = {k: m[k] * weight for k in (*_MEAN_METRICS, *_IS_MEAN_METRICS) if k in m}
        aux["completion_tokens"] = tokens_mb
        aux.update(_entropy_sums(jax.lax.stop_gradient(ent), mb))
        if mb.rollout_logps is not None:
            aux.update(_mismatch_rows(trainer_old, mb.rollout_logps, mb.completion_mask, index,
                                      n_rows))  # fmt: skip
        return share, aux

    # The row index travels with the rows through the micro-batch split: per-row statistics
    # (a max is not a sum) are scattered into (N,) vectors that the accumulation's sum keeps.
    return step_inputs.accumulate_with_features(
        loss_fn, graphdef, params, (rows, jnp.arange(n_rows)), vision, num_micro,
        train_vision=train_vision,
    )  # fmt: skip


def _mismatch_rows(
    trainer_logps: jax.Array, rollout_logps: jax.Array, mask: jax.Array, index: jax.Array, n: int
) -> dict[str, jax.Array]:
    """(n,) vectors (zero outside this micro-batch's rows ``index``): per row, the summed k3
    estimate of KL(pi_rollout || pi_old) over its completion tokens, exp(d) - d - 1 with d =
    old - rollout (>= 0, sampled from the rollout), and max |d|."""
    d = jax.lax.stop_gradient(trainer_logps) - jnp.asarray(rollout_logps, jnp.float32)
    d = jnp.where(mask > 0, jnp.where(jnp.isnan(d), 0.0, d), 0.0)
    k3 = jnp.sum((jnp.exp(d) - d - 1.0) * mask, axis=1)
    zeros = jnp.zeros((n,), jnp.float32)
    return {
        "mismatch_rows/k3": zeros.at[index].set(k3),
        "mismatch_rows/max_abs": zeros.at[index].set(jnp.max(jnp.abs(d), axis=1)),
        "mismatch_rows/abs": zeros.at[index].set(jnp.sum(jnp.abs(d), axis=1)),
    }


def mismatch_metrics(aux: Mapping[str, jax.Array], rows: step_inputs.GrpoRows) -> dict:
    """Rollout/trainer mismatch on the step's completion tokens, in all and per task:
    ``mismatch/k3/<t>`` (mean k3 KL(pi_rollout || pi_old) per token), ``mismatch/abs_logp_diff/
    <t>`` (mean |log pi_old - log pi_rollout|, TRL's ``sampling_logp_difference/mean``) and
    ``mismatch/max_abs_logp_diff/<t>`` (its max). pi_old is the trainer's forward of the
    policy that sampled (mu > 1: the recomputed ``old_logps``). Empty without
    ``rows.rollout_logps``."""
    if "mismatch_rows/k3" not in aux:
        return {}
    tokens = jnp.sum(rows.completion_mask, axis=1)
    out = {}
    for task, sel in [("all", tokens >= 0)] + [
        (t, rows.task_id == tid) for t, tid in prompts.TASK_IDS.items()
    ]:
        n_tok = jnp.maximum(jnp.sum(jnp.where(sel, tokens, 0.0)), 1.0)
        out[f"mismatch/k3/{task}"] = jnp.sum(jnp.where(sel, aux["mismatch_rows/k3"], 0.0)) / n_tok
        out[f"mismatch/abs_logp_diff/{task}"] = (
            jnp.sum(jnp.where(sel, aux["mismatch_rows/abs"], 0.0)) / n_tok
        )
        out[f"mismatch/max_abs_logp_diff/{task}"] = jnp.max(
            jnp.where(sel, aux["mismatch_rows/max_abs"], 0.0)
        )
    return out


def _entropy_sums(ent: jax.Array, mb: step_inputs.GrpoRows) -> dict[str, jax.Array]:
    """Summed entropies (and tokens) over the completion tokens, in all and per task."""
    mask = mb.completion_mask
    tok_ent = jnp.sum(ent * mask, axis=1)  # (n,)
    out = {"entropy_sum": jnp.sum(tok_ent)}
    for task, tid in prompts.TASK_IDS.items():
        on = (mb.task_id == tid).astype(jnp.float32)
        out[f"entropy_sum/{task}"] = jnp.sum(tok_ent * on)
        out[f"completion_tokens/{task}"] = jnp.sum(mask.sum(axis=1) * on)
    return out


def entropy_metrics(aux: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``entropy/all`` and ``entropy/<task>``: mean token entropy (nats) of the policy over the
    step's completion tokens, from :func:`grpo_grads`' aux sums (0 for a task with no tokens)."""
    out = {"entropy/all": aux["entropy_sum"] / jnp.maximum(aux["completion_tokens"], 1.0)}
    for task in prompts.TASK_IDS:
        if f"entropy_sum/{task}" in aux:
            tokens = jnp.maximum(aux[f"completion_tokens/{task}"], 1.0)
            out[f"entropy/{task}"] = aux[f"entropy_sum/{task}"] / tokens
    return out


def make_grpo_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss: grpo.LossConfig | None = None,
    num_micro: int = 1,
    chunk_size: int = 1024,
    trainable: PyTree | None = None,
    train_vision: bool | None = None,
    schedule: optax.Schedule | None = None,
    old_from_rollout: bool = False,
) -> Callable[[optim.TrainState, step_inputs.GrpoBatch], tuple[optim.TrainState, dict]]:
    """Pure ``step(state, batch) -> (state, metrics)``: one optimizer update on a rollout.

    ``loss``: the objective's settings (None: ``grpo.LossConfig()``); ``train_vision`` None =
    what ``trainable`` says; ``old_from_rollout``: pi_old = ``rows.rollout_logps``.
    Metrics: ``loss``, ``kl``, ``clip_frac`` (+ ``_low``/``_high``), ``ratio_mean`` (token-weighted
    over micro-batches), ``completion_tokens``, ``entropy/all`` + ``entropy/<task>``
    (:func:`entropy_metrics`), ``grad_norm``, ``update_skipped``, ``nonfinite_count`` and ``lr``
    when ``schedule`` is given; with ``rows.rollout_logps`` the :func:`mismatch_metrics`, and
    with a rollout correction ``is_weight_mean`` and ``is_masked_frac`` (token-weighted).
    """
    if train_vision is None:
        train_vision = step_inputs.vision_trains(trainable)
    loss = grpo.LossConfig() if loss is None else loss

    def step(state: optim.TrainState, batch: step_inputs.GrpoBatch):
        loss_value, grads, aux = grpo_grads(
            graphdef, state.params, batch, loss, num_micro=num_micro,
            train_vision=train_vision, chunk_size=chunk_size, old_from_rollout=old_from_rollout,
        )  # fmt: skip
        new_state, info = optim.apply_gradients(
            state, grads, tx, loss=loss_value, trainable=trainable, schedule=schedule
        )
        sums = {k for k in aux if k.startswith(("entropy_sum", "mismatch_rows/"))}
        metrics = {k: v for k, v in aux.items() if k not in sums}
        mismatch = mismatch_metrics(aux, batch.rows)
        return new_state, {
            "loss": loss_value, **metrics, **entropy_metrics(aux), **mismatch, **info
        }

    return step
