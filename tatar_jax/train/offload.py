"""Host offload of training state that a program does not read (jax memory kinds).

Full-parameter GRPO holds the AdamW moments (2x the float32 parameters) and the reference copy
in device memory through the rollout, which reads neither. With ``config.offload``:

- ``mode = "never"``: everything stays on the device (default).
- ``mode = "rollout"``: the offloaded parts move to host memory (``pinned_host``) after each
  update and come back when the next update step starts: the rollout, the reward scoring, the
  checkpoint and the evaluation run without them.
- ``mode = "always"``: as ``rollout``, and they come back only for the program that reads them:
  the optimizer state for the update program (the reference / pi_old log-prob passes run
  without it), the reference copy for its own pass.

``parts``: ``"opt_state"`` (AdamW moments and counters), ``"reference"`` (the frozen
reference copy of a full-parameter run; a LoRA run has none: its reference is the policy's base)
and ``"params"`` (the float32 master weights of a full-parameter run: the rollout and the
evaluation read their own compute-dtype copy, which ``generate.Sampler.place_state`` makes leaf
by leaf from the host copy; with ``always`` they come back for the passes that read the policy,
not for the reference pass; frozen leaves stay: they are the model's own buffers. A LoRA run's
base *is* the rollout's weights: refused there).
A transfer is an exact copy, so numbers and resumed runs are bit-identical to ``never``.

Backends: memory kinds need a device with a ``pinned_host`` memory (TPU, GPU, and jax's CPU
backend, where both kinds are host RAM: the code path runs, nothing is saved). On a device
without one, offload is a no-op and says so once in the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

PyTree = Any

MODES = ("never", "rollout", "always")
PARTS = ("opt_state", "reference", "params")
HOST, DEVICE = "pinned_host", "device"

__all__ = ["HOST", "MODES", "PARTS", "Offload", "from_config", "move", "supported"]


def supported(device: jax.Device | None = None) -> bool:
    """True when ``device`` (default: the first) has a ``pinned_host`` memory."""
    device = device or jax.devices()[0]
    try:
        return any(m.kind == HOST for m in device.addressable_memories())
    except Exception:  # noqa: BLE001 - a backend without memory spaces
        return False


def move(tree: PyTree, kind: str) -> PyTree:
    """``tree``'s arrays in memory ``kind`` (``pinned_host`` / ``device``), same layout; leaves
    already there are kept (no copy), non-arrays pass through."""

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.sharding.memory_kind == kind:
            return x
        return jax.device_put(x, x.sharding.with_memory_kind(kind))

    return jax.tree.map(one, tree)


class Offload:
    """What leaves device memory when (see the module docstring)."""

    def __init__(
        self,
        mode: str = "never",
        parts: Sequence[str] = ("opt_state",),
        trainable: PyTree | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"config.offload.mode must be one of {MODES}, got {mode!r}")
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"config.offload.parts: unknown {unknown}; choose from {PARTS}")
        self.parts = tuple(parts)
        self.mode = mode
        # "params" moves the trainable leaves only: frozen ones (a frozen vision tower) are the
        # model's own buffers, which stay on the device anyway (tatar_jax.train.frozen)
        self.trainable = trainable
        if mode != "never" and not supported():
            logging.warning(
                "config.offload.mode=%s: %s has no pinned_host memory; nothing is offloaded",
                mode, jax.devices()[0].platform,
            )  # fmt: skip
            self.mode = "never"

    def on(self, part: str) -> bool:
        return self.mode != "never" and part in self.parts

    def park(self, state: Any) -> Any:
        """The train state with the configured parts (optimizer state, parameters) in host
        memory."""
        return self._moved(state, HOST, self.on("opt_state"), self.on("params"))

    def fetch(self, state: Any, program: str) -> Any:
        """The train state with the parts ``program`` reads back on the device:
        "update_start" (the start of the update stage), "policy" (a log-prob pass of the
        policy: its parameters) or "step" (the update program: everything)."""
        if program not in ("update_start", "policy", "step"):
            raise ValueError(f"Offload.fetch: unknown program {program!r}")
        early = self.mode == "rollout" or program == "step"
        return self._moved(
            state, DEVICE, self.on("opt_state") and early,
            self.on("params") and (early or program == "policy"),
        )  # fmt: skip

    def _moved(self, state: Any, kind: str, opt_state: bool, params: bool) -> Any:
        if opt_state:
            state = state.replace(opt_state=move(state.opt_state, kind))
        if params:
            if self.trainable is None:
                state = state.replace(params=move(state.params, kind))
            else:
                state = state.replace(params=jax.tree.map(
                    lambda x, t: move(x, kind) if t else x, state.params, self.trainable
                ))  # fmt: skip
        return state

    def park_reference(self, ref: PyTree) -> PyTree:
        return move(ref, HOST) if self.on("reference") and ref is not None else ref

    def fetch_reference(self, ref: PyTree) -> PyTree:
        return move(ref, DEVICE) if self.on("reference") and ref is not None else ref


def from_config(block: Any, trainable: PyTree | None = None) -> Offload:
    """The ``offload`` config block (absent: never); ``trainable``: the bool pytree of
    ``optim.trainable_mask`` (None: every parameter trains)."""
    if block is None:
        return Offload()
    return Offload(str(block.mode), tuple(block.parts), trainable)
