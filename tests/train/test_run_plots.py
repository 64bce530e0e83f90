"""tatar_jax.train.run_plots and scripts/plot_run.py: the curves read back from a run directory are
the logged numbers, the PNGs are written, several runs go side by side, and a real tiny run
(SFT warm-up + GRPO, scripts/train.py) leaves ``plots/`` and the console table."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest
from train_runs import run_script, train_env

from tatar_jax.train import run_plots

ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _eval(iqa: tuple[float, float], iaa: tuple[float, float]) -> dict:
    out = {}
    for task, (s, p) in (("iqa", iqa), ("iaa", iaa)):
        out[f"eval/synthetic-{task}-test/srcc"] = s
        out[f"eval/synthetic-{task}-test/plcc"] = p
        out[f"eval/synthetic-{task}-test/frac_unparsed"] = 1.0 if math.isnan(s) else 0.0
    return out


def _write(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_run(wd: pathlib.Path, shift: float = 0.0) -> pathlib.Path:
    """An embedded-default run directory: SFT warm-up (eval at start and end) then 3 GRPO steps."""
    _write(wd / "sft" / "metrics.jsonl", [
        {"step": 0, **_eval((NAN, NAN), (NAN, NAN))},
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
        {"step": 2, **_eval((0.5, 0.4), (-0.1, 0.0))},
    ])  # fmt: skip
    grpo = []
    for s in (1, 2, 3):
        grpo.append({
            "step": s, "reward_total/iqa": 1.0 + s / 10 + shift, "reward/format/iqa": 1.0,
            "reward/accuracy/iqa": s / 10, "reward/thurstone/iqa": 0.0,
            "reward_total/iaa": 1.5 + shift, "reward/format/iaa": 0.9,
            "reward/thurstone/iaa": 0.6, "reward/accuracy/iaa": 0.0,
        })  # fmt: skip
    grpo.append({"step": 3, **_eval((0.6 + shift, 0.55), (0.2, 0.25))})
    _write(wd / "metrics.jsonl", grpo)
    weights = {"iqa": {"format": 1.0, "accuracy": 1.0, "thurstone": 0.0},
               "iaa": {"format": 1.0, "accuracy": 0.0, "thurstone": 1.0}}  # fmt: skip
    (wd / "run_config.json").write_text(
        json.dumps({"stage": "grpo", "rewards": {"weights": weights}})
    )
    return wd


def test_read_run_phases_and_curves(tmp_path):
    run = run_plots.read_run(_fake_run(tmp_path / "a"))
    ph = run_plots.eval_phases(run)
    assert list(ph) == ["before SFT", "after SFT", "after GRPO"]
    assert math.isnan(ph["before SFT"]["iqa"]["srcc"])
    assert ph["before SFT"]["iaa"]["frac_unparsed"] == 1.0
    assert ph["after SFT"]["iqa"] == {"srcc": 0.5, "plcc": 0.4, "frac_unparsed": 0.0}
    assert ph["after GRPO"]["iaa"] == {"srcc": 0.2, "plcc": 0.25, "frac_unparsed": 0.0}
    iqa = run_plots.reward_curves(run, "iqa")
    # thurstone has weight 0 for IQA: not a curve of that task
    assert list(iqa) == ["total", "format", "accuracy"]
    assert iqa["accuracy"] == ([1, 2, 3], [0.1, 0.2, 0.3])
    assert iqa["total"][1] == pytest.approx([1.1, 1.2, 1.3])
    assert list(run_plots.reward_curves(run, "iaa")) == ["total", "format", "thurstone"]
    table = run_plots.eval_table(run)
    assert "GRPO - SFT" in table
    diff = table.splitlines()[-1].split()[-4:]
    assert [float(x) for x in diff] == pytest.approx([0.1, 0.15, 0.3, 0.25])


def test_grpo_run_from_a_checkpoint_has_its_start_as_after_sft(tmp_path):
    wd = tmp_path / "g"
    _write(wd / "metrics.jsonl", [
        {"step": 0, **_eval((0.3, 0.3), (0.1, 0.1))}, {"step": 1, "reward_total/iqa": 1.0},
        {"step": 1, **_eval((0.4, 0.35), (0.2, 0.1))},
    ])  # fmt: skip
    ph = run_plots.eval_phases(run_plots.read_run(wd))
    assert list(ph) == ["after SFT", "after GRPO"]
    assert ph["after SFT"]["iqa"]["srcc"] == 0.3 and ph["after GRPO"]["iqa"]["srcc"] == 0.4


def test_write_plots_side_by_side(tmp_path):
    runs = [run_plots.read_run(_fake_run(tmp_path / n, s), n) for n, s in (("a", 0.0), ("b", 0.5))]
    figs = run_plots.write_plots(runs, tmp_path / "out")
    assert set(figs) == {"rewards_iqa", "rewards_iaa", "reward_total", "eval_srcc_plcc", "sft_loss"}
    for fig in figs.values():
        assert pathlib.Path(fig["path"]).read_bytes()[:8] == PNG
    total = figs["reward_total"]["curves"]["iaa"]
    assert total["a"] == ([1, 2, 3], [1.5] * 3) and total["b"] == ([1, 2, 3], [2.0] * 3)
    assert figs["eval_srcc_plcc"]["phases"]["b"]["after GRPO"]["iqa"]["srcc"] == 1.1
    assert figs["sft_loss"]["curves"]["a"] == ([1, 2], [3.0, 2.0])


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_plots.read_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        run_plots.read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        run_plots.read_run(tmp_path)


def _script(args, env=None):
    return subprocess.run(
        [sys.executable, "scripts/plot_run.py", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_plot_run_usage_error(tmp_path):
    p = _script([f"--workdir={tmp_path / 'nope'}"])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path / 'nope'}: no such directory"
    ]


@pytest.mark.slow
def test_tiny_run_leaves_plots_and_plot_run_redraws_them(tmp_path, xla_cache_dir):
    """scripts/train.py on configs/grpo.py:tiny with a 2-step SFT warm-up and 2 GRPO steps."""
    env = train_env(tmp_path / "cache", xla_cache_dir)
    wd = tmp_path / "run"
    args = [
        "--config=configs/grpo.py:tiny", f"--workdir={wd}",
        "--config.warmup.total_steps=2", "--config.total_steps=2", "--config.eval.at_start=True",
        "--config.warmup.eval.at_start=True",  # the warm-up's own flag: "before SFT"
        "--config.eval.max_examples=4", "--config.model.remat=False", "--config.grpo.beta=0.0",
        "--config.logging.tensorboard=False",
    ]  # fmt: skip
    p = run_script("train.py", args, env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "held-out evaluation" in p.stdout and "GRPO - SFT" in p.stdout
    names = ("rewards_iqa", "rewards_iaa", "reward_total", "eval_srcc_plcc", "sft_loss")
    for n in names:
        assert (wd / "plots" / f"{n}.png").read_bytes()[:8] == PNG
    run = run_plots.read_run(wd)
    assert list(run_plots.eval_phases(run)) == ["before SFT", "after SFT", "after GRPO"]
    logged = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["reward_total/iqa"]) for r in logged if "reward_total/iqa" in r]
    got = run_plots.reward_curves(run, "iqa")["total"]
    assert list(zip(*got, strict=True)) == want and [s for s, _ in want] == [1, 2]
    assert set(run_plots.reward_curves(run, "iaa")) >= {"total", "format", "thurstone"}

    out = tmp_path / "cmp"
    q = _script(
        [f"--workdir={wd}", f"--workdir={wd}", "--label=a", "--label=b", f"--out={out}"], env
    )
    assert q.returncode == 0, q.stderr[-3000:]
    assert q.stdout.count("held-out evaluation") == 2
    for n in names:
        assert (out / f"{n}.png").read_bytes()[:8] == PNG
