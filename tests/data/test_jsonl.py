"""tatar_jax.data.jsonl: row-numbered reading, the append journal, atomic writes."""

import json
import os

import pytest

from tatar_jax.data import jsonl


def test_parse_rows_names_file_and_row():
    assert jsonl.parse_rows("f", '{"a": 1}\n{"b": 2}') == [{"a": 1}, {"b": 2}]  # no last newline
    assert jsonl.parse_rows("f", "") == []
    with pytest.raises(jsonl.JsonlError, match=r"^f: row 1: invalid JSON"):
        jsonl.parse_rows("f", '{"a": 1}\n{"b": \n')
    with pytest.raises(jsonl.JsonlError, match=r"^f: row 0: expected an object, got list"):
        jsonl.parse_rows("f", "[1]\n")
    with pytest.raises(jsonl.JsonlError, match=r"^f: row 1: empty line"):
        jsonl.parse_rows("f", '{"a": 1}\n\n{"b": 2}\n')


def test_line_separators_inside_strings_stay_in_their_row(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 / U+0085 unescaped; they are not line breaks
    row = {"text": "a\u2028b\u0085c\u2029d"}
    path = str(tmp_path / "r.jsonl")
    jsonl.write_rows(path, [row, row])
    assert jsonl.read_rows(path) == [row, row]


def test_appender_and_torn_last_line(tmp_path):
    path = str(tmp_path / "j.jsonl")
    assert jsonl.read_rows(path) == []
    with jsonl.Appender(path, fsync=True) as log:
        log.append({"row": 0, "text": "é"})
        log.append({"row": 1})
    with open(path, encoding="utf-8") as f:
        assert f.read() == '{"row": 0, "text": "é"}\n{"row": 1}\n'
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"row": 2, "te')  # what a kill in the middle of a write leaves
    assert jsonl.read_rows(path) == [{"row": 0, "text": "é"}, {"row": 1}]
    assert os.path.getsize(path) > len('{"row": 0, "text": "é"}\n{"row": 1}\n')  # not repaired
    assert jsonl.read_rows(path, repair=True) == [{"row": 0, "text": "é"}, {"row": 1}]
    with jsonl.Appender(path, fsync=False) as log:  # appending continues on a line of its own
        log.append({"row": 2})
    assert [r["row"] for r in jsonl.read_rows(path)] == [0, 1, 2]
    with jsonl.Appender(path, fsync=False, truncate=True) as log:
        log.append({"row": 9})
    assert jsonl.read_rows(path) == [{"row": 9}]


def test_atomic_writes(tmp_path):
    path = str(tmp_path / "o.json")
    jsonl.write_json(path, {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    with pytest.raises(ValueError):
        jsonl.write_json(str(tmp_path / "n.json"), {"x": float("nan")}, indent=1)
    rows = [{"a": 1}, {"a": "ü"}]
    jsonl.write_rows(path, rows)  # replaces the file
    assert jsonl.read_rows(path) == rows
    assert sorted(os.listdir(tmp_path)) == ["o.json"]  # the failed write left nothing
