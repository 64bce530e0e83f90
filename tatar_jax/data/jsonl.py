"""JSON Lines files: reading with row numbers, an append journal, atomic whole-file writes.

One object per line, UTF-8, non-ASCII kept as is. Lines are split on ``"\\n"`` only (JSON text
may hold U+2028 and friends unescaped, which ``str.splitlines`` would split on). Row numbers in
error messages are 0-based positions of the line in the file.

A file appended to by :class:`Appender` survives a killed writer: every object goes out in one
``write`` on an ``O_APPEND`` descriptor, so the only damage a kill can leave is a torn last line
(no newline), which :func:`read_rows` drops (and with ``repair`` cuts off the file so that
appending continues cleanly). Whole files are written to a temporary file, fsync'd and renamed
(:func:`write_rows`, :func:`write_json`), so a reader sees the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

log = logging.getLogger(__name__)


class JsonlError(ValueError):
    """A JSONL row that is not a JSON object; the message names the file and the row."""


def dumps_line(obj: Mapping[str, Any]) -> str:
    """``obj`` as one JSONL line (with its newline)."""
    return json.dumps(obj, ensure_ascii=False) + "\n"


def parse_rows(path: str, text: str) -> list[dict[str, Any]]:
    """The objects of JSONL ``text`` read from ``path`` (named in errors), one per line.

    The last line needs no newline. An empty line, invalid JSON or a non-object raises
    :class:`JsonlError` ``"<path>: row <i>: <why>"``.
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            raise JsonlError(f"{path}: row {i}: empty line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise JsonlError(f"{path}: row {i}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise JsonlError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_rows(path: str, *, repair: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSONL file written by :class:`Appender` (``[]`` when there is none).

    A torn last line (no newline: a killed writer) is dropped with a warning; with ``repair`` it
    is also cut off the file, so that appending continues on a line of its own.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted run",
            path,
            len(data) - end,
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
    return parse_rows(path, data[:end].decode("utf-8"))


class Appender:
    """Appends objects to a JSONL file, one ``write`` per object (never interleaved, never half a
    line after a clean return), fsync'd after each when ``fsync``.

    ``truncate`` empties the file first (a file rewritten by each run); otherwise objects go after
    what is there. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str, *, fsync: bool, truncate: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        self._fd = os.open(path, flags, 0o644)

    def append(self, obj: Mapping[str, Any]) -> None:
        """Writes ``obj`` as one line (and fsyncs it when ``fsync``)."""
        os.write(self._fd, dumps_line(obj).encode("utf-8"))
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_atomic(path: str, write: Callable[[IO[str]], None]) -> None:
    """Writes ``path`` through ``write(file)`` into a temporary file, fsyncs it and renames it
    over ``path`` (readers see the old file or the new one, never a part). When ``write`` raises,
    ``path`` is untouched and the temporary file removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_rows(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """``rows`` as a JSONL file, atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.writelines(dumps_line(r) for r in rows))


def write_json(path: str, obj: Any, *, indent: int, sort_keys: bool = False) -> None:
    """``obj`` as an indented JSON file ending in a newline, atomically; NaN is refused (it is not
    JSON)."""

    def write(f: IO[str]) -> None:
        json.dump(obj, f, indent=indent, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)
        f.write("\n")

    write_atomic(path, write)
