"""The one-line error contract of every ``scripts/*.py`` command.

Two kinds of failure a user can act on, each one line on stderr, never a traceback:

- a usage error (an unknown flag or config field, a value a flag cannot take, a missing input
  named on the command line): ``error: <what is wrong>``, exit status :data:`USAGE` (2);
- a damaged input (a file the command reads that is not what it should be: not UTF-8, not JSON,
  a row that does not parse): ``error: <file>: <what is wrong>``, exit status :data:`DAMAGED` (1).

A script gets both by ending with ``cli_errors.run_script(main)`` and raising :class:`UsageError`
(or ``absl.app.UsageError``) or :class:`DamagedInputError` from anywhere below ``main``. The
readers here (:func:`read_text`, :func:`read_json`) turn a decoding failure into a
:class:`DamagedInputError` naming the file, so nothing reaches the user as a bare
``UnicodeDecodeError`` / ``JSONDecodeError``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app

USAGE = 2
DAMAGED = 1


class UsageError(app.UsageError):
    """The command line asks for something that cannot be done (exit status 2)."""


class DamagedInputError(Exception):
    """A file the command reads is damaged (exit status 1); the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: {reason}")


def decode_reason(err: BaseException) -> str:
    """What is wrong with a file's bytes, in words (UnicodeDecodeError / JSONDecodeError)."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r})"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (line {err.lineno} column {err.colno}: {err.msg})"
    return str(err)


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; DamagedInputError naming it when the bytes are not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as err:
        raise DamagedInputError(path, decode_reason(err)) from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of ``path``; DamagedInputError naming it (not UTF-8, not JSON)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedInputError(path, decode_reason(err)) from None


def usage_line(err: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for a flag-parsing error: absl's message without ml_collections' embedded
    traceback (its last line is the cause); an unknown ``--config.<field>`` named as given in
    ``argv``."""
    text = str(err)
    if "Traceback (most recent call last)" in text:
        head = text.split(":", 1)[0] if text.startswith("flag --") else ""
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        text = f"{head}: {last}" if head else last
    if "Failed loading config file" in text and "[Errno" in text:  # --config=<missing file>
        text = "--config: " + text.rsplit("]", 1)[-1].strip()
    if isinstance(err, KeyError | AttributeError):  # ml_collections: --config.<no such field>
        field = str(err).strip("\"'")
        given = [a.split("=", 1)[0] for a in argv if a.startswith("--") and f".{field}" in a]
        text = f"{given[0] if given else field}: no such config field"
    return " ".join(text.split())


def fail(message: str, status: int) -> None:
    """Prints ``error: <message>`` (one line per line of ``message``) on stderr and exits."""
    for line in str(message).splitlines() or [""]:  # several problems: one line each
        print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def run_script(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)`` with the scripts' error contract (module docstring): a flag that
    does not parse (an unknown flag, a bad value, a missing or broken ``--config`` file, an
    unknown ``--config.<field>``) or a :class:`UsageError` / ``app.UsageError`` raised by
    ``main`` is one line and exit status 2; a :class:`DamagedInputError` is one line naming the
    file and exit status 1; never a traceback or the help text for either."""
    from absl import flags as absl_flags

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = absl_flags.FLAGS(argv)
            for name in list(absl_flags.FLAGS):  # a config file that failed to load raises
                if name == "config" and absl_flags.FLAGS[name].value is not None:  # only when used
                    absl_flags.FLAGS[name].value.keys()
        except Exception as err:  # absl, config_flags and config-file errors alike
            fail(usage_line(err, argv), USAGE)
            raise  # unreachable
        return rest

    def guarded(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except app.UsageError as err:
            fail(str(err), USAGE)
        except DamagedInputError as err:
            fail(str(err), DAMAGED)
        return None  # unreachable

    app.run(guarded, flags_parser=parse)
