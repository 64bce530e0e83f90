"""Redraw the plots of training runs and print their held-out before/after tables.

    python scripts/plot_run.py --workdir=/tmp/grpo                  # -> /tmp/grpo/plots/
    python scripts/plot_run.py --workdir=/tmp/grpo --workdir=/tmp/grpo_ref \\
        --label=tatar --label=reference --out=/tmp/compare          # several runs side by side

A workdir is a ``scripts/train.py`` run directory (its ``metrics.jsonl`` and, for the embedded
default, ``sft/metrics.jsonl``). Figures: see :mod:`tatar_jax.train.run_plots`. Default ``--out``:
``<workdir>/plots`` for one run, ``<first workdir>/plots_compare`` for several.
"""

from __future__ import annotations

import pathlib

from absl import flags

from tatar_jax import cli_errors
from tatar_jax.train import run_plots

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "run directory (repeat for several runs)")
_LABEL = flags.DEFINE_multi_string("label", None, "legend name per --workdir (default: its name)")
_OUT = flags.DEFINE_string("out", None, "folder for the PNGs")


def _usage_error(msg: str) -> None:
    raise cli_errors.UsageError(msg)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {argv[1:]}")
    wds = list(_WORKDIR.value or [])
    labels = list(_LABEL.value or [])
    if not wds:
        _usage_error("give at least one --workdir=DIR")
    if labels and len(labels) != len(wds):
        _usage_error(f"{len(labels)} --label for {len(wds)} --workdir: give one per workdir")
    runs = []
    for i, wd in enumerate(wds):
        if not pathlib.Path(wd).is_dir():
            _usage_error(f"--workdir={wd}: no such directory")
        try:
            runs.append(run_plots.read_run(wd, labels[i] if labels else None))
        except (FileNotFoundError, ValueError) as err:
            _usage_error(f"--workdir={wd}: {err}")
    default = pathlib.Path(wds[0]) / ("plots" if len(wds) == 1 else "plots_compare")
    out = pathlib.Path(_OUT.value) if _OUT.value else default
    figs = run_plots.write_plots(runs, out)
    for run in runs:
        print(run_plots.eval_table(run))
    for name, fig in figs.items():
        print(f"{name}: {fig['path']}")


if __name__ == "__main__":
    cli_errors.run_script(main)
