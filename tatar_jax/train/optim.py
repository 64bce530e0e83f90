"""Optimizer, learning-rate schedule, trainable mask, gradient accumulation, non-finite skipping.

One optimizer step of either stage is

    grads, loss, aux = accumulate_gradients(loss_fn, state.params, batch, grad_accum_steps)
    state, info = apply_gradients(state, grads, tx, loss=loss, trainable=mask)

inside one jitted function.

Design choices
- **Accumulation inside the step** (a ``lax.scan`` over micro-batches), not ``optax.MultiSteps``:
  a checkpoint is only ever taken at an optimizer-step boundary, so there is no half-accumulated
  gradient to save and resume stays exact. The learning-rate schedule counts applied updates
  (the trainer's step less the skipped ones, below).
  ``loss_fn`` must return quantities already divided by the *whole step's* normaliser (e.g. the
  total number of assistant tokens of all micro-batches), so the step's loss and gradient are the
  plain sums over micro-batches (see ``tatar_jax.train.sft_step``).
- **Frozen parameters** (the vision tower with ``model.freeze_vision``) go through
  ``optax.set_to_zero`` inside ``optax.multi_transform``: zero updates and no AdamW moments; the
  global gradient norm (clipping and the logged norm) covers trainable parameters only.
- **Non-finite guard**: if the loss, any trainable gradient or the update itself (a NaN or
  infinite learning rate, an overflowing moment) is NaN/Inf the whole update is
  dropped (parameters and optimizer state stay bit-identical, the schedule does not advance), the
  step counter still advances (the batch is consumed), and ``nonfinite_count`` counts consecutive
  skips; ``should_stop`` turns it into a stop signal.
- Schedules follow Hugging Face ``get_{linear,cosine}_schedule_with_warmup`` (the reference's
  TRL defaults): the first update uses ``schedule(0)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

VISION_PATTERN = r"(^|/)visual(/|$)"  # HF / our Qwen2.5-VL module name of the vision tower
# config.optimizer.mu_dtype: AdamW's first moment in the parameters' dtype ("params", optax's
# default) or in a dtype of its own. optax 0.2.8 keeps the second moment in the parameters'
# dtype; a bfloat16 nu would be wrong anyway: b2 = 0.999 moves it by 1e-3 of itself per step,
# under bfloat16's resolution (2^-8), so rounding would freeze it.
MU_DTYPES = ("params", "float32", "bfloat16")


def make_schedule(
    learning_rate: float,
    total_steps: int,
    *,
    schedule: str = "linear",
    warmup_steps: int = 0,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """Learning rate per optimizer update (count 0 = first update).

    linear: warm-up 0 -> lr over ``warmup_steps``, then linear to ``end_lr_factor * lr`` at
    ``total_steps`` (HF ``get_linear_schedule_with_warmup``); cosine: half-cosine decay instead
    (HF ``get_cosine_schedule_with_warmup``); constant: lr after the warm-up.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    end = learning_rate * end_lr_factor
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        main = optax.linear_schedule(learning_rate, end, decay_steps)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_factor)
    elif schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"unknown schedule {schedule!r} (linear | cosine | constant)")
    if warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warm, main], [warmup_steps])


def path_str(path: Sequence[Any]) -> str:
    """'/'-joined names of a pytree key path (dict keys, attributes, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def trainable_mask(
    params: PyTree,
    *,
    freeze_vision: bool = False,
    freeze: Sequence[str] = (),
    train_only: Sequence[str] = (),
) -> PyTree:
    """Pytree of bools like ``params``: False for frozen leaves.

    Args:
      freeze_vision: freeze everything under a ``visual`` module (ViT blocks, patch embed, merger).
      freeze: extra regular expressions searched in each leaf's '/'-joined path.
      train_only: when given, only leaves whose path one of these regexes finds can train (LoRA:
        ``tatar_jax.models.lora.ADAPTER_PATTERN``); ``freeze`` still applies to them.
    """
    patterns = [re.compile(p) for p in freeze]
    if freeze_vision:
        patterns.append(re.compile(VISION_PATTERN))
    only = [re.compile(p) for p in train_only]

    def one(path, _):
        s = path_str(path)
        if only and not any(p.search(s) for p in only):
            return False
        return not any(p.search(s) for p in patterns)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    trainable: PyTree | None = None,
    mu_dtype: str = "params",
) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (spec §6.3/§7.4 defaults), frozen leaves zeroed.

    ``trainable``: the bool pytree of ``trainable_mask`` (None = everything trains).
    ``mu_dtype``: the first moment's dtype (:data:`MU_DTYPES`; "params": the parameters').
    A bfloat16 first moment halves its memory (float32 parameters: 2 of the state's 12 bytes
    per trainable parameter); the update reads it in float32 (optax casts).
    """
    if mu_dtype not in MU_DTYPES:
        raise ValueError(f"config.optimizer.mu_dtype must be one of {MU_DTYPES}, got {mu_dtype!r}")
    parts = []
    if max_grad_norm and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mu_dtype=None if mu_dtype == "params" else mu_dtype,
    ))  # fmt: skip
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def optimizer_from_config(
    cfg: ml_collections.ConfigDict,
    total_steps: int,
    trainable: PyTree | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from the ``optimizer`` block of configs/common.py."""
    if cfg.name != "adamw":
        raise ValueError(f"unknown optimizer {cfg.name!r} (only 'adamw')")
    sched = make_schedule(
        cfg.learning_rate,
        total_steps,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        end_lr_factor=cfg.end_lr_factor,
    )
    tx = make_optimizer(
        sched,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        trainable=trainable,
        mu_dtype=str(cfg.get("mu_dtype", "params")),
    )
    return tx, sched


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator (a pytree; checkpointable).

    ``rng`` holds raw key data (``jax.random.key_data``; orbax cannot save typed keys); use
    ``state.key()`` / ``rng_for_step``.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken (skipped ones included)
    params: PyTree
    opt_state: PyTree
    rng: jax.Array  # uint32 key data
    nonfinite_count: jax.Array  # int32: consecutive skipped updates
    nonfinite_total: jax.Array  # int32: all skipped updates

    @classmethod
    def create(cls, params: PyTree, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)

        # Separate buffers per counter, so a jitted step may donate the whole state.
        def zero():
            return jnp.zeros((), jnp.int32)

        return cls(zero(), params, tx.init(params), rng, zero(), zero())

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def rng_for_step(state: TrainState, salt: int = 0) -> jax.Array:
    """A typed key for this step: depends only on (seed, step, salt), so resume replays it."""
    return jax.random.fold_in(jax.random.fold_in(state.key(), state.step), salt)


def all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def accumulate_gradients(
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]],
    params: PyTree,
    batch: PyTree,
    num_micro_batches: int,
) -> tuple[jax.Array, PyTree, PyTree]:
    """Sum of loss, gradients and aux over micro-batches.

    Args:
      loss_fn: (params, micro_batch) -> (scalar loss, aux pytree of summable arrays); the loss
        must already be divided by the whole step's normaliser.
      batch: pytree of arrays with leading dim B, split into ``num_micro_batches`` equal parts
        (B % num_micro_batches == 0).
    Returns:
      (loss, grads, aux): sums; gradients in float32 whatever the parameter dtype.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches <= 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, jax.tree.map(lambda g: g.astype(jnp.float32), grads), aux

    def split(x):
        if x.shape[0] % num_micro_batches:
            raise ValueError(f"batch dim {x.shape[0]} not divisible by {num_micro_batches}")
        return x.reshape((num_micro_batches, x.shape[0] // num_micro_batches) + x.shape[1:])

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, aux0), _ = jax.eval_shape(grad_fn, params, first)
    zeros = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0),
    )

    def body(carry, mb):
        loss_acc, grad_acc, aux_acc = carry
        (loss, aux), grads = grad_fn(params, mb)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
        return (loss_acc + loss.astype(jnp.float32), grad_acc, aux_acc), None

    (loss, grads, aux), _ = jax.lax.scan(body, zeros, micro)
    return loss, grads, aux


def apply_gradients(
    state: TrainState,
    grads: PyTree,
    tx: optax.GradientTransformation,
    *,
    loss: jax.Array | None = None,
    trainable: PyTree | None = None,
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update, skipped entirely when the loss or a trainable gradient is non-finite.

    Returns the new state and {grad_norm (pre-clip, trainable leaves), update_skipped (0/1),
    nonfinite_count, and ``lr`` (this update's learning rate) when ``schedule`` is given}.
    Frozen leaves' gradients are ignored (they may even be NaN).
    """
    if trainable is not None:
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    finite = all_finite(grads)
    if loss is not None:
        finite = finite & jnp.all(jnp.isfinite(loss))
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    # Finite gradients can still make a non-finite update (a NaN or infinite learning rate, an
    # overflowing moment): the guard covers what is applied, not only what went in.
    finite = finite & all_finite(updates)
    new_params = optax.apply_updates(state.params, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    params = jax.tree.map(keep, new_params, state.params)
    opt_state = jax.tree.map(keep, new_opt, state.opt_state)
    count = jnp.where(finite, 0, state.nonfinite_count + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        nonfinite_count=count,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    info = {
        "grad_norm": grad_norm,
        "update_skipped": (~finite).astype(jnp.int32),
        "nonfinite_count": count,
    }
    if schedule is not None:
        # The optimizer's update count equals the number of applied (non-skipped) updates.
        applied = state.step - state.nonfinite_total
        info["lr"] = jnp.asarray(schedule(applied), jnp.float32)
    return new_state, info


def should_stop(state: TrainState, max_consecutive: int) -> bool:
    """Host-side: True once ``max_consecutive`` updates in a row were skipped (<= 0: never)."""
    return max_consecutive > 0 and int(state.nonfinite_count) >= max_consecutive
