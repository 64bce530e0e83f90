"""The curves a user looks at after a training run: rewards per task and per reward function over
the GRPO steps, held-out SRCC / PLCC before SFT, after SFT and after GRPO, and the SFT loss.

    from tatar_jax.train import run_plots
    data = run_plots.write_plots(["/runs/a"], "/runs/a/plots")   # PNGs + the plotted data
    print(run_plots.eval_table(run_plots.read_run("/runs/a")))

A run directory is what :func:`tatar_jax.train.trainer.run` leaves: ``metrics.jsonl`` of the
configured stage and, for the embedded default, the SFT warm-up's ``sft/metrics.jsonl``. The
warm-up's evaluation at its start is "before SFT", its evaluation at its end "after SFT"; a GRPO run
started from another directory's checkpoint has its own evaluation at start as "after SFT".
Several runs are drawn side by side (one line style per run) in the same figures.

Files (PNG, matplotlib Agg): ``rewards_iqa.png`` / ``rewards_iaa.png`` (total reward and each
reward function with a non-zero curve, per logged step), ``reward_total.png`` (total per task, all
runs), ``eval_srcc_plcc.png`` (held-out SRCC and PLCC per task at the three phases),
``sft_loss.png`` when an SFT stage was logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

TASKS = ("iqa", "iaa")
PHASES = ("before SFT", "after SFT", "after GRPO")
METRICS = ("srcc", "plcc")

Curve = tuple[list[int], list[float]]  # (steps, values)


@dataclasses.dataclass
class RunData:
    """The logged records of one run directory (last record per step when a resumed run logged
    a step twice). ``sft`` / ``grpo``: ``{step: {metric: value}}`` ({} when the stage is absent);
    ``weights``: the run's ``rewards.weights`` (``{task: {function: weight}}``, {} if unknown)."""

    workdir: str
    label: str
    sft: dict[int, dict[str, float]]
    grpo: dict[int, dict[str, float]]
    weights: dict[str, dict[str, float]]


def _read_jsonl(path: pathlib.Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return rows
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not a JSON line ({err})") from err
            step = int(rec.pop("step"))
            rows.setdefault(step, {}).update(rec)
    return rows


def read_run(workdir: str | os.PathLike, label: str | None = None) -> RunData:
    """The metrics of a run directory; a directory without any ``metrics.jsonl`` is an error."""
    wd = pathlib.Path(workdir)
    if not wd.is_dir():
        raise FileNotFoundError(f"run directory {wd} does not exist")
    top = _read_jsonl(wd / "metrics.jsonl")
    rc = {}
    if (wd / "run_config.json").is_file():
        rc = json.loads((wd / "run_config.json").read_text())
    stage = rc.get("stage", "")
    sft = _read_jsonl(wd / "sft" / "metrics.jsonl")
    grpo = top
    if stage == "sft":
        sft, grpo = top, {}
    if not sft and not grpo:
        raise FileNotFoundError(f"{wd} holds no metrics.jsonl (nor sft/metrics.jsonl)")
    weights = (rc.get("rewards") or {}).get("weights") or {}
    return RunData(str(wd), label or wd.name, sft, grpo, weights)


def curve(rows: Mapping[int, Mapping[str, float]], key: str) -> Curve:
    """(steps, values) of metric ``key`` over the logged steps that have it."""
    steps = sorted(s for s, r in rows.items() if key in r)
    return steps, [float(rows[s][key]) for s in steps]


def reward_curves(run: RunData, task: str) -> dict[str, Curve]:
    """GRPO reward curves of one task: ``total`` and every function logged as
    ``reward/<function>/<task>`` (unweighted values) whose weight for ``task`` is not 0, in the
    order first logged."""
    out = {"total": curve(run.grpo, f"reward_total/{task}")}
    weights = run.weights.get(task, {})
    names: list[str] = []
    for rec in run.grpo.values():
        for k in rec:
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "reward" and parts[2] == task:
                if parts[1] not in names and float(weights.get(parts[1], 1.0)) != 0.0:
                    names.append(parts[1])
    for name in names:
        out[name] = curve(run.grpo, f"reward/{name}/{task}")
    return {k: v for k, v in out.items() if v[0]}


def _eval_at(rows: Mapping[int, Mapping[str, float]], first: bool) -> dict[str, float]:
    """The evaluation at step 0 (``first``) or the last one after step 0; {} if there is none."""
    steps = sorted(s for s, r in rows.items() if any(k.startswith("eval/") for k in r))
    steps = [s for s in steps if (s == 0) == first]
    if not steps:
        return {}
    rec = rows[steps[0] if first else steps[-1]]
    return {k: v for k, v in rec.items() if k.startswith("eval/")}


def _task_metric(ev: Mapping[str, float], task: str, metric: str) -> float:
    """The value of ``eval/<dataset>/<metric>`` for the (first) dataset of ``task``; NaN if none."""
    for k, v in ev.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[2] == metric and task in parts[1].split("-"):
            return float(v)
    return math.nan


def eval_phases(run: RunData) -> dict[str, dict[str, dict[str, float]]]:
    """Held-out metrics ``{phase: {task: {"srcc", "plcc", "frac_unparsed"}}}`` for the phases of
    :data:`PHASES` the run has (NaN = not evaluated there, or nothing parsed)."""
    evals = {
        "before SFT": _eval_at(run.sft, first=True),
        "after SFT": _eval_at(run.sft, first=False) or _eval_at(run.grpo, first=True),
        "after GRPO": _eval_at(run.grpo, first=False) if run.grpo else {},
    }
    out: dict[str, dict[str, dict[str, float]]] = {}
    for phase, ev in evals.items():
        if ev:
            out[phase] = {
                t: {m: _task_metric(ev, t, m) for m in (*METRICS, "frac_unparsed")} for t in TASKS
            }
    return out


def eval_table(run: RunData) -> str:
    """A console table of :func:`eval_phases`, plus the GRPO-minus-SFT change when both exist."""
    ph = eval_phases(run)
    cols = [(t, m) for t in TASKS for m in METRICS]

    def row(name: str, vals: Mapping[str, Mapping[str, float]]) -> str:
        cells = ("      -" if math.isnan(vals[t][m]) else f"{vals[t][m]:+7.3f}" for t, m in cols)
        return f"{name:<12}" + "".join(f"{c:>10}" for c in cells)

    head = f"{'held-out':<12}" + "".join(f"{t.upper() + ' ' + m.upper():>10}" for t, m in cols)
    lines = [f"[tatar-jax] {run.label}: held-out evaluation ('-' = nothing parsed)", head]
    lines += [row(phase, vals) for phase, vals in ph.items()]
    if "after SFT" in ph and "after GRPO" in ph:
        a, b = ph["after SFT"], ph["after GRPO"]
        diff = {t: {m: b[t][m] - a[t][m] for m in METRICS} for t in TASKS}
        lines.append(row("GRPO - SFT", diff))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless; never opens a window
    import matplotlib.pyplot as plt

    return plt


_STYLES = ("-", "--", ":", "-.")
# One marker per run too: a run with one evaluated phase draws a point, which has no line style.
_MARKERS = ("o", "s", "^", "D")


def _save(fig: Any, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    _pyplot().close(fig)
    return os.fspath(path)


def _reward_figure(runs: Sequence[RunData], task: str, path: pathlib.Path) -> dict[str, Any]:
    """Total and per-function rewards of ``task`` over the GRPO steps, one style per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    data = {}
    for i, run in enumerate(runs):
        curves = reward_curves(run, task)
        data[run.label] = curves
        for j, (name, (x, y)) in enumerate(curves.items()):
            label = name if len(runs) == 1 else f"{run.label}: {name}"
            ax.plot(x, y, _STYLES[i % len(_STYLES)], color=f"C{j}", marker=".", label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the step's completions")
    ax.set_title(f"{task.upper()} rewards (total = weighted sum; functions unweighted)")
    if any(data.values()):
        ax.legend(fontsize=7)
    return {"path": _save(fig, path), "curves": data}


def _total_figure(runs: Sequence[RunData], path: pathlib.Path) -> dict[str, Any]:
    """The total reward of each task over the GRPO steps, all runs in one axes per task."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    data: dict[str, dict[str, Curve]] = {}
    for ax, task in zip(axes, TASKS, strict=True):
        data[task] = {}
        for i, run in enumerate(runs):
            x, y = curve(run.grpo, f"reward_total/{task}")
            data[task][run.label] = (x, y)
            ax.plot(x, y, _STYLES[i % len(_STYLES)], marker=".", label=run.label)
        ax.set_xlabel("GRPO step")
        ax.set_title(f"{task.upper()} total reward")
        ax.legend(fontsize=7)
    return {"path": _save(fig, path), "curves": data}


def _eval_figure(runs: Sequence[RunData], path: pathlib.Path) -> dict[str, Any]:
    """Held-out SRCC and PLCC per task at each phase (NaN = nothing parsed / not evaluated)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    data = {run.label: eval_phases(run) for run in runs}
    for ax, task in zip(axes, TASKS, strict=True):
        for i, run in enumerate(runs):
            ph = data[run.label]
            xs = [k for k, p in enumerate(PHASES) if p in ph]
            for j, m in enumerate(METRICS):
                ys = [ph[PHASES[k]][task][m] for k in xs]
                label = m.upper() if len(runs) == 1 else f"{run.label}: {m.upper()}"
                style, marker = _STYLES[i % len(_STYLES)], _MARKERS[i % len(_MARKERS)]
                ax.plot(xs, ys, style, color=f"C{j}", marker=marker, label=label)
        ax.set_xticks(range(len(PHASES)), PHASES)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"{task.upper()} held-out (missing point = nothing parsed)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("correlation with ground truth")
    return {"path": _save(fig, path), "phases": data}


def _sft_loss_figure(runs: Sequence[RunData], path: pathlib.Path) -> dict[str, Any]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    data = {}
    for i, run in enumerate(runs):
        data[run.label] = curve(run.sft, "loss")
        ax.plot(*data[run.label], _STYLES[i % len(_STYLES)], label=run.label)
    ax.set_xlabel("SFT step")
    ax.set_ylabel("loss")
    ax.set_title("SFT warm-up loss")
    ax.legend(fontsize=7)
    return {"path": _save(fig, path), "curves": data}


def write_plots(
    runs: Sequence[RunData | str | os.PathLike], out_dir: str | os.PathLike
) -> dict[str, dict[str, Any]]:
    """Draws the figures of the module docstring for ``runs`` (run directories or
    :class:`RunData`) into ``out_dir``. Returns ``{figure name: {"path": png, <plotted data>}}``
    (the data is what was drawn: curves as (steps, values), phases as :func:`eval_phases`)."""
    rs = [r if isinstance(r, RunData) else read_run(r) for r in runs]
    if not rs:
        raise ValueError("write_plots needs at least one run")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, dict[str, Any]] = {}
    if any(r.grpo for r in rs):
        for task in TASKS:
            figs[f"rewards_{task}"] = _reward_figure(rs, task, out / f"rewards_{task}.png")
        figs["reward_total"] = _total_figure(rs, out / "reward_total.png")
    figs["eval_srcc_plcc"] = _eval_figure(rs, out / "eval_srcc_plcc.png")
    if any(r.sft for r in rs):
        figs["sft_loss"] = _sft_loss_figure(rs, out / "sft_loss.png")
    return figs
