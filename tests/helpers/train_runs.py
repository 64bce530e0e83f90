"""``scripts/train.py`` (and the other scripts) as subprocesses of the tests: one environment and
the tiny SFT flags shared by tests/e2e/test_train_run.py, test_run_life.py,
test_scripts_after_training.py and tests/train/test_run_plots.py, test_reward_plugins.py; and the
``trainer.run`` worker processes of tests/e2e/test_train_multidevice.py and
test_grpo_dynamic_sampling.py (:func:`start_workers`, :func:`worker_config`, :func:`finish`).

The runs are single-device CPU processes (``XLA_FLAGS`` cleared: no 8 virtual devices) and share
the session's persistent XLA compilation cache (tests/conftest.py ``xla_cache_dir``), so a step
program that one module's run compiled is read back by the next run of the same shapes. The
cache is bounded (``JAX_COMPILATION_CACHE_MAX_SIZE``), which makes jax lock it: concurrent
processes (pytest-xdist workers) never read a half-written entry.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
from typing import Any

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


# --------------------------------------------------------------------------------------------
# Worker processes: ``python -c CODE pid port nproc devices workdir [args...]``, where CODE starts
# with ``cfg = train_runs.worker_config()`` (this module imports no jax: the worker sets its device
# count before jax loads).


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker: this process's, with tests/helpers and the repository on
    ``PYTHONPATH`` and ``XLA_FLAGS`` left to the worker (its device count); ``extra`` added."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "helpers"), str(ROOT)])
    env.update(extra)
    return env


def free_port() -> str:
    """A free localhost TCP port, for the ``jax.distributed`` coordinator of a worker group."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return str(sock.getsockname()[1])


def start_workers(
    code: str,
    nproc: int,
    devices: int,
    workdir: str | os.PathLike,
    *args: Any,
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    """Starts the ``nproc`` workers of one ``jax.distributed`` group of ``nproc`` processes x
    ``devices`` CPU devices each (on a free coordinator port), stdout and stderr merged
    as text; ``args`` follow the workdir on their command lines."""
    port = free_port() if nproc > 1 else "0"
    common = [str(nproc), str(devices), str(workdir), *map(str, args)]
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, str(pid), port, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or worker_env(),
            cwd=ROOT,
        )
        for pid in range(nproc)
    ]


def worker_config(argv: list[str] | None = None) -> Any:
    """In a worker, before anything imports jax: ``devices`` CPU devices (``argv`` = pid, port,
    nproc, devices, ...; default ``sys.argv[1:]``), gloo collectives when ``nproc`` > 1, and
    ``tiny_runs.tiny_config(fsdp=-1)`` (fsdp over every device of the group) whose mesh joins
    the group's coordinator on localhost."""
    pid, port, nproc, devices = (argv or sys.argv[1:])[:4]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax

    if int(nproc) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import tiny_runs

    cfg = tiny_runs.tiny_config(fsdp=-1)
    if int(nproc) > 1:
        cfg.mesh.coordinator_address = f"localhost:{port}"
        cfg.mesh.num_processes = int(nproc)
        cfg.mesh.process_id = int(pid)
    return cfg


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Waits for a worker and returns its output; a failed worker fails the test with its
    traceback (a process that dies takes the others down at jax's shutdown barrier)."""
    out, _ = proc.communicate(timeout=timeout)
    cut = out.find("Traceback")
    assert proc.returncode == 0, out[-5000:] if cut < 0 else out[cut : cut + 5000]
    return out
