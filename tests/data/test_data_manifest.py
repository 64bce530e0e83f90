"""Manifests: 0-100 mapping (declared range vs the reference's value rule, bug B1), reading,
sampling, bad rows (file + row + reason; skip-and-count, never replace), built-in declarations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from tatar_jax.data import datasets, manifest

# ---------------------------------------------------------------------------------------------
# Mapping


def test_to_score_100_scalar_and_array():
    assert manifest.to_score_100(3.0, score_range=(1.0, 5.0)) == 50.0
    assert manifest.to_score_100(1.0, score_range=(1.0, 5.0)) == 0.0
    assert manifest.to_score_100(5.0, score_range=(1.0, 5.0)) == 100.0
    assert manifest.to_score_100(0.59, score_range=(0.0, 1.0)) == pytest.approx(59.0)
    assert isinstance(manifest.to_score_100(2, score_range=(1, 10)), float)
    y = manifest.to_score_100(np.array([[-1.0, 0.0], [5.5, 12.0]]), score_range=(0.0, 10.0))
    assert y.shape == (2, 2)
    np.testing.assert_allclose(y, [[0.0, 0.0], [55.0, 100.0]])  # clipped at both ends
    with pytest.raises(ValueError):
        manifest.to_score_100(1.0, score_range=(5.0, 5.0))


def test_reference_rule_branches():
    ref = manifest.reference_score_100
    assert ref(0.5, "iqa") == 50.0  # [0,1] -> 100x
    assert ref(1.0, "iqa") == 100.0  # the first branch wins at exactly 1.0 (bug B1)
    assert ref(3.0, "iqa") == 50.0  # (1,5] -> 25(x-1)
    assert ref(4.167, "iqa") == pytest.approx(79.175)
    assert ref(60.0, "iqa") == 60.0
    assert ref(140.0, "iqa") == 100.0
    assert ref(5.5, "iaa") == 55.0
    assert ref(0.59, "iaa") == pytest.approx(5.9)
    assert ref(42.0, "iaa") == 42.0
    np.testing.assert_allclose(ref(np.array([1.0, 2.0, 6.0]), "iqa"), [100.0, 25.0, 6.0])
    with pytest.raises(ValueError):
        ref(1.0, "vqa")


# ---------------------------------------------------------------------------------------------
# Reading + records


def _write(path, rows, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        else:
            json.dump(rows, f)
    return str(path)


ROWS = [{"image": f"im{i}.jpg", "gt_score": 1.0 + 0.5 * i, "note": f"n{i}"} for i in range(9)]


@pytest.mark.parametrize("jsonl", [False, True])
def test_load_records_fields(tmp_path, jsonl):
    path = _write(tmp_path / ("m.jsonl" if jsonl else "m.json"), ROWS, jsonl)
    spec = manifest.DatasetSpec("toy", "iqa", path, image_root="/imgs", score_range=(1.0, 5.0))
    loaded = manifest.load_records(spec)
    assert loaded.num_skipped == 0 and len(loaded.records) == 9
    r = loaded.records[4]
    assert r["image"] == "/imgs/im4.jpg" and r["image_name"] == "im4.jpg"
    assert r["score_raw"] == 3.0 and r["gt_100"] == 50.0 and r["gt_score"] == 3.0
    assert r["row_id"] == 4 and r["source"] == path and r["dataset"] == "toy"
    assert r["task"] == "iqa" and r["note"] == "n4"  # extra fields kept
    ref = manifest.load_records(spec, reference_compat=True).records
    assert [x["gt_100"] for x in ref][:3] == [100.0, 12.5, 25.0]


def test_default_image_root_is_manifest_folder(tmp_path):
    path = _write(tmp_path / "m.json", ROWS[:1])
    spec = manifest.DatasetSpec("toy", "iaa", path, score_range=(0, 10))
    assert manifest.load_records(spec).records[0]["image"] == str(tmp_path / "im0.jpg")


def test_target_field(tmp_path):
    rows = [{"image": "a.jpg", "gt_score": 2.0, "cot": "<think>x</think><answer>1</answer>"}]
    spec = manifest.DatasetSpec(
        "t", "iaa", _write(tmp_path / "m.json", rows), score_range=(0, 10), target_field="cot"
    )
    assert manifest.load_records(spec).records[0]["target"] == rows[0]["cot"]
    rows[0].pop("cot")
    with pytest.raises(manifest.ManifestError, match=r"row 0.*'cot'"):
        manifest.load_records(spec, rows=rows)


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_strategies():
    si = manifest.sample_indices
    np.testing.assert_array_equal(si(10, "all"), np.arange(10))
    np.testing.assert_array_equal(si(10, "first:3"), [0, 1, 2])
    np.testing.assert_array_equal(si(10, "end:2"), [8, 9])
    np.testing.assert_array_equal(si(10, "first:25%"), [0, 1, 2])  # ceil(2.5)
    np.testing.assert_array_equal(si(10, "first:50"), np.arange(10))  # capped at n
    a, b, c = si(100, "random:10", 1), si(100, "random:10", 1), si(100, "random:10", 2)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 10 and not np.array_equal(a, c)
    np.testing.assert_array_equal(
        si(100, "random:10", 1), np.random.default_rng(1).permutation(100)[:10]
    )
    assert len(si(101, "30%")) == 31 and len(si(101, "random:30%")) == 31
    for bad in ("some:3", "first:x", "first:-1", "150%", "7"):
        with pytest.raises(ValueError):
            manifest.parse_sampling(bad)
    with pytest.raises(ValueError):
        manifest.DatasetSpec("x", "iqa", "m.json", sampling="last:3")


def test_sampling_keeps_file_rows(tmp_path):
    spec = manifest.DatasetSpec(
        "toy", "iqa", _write(tmp_path / "m.json", ROWS), score_range=(1, 5), sampling="end:2"
    )
    assert [r["row_id"] for r in manifest.load_records(spec).records] == [7, 8]


# ---------------------------------------------------------------------------------------------
# Bad rows


BAD_ROWS = [
    {"image": "ok0.jpg", "gt_score": 3.0},
    {"image": "nan.jpg", "gt_score": float("nan")},
    {"image": "text.jpg", "gt_score": "good"},
    {"image": "big.jpg", "gt_score": 7.5},
    {"gt_score": 2.0},
    {"image": "nolabel.jpg"},
    {"image": "ok0.jpg", "gt_score": 2.0},
    {"image": "ok1.jpg", "gt_score": "4.5"},
    {"image": "bool.jpg", "gt_score": True},
]
BAD_REASONS = {
    1: "not finite",
    2: "not a number",
    3: "outside the declared range",
    4: "missing or empty field 'image'",
    5: "missing field 'gt_score'",
    6: "duplicate image (same as row 0)",
    7: "'4.5' is a string, not a number",
    8: "not a number",
}


def test_bad_rows_error_names_file_and_row(tmp_path):
    path = _write(tmp_path / "bad.json", BAD_ROWS[:2])
    spec = manifest.DatasetSpec("toy", "iqa", path, score_range=(1, 5))
    with pytest.raises(manifest.ManifestError) as err:
        manifest.load_records(spec)
    assert "bad.json" in str(err.value) and "row 1" in str(err.value)
    assert "not finite" in str(err.value) and "nan.jpg" in str(err.value)


def test_bad_rows_skip_and_count(tmp_path):
    path = _write(tmp_path / "bad.jsonl", BAD_ROWS, jsonl=True)
    spec = manifest.DatasetSpec("toy", "iqa", path, score_range=(1, 5))
    loaded = manifest.load_records(spec, on_error="skip")
    assert [r["row_id"] for r in loaded.records] == [0]  # nothing substituted or guessed
    assert loaded.num_skipped == len(BAD_REASONS)
    for bad in loaded.skipped:
        assert bad.source == path and BAD_REASONS[bad.row] in bad.reason
    problems = manifest.validate(spec, check_images=False)
    assert {p.row: p.reason for p in problems}.keys() == BAD_REASONS.keys()


def test_malformed_files(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"image": "a", "gt_score": 1}\n{oops\n')
    with pytest.raises(manifest.ManifestError, match=r"x.jsonl: row 1: invalid JSON"):
        manifest.read_rows(tmp_path / "x.jsonl")
    (tmp_path / "y.json").write_text('[{"image": "a"}, 3]')
    with pytest.raises(manifest.ManifestError, match=r"y.json: row 1: expected an object"):
        manifest.read_rows(tmp_path / "y.json")
    with pytest.raises(manifest.ManifestError, match="cannot read"):
        manifest.read_rows(tmp_path / "missing.json")
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(manifest.ManifestError, match="empty"):
        manifest.read_rows(tmp_path / "e.json")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(manifest.ManifestError, match=r"none.json: no rows"):
        manifest.read_rows(tmp_path / "none.json")


def test_write_manifest_round_trip(tmp_path):
    for name in ("a.json", "a.jsonl"):
        manifest.write_manifest(tmp_path / name, ROWS)
        assert manifest.read_rows(tmp_path / name) == ROWS


# ---------------------------------------------------------------------------------------------
# Built-in declarations on the real label files (bug B1)

# Rows the reference maps wrongly, from shared/benchmarks/README.md: name -> (raw, ours, reference)
B1_ROWS = {
    "KonIQ-10K": {"3632417985.jpg": (4.1674, 4.1674, 79.185)},
    "SPAQ": {
        "03464.jpg": (4.17, 4.17, 79.25),
        "05240.jpg": (4.0, 4.0, 75.0),
        "08456.jpg": (4.75, 4.75, 93.75),
        "08648.jpg": (4.8, 4.8, 95.0),
        "10032.jpg": (4.75, 4.75, 93.75),
    },
    "PIPAL": {"A0243_03_23.bmp": (1.0, 0.0, 100.0)},
}
# Perfect predictor of the raw labels scored against the reference-mapped labels (README).
REFERENCE_SRCC_PLCC = {
    "KonIQ-10K": (0.9972, 0.9941),
    "SPAQ": (0.9877, 0.9822),
    "PIPAL": (0.9987, 0.9937),
}


def test_builtin_benchmarks_load_with_declared_ranges(benchmarks_dir):
    expected = {  # name: (task, range, entries)
        "KonIQ-10K": ("iqa", (0, 100), 2015),
        "SPAQ": ("iqa", (0, 100), 2224),
        "KADID": ("iqa", (1, 5), 2000),
        "PIPAL": ("iqa", (1, 5), 4640),
        "ArtiMuse-10K": ("iaa", (0, 10), 1002),
        "AVA": ("iaa", (1, 10), 19930),
        "TAD66K": ("iaa", (1, 10), 14079),
        "FLICKR-AES": ("iaa", (0, 1), 4737),
    }
    specs = datasets.benchmarks(benchmarks_dir)
    assert list(specs) == list(expected)
    for name, spec in specs.items():
        task, rng, n = expected[name]
        assert (spec.task, spec.score_range) == (task, tuple(map(float, rng)))
        loaded = manifest.load_records(spec)  # every label inside its declared range
        assert len(loaded.records) == n and loaded.num_skipped == 0
        raw = np.array([r["score_raw"] for r in loaded.records])
        y = np.array([r["gt_100"] for r in loaded.records])
        np.testing.assert_allclose(y, 100 * (raw - rng[0]) / (rng[1] - rng[0]), rtol=0, atol=1e-9)


def test_b1_rows_and_perfect_predictor(benchmarks_dir):
    specs = datasets.benchmarks(benchmarks_dir)
    for name, rows in B1_ROWS.items():
        spec = specs[name]
        ours = {r["image_name"]: r for r in manifest.load_records(spec).records}
        ref = {
            r["image_name"]: r for r in manifest.load_records(spec, reference_compat=True).records
        }
        for img, (raw, want_ours, want_ref) in rows.items():
            assert ours[img]["score_raw"] == pytest.approx(raw, abs=1e-4)
            assert ours[img]["gt_100"] == pytest.approx(want_ours, abs=1e-3)
            assert ref[img]["gt_100"] == pytest.approx(want_ref, abs=1e-2)
        # Rows the reference maps wrongly are exactly the listed ones.
        wrong = {k for k in ours if abs(ours[k]["gt_100"] - ref[k]["gt_100"]) > 1e-6}
        assert wrong == set(rows)
    for name, spec in specs.items():
        recs = manifest.load_records(spec).records
        raw = np.array([r["score_raw"] for r in recs])
        ours = np.array([r["gt_100"] for r in recs])
        assert stats.spearmanr(raw, ours).statistic == pytest.approx(1.0, abs=1e-12)
        assert stats.pearsonr(raw, ours).statistic == pytest.approx(1.0, abs=1e-12)
        if name in REFERENCE_SRCC_PLCC:
            ref = manifest.reference_score_100(raw, spec.task)
            srcc, plcc = REFERENCE_SRCC_PLCC[name]
            assert stats.spearmanr(raw, ref).statistic == pytest.approx(srcc, abs=5e-5)
            assert stats.pearsonr(raw, ref).statistic == pytest.approx(plcc, abs=5e-5)


def test_training_set_declarations(shared_dir):
    root = shared_dir / "benchmarks"
    iaa = datasets.get("artimuse_train", root, image_root="/data/artimuse")
    assert (iaa.task, iaa.score_range, iaa.label_field) == ("iaa", (0.0, 10.0), "gt_score")
    recs = manifest.load_records(iaa).records
    assert len(recs) == 8998 and recs[0]["image"].startswith("/data/artimuse/")
    ys = np.array([r["gt_100"] for r in recs])
    assert ys.min() == 0.0 and ys.max() == 100.0


def test_training_set_declarations_without_their_label_files(tmp_path):
    root = tmp_path / "no_labels"  # the training sets' label files do not ship: declarations only
    iqa = datasets.get("KONIQ-TRAIN", root)
    assert (iqa.task, iqa.score_range, iqa.label_field) == ("iqa", (1.0, 5.0), "gt_score_norm")
    assert iqa.manifest.endswith("train/train_koniq_7k.json")
    # DeQA's minimum gt_score_norm (exactly 1.0) is the worst image: 0, not the reference's 100.
    rows = [{"image": "a.jpg", "gt_score": 3.0, "gt_score_norm": 1.0}]
    rec = manifest.load_records(iqa, rows=rows).records[0]
    assert rec["gt_100"] == 0.0
    assert (
        manifest.load_records(iqa, rows=rows, reference_compat=True).records[0]["gt_100"] == 100.0
    )
    with pytest.raises(KeyError, match="built-in"):
        datasets.get("LIVE", root)
    assert math.isclose(datasets.BUILTINS["FLICKR-AES"].score_range[1], 1.0)


def test_spec_from_config():
    import ml_collections

    from configs import common

    cfg = common.dataset_source(
        "iqa",
        manifest="/d/m.jsonl",
        image_root="/d/img",
        sampling="first:100",
        score_range=(1, 5),
        label_field="gt_score_norm",
    )
    assert isinstance(cfg, ml_collections.ConfigDict)
    spec = manifest.spec_from_config("koniq", cfg)
    assert spec == manifest.DatasetSpec(
        "koniq", "iqa", "/d/m.jsonl", "/d/img", (1.0, 5.0), "first:100", "gt_score_norm"
    )
    d = {
        **common.dataset_source("iaa").to_dict(),
        "manifest": "m.json",
        "score_range": [0, 10],
        "sampling": "random:5%",
        "target_field": "cot_reasoning",
    }
    spec = manifest.spec_from_config("x", d)
    assert (spec.sampling, spec.target_field, spec.image_root) == ("random:5%", "cot_reasoning", "")
    with pytest.raises(ValueError, match="score_range.*declared native range"):
        manifest.spec_from_config("x", {**d, "score_range": ()})
    with pytest.raises(ValueError, match="unknown field.*'label_feild'"):
        manifest.spec_from_config("x", {**d, "label_feild": "mos"})
    # A renamed field is an error naming the missing one, never its default.
    renamed = {k: v for k, v in d.items() if k != "label_field"} | {"label_feild": "mos"}
    with pytest.raises(ValueError, match="missing config field.*'label_field'"):
        manifest.spec_from_config("x", renamed)


@pytest.mark.parametrize(
    "target, why",
    [
        ("Sharp and clean. 80", "SFT target lacks <think>, </think>, <answer>, </answer>"),
        ("<think>ok</think> 80", "SFT target lacks <answer>, </answer>"),
        ("<answer>80</answer><think>x</think>", "SFT target's tags are out of order"),
    ],
)
def test_sft_target_needs_think_and_answer(tmp_path, target, why):
    """Issue 32 item 9: a target without <think>/<answer> is a bad row naming file and row."""
    rows = [{"image": "a.jpg", "gt_score": 2.0, "cot": target}]
    path = _write(tmp_path / "m.json", rows)
    spec = manifest.DatasetSpec("t", "iaa", path, score_range=(0, 10), target_field="cot")
    with pytest.raises(manifest.ManifestError) as err:
        manifest.load_records(spec)
    assert str(err.value).startswith(
        f"dataset 't': {path}: row 0 (image 'a.jpg'): field 'cot': {why}"
    )
