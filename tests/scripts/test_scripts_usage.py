"""Usage errors of the scripts, from the user's side: one line ``error: ...`` on stderr naming the
flag (and the allowed values), exit status 2, before any work (no model, no run directory)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GRPO = "--config=configs/grpo.py:tiny"


def _train(flag: str, complaint: str) -> tuple[list[str], str]:
    """``train.py`` on the tiny GRPO config with one bad ``--config.<field>=<value>``: the one
    error line names ``--config.<field>``, then says what is wrong."""
    field = flag.partition("=")[0]
    args = ["train.py", GRPO, "--workdir=/tmp/never", f"--config.{flag}"]
    return args, f"error: --config.{field}: {complaint}"


def _build_reasoning(*flags: str) -> list[str]:
    """``build_reasoning.py`` on the IQA preset, with the judge off (no second endpoint)."""
    preset = "--config=configs/reasoning.py:iqa"
    return ["build_reasoning.py", preset, *flags, "--config.judge.enabled=False"]


_STEPS = "must be -1 (whole epochs: data.num_epochs) or a positive number of steps, got"

# name -> (the bad ``--config.`` flag of train.py, what the error says about it)
TRAIN_CASES = {
    "train_enum": ("grpo.advantage=foo", "'foo' is not one of grpo, dr_grpo, rloo, batch_std"),
    "train_missing_hf_dir": ("model.hf_dir=/nonexistent", "no such directory: /nonexistent"),
    "train_unknown_data_set": (
        "data.train=nope",
        "unknown data set 'nope'; configured: synthetic, synthetic_test, user_iaa, user_iqa",
    ),
    # Issue 32 item 3: a non-finite or impossible hyper-parameter is never trained with.
    "train_nan_learning_rate": ("optimizer.learning_rate=nan", "must be a finite number, got nan"),
    "train_negative_learning_rate": ("optimizer.learning_rate=-1e-3", "must be >= 0, got -0.001"),
    "train_beta2_one": ("optimizer.b2=1.0", "must be < 1, got 1.0"),
    "train_infinite_temperature": ("grpo.temperature=inf", "must be a finite number, got inf"),
    # Issue 32 item 4: only -1 means whole epochs.
    "train_negative_total_steps": ("total_steps=-5", f"{_STEPS} -5"),
    "train_zero_total_steps": ("total_steps=0", f"{_STEPS} 0"),
    "train_negative_warmup_steps": (
        "warmup.total_steps=-7",
        "must be 0 (no warm-up) or a step count, got -7",
    ),
}

CASES = {
    "unknown_flag": (["eval.py", "--foo=1"], "error: Unknown command line flag 'foo'"),
    "unknown_config_field": (
        ["eval.py", "--config.eval.foo=1"],
        "error: --config.eval.foo: no such config field",
    ),
    "missing_config_file": (
        ["eval.py", "--config=configs/nofile.py"],
        "error: --config: No such file or directory: 'configs/nofile.py'",
    ),
    "unknown_dataset": (
        ["eval.py", "--datasets=KADID,LIVE", "--out_dir=/tmp/never"],
        "error: --datasets: unknown dataset 'LIVE'; choose from KonIQ-10K, SPAQ, KADID, PIPAL,"
        " ArtiMuse-10K, AVA, TAD66K, FLICKR-AES",
    ),
    "eval_missing_hf_dir": (
        [
            "eval.py",
            "--hf_dir=/nonexistent/ckpt",
            "--datasets=KADID",
            "--image_roots=KADID=/x",
            "--out_dir=/tmp/never",
        ],
        "error: --hf_dir: no such directory: /nonexistent/ckpt",
    ),  # fmt: skip
    "score_missing_image": (
        ["score.py", "--hf_dir=/nonexistent", "--image", "/nonexistent/x.png"],
        "error: --image: /nonexistent/x.png does not exist",
    ),
    "convert_missing_workdir": (
        ["convert_checkpoint.py", "--workdir=/nonexistent/run", "--hf_out=/tmp/never"],
        "error: --workdir: no such directory: /nonexistent/run",
    ),
    "convert_no_output": (
        ["convert_checkpoint.py", "--orbax_dir=/tmp"],
        "error: --orbax_dir needs --hf_out",
    ),
    **{name: _train(*case) for name, case in TRAIN_CASES.items()},
    "train_no_workdir": (
        ["train.py", GRPO],
        "error: flag --workdir=None: Flag --workdir must have a value other than None.",
    ),
    # Issue 32 item 7: every script's usage errors, one line, exit 2.
    "build_reasoning_missing_input": (
        _build_reasoning(
            "--config.input=/no/x.jsonl",
            "--config.score_range=(1.0, 5.0)",
            "--config.teacher.base_url=http://h/v1",
            "--config.teacher.model=m",
        ),
        "error: --config.input: no such file: /no/x.jsonl",
    ),
    "build_reasoning_teacher_kind": (
        _build_reasoning("--config.teacher.kind=magic"),
        "error: --config.teacher.kind: 'magic' is not one of openai, jax, none",
    ),
    "build_reasoning_empty_base_url": (
        _build_reasoning("--config.teacher.model=m"),
        "error: --config.teacher.base_url: empty (the endpoint URL, e.g. http://host:8000/v1)",
    ),
    "build_reasoning_file_url": (  # item 9: never handed to urllib
        _build_reasoning(
            "--config.teacher.model=m", "--config.teacher.base_url=file:///etc/passwd"
        ),
        "error: --config.teacher.base_url: must start with http:// or https://, got "
        "'file:///etc/passwd'",
    ),
    "plan_memory_unknown_model": (
        ["plan_memory.py", "--model=13b"],
        "error: --model: unknown preset '13b'; choose from 3b, 7b, 32b, 72b, tiny",
    ),
    "plan_memory_bad_mesh": (
        ["plan_memory.py", "--mesh=fsdp=abc"],
        "error: --mesh=fsdp=abc: entry 'fsdp=abc': the size must be a positive integer",
    ),
    "convert_bad_shard_size": (
        [
            "convert_checkpoint.py",
            "--orbax_dir=/tmp",
            "--hf_out=/tmp/never",
            "--max_shard_size=lots",
        ],
        "error: --max_shard_size: 'lots' is not a size (e.g. 5GB, 500MB or bytes)",
    ),
    # Item 9: accepted silently before.
    "score_both_weights": (
        ["score.py", "--hf_dir=/tmp", "--checkpoint=/tmp", "--image", "/tmp"],
        "error: give either --hf_dir or --checkpoint, not both",
    ),
    "eval_negative_limit": (
        [
            "eval.py",
            "--manifest=/tmp/x.jsonl",
            "--task=iqa",
            "--score_range=1,5",
            "--out_dir=/tmp/never",
            "--limit=-3",
        ],
        "error: --limit: must be -1 (every record) or a positive count, got -3",
    ),  # fmt: skip
    "make_synthetic_no_out": (
        ["make_synthetic.py"],
        "error: flag --out=None: Flag --out must have a value other than None.",
    ),
    "check_data_unknown": (
        ["check_data.py", "--dataset=LIVE"],
        "error: --dataset: unknown dataset 'LIVE'; built-in: KonIQ-10K",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_error_is_one_line_and_exit_2(case):
    (script, *args), expected = CASES[case]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    ours = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(ours) == 1 and ours[0].startswith(expected), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not pathlib.Path("/tmp/never").exists()
