"""Build SFT reasoning data with a teacher and a judge (spec §5). Thin entry point.

    export TATAR_TEACHER_API_KEY=...   # optional; read from the environment, never from flags
    python scripts/build_reasoning.py --config=configs/reasoning.py:iqa \\
        --config.input=train.jsonl --config.out_dir=out/iqa \\
        --config.teacher.base_url=http://localhost:8000/v1 --config.teacher.model=MODEL \\
        --config.judge.base_url=http://localhost:8001/v1 --config.judge.model=JUDGE

Re-running the same command resumes (finished rows are skipped). See configs/reasoning.py for
every knob and tatar_jax/reasoning/build.py for the output files. A usage error (a missing input,
an unknown teacher.kind, an empty or non-http(s) base_url) is one line per problem, exit status
2; a damaged input file (not UTF-8, a bad row) one line naming it, exit status 1.
"""

from __future__ import annotations

import logging
import sys

from absl import flags
from ml_collections import config_flags

from tatar_jax import cli_errors
from tatar_jax.data.manifest import ManifestError
from tatar_jax.reasoning import from_config
from tatar_jax.reasoning.teachers import FatalTeacherError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/reasoning.py[:iqa|iaa]", lock_config=False
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise cli_errors.UsageError(f"unexpected arguments: {argv[1:]}")
    problems = from_config.usage_problems(_CONFIG.value)
    if problems:
        raise cli_errors.UsageError("\n".join(problems))
    logging.getLogger("tatar_jax.reasoning").setLevel(logging.INFO)
    try:
        summary = from_config.main(_CONFIG.value)
    except FatalTeacherError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 2
    except ManifestError as e:  # a damaged input file: the message names it (and the row)
        cli_errors.fail(str(e), cli_errors.DAMAGED)
    return 0 if summary.pending == 0 and not summary.failed else 1


if __name__ == "__main__":
    cli_errors.run_script(main)
