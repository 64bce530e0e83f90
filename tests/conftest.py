"""Shared test fixtures.

``benchmarks_dir`` is the project's own shipped label files (``tatar_jax/data/benchmarks``): every
test that needs the eight benchmarks' labels reads those, so the suite passes on a clone alone.
``shared_dir`` points at the read-only ``../shared`` folder beside the checkout (an outside copy of
the label files, the training sets' labels); override with ``TATAR_SHARED=/path``. A test that
needs it is skipped, with the reason, where it is absent (a user's clone).
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
        pytest.skip(
            f"needs the outside copy of the label files: no {path / 'benchmarks'} "
            "(set TATAR_SHARED=/path to compare with one)"
        )
    return path


@pytest.fixture(scope="session")
def benchmarks_dir() -> pathlib.Path:
    """The label files that ship with tatar-jax (``IQA/<name>/<name>.json``, ``IAA/...``)."""
    from tatar_jax.data import datasets

    return pathlib.Path(datasets.PACKAGED_ROOT)


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


# The slowest modules, slowest first (seconds of a serial run on a 2-core machine, rounded): they
# start first, so that under ``pytest -n 2 --dist loadfile`` no long module is left to run alone
# at the end while the other worker idles. Every other module keeps its collection order.
SLOW_MODULES = {
    "tests/e2e/test_train_multidevice.py": 320,
    "tests/train/test_train_step.py": 260,
    "tests/e2e/test_run_life.py": 170,
    "tests/e2e/test_train_run.py": 170,
    "tests/train/test_train_mesh.py": 125,
    "tests/generate/test_generate_sharded.py": 125,
    "tests/sharding/test_sharding.py": 125,
    "tests/train/test_rollout_logps.py": 120,
    "tests/models/test_qwen2_5_vl_parity.py": 110,
    "tests/train/test_lean_update.py": 110,
    "tests/train/test_plots.py": 100,
    "tests/generate/test_generate.py": 100,
    "tests/e2e/test_lora_train.py": 95,
}


def pytest_configure(config):
    # xdist's loadscope/loadfile reorders modules by test count unless told not to; keep ours.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def weight(item) -> int:
        rel = item.path.relative_to(REPO_ROOT).as_posix() if item.path else ""
        return SLOW_MODULES.get(rel, 0)

    items.sort(key=lambda item: -weight(item))  # stable: each module stays whole and in order
