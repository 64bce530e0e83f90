"""Train TATAR: Stage-1 SFT or Stage-2 GRPO (spec §6, §7).

    python scripts/train.py --config=configs/grpo.py --workdir=/tmp/tatar_run     # embedded default
    python scripts/train.py --config=configs/sft.py --workdir=/runs/sft \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct
    python scripts/train.py --config=configs/grpo.py:reference --workdir=/runs/grpo \\
        --config.model.init_checkpoint=/runs/sft --config.optimizer.learning_rate=1e-6

Restarting with the same ``--workdir`` resumes from its latest checkpoint. A run writes nothing
outside ``--workdir``. A usage error (an unknown flag or config field, a value outside a field's
choices, an unknown data set, a missing directory) is one line per problem on stderr, exit
status 2, before any work.
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from tatar_jax.train import validate

    try:
        validate.check_config(_CONFIG.value)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    absl_logging.get_absl_handler().addFilter(_QuietOrbax())
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    # The offline tokenizer cache goes into the run directory unless the user set one.
    os.environ.setdefault("TATAR_JAX_CACHE", str(workdir / ".cache"))
    from tatar_jax import train

    train.run(_CONFIG.value, workdir)


if __name__ == "__main__":
    from tatar_jax.evaluation import cli

    cli.run_script(main)
