"""Train TATAR: Stage-1 SFT or Stage-2 GRPO (spec §6, §7).

    python scripts/train.py --config=configs/grpo.py --workdir=/tmp/tatar_run     # embedded default
    python scripts/train.py --config=configs/sft.py --workdir=/runs/sft \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct
    python scripts/train.py --config=configs/grpo.py:reference --workdir=/runs/grpo \\
        --config.model.init_checkpoint=/runs/sft --config.optimizer.learning_rate=1e-6

Restarting with the same ``--workdir`` resumes from its latest checkpoint. A run writes nothing
outside ``--workdir``.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/grpo.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, data)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(std_logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint) from the console;
    its warnings and errors, and all of our own lines, still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    del argv
    absl_logging.get_absl_handler().addFilter(_QuietOrbax())
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    # The offline tokenizer cache goes into the run directory unless the user set one.
    os.environ.setdefault("TATAR_JAX_CACHE", str(workdir / ".cache"))
    from configs import rewards as rewards_configs
    from tatar_jax import train

    cfg = _CONFIG.value
    # --config.rewards.preset=NAME: the rewards block of preset NAME (other rewards overrides kept)
    if "rewards" in cfg and rewards_configs.resolve_overrides(cfg, _overrides()):
        w = cfg.rewards.weights.to_dict()
        print(f"[tatar-jax] rewards preset {cfg.rewards.preset!r}: weights {w}", flush=True)
    train.run(cfg, workdir)


def _overrides() -> list[str]:
    """The dotted paths of the ``--config.<path>=...`` flags given on the command line."""
    return list(flags.FLAGS["config"].override_values)


if __name__ == "__main__":
    app.run(main)
