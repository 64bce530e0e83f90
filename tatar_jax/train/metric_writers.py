"""The run's metric output: writers (console / JSONL / TensorBoard), the compact console line,
the progress bar, windowed means and step timers.

Writers run on process 0 only. Everything here is host-side (numpy); jitted steps return arrays and
the loop hands them over with ``writer.write(step, metrics)``. The model's FLOP count and MFU are
:mod:`tatar_jax.train.flop_model`; a GRPO step's reward statistics
:mod:`tatar_jax.train.reward_stats`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

# --- writers ---------------------------------------------------------------------------------


def _to_float(v: Any) -> float:
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"metric must be a scalar, got shape {a.shape}")
    return float(a.reshape(()))


class MetricsWriter:
    """Per written step: one compact console line, one JSONL record with every metric,
    TensorBoard scalars (the loop chooses the steps: ``logging.every_steps``).

    Files: ``<workdir>/metrics.jsonl`` (``{"step": s, "wall_time": t, name: value, ...}``;
    non-finite values as JSON NaN/Infinity) and ``<workdir>/tensorboard/``.

    ``resume_step``: the step the run restarts from. Rows of later steps (logged after that
    checkpoint by a run that was then killed; the resumed run logs them again) are removed
    from ``metrics.jsonl`` and TensorBoard discards its events from the step after, so no step
    is recorded twice. ``total``: the run's last step, for the console's ETA.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        jsonl: bool = True,
        console: bool = True,
        process_index: int | None = None,
        resume_step: int | None = None,
        total: int | None = None,
    ):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.enabled = process_index == 0
        self.console = console
        self.workdir = pathlib.Path(workdir)
        self.total = total
        self.dropped = 0  # rows of steps after resume_step removed from metrics.jsonl
        self._jsonl = None
        self._tb = None
        self._rate = _Rate()
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.workdir / "metrics.jsonl"
            if resume_step is not None:
                self.dropped = truncate_after(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Writes ``metrics`` (scalars) as step ``step``; returns whether it wrote (process 0)."""
        if not self.enabled:
            return False
        values = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "wall_time": time.time(), **values}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self.console:
            eta = self._rate.eta(step, self.total) if "loss" in values else None
            _console(console_line(step, values, total=self.total, eta_s=eta))
        return True

    def write_text(self, step: int, name: str, text: str) -> None:
        """Sample completions etc. (TensorBoard text + console)."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_text(name, text, int(step))
        if self.console:
            _console(f"step {step} {name}: {text}")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_after(path: pathlib.Path, step: int) -> int:
    """Removes the rows of ``metrics.jsonl`` with ``step > step`` (and a torn last line);
    returns how many were removed. Atomic: a new file replaces the old one."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False  # a row torn by kill -9
        if ok:
            keep.append(line + "\n")
        else:
            dropped += bool(line.strip())
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return dropped


class _Rate:
    """Wall-clock seconds per step between logged training rows (checkpoints and periodic
    evaluations included, so the ETA covers them)."""

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None

    def eta(self, step: int, total: int | None) -> float | None:
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
            return None
        s0, t0 = self._first
        if total is None or step <= s0:
            return None
        return (now - t0) / (step - s0) * max(total - step, 0)


# Console: (key, label, format) of a training row, shown when present.
_CONSOLE = (
    ("loss", "loss", "{:.4g}"),
    ("reward_total/iqa", "reward iqa", "{:.3f}"),
    ("reward_total/iaa", "reward iaa", "{:.3f}"),
    ("kl", "kl", "{:.3g}"),
    ("parsed_frac/all", "parsed", "{:.0%}"),
    ("token_accuracy", "acc", "{:.3f}"),
    ("time/step", "", "{:.2f}s/step"),
)


def _duration(sec: float) -> str:
    sec = int(round(sec))
    h, rem = divmod(sec, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def console_line(
    step: int, values: Mapping[str, float], *, total: int | None = None, eta_s: float | None = None
) -> str:
    """One short line of a logged row: training (step, loss, reward per task, KL, parsed %,
    step time, ETA; skipped records and non-finite updates when there are any) or evaluation
    (per dataset SRCC / PLCC). Every metric is in the JSONL and TensorBoard."""
    head = f"step {step}/{total}" if total else f"step {step}"
    if "loss" not in values:
        evals: dict[str, list[str]] = {}
        for k, v in values.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("srcc", "plcc"):
                evals.setdefault(parts[1], []).append(f"{parts[2]} {_fmt(v)}")
        if evals:
            return " | ".join([f"{head} eval", *(f"{d} {' '.join(x)}" for d, x in evals.items())])
        return f"{head}: " + " ".join(f"{k}={_fmt(v)}" for k, v in list(values.items())[:8])
    parts = [head]
    for key, label, fmt in _CONSOLE:
        if key in values and math.isfinite(values[key]):
            parts.append(f"{label} {fmt.format(values[key])}".strip())
        elif key in values:
            parts.append(f"{label} {values[key]}".strip())
    if values.get("update_skipped"):
        parts.append(f"non-finite {values['update_skipped']:.0%}")
    if values.get("data/skipped_total"):
        parts.append(f"skipped {int(values['data/skipped_total'])}")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _console(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)  # keeps an active progress bar intact


class WindowMean:
    """Per-key means of the step metrics since the last logged step.

    GRPO rewards of one step are a handful of prompts: the logged value is the mean over the
    logging window (as TRL logs), not whichever step happened to land on the logging step. A key
    absent from some steps (e.g. IAA rewards in a step without IAA prompts) is averaged over the
    steps that have it. ``LAST`` keys are states, not rates: their latest value is kept.
    """

    LAST = ("lr", "nonfinite_count", "nonfinite_total")
    LAST_PREFIXES = ("data/skipped",)  # running counts

    def __init__(self) -> None:
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            x = _to_float(v)
            if k in self.LAST or k.startswith(self.LAST_PREFIXES):
                self._last[k] = x
                continue
            self._sum[k] = self._sum.get(k, 0.0) + x
            self._n[k] = self._n.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self._sum[k] / self._n[k] for k in self._sum}
        out.update(self._last)
        self.__init__()
        return out


class Progress:
    """tqdm bar over optimizer steps with rate and ETA; ``initial`` = resumed step."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = "train"):
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix({k: _fmt(_to_float(v)) for k, v in postfix.items()})
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class StepTimer:
    """Wall-clock split of a step: ``with timer("rollout"): ...``; ``metrics()`` -> time/<name>.

    Block on device results inside a section (``jax.block_until_ready``) or the time lands in the
    next section that waits.
    """

    def __init__(self) -> None:
        self._t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._t[name] = self._t.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self, reset: bool = True) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._t.items()}
        out["time/step"] = sum(self._t.values())
        if reset:
            self._t = {}
        return out


# --- GRPO summaries ----------------------------------------------------------------------------
