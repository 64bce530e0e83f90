"""Every test in tests/e2e runs a script, a training run or several processes end to end: all are
``slow`` (``pytest -m "not slow"`` leaves them out; CI runs them)."""

from __future__ import annotations

import pathlib

import pytest

_HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # A conftest's collection hook sees the whole session's items: mark only this folder's.
    for item in items:
        if item.path is not None and _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)
