"""Tiny in-process training runs compared across meshes and processes (tests/train/
test_train_mesh.py, tests/e2e/test_train_multidevice.py and the latter's worker processes):
configs/grpo.py and configs/sft.py ``tiny`` for 2 steps with rewards that move the parameters, and
readers of a run's final parameters and records.

The random tiny model never writes a parseable answer, so every reward would be 0 and nothing
would move: the runs use a parser that reads a number from any text (a function of the whole
completion), which makes the real rewards (accuracy, IAA Thurstone over the global batch, ...)
and advantages non-zero. Adam's ``eps`` is raised so that the update is nearly linear in the
gradient (``g / (|g| + eps)`` would turn float-summation-order noise of near-zero gradients into
full-size steps).
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np

from configs import grpo as grpo_configs
from configs import sft as sft_configs


def _parse_any(text: str) -> float:
    """A number from any completion (the tiny random model writes no answer tags)."""
    return float(sum(map(ord, text)) % 101)


def tiny_config(**mesh):
    """configs/grpo.py:tiny for 2 short steps with rewards that move the parameters."""
    cfg = grpo_configs.get_config("tiny")
    cfg.total_steps = 2
    cfg.eval.datasets = ()
    cfg.model.remat = False
    cfg.grpo.beta = 0.0  # no reference pass: half the compiles
    cfg.grpo.max_new_tokens = 8
    # (``parser`` is a str field of the config: a new block holds the callable)
    cfg.rewards = ml_collections.ConfigDict({**cfg.rewards.to_dict(), "parser": _parse_any})
    cfg.optimizer.learning_rate = 1e-3
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.eps = 1e-3  # near-linear update: see the module docstring
    cfg.checkpoint.every_steps = 100
    cfg.logging.tensorboard = False
    for k, v in mesh.items():
        if k == "num_devices":
            cfg.mesh.num_devices = v
        else:
            cfg.mesh.shape[k] = v
    return cfg


def tiny_sft_config(**mesh):
    """configs/sft.py:tiny for 2 steps, evaluated at the end on 4 held-out images (greedy)."""
    cfg = sft_configs.get_config("tiny")
    cfg.total_steps = 2
    cfg.model.remat = False
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.eps = 1e-3  # near-linear update: see the module docstring
    cfg.checkpoint.every_steps = 100
    cfg.logging.tensorboard = False
    cfg.eval.datasets = ("synthetic_test",)
    cfg.eval.max_examples = 4
    cfg.eval.batch_size = 4
    cfg.eval.max_new_tokens = 6
    for k, v in mesh.items():
        cfg.mesh.shape[k] = v
    return cfg


def final_params(workdir, cfg) -> dict[str, np.ndarray]:
    """{path: value} of the last checkpoint's parameters (host numpy)."""
    from flax import nnx

    from tatar_jax.data import tokenizer
    from tatar_jax.train import checkpointing, sources, trainer

    tok = tokenizer.load_tokenizer(sources.tokenizer_dir(cfg))
    model = trainer.load_policy(cfg, tok).model
    _, target = nnx.split(model)
    params, _ = checkpointing.load_params(workdir, target)
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def records(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip() and "loss" in json.loads(x)]


def eval_records(workdir) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.update({k: v for k, v in r.items() if k.startswith("eval/")})
    return out


_INIT_CACHE: dict = {}


def final_params_init(cfg) -> dict[str, np.ndarray]:
    """The initial parameters (embedded tiny model, the run's seed)."""
    if "p" not in _INIT_CACHE:
        from flax import nnx

        from tatar_jax.data import tokenizer
        from tatar_jax.train import sources, trainer

        tok = tokenizer.load_tokenizer(sources.tokenizer_dir(cfg))
        model = trainer.load_policy(cfg, tok).model
        flat = jax.tree_util.tree_leaves_with_path(nnx.state(model))
        _INIT_CACHE["p"] = {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
    return _INIT_CACHE["p"]
