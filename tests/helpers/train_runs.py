"""``scripts/train.py`` (and the other scripts) as subprocesses of the tests: one environment and
the tiny SFT flags shared by tests/e2e/test_train_run.py, test_run_life.py,
test_scripts_after_training.py and tests/train/test_run_plots.py, test_reward_plugins.py.

The runs are single-device CPU processes (``XLA_FLAGS`` cleared: no 8 virtual devices) and share
the session's persistent XLA compilation cache (tests/conftest.py ``xla_cache_dir``), so a step
program that one module's run compiled is read back by the next run of the same shapes. The
cache is bounded (``JAX_COMPILATION_CACHE_MAX_SIZE``), which makes jax lock it: concurrent
processes (pytest-xdist workers) never read a half-written entry.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# configs/sft.py:tiny for 4 steps with a checkpoint after every step, no held-out evaluation.
SFT_TINY_FLAGS = (
    "--config=configs/sft.py:tiny",
    "--config.total_steps=4",
    "--config.checkpoint.every_steps=1",
    "--config.eval.datasets=()",
    "--config.model.remat=False",
)


def train_env(
    tok_cache: pathlib.Path, xla_cache: pathlib.Path | None = None, helpers: bool = False
) -> dict[str, str]:
    """The environment of a script subprocess: CPU, one device, ``TATAR_JAX_CACHE=tok_cache``,
    the repository (and ``tests/helpers`` when ``helpers``) on ``PYTHONPATH``, the persistent
    compilation cache in ``xla_cache`` when given (every compiled program is kept)."""
    path = [str(ROOT)] + ([str(ROOT / "tests" / "helpers")] if helpers else [])
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",  # one device: the runs under test are single-device
        TATAR_JAX_CACHE=str(tok_cache),
        PYTHONPATH=os.pathsep.join(path),
    )
    if xla_cache is not None:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(xla_cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            JAX_COMPILATION_CACHE_MAX_SIZE=str(4 << 30),
        )
    return env


def script_cmd(script: str, *args: str) -> list[str]:
    """``python scripts/<script> args...`` (run with ``cwd=ROOT``)."""
    return [sys.executable, f"scripts/{script}", *args]


def run_script(script: str, args, env, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Runs ``scripts/<script>`` to the end, stdout and stderr captured as text."""
    return subprocess.run(
        script_cmd(script, *args), cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
