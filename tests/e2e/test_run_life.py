"""A run's life from the user's side (scripts/train.py on the tiny SFT preset): resume past a
damaged latest checkpoint without logging a step twice, a finished run started again leaves
its records, a changed hyper-parameter is refused (exit 2) or recorded, bad records skipped
and counted or stopping the run, the compact console line.

One base run is shared by the module; the subprocesses share the session's persistent XLA cache
(tests/helpers/train_runs.py) with test_train_run.py's runs of the same flags."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from train_runs import SFT_TINY_FLAGS, run_script, train_env

FLAGS = [*SFT_TINY_FLAGS, "--config.checkpoint.keep=5"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, xla_cache_dir):
    return train_env(tmp_path_factory.mktemp("tok_cache"), xla_cache_dir)


def _train(workdir, flags, env):
    r = run_script("train.py", [f"--workdir={workdir}", *flags], env)
    return r.returncode, r.stdout, r.stderr


def _rows(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _params(step_dir):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as c:
        return c.restore(pathlib.Path(step_dir) / "state")["params"]


def _leaves(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    out = {}
    for key, sub in tree.items():
        out.update(_leaves(sub, f"{prefix}/{key}"))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, env):
    wd = tmp_path_factory.mktemp("life") / "sft"
    rc, out, err = _train(wd, FLAGS, env)
    assert rc == 0, err[-3000:]
    return wd, out


@pytest.mark.slow
def test_compact_console_and_damaged_latest_checkpoint(base, env):
    wd, out = base
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert len(lines) == 4 and lines[0].startswith("step 1/4 | loss ")
    assert "s/step" in lines[0] and "ETA" in lines[1] and "grad_norm" not in out
    assert "grad_norm" in _rows(wd)[0]  # every metric still in the JSONL
    want = _leaves(_params(wd / "checkpoints" / "4"))
    # Damage the latest step (half of its largest data file), as a full disk or a bad copy
    # would; the run resumes from step 3, logs step 4 once, and ends bit-identical.
    big = max((wd / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    rc, out, err = _train(wd, FLAGS, env)
    assert rc == 0, err[-3000:]
    moved = wd / "checkpoints_damaged" / "4"
    assert f"checkpoint step 4 is damaged: moved to {moved}; resuming from step 3" in out
    assert "checkpoints/4 is damaged: ValueError: OUT_OF_RANGE" in err
    # Issue 32 item 5: no asyncio noise from the failed restore after a successful recovery.
    assert "Event loop is closed" not in err and "Exception ignored" not in err
    assert "Task exception was never retrieved" not in err and "Traceback" not in err
    assert "resumed sft from" in out and (moved / "state").is_dir()
    train_steps = [r["step"] for r in _rows(wd) if "loss" in r]
    assert train_steps == [1, 2, 3, 4]  # step 4's first row was dropped, then re-logged
    got = _leaves(_params(wd / "checkpoints" / "4"))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_finished_run_keeps_its_records_and_config_changes_need_the_flag(base, env):
    wd, _ = base
    files = ("summary.json", "metrics.jsonl", "run_config.json")
    before = {f: (wd / f).read_text() for f in files}
    assert json.loads(before["summary.json"])["sft"]["last_metrics"]["loss"] > 0
    rc, out, err = _train(wd, FLAGS, env)
    assert rc == 0, err[-3000:]
    assert {f: (wd / f).read_text() for f in files} == before

    changed = [*FLAGS, "--config.optimizer.learning_rate=0.002", "--config.total_steps=5"]
    rc, out, err = _train(wd, changed, env)
    assert rc == 2
    msg = [x for x in err.splitlines() if x.startswith("train.py: ")]
    assert len(msg) == 1 and "resumes from step 4 with a config that differs" in msg[0]
    assert "optimizer.learning_rate: 0.001 -> 0.002; total_steps: 4 -> 5" in msg[0]
    assert (wd / "run_config.json").read_text() == before["run_config.json"]

    rc, out, err = _train(wd, [*changed, "--allow_config_change"], env)
    assert rc == 0, err[-3000:]
    rec = json.loads((wd / "config_changes.jsonl").read_text().splitlines()[-1])
    assert rec["resume_step"] == 4 and rec["changes"]["total_steps"] == [4, 5]
    assert rec["changes"]["optimizer.learning_rate"] == [0.001, 0.002]
    assert [r["step"] for r in _rows(wd) if "loss" in r] == [1, 2, 3, 4, 5]
    assert json.loads((wd / "summary.json").read_text())["sft"]["step"] == 5


def _user_manifests(base_wd, tmp_path):
    """Five IQA and eight IAA rows of the base run's synthetic set (absolute image paths, so
    with the explicit allow_absolute_images opt-out); IQA row 3's image is junk."""
    syn = base_wd / "synthetic"
    out = {}
    for task, n in (("iqa", 5), ("iaa", 8)):
        rows = [json.loads(x) for x in (syn / f"{task}_train.jsonl").read_text().splitlines()]
        rows = [dict(r, image=str(syn / r["image"])) for r in rows[:n]]
        if task == "iqa":
            junk = tmp_path / "junk.png"
            junk.write_bytes(b"not a png")
            rows[3]["image"] = str(junk)
        out[task] = tmp_path / f"{task}.jsonl"
        out[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--config.data.train=('user_iqa','user_iaa')"]
    for task, rng in (("iqa", "(1.0,5.0)"), ("iaa", "(0.0,10.0)")):
        s = f"--config.data.sources.user_{task}"
        flags += [f"{s}.manifest={out[task]}", f"{s}.score_range={rng}",
                  f"{s}.target_field=rationale",
                  f"{s}.allow_absolute_images=True"]  # fmt: skip
    return flags


@pytest.mark.slow
def test_bad_record_skip_counts_error_and_budget_stop(base, env, tmp_path):
    data = _user_manifests(base[0], tmp_path)
    wd = tmp_path / "skip"
    skip = [*FLAGS, *data, "--config.data.bad_record=skip", "--config.data.max_skip_fraction=0.25"]
    rc, out, err = _train(wd, skip, env)
    assert rc == 0, err[-3000:]
    logged = [x for x in err.splitlines() if "skipped dataset 'user_iqa'" in x]
    assert len(logged) == 1 and "row 3 (image" in logged[0] and "junk.png" in logged[0]
    rows = [r for r in _rows(wd) if "loss" in r]
    assert rows[-1]["data/skipped/user_iqa"] == 1 and rows[-1]["data/skipped/user_iaa"] == 0
    assert all(r["sequences"] == 4 for r in rows)  # refilled: every batch is full
    summary = json.loads((wd / "summary.json").read_text())["sft"]
    assert summary["skipped_records"] == {"user_iqa": 1, "user_iaa": 0}

    # The same data with the default bad_record="error": the first bad record stops the run.
    rc, out, err = _train(tmp_path / "error", [*FLAGS, *data], env)
    assert rc == 1
    line = [x for x in err.splitlines() if x.startswith("train.py: ")]
    assert len(line) == 1 and "Traceback" not in err
    assert line[0].startswith("train.py: BadRecordError: dataset 'user_iqa' (")
    assert "row 3 (image" in line[0] and "junk.png'): ImageLoadError: " in line[0]
    assert line[0].endswith("not a readable image (unknown or corrupt format)")
    # Skipping more than data.max_skip_fraction (1 of 5 > 10 %) stops with the count.
    budget = [*skip[:-1], "--config.data.max_skip_fraction=0.1"]
    rc, out, err = _train(tmp_path / "budget", budget, env)
    assert rc == 1
    want = "train.py: TooManySkippedError: dataset 'user_iqa': 1 of 5 records skipped (20.0%)"
    assert want in err and "Traceback" not in err


def _damage(step_dir):
    big = max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])


def _errors(err):
    return [x for x in err.splitlines() if x.startswith("error: ")]


@pytest.mark.slow
def test_every_checkpoint_damaged_is_one_line_and_moved_aside(base, env, tmp_path):
    """Issue 32 item 5: every step damaged -> one line naming each step's damage, exit 1, no
    traceback and no asyncio "Event loop is closed" noise; the steps are moved aside (never
    deleted) as with one damaged step, so the next start is a fresh run."""
    import shutil

    wd = tmp_path / "sft"
    shutil.copytree(base[0], wd)
    shutil.rmtree(wd / "checkpoints_damaged", ignore_errors=True)  # an earlier test's
    steps = sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    for s in steps:
        _damage(wd / "checkpoints" / s)
    # an earlier test of this module may have extended base's run with a recorded config change
    rc, out, err = _train(wd, [*FLAGS, "--allow_config_change"], env)
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert "Exception ignored" not in err and "never retrieved" not in err
    (line,) = _errors(err)
    newest = max(steps, key=int)  # the newest step's damage is named first
    assert line.startswith(
        f"error: no checkpoint in {wd / 'checkpoints'} can be restored (step {newest}: "
    )
    assert all(f"step {s}: ValueError: OUT_OF_RANGE" in line for s in steps)
    assert line.endswith(
        f"); moved to {wd / 'checkpoints_damaged'}: rerun to start the run again from step 0"
    )
    assert sorted(p.name for p in (wd / "checkpoints_damaged").iterdir()) == steps
    assert not [p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_damaged_inputs_of_a_run_are_one_line_naming_the_file(base, env, tmp_path):
    """Issue 32 item 6: a corrupt run_config.json on resume, a NaN score or a missing SFT target
    in a user manifest -> one line naming the file (and row), exit 1; --workdir naming a regular
    file -> a usage error, exit 2."""
    import shutil

    wd = tmp_path / "sft"
    shutil.copytree(base[0], wd)
    (wd / "run_config.json").write_text('{"stage": ')
    rc, _, err = _train(wd, FLAGS, env)
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert _errors(err) == [
        f"error: {wd / 'run_config.json'}: not valid JSON (line 1 column 11: Expecting value)"
    ]
    rows = {
        "nan": '{"image": "0.png", "gt_score": NaN, "why": "<think>a</think><answer>3</answer>"}\n',
        "target": '{"image": "0.png", "gt_score": 2}\n',
    }
    want = {
        "nan": "row 0 (image '0.png'): field 'gt_score': score nan is not finite",
        "target": "row 0 (image '0.png'): missing or non-text field 'why'",
    }
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(row)
        user = [
            "--config=configs/sft.py:tiny", "--config.data.train=('user_iqa',)",
            f"--config.data.sources.user_iqa.manifest={path}",
            "--config.data.sources.user_iqa.score_range=(1.0, 5.0)",
            "--config.data.sources.user_iqa.target_field=why", "--config.eval.datasets=()",
        ]  # fmt: skip
        rc, _, err = _train(tmp_path / f"w_{name}", user, env)
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        assert _errors(err) == [f"error: dataset 'user_iqa': {path}: {want[name]}"]
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    rc, _, err = _train(a_file, ["--config=configs/sft.py:tiny"], env)
    assert rc == 2 and _errors(err) == [f"error: --workdir: {a_file} exists and is not a directory"]
    assert a_file.read_text() == "mine"
