"""The one loader of the ``configs/*.py`` files (big_vision style: a config file is code).

``config_flags`` loads a config file by path, and the ``configs/`` folder is not a package on
``sys.path``, so config files reach their siblings (``common.py``, ``rewards.py``) through here,
and so does the trainer when it builds the SFT warm-up of the embedded default.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import types

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name: str, config_dir: str | os.PathLike | None = None) -> types.ModuleType:
    """Imports ``<config_dir>/<name>.py`` (default: the repository's ``configs/``) once."""
    path = pathlib.Path(config_dir or CONFIG_DIR) / f"{name}.py"
    key = f"_tatar_configs_{name}"
    module = sys.modules.get(key)
    if module is not None and pathlib.Path(module.__file__).resolve() == path.resolve():
        return module
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load config module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def get_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py:get_config(arg)``, e.g. ``get_config("sft", "default")``."""
    return load(name).get_config(arg)
