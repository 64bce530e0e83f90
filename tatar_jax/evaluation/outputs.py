"""The files of one evaluated dataset's folder (see :mod:`tatar_jax.evaluation.runner`)."""

from __future__ import annotations

from typing import Any

from tatar_jax import cli_errors
from tatar_jax.data import jsonl

PREDICTIONS = "predictions.jsonl"
ERRORS = "errors.jsonl"
METRICS = "metrics.json"
RUN_INFO = "run_info.json"


class EvalError(RuntimeError):
    """Evaluation cannot continue (inconsistent resume state, bad predict function output)."""


class ResumeMismatchError(EvalError):
    """The out_dir holds another evaluation's results (other weights, decoding settings, labels):
    continuing would mix them; the scripts report it as a usage error (one line, exit 2)."""


class DamagedOutputError(EvalError, cli_errors.DamagedInputError):
    """A file of the out_dir cannot be read back (one line naming it, exit 1)."""


def read_jsonl(path: str, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a predictions / errors file ([] when absent). A partial last line (a killed
    writer) is dropped; with ``repair`` it is also cut off the file so that appending continues
    cleanly (:func:`tatar_jax.data.jsonl.read_rows`). Any other bad line raises EvalError naming
    the file and row."""
    try:
        return jsonl.read_rows(path, repair=repair)
    except jsonl.JsonlError as err:
        raise DamagedOutputError(path, str(err).removeprefix(f"{path}: ")) from None
