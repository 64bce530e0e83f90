"""Shared test fixtures.

``shared_dir`` points at the read-only ``../shared`` folder beside the checkout (benchmarks' label
files, the spec). Override with ``TATAR_SHARED=/path``.
"""

from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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
