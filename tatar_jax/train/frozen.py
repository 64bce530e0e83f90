"""Frozen parameters held once: the train state shares them, the update never rewrites them.

A LoRA run's frozen base (or a frozen vision tower) is the bulk of the parameters. The train
state keeps its full parameter tree (checkpoints hold every leaf, as before), but

- :func:`init_state` copies only the trainable leaves (and the counters): the frozen leaves of a
  fresh state are the model's own buffers;
- :func:`step_without_frozen` compiles a step so that the frozen leaves are a separate, *not
  donated* argument and no output: the update reads them and writes no new copy;
- the reference model of a LoRA run is the state's own parameters with the adapters off
  (:func:`tatar_jax.models.lora.adapters_off`), and the rollout reads the same buffers where
  its dtype and layout are the training ones (``generate.Sampler.place_state`` keeps such
  leaves as they are).

So one frozen base sits in device memory for the policy, the reference and the rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tatar_jax.train import optim

PyTree = Any

__all__ = ["frozen_leaves", "init_state", "join", "split", "step_without_frozen"]


def _is_none(x: Any) -> bool:
    return x is None


def split(state: optim.TrainState, trainable: PyTree) -> tuple[optim.TrainState, PyTree]:
    """(state whose frozen parameter leaves are None, the frozen leaves with None elsewhere)."""
    params = jax.tree.map(lambda p, t: p if t else None, state.params, trainable)
    frozen = jax.tree.map(lambda p, t: None if t else p, state.params, trainable)
    return state.replace(params=params), frozen


def join(state: optim.TrainState, frozen: PyTree) -> optim.TrainState:
    """Inverse of :func:`split`: the frozen leaves back into the state's parameters."""
    params = jax.tree.map(
        lambda p, f: f if p is None else p, state.params, frozen, is_leaf=_is_none
    )
    return state.replace(params=params)


def frozen_leaves(trainable: PyTree | None) -> int:
    """How many parameter leaves ``trainable`` freezes (0 for None: everything trains)."""
    return 0 if trainable is None else sum(not t for t in jax.tree.leaves(trainable))


def init_state(
    params: PyTree, tx: Any, rng: jax.Array, trainable: PyTree | None
) -> optim.TrainState:
    """A fresh train state whose every leaf is its own buffer (the step donates them) except the
    frozen parameters, which stay ``params``' buffers (shared with the model, never donated)."""
    state = optim.TrainState.create(params, tx, rng)
    if not frozen_leaves(trainable):
        return jax.tree.map(jnp.copy, state)
    rest, frozen = split(state, trainable)
    return join(jax.tree.map(jnp.copy, rest), frozen)


def step_without_frozen(
    step: Callable[[optim.TrainState, Any], tuple[optim.TrainState, Any]],
    trainable: PyTree | None,
    **jit_kwargs: Any,
) -> Callable[[optim.TrainState, Any], tuple[optim.TrainState, Any]]:
    """``step(state, batch) -> (state, metrics)`` jitted with the state donated except its frozen
    parameter leaves, which go in as their own argument and come back unchanged (the same
    arrays; the compiled program has no output for them). Without frozen leaves: the plain
    donating jit. ``jit_kwargs``: more ``jax.jit`` arguments (e.g. ``out_shardings``)."""
    if not frozen_leaves(trainable):
        return jax.jit(step, donate_argnums=(0,), **jit_kwargs)

    def inner(rest, frozen, batch):
        new, metrics = step(join(rest, frozen), batch)
        return split(new, trainable)[0], metrics

    compiled = jax.jit(inner, donate_argnums=(0,), **jit_kwargs)

    def call(state: optim.TrainState, batch: Any) -> tuple[optim.TrainState, Any]:
        rest, frozen = split(state, trainable)
        new, metrics = compiled(rest, frozen, batch)
        return join(new, frozen), metrics

    call.lower = lambda state, batch: compiled.lower(*split(state, trainable), batch)  # type: ignore[attr-defined]
    return call
