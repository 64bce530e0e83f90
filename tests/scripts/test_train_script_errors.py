"""scripts/train.py's top level: an operating-system I/O error (a full disk) ends the run with
one line naming errno and path and exit status 1, not pages of tracebacks.

The failure is injected into ``tatar_jax.train.run`` in a subprocess (a real full disk needs a
small filesystem; the tensorstore text below is what orbax raised on a 200 MB tmpfs)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

TS_TEXT = (
    'RESOURCE_EXHAUSTED: Error writing "opt_state.x/0.0" in OCDBT database at local file '
    '"/w/checkpoints/2.orbax-checkpoint-tmp/state/": Failed writing: "/w/checkpoints/2.orbax-'
    'checkpoint-tmp/state/d/c5f6": Failed to write 18026496 bytes to file 12: No space left on '
    "device [os_error_code='28']"
)

RUNNER = r"""
import errno, runpy, sys
import tatar_jax.train as t
kind, workdir, text = sys.argv[1:4]

def run(cfg, wd):
    if kind == "oserror":
        raise OSError(errno.ENOSPC, "No space left on device", f"{wd}/metrics.jsonl")
    if kind == "tensorstore":
        try:
            raise ValueError(text)
        except ValueError as e:
            raise RuntimeError("async save failed") from e
    raise KeyError("not an I/O error")

t.run = run
sys.argv = ["train.py", "--config=configs/sft.py:tiny", f"--workdir={workdir}"]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@pytest.mark.parametrize("kind", ["oserror", "tensorstore", "other"])
def test_io_error_is_one_line_exit_1(tmp_path, kind):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", RUNNER, kind, str(tmp_path), TS_TEXT]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    if kind == "other":  # not an I/O error: the traceback stays
        assert "Traceback" in r.stderr and "KeyError: 'not an I/O error'" in r.stderr
        return
    path = f"{tmp_path}/metrics.jsonl" if kind == "oserror" else "/w/checkpoints/2.orbax-"
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr
    assert lines[-1].startswith(f"train.py: I/O error ENOSPC (No space left on device): {path}")
    assert f"checkpoint in {tmp_path}/checkpoints is kept" in lines[-1]
