"""scripts/check_data.py: every kind of bad row reported with file, row and reason; exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def _run(repo_root, *args):
    return subprocess.run(
        [sys.executable, str(repo_root / "scripts/check_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _jpeg(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def bad_set(tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    for i in range(3):
        (img / f"ok{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)))
    data = _jpeg(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (img / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (img / "junk.jpg").write_bytes(b"GIF89a but not really")
    (img / "empty.jpg").write_bytes(b"")
    rows = [
        {"image": "ok0.jpg", "gt_score": 3.0},  # 0 ok
        {"image": "missing.jpg", "gt_score": 3.0},  # 1
        {"image": "trunc.jpg", "gt_score": 3.0},  # 2
        {"image": "junk.jpg", "gt_score": 3.0},  # 3
        {"image": "empty.jpg", "gt_score": 3.0},  # 4
        {"image": "ok1.jpg", "gt_score": "NaN"},  # 5
        {"image": "ok1.jpg", "gt_score": "bad"},  # 6
        {"image": "ok2.jpg", "gt_score": 9.0},  # 7
        {"image": "ok0.jpg", "gt_score": 2.0},  # 8 duplicate of 0
        {"gt_score": 2.0},  # 9
        {"image": "ok2.jpg", "gt_score": 4.5},  # 10 ok
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, img


EXPECTED = {
    1: "file not found",
    2: "truncated",
    3: "not a readable image",
    4: "empty file",
    5: "'NaN' is a string, not a number",
    6: "'bad' is a string, not a number",
    7: "outside the declared range [1, 5]",
    8: "duplicate image (same as row 0)",
    9: "missing or empty field 'image'",
}


def test_reports_every_bad_row(repo_root, bad_set):
    path, img = bad_set
    out = _run(
        repo_root, f"--manifest={path}", f"--image_root={img}", "--task=iqa", "--score_range=1,5"
    )
    assert out.returncode == 1, out.stderr
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR ")]
    assert len(errors) == len(EXPECTED)
    for line, (row, reason) in zip(errors, sorted(EXPECTED.items()), strict=True):
        assert f"{path}: row {row}" in line and reason in line, line
    assert "bad: 11 rows, 9 bad (duplicate: 1, field: 1, image: 4, score: 3)" in out.stdout
    assert "FAILED: 11 rows checked, 9 bad rows" in out.stdout


def test_rows_only_and_clean(repo_root, bad_set, tmp_path):
    path, img = bad_set
    out = _run(
        repo_root, f"--manifest={path}", f"--image_root={img}", "--score_range=1,5", "--noimages"
    )
    assert out.returncode == 1 and "5 bad (duplicate: 1, field: 1, score: 3)" in out.stdout
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([{"image": f"ok{i}.jpg", "gt_score": 1 + i} for i in range(3)]))
    out = _run(repo_root, f"--manifest={clean}", f"--image_root={img}", "--score_range=1,5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: 3 rows checked, 0 bad rows" in out.stdout


def test_builtin_datasets_and_usage_errors(repo_root, benchmarks_dir, tmp_path):
    root = benchmarks_dir
    out = _run(
        repo_root, "--dataset=KADID", "--dataset=ava", f"--benchmark_root={root}", "--noimages"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "KADID: 2000 rows, 0 bad (ok); range (1.0, 5.0)" in out.stdout
    assert "AVA: 19930 rows, 0 bad" in out.stdout
    # A too-narrow declared range is caught on the real labels.
    out = _run(
        repo_root, "--dataset=SPAQ", f"--benchmark_root={root}", "--noimages", "--score_range=0,90"
    )
    n_over = sum(r["gt_score"] > 90 for r in json.loads((root / "IQA/SPAQ/SPAQ.json").read_text()))
    assert n_over > 0 and out.returncode == 1
    assert f"SPAQ: 2224 rows, {n_over} bad (score: {n_over})" in out.stdout
    # Images are not shipped with the label files: every image is reported missing.
    out = _run(repo_root, "--dataset=PIPAL", f"--benchmark_root={root}", f"--image_root={tmp_path}")
    assert out.returncode == 1 and "4640 bad (image: 4640)" in out.stdout
    assert "A0243_03_23.bmp" in out.stdout or "more problems" in out.stdout
    assert _run(repo_root, "--manifest=x.json").returncode != 0  # no range
    assert _run(repo_root, "--dataset=LIVE", f"--benchmark_root={root}").returncode == 2
    # The shipped label files are the default root; an empty manifest is no data set.
    out = _run(repo_root, "--dataset=KADID", "--noimages")
    assert out.returncode == 0 and "KADID: 2000 rows, 0 bad (ok)" in out.stdout, out.stderr
    (tmp_path / "none.json").write_text("[]")
    out = _run(repo_root, f"--manifest={tmp_path / 'none.json'}", "--score_range=1,5")
    assert out.returncode == 1 and "none.json: no rows" in out.stdout


def test_stage_as_tfds(repo_root, bad_set, tmp_path):
    from tatar_jax.data import manifest, tfds_builder

    path, img = bad_set
    args = [f"--manifest={path}", f"--image_root={img}", "--score_range=1,5"]
    out = _run(repo_root, *args, f"--tfds_dir={tmp_path / 'no'}")
    assert out.returncode == 1 and "bad: not staged (bad rows" in out.stdout
    assert not (tmp_path / "no").exists()
    out = _run(repo_root, *args, f"--tfds_dir={tmp_path / 't'}", "--tfds_split=test", "--skip_bad")
    assert out.returncode == 1, out.stderr  # the problems are still reported
    assert "bad: staged 2 records as TFDS split 'test'" in out.stdout
    recs = tfds_builder.load(tmp_path / "t/tatar_manifest/bad/1.0.0", "test")
    assert [r["row_id"] for r in recs] == [0, 10] and recs[1]["gt_100"] == 87.5
    assert sorted(s["row"] for s in recs.skipped()) == sorted(EXPECTED)
    spec = manifest.DatasetSpec("bad", "iqa", str(path), str(img), (1, 5))
    good = manifest.load_records(spec, on_error="skip").records
    assert (
        (img / "ok2.jpg").read_bytes()
        == recs[1]["image_bytes"]
        == open(good[-1]["image"], "rb").read()
    )


def _error_lines(out):
    return [x for x in (out.stdout + out.stderr).splitlines() if x.startswith(("error:", "ERROR"))]


@pytest.mark.parametrize(
    "given, line",
    [
        ("5,1", "error: --score_range needs LO < HI, got '5,1'"),
        ("a,b", "error: --score_range must be LO,HI (two numbers), got 'a,b'"),
        ("nan,5", "error: --score_range needs two finite numbers, got 'nan,5'"),
    ],
)
def test_bad_score_range_is_a_usage_error(repo_root, tmp_path, given, line):
    """Issue 32 item 7: one line, exit 2, no traceback."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "gt_score": 3}\n')
    out = _run(repo_root, f"--manifest={path}", f"--score_range={given}", "--noimages")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [line]


def test_non_utf8_manifest_names_the_file(repo_root, tmp_path):
    """Issue 32 item 8: a manifest that is not UTF-8 text: the file and byte, exit 1."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"image": "a.png", "gt_score": 3, "note": "caf\xe9"}\n')
    out = _run(repo_root, f"--manifest={path}", "--score_range=1,5", "--noimages")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_lines(out) == [f"ERROR {path}: not UTF-8 text (byte 46: b'\\xe9')"]


def test_image_paths_are_confined_to_the_image_root(repo_root, bad_set, tmp_path):
    """Issue 32 item 10: ``..`` out of the image root and absolute entries are bad rows (never
    opened); --allow_absolute_images is the explicit opt-out for absolute entries. Item 9: an
    image that is a symbolic-link loop is named as such, not as a missing file."""
    _, img = bad_set
    (img / "loop_a.jpg").symlink_to(img / "loop_b.jpg")
    (img / "loop_b.jpg").symlink_to(img / "loop_a.jpg")
    rows = [
        {"image": "../../../../etc/passwd", "gt_score": 3},
        {"image": str(img / "ok0.jpg"), "gt_score": 3},
        {"image": "ok1.jpg", "gt_score": 3},
        {"image": "loop_a.jpg", "gt_score": 3},
    ]
    path = tmp_path / "paths.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"--manifest={path}", f"--image_root={img}", "--score_range=1,5"]
    out = _run(repo_root, *args)
    assert out.returncode == 1, out.stderr
    assert _error_lines(out) == [
        f"ERROR {path}: row 0 (image '../../../../etc/passwd'): image path "
        f"'../../../../etc/passwd' leaves the image root {img}",
        f"ERROR {path}: row 1 (image '{img / 'ok0.jpg'}'): absolute image path "
        f"'{img / 'ok0.jpg'}': image entries are relative to the image root (set "
        "allow_absolute_images / --allow_absolute_images to use absolute paths)",
        f"ERROR {path}: row 3 (image 'loop_a.jpg'): symbolic link does not resolve (Too many "
        "levels of symbolic links)",
    ]
    out = _run(repo_root, *args, "--allow_absolute_images")
    assert out.returncode == 1 and len(_error_lines(out)) == 2  # row 1 is now read and fine
    assert "row 1" not in out.stdout and "paths: 4 rows, 2 bad (image: 2)" in out.stdout
