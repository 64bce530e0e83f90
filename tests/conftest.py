"""Shared test fixtures.

``shared_dir`` points at the read-only ``../shared`` folder beside the checkout (benchmarks' label
files, the spec). Override with ``TATAR_SHARED=/path``.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight virtual CPU devices so sharding tests can build real meshes; unsharded code still runs on
# device 0 exactly as on a one-device machine.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# tests/helpers (tiny models, the stub OpenAI server) import as top-level modules.
sys.path.insert(0, str(REPO_ROOT / "tests" / "helpers"))


def _shared_dir() -> pathlib.Path:
    env = os.environ.get("TATAR_SHARED")
    return pathlib.Path(env) if env else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    path = _shared_dir()
    if not (path / "benchmarks").is_dir():
        pytest.fail(f"shared folder not found at {path} (set TATAR_SHARED)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory) -> pathlib.Path:
    """A persistent XLA compilation cache for the script subprocesses of the whole session
    (tests/helpers/train_runs.py): one folder shared by the pytest-xdist workers of a run, so a
    tiny run's step programs compile once for every module that starts the same run."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N, common to the workers
    path = base / "xla_cache"
    path.mkdir(exist_ok=True)
    return path
