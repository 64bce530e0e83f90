"""The configs package (big_vision style): each file's ``get_config(arg)`` returns a ConfigDict.

    python scripts/train.py --config=configs/grpo.py:reference --config.grpo.beta=0
    from configs import grpo; cfg = grpo.get_config("tiny")

Files import their siblings as ``from configs import common``: ``configs`` is installed beside
``tatar_jax`` (``pip install --no-deps -e .``, pyproject.toml), so absl's ``config_flags`` can
load a file by path from any working directory. Configs are light: they import no JAX;
``rewards.py`` takes the reward names from the pure-Python ``tatar_jax.rewards.names`` and
``reasoning.py`` its prompt texts from ``tatar_jax.reasoning.prompts`` / ``judge``, so a name has
one source.
"""
