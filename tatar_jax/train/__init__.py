"""Training: the stages (SFT, GRPO), their jitted steps and the loop around them.

    from tatar_jax import train
    train.run(config, workdir)     # config: configs/sft.py or configs/grpo.py get_config()
"""

from __future__ import annotations

from typing import Any


def run(config: Any, workdir: Any) -> Any:
    """Runs the configured stage (see :func:`tatar_jax.train.trainer.run`)."""
    from tatar_jax.train import trainer  # lazy: the steps pull in the model

    return trainer.run(config, workdir)
