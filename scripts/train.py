"""Train TATAR: Stage-1 SFT or Stage-2 GRPO (spec §6, §7).

    python scripts/train.py --config=configs/grpo.py --workdir=/tmp/tatar_run     # embedded default
    python scripts/train.py --config=configs/sft.py --workdir=/runs/sft \\
        --config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct
    python scripts/train.py --config=configs/grpo.py:reference --workdir=/runs/grpo \\
        --config.model.init_checkpoint=/runs/sft --config.optimizer.learning_rate=1e-6

Restarting with the same ``--workdir`` resumes from its latest checkpoint. A run writes nothing
outside ``--workdir``. A usage error (an unknown flag or config field, a value outside a field's
choices, an unknown data set, a missing directory) is one line per problem on stderr, exit
status 2, before any work. A resume whose hyper-parameters differ from
``<workdir>/run_config.json`` is refused (exit status 2) unless ``--allow_config_change``. An
operating-system I/O error (a full disk, a lost mount) or a bad record ends the run with one line
naming the path and errno, or the dataset, file, row and reason, exit status 1; the newest
complete checkpoint is kept. A damaged input (a manifest row, ``run_config.json``, every
checkpoint of the run: then moved aside to ``checkpoints_damaged/``) is one line ``error: ...``
naming it, exit status 1.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import pathlib
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/grpo.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, data)")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "resume even though hyper-parameters differ from <workdir>/run_config.json (the change is "
    "recorded in config_changes.jsonl); sets config.allow_config_change (and the warm-up's)",
)
flags.mark_flags_as_required(["config", "workdir"])


# tensorstore (orbax's writer) reports an OS error inside a ValueError's text:
# ... Failed writing: "<path>": ... No space left on device [os_error_code='28']
_TS_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_TS_PATH = re.compile(r'(?:Failed writing|Error writing file|Error opening file): "([^"]+)"')


def os_error_in(err: BaseException) -> tuple[int, str] | None:
    """(errno, path) of the operating-system error behind ``err``, if any: orbax and grain
    re-raise a failed write wrapped in their own exceptions (tensorstore's as text)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno, str(cur.filename or "")
        codes = _TS_CODE.findall(str(cur))
        if codes:
            paths = _TS_PATH.findall(str(cur))
            return int(codes[-1]), (paths[-1] if paths else "")
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)


def io_error_line(code: int, path: str, workdir: pathlib.Path) -> str:
    name = errno.errorcode.get(code, str(code))
    where = f": {path}" if path else ""
    line = f"train.py: I/O error {name} ({os.strerror(code)}){where}"
    if code in _WRITE_ERRORS:  # a write failed: say what survived
        line += (
            f". The newest complete checkpoint in {workdir / 'checkpoints'} is kept; fix the "
            "cause and rerun to resume."
        )
    return line


class _QuietOrbax(std_logging.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint) from the console,
    and its background threads' tracebacks of an OS error (the run ends with one line for it);
    its other warnings and errors, and all of our own lines, still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if "os_error_code=" in record.getMessage():
            return False
        return record.levelno >= std_logging.WARNING


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
    if workdir.exists() and not workdir.is_dir():
        raise app.UsageError(f"--workdir: {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    # The offline tokenizer cache goes into the run directory unless the user set one.
    os.environ.setdefault("TATAR_JAX_CACHE", str(workdir / ".cache"))
    from configs import rewards as rewards_configs
    from tatar_jax import cli_errors, train
    from tatar_jax.data.manifest import ManifestError
    from tatar_jax.data.pipeline import BadRecordError
    from tatar_jax.train.checkpointing import CheckpointError
    from tatar_jax.train.run_records import ConfigChangeError

    cfg = _CONFIG.value
    # --config.rewards.preset=NAME: the rewards block of preset NAME (other rewards overrides kept)
    if "rewards" in cfg and rewards_configs.resolve_overrides(cfg, _overrides()):
        w = cfg.rewards.weights.to_dict()
        print(f"[tatar-jax] rewards preset {cfg.rewards.preset!r}: weights {w}", flush=True)
    if _ALLOW_CHANGE.value:
        cfg.allow_config_change = True
        if "warmup" in cfg:
            cfg.warmup.allow_config_change = True
    try:
        train.run(cfg, workdir)
    except ConfigChangeError as err:
        print(f"train.py: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BadRecordError as err:  # names dataset, manifest, row, image and what is wrong
        print(f"train.py: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (ManifestError, CheckpointError) as err:  # a damaged input; the message names it
        cli_errors.fail(str(err), cli_errors.DAMAGED)
    except FileExistsError as err:  # e.g. <workdir>/synthetic is not a synthetic build
        cli_errors.fail(str(err), cli_errors.USAGE)
    except Exception as err:
        io = os_error_in(err)
        if io is None:
            raise
        print(io_error_line(*io, workdir), file=sys.stderr, flush=True)
        sys.exit(1)


def _overrides() -> list[str]:
    """The dotted paths of the ``--config.<path>=...`` flags given on the command line."""
    return list(flags.FLAGS["config"].override_values)


if __name__ == "__main__":
    from tatar_jax import cli_errors

    cli_errors.run_script(main)
