"""Training checkpoints: orbax ``CheckpointManager`` + grain iterator state + pre-emption.

A checkpoint of step ``s`` (the state *after* ``s`` optimizer steps) lives in
``<workdir>/checkpoints/<s>/`` with three items:

- ``state``: the ``TrainState`` pytree (params, optimizer state, step, RNG key data, non-finite
  counters) through ``ocp.args.PyTreeSave`` (typed PRNG keys anywhere in it are stored as key data
  and re-wrapped on restore);
- ``data``: the grain iterator position through ``grain.checkpoint.CheckpointSave`` (one JSON file
  per process, ``process_<i>-of-<n>.json``), so a resumed run sees exactly the batches the
  uninterrupted run would have seen: no fast-forward, no skipped or repeated data;
- ``meta``: a small JSON dict (the caller's: config, wall time, ...).

Saves are asynchronous (the arrays are copied to host, then written in a background thread), kept
N newest, and atomic: orbax writes into a temporary directory and renames it when complete, so a
``kill -9`` during a save leaves the previous checkpoint as the latest one. Restarting with the same
workdir resumes from the latest complete checkpoint (``restore_or_init``).

Pre-emption: ``Checkpointer(..., handle_sigterm=True)`` installs a SIGTERM handler that only sets a
flag; the loop calls ``ckpt.reached_preemption(step)`` at each step boundary and, when True, saves
(``force=True``), waits and exits 0. On multi-host runs the host-local flag is not used (hosts
could disagree and deadlock); JAX's preemption sync service (``jax.distributed`` with
``jax_enable_preemption_service``) drives orbax's ``reached_preemption`` so all hosts stop at the
same step.

Damaged checkpoints: a step that cannot be read (truncated or missing files, a bad manifest) is
reported with what is wrong, and resume falls back to the newest step that restores; the damaged
newer steps are moved, never deleted, to ``<workdir>/checkpoints_damaged/`` (so the run can save
those step numbers again). ``load_params`` (next stage, export) falls back the same way when
asked for the latest step, read-only. Every step failing is a :class:`CheckpointError` listing
each step and its reason; on resume those steps are moved aside as well, so the next start is a
fresh run (``scripts/train.py`` reports it as one line, exit status 1). The asyncio noise a
failed restore leaves behind is dropped at import (:func:`_quiet_closed_event_loop`).

Nothing is written outside ``<workdir>``.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"


def _quiet_closed_event_loop(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that drops two known, harmless reports and passes on the rest
    (a third kind: :class:`_QuietAbandonedReads`).

    When an orbax restore fails (a damaged step), (1) the tensorstore reads still in flight
    finish after orbax's asyncio loop has closed; their completion callbacks then call
    ``loop.call_soon_threadsafe`` and raise ``RuntimeError('Event loop is closed')``; (2) the
    sibling reads of the failed one (orbax's ``_read_array_index_and_device_put`` coroutines)
    are never awaited again and their own read errors are reported when they are collected.
    Both come as unraisable exceptions: dozens of tracebacks on stderr after the one line that
    matters. Nothing is lost (that restore had already failed and is reported); only these two
    are dropped."""

    def hook(unraisable: Any) -> None:
        err, tb = unraisable.exc_value, unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (
            isinstance(err, RuntimeError)
            and str(err) == "Event loop is closed"
            and tb is not None
            and tb.tb_frame.f_code.co_name == "_check_closed"
            and "asyncio" in tb.tb_frame.f_code.co_filename
        ):
            return
        code = getattr(unraisable.object, "cr_code", None)  # an abandoned coroutine
        if (
            code is not None
            and code.co_name == "_read_array_index_and_device_put"
            and "orbax" in code.co_filename
        ):
            return
        previous(unraisable)

    hook.tatar_quiet_event_loop = True  # type: ignore[attr-defined]
    return hook


if not getattr(sys.unraisablehook, "tatar_quiet_event_loop", False):
    sys.unraisablehook = _quiet_closed_event_loop(sys.unraisablehook)


class _QuietAbandonedReads(std_logging.Filter):
    """(3) The same abandoned reads as orbax ``async_deserialize`` tasks: asyncio logs "Task
    exception was never retrieved" with their tracebacks when they are collected. Only those
    (orbax's tasks) are dropped from the ``asyncio`` logger; every other record passes."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Task exception was never retrieved") and "orbax" in msg)


if not any(isinstance(f, _QuietAbandonedReads) for f in std_logging.getLogger("asyncio").filters):
    std_logging.getLogger("asyncio").addFilter(_QuietAbandonedReads())


class CheckpointError(RuntimeError):
    """No checkpoint step could be read; the message lists each step and what is wrong."""


def damage_reason(err: BaseException) -> str:
    """One line saying what is wrong: the innermost cause (tensorstore's ``OUT_OF_RANGE: ...
    Requested byte range ...``), without the multi-line TensorStore spec dumps."""
    inner, seen = err, set()
    # Only explicit causes: an implicit __context__ may be an unrelated, handled exception.
    while inner.__cause__ is not None and id(inner.__cause__) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    msg = str(inner).splitlines()[0] if str(inner) else ""
    for cut in (" [tensorstore_spec", " See full TensorStore"):
        msg = msg.split(cut)[0]
    msg = f"{type(inner).__name__}: {msg}" if type(inner).__name__ not in msg else msg
    # The head says which array, the tail what is wrong with its file.
    return msg if len(msg) <= 400 else f"{msg[:150]} ... {msg[-250:]}"


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: PyTree) -> PyTree:
    """Typed PRNG keys -> uint32 key data (orbax cannot serialise typed keys)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _abstract(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with a sharding for every leaf (typed keys as their key data).

    Leaves without a sharding (plain ``jax.eval_shape``) are placed on the first local device;
    pass an abstract state with ``NamedSharding``s to restore sharded.
    """
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        if _is_typed_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _key_impl(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    return x.dtype._impl  # abstract key (ShapeDtypeStruct): jax has no public accessor yet


def _rewrap_keys(template: PyTree, restored: PyTree) -> PyTree:
    return jax.tree.map(
        lambda t, r: jax.random.wrap_key_data(r, impl=_key_impl(t)) if _is_typed_key(t) else r,
        template,
        restored,
    )


class PreemptionFlag:
    """SIGTERM -> a flag checked at step boundaries (the handler itself does no I/O)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            logging.warning("not in the main thread: SIGTERM handler not installed")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del signum, frame  # no logging/I-O inside a signal handler
        self.requested = True

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class Checkpointer:
    """Orbax manager for one training run's ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory (created if missing).
      every_steps: save when ``step % every_steps == 0`` (and whenever ``force=True``).
      keep: number of newest checkpoints kept.
      async_save: write in a background thread.
      with_data: checkpoints carry a grain iterator state (then ``save`` needs ``data_iter``).
      handle_sigterm: install the SIGTERM flag (single-host; see module docstring).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every_steps: int,
        keep: int = 3,
        async_save: bool = True,
        with_data: bool = True,
        handle_sigterm: bool = False,
    ):
        if every_steps <= 0:
            raise ValueError(f"every_steps must be > 0, got {every_steps}")
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_SUBDIR
        self.with_data = with_data
        self.every_steps = every_steps
        items = ("state", "data", "meta") if with_data else ("state", "meta")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=items, options=options)
        self.preemption = PreemptionFlag() if handle_sigterm else None

    # -- discovery ---------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # -- saving ------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """``step % every_steps == 0`` (orbax's own policy would also save the first step)."""
        return step % self.every_steps == 0

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_iter: Any = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves if ``step`` is a save step (or ``force``); returns whether it saved.

        The grain iterator state is read now (synchronously), so the iterator may advance as soon
        as this returns; the arrays are written in the background when async.
        """
        if not force and not self.should_save(step):
            return False
        if step in self.manager.all_steps():
            return False  # e.g. the final save right after a periodic one
        items: dict[str, Any] = {
            "state": ocp.args.PyTreeSave(keys_to_data(state)),
            "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step))),
        }
        if self.with_data:
            if data_iter is None:
                raise ValueError("this Checkpointer saves the data iterator: pass data_iter")
            from grain.checkpoint import CheckpointSave

            items["data"] = CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self.preemption is not None:
            self.preemption.uninstall()

    # -- restoring ---------------------------------------------------------------------------
    def restore(
        self, step: int, target: PyTree, *, data_iter: Any = None
    ) -> tuple[PyTree, dict[str, Any]]:
        """Restores ``step`` into the structure (and shardings) of ``target``.

        ``target`` may be concrete or abstract (``jax.eval_shape``; leaves without a sharding go
        to the first local device). ``data_iter`` (grain) is set to the saved position in place.
        Returns (state, meta).
        """
        abstract = _abstract(target)
        items: dict[str, Any] = {
            "state": ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
            ),
            "meta": ocp.args.JsonRestore(),
        }
        if self.with_data:
            if data_iter is None:
                raise ValueError("this Checkpointer restores the data iterator: pass data_iter")
            from grain.checkpoint import CheckpointRestore

            items["data"] = CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = _rewrap_keys(target, restored["state"])
        return state, dict(restored["meta"] or {})

    def restore_or_init(
        self,
        init_fn: Callable[[], PyTree],
        *,
        data_iter: Any = None,
        abstract_state: PyTree | None = None,
    ) -> tuple[PyTree, int | None]:
        """The latest checkpoint if there is one, else ``init_fn()``.

        ``abstract_state``: the state's ShapeDtypeStructs with shardings; pass it on sharded
        runs to restore without running the init. Default: on one device
        ``jax.eval_shape(init_fn)`` (nothing computed); on several devices the shardings of a
        concrete ``init_fn()`` (``eval_shape`` does not report shardings), which briefly holds
        two copies of the state.
        Returns (state, restored step or None).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return init_fn(), None
        if abstract_state is not None:
            target = abstract_state
        elif jax.device_count() > 1:
            target = jax.tree.map(
                lambda x: (
                    jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                    if isinstance(x, jax.Array)
                    else x
                ),
                init_fn(),
            )
        else:
            target = jax.eval_shape(init_fn)
        damaged: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, _ = self.restore(step, target, data_iter=data_iter)
            except Exception as err:  # noqa: BLE001 - any unreadable step: try the one before
                damaged.append((step, damage_reason(err)))
                logging.warning("checkpoint %s/%d is damaged: %s", self.directory, *damaged[-1])
                continue
            self._set_aside([s for s, _ in damaged], restored=step)
            logging.info("resumed from %s/%d", self.directory, step)
            return state, step
        # Every step is damaged: they are moved aside too (never deleted), so that the next
        # start of the run is a fresh one instead of the same failure.
        self._set_aside([s for s, _ in damaged], restored=None)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ("
            + "; ".join(f"step {s}: {why}" for s, why in damaged)
            + f"); moved to {self.directory.parent / DAMAGED_SUBDIR}: rerun to start the run "
            "again from step 0"
        )

    def _set_aside(self, steps: list[int], restored: int | None) -> None:
        """Moves damaged steps (newer than the restored one, or all: ``restored`` None) out of
        the manager's directory."""
        if not steps:
            return
        if jax.process_index() == 0:
            self._move_damaged(steps, restored)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tatar_damaged_checkpoints")
        self.manager.reload()

    def _move_damaged(self, steps: list[int], restored: int | None) -> None:
        dest = self.directory.parent / DAMAGED_SUBDIR
        dest.mkdir(exist_ok=True)
        for step in steps:
            to, k = dest / str(step), 1
            while to.exists():  # the same step damaged again on a later run
                to, k = dest / f"{step}.{k}", k + 1
            shutil.move(str(self.directory / str(step)), str(to))
            if restored is not None:
                msg = f"checkpoint step {step} is damaged: moved to {to}; resuming from step "
                print(f"[tatar-jax] {msg}{restored}", flush=True)

    # -- pre-emption -------------------------------------------------------------------------
    def reached_preemption(self, step: int) -> bool:
        """True when the run should checkpoint now and exit (SIGTERM or JAX preemption sync)."""
        if self.manager.reached_preemption(step):
            return True
        if jax.process_count() > 1:
            return False
        if self.preemption is not None and self.preemption.requested:
            logging.warning("SIGTERM received: checkpointing step %d, then exiting", step)
            return True
        return False


def latest_step_on_disk(workdir: str | os.PathLike) -> int | None:
    """The newest step directory under ``<workdir>/checkpoints`` (no orbax, no reads; orbax's
    unfinished ``<step>.orbax-checkpoint-tmp`` directories do not count)."""
    d = pathlib.Path(workdir) / CHECKPOINT_SUBDIR
    steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
    return max(steps, default=None)


def load_params(
    path: str | os.PathLike, target_params: PyTree, *, step: int = -1
) -> tuple[PyTree, int]:
    """Only the ``params`` of a training checkpoint (init of the next stage; HF export).

    Args:
      path: a run's workdir, its ``checkpoints`` directory, or one step directory.
      target_params: concrete or abstract params (structure, dtypes, shardings).
      step: -1 = latest.
    Returns:
      (params, step). The optimizer state is not read.
    """
    p = pathlib.Path(path).absolute()
    if (p / CHECKPOINT_SUBDIR).is_dir():
        p = p / CHECKPOINT_SUBDIR
    if (p / "state").is_dir() and p.name.isdigit():
        step, p = int(p.name), p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(p, item_names=("state",), options=options)
    try:
        have = sorted(manager.all_steps(), reverse=True)
        if step < 0:
            if not have:
                raise FileNotFoundError(f"no complete checkpoint in {p}")
            candidates = have  # the latest that reads; damaged newer steps are reported
        elif step not in have:
            raise FileNotFoundError(f"step {step} not in {p} (have {sorted(have)})")
        else:
            candidates = [step]
        abstract = {"params": _abstract(target_params)}
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        damaged: list[str] = []
        for s in candidates:
            try:
                restored = manager.restore(s, args=ocp.args.Composite(state=args))
            except Exception as err:  # noqa: BLE001 - report it, try the step before
                damaged.append(f"step {s}: {damage_reason(err)}")
                logging.warning("checkpoint %s/%d is damaged: %s", p, s, damage_reason(err))
                continue
            if damaged:
                print(f"[tatar-jax] using step {s} of {p}; damaged: {'; '.join(damaged)}")
            return restored["state"]["params"], int(s)
        raise CheckpointError(f"cannot read the params of {p}: " + "; ".join(damaged))
    finally:
        manager.close()


def param_shapes(path: str | os.PathLike, step: int) -> dict[str, tuple[int, ...]]:
    """{'/'-joined leaf path: shape} of the ``params`` stored at ``step`` (metadata only; e.g.
    whether a run saved LoRA adapters). ``path`` as in :func:`load_params`."""
    p = pathlib.Path(path).absolute()
    if (p / CHECKPOINT_SUBDIR).is_dir():
        p = p / CHECKPOINT_SUBDIR
    if (p / "state").is_dir() and p.name.isdigit():
        p = p.parent
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(p / str(step) / "state").item_metadata
    tree = getattr(meta, "tree", meta)
    return {
        "/".join(str(getattr(k, "key", k)) for k in path_): tuple(leaf.shape)
        for path_, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])
    }
