"""End-to-end evaluation runner: outputs, resume, missing images, B1 label mapping, summary layout.

The model is replaced by ``FakePredictor``, a deterministic test double that answers a noisy
function of the ground truth (it never touches a model); the real predict function is built by
``scripts/eval.py``.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from tatar_jax.data import datasets, manifest
from tatar_jax.evaluation import outputs, report, runner, scoring


class FakePredictor:
    """Test double: completion = think text + answer = gt_100 + a row-seeded offset.

    Every 5th row answers in words ("about N points": strict parsing rejects it, the lenient
    reference parser accepts it). Records every row_id it was asked for.
    """

    def __init__(self, fail_after_calls: int | None = None, exact: bool = False):
        self.calls: list[list[int]] = []
        self.fail_after_calls = fail_after_calls
        self.exact = exact

    def __call__(self, records):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append([(r["dataset"], r["row_id"]) for r in records])
        out = []
        for r in records:
            assert r["pil_image"].size == (8, 6)  # the runner hands over the decoded image
            rid = r["row_id"]
            if self.exact:
                out.append(f"<think>sharp</think><answer>{r['gt_100']!r}</answer>")
                continue
            value = r["gt_100"] + ((rid * 37) % 11 - 5) * 2.5
            words = " ".join(["word"] * (rid % 4 + 1))
            ans = f"about {value:.0f} points" if rid % 5 == 1 else f"{value:.2f}"
            out.append(f"<think>{words}</think>\n<answer>{ans}</answer>")
        return out

    def rows_seen(self, dataset: str) -> list[int]:
        return [i for c in self.calls for d, i in c if d == dataset]


def _image(path):
    Image.fromarray(np.full((6, 8, 3), 128, np.uint8)).save(path)


def _dataset(tmp_path, name, task, score_range, n, missing=()):
    root = tmp_path / name
    root.mkdir()
    rng = np.random.default_rng(len(name))
    lo, hi = score_range
    rows = []
    for i in range(n):
        img = f"img_{i:03d}.png"
        if i not in missing:
            _image(root / img)
        rows.append({"image": img, "gt_score": round(float(rng.uniform(lo, hi)), 3)})
    (root / "labels.json").write_text(json.dumps(rows))
    return manifest.DatasetSpec(name, task, str(root / "labels.json"), score_range=score_range)


@pytest.fixture
def specs(tmp_path):
    return [
        _dataset(tmp_path, "KADID", "iqa", (1.0, 5.0), 23, missing=(4,)),
        _dataset(tmp_path, "AVA", "iaa", (1.0, 10.0), 17),
    ]


def _opts(**kw):
    base = dict(batch_size=4, progress=False, image_threads=2)
    base.update(kw)
    return runner.EvalOptions(**base)


def test_end_to_end_outputs_and_metrics(tmp_path, specs):
    out = tmp_path / "out"
    fake = FakePredictor()
    results = runner.run_eval(specs, fake, out, _opts())
    for name in ("KADID", "AVA"):
        d = out / name
        for f in ("predictions.jsonl", "errors.jsonl", "metrics.json", "scatter.png"):
            assert (d / f).is_file(), f
    for f in ("metrics.json", "summary.md", "think_length_iqa.png", "think_length_iaa.png"):
        assert (out / f).is_file(), f

    # Independent recomputation from the manifest + the fake's rule.
    spec = specs[0]
    raw = [r["gt_score"] for r in json.loads(open(spec.manifest).read())]
    rows = outputs.read_jsonl(str(out / "KADID" / "predictions.jsonl"))
    assert sorted(r["row_id"] for r in rows) == [i for i in range(23) if i != 4]
    gt, pred = [], []
    for r in rows:
        rid = r["row_id"]
        assert r["gt_raw"] == raw[rid]
        assert r["gt_100"] == pytest.approx(25.0 * (raw[rid] - 1.0))  # declared (1, 5)
        assert r["think_words"] == rid % 4 + 1 and r["think_tokens"] is None
        if rid % 5 == 1:
            assert r["parsed"] is False and r["prediction"] is None
        else:
            v = r["gt_100"] + ((rid * 37) % 11 - 5) * 2.5
            assert r["prediction"] == pytest.approx(min(max(round(v, 2), 0), 100), abs=1e-9)
            gt.append(r["gt_100"])
            pred.append(r["prediction"])
    m = results["KADID"]
    assert json.loads((out / "KADID" / "metrics.json").read_text()) == m
    assert m["n_records"] == 23 and m["n_scored"] == 22 and m["n_image_errors"] == 1
    assert m["n_missing"] == 0
    assert m["n_unparsed"] == sum(1 for r in rows if r["row_id"] % 5 == 1)
    assert m["frac_unparsed"] == pytest.approx(m["n_unparsed"] / 22)
    assert m["n_pairs"] == len(gt)
    assert m["srcc"] == pytest.approx(stats.spearmanr(gt, pred).statistic, abs=1e-12)
    assert m["plcc"] == pytest.approx(stats.pearsonr(gt, pred).statistic, abs=1e-12)
    assert m["mean_think_words"] == pytest.approx(np.mean([r["think_words"] for r in rows]))

    # The missing image is listed with its reason and never sent to the predictor.
    errs = outputs.read_jsonl(str(out / "KADID" / "errors.jsonl"))
    assert [(e["kind"], e["row_id"], e["image"]) for e in errs] == [("image", 4, "img_004.png")]
    assert "not found" in errs[0]["reason"]
    assert 4 not in fake.rows_seen("KADID")
    assert sorted(fake.rows_seen("KADID")) == [i for i in range(23) if i != 4]
    assert sorted(fake.rows_seen("AVA")) == list(range(17))
    assert all(len(c) <= 4 for c in fake.calls)


def test_resume_after_truncation_and_kill_gives_identical_metrics(tmp_path, specs):
    ref_out = tmp_path / "ref"
    ref = runner.run_eval(specs, FakePredictor(), ref_out, _opts(plots=False))

    # (a) killed mid-way: the predictor dies on its third call.
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(specs, FakePredictor(fail_after_calls=2), out, _opts(plots=False))
    pred_path = out / "KADID" / "predictions.jsonl"
    # two flushed batches of 4 survive (row 4 has no image)
    assert [r["row_id"] for r in outputs.read_jsonl(str(pred_path))] == [0, 1, 2, 3, 5, 6, 7]
    again = FakePredictor()
    res = runner.run_eval(specs, again, out, _opts(plots=False))
    assert res == ref
    assert sorted(again.rows_seen("KADID")) == [i for i in range(8, 23) if i != 4]
    assert sorted(again.rows_seen("AVA")) == list(range(17))

    # (b) metrics deleted, predictions truncated mid-line (a killed writer), image now present.
    for name in ("KADID", "AVA"):
        os.remove(out / name / "metrics.json")
    data = pred_path.read_bytes()
    lines = data.split(b"\n")
    pred_path.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:17])
    third = FakePredictor()
    res = runner.run_eval(specs, third, out, _opts(plots=False))
    assert res == ref
    stored = [r["row_id"] for r in outputs.read_jsonl(str(pred_path))]
    assert third.rows_seen("AVA") == []
    assert sorted(third.rows_seen("KADID")) == sorted(set(range(23)) - {4} - set(stored[:5]))
    assert len(stored) == len(set(stored)) == 22
    assert json.loads((out / "metrics.json").read_text()) == ref

    # (c) nothing left to do: no predictor call at all, same metrics.
    idle = FakePredictor()
    assert runner.run_eval(specs, idle, out, _opts(plots=False)) == ref and idle.calls == []


def test_failed_image_retried_on_resume(tmp_path, specs):
    out = tmp_path / "out"
    runner.run_eval(specs[:1], FakePredictor(), out, _opts(plots=False))
    _image(os.path.join(os.path.dirname(specs[0].manifest), "img_004.png"))
    again = FakePredictor()
    m = runner.run_eval(specs[:1], again, out, _opts(plots=False))["KADID"]
    assert again.rows_seen("KADID") == [4]
    assert m["n_image_errors"] == 0 and m["n_scored"] == 23
    assert outputs.read_jsonl(str(out / "KADID" / "errors.jsonl")) == []


def test_resume_refuses_other_data_or_settings(tmp_path, specs):
    out = tmp_path / "out"
    runner.run_eval(specs[:1], FakePredictor(), out, _opts(plots=False))
    with pytest.raises(outputs.EvalError, match="reference_compat"):
        runner.run_eval(specs[:1], FakePredictor(), out, _opts(reference_compat=True))
    rows = json.loads(open(specs[0].manifest).read())
    rows[2]["gt_score"] = 4.5 if rows[2]["gt_score"] != 4.5 else 4.4
    open(specs[0].manifest, "w").write(json.dumps(rows))
    with pytest.raises(outputs.EvalError, match="row_id 2"):
        runner.run_eval(specs[:1], FakePredictor(), out, _opts(plots=False))


def test_predict_fn_contract_is_checked(tmp_path, specs):
    with pytest.raises(outputs.EvalError, match="returned 1 completions for 4"):
        runner.run_eval(specs[:1], lambda recs: ["x"], tmp_path / "a", _opts(plots=False))
    with pytest.raises(outputs.EvalError, match="expected the decoded text"):
        runner.run_eval(specs[:1], lambda recs: [None] * len(recs), tmp_path / "b", _opts())


def test_bad_manifest_row_errors_or_is_listed(tmp_path, specs):
    rows = json.loads(open(specs[0].manifest).read())
    rows[3]["gt_score"] = 7.0  # outside the declared (1, 5)
    open(specs[0].manifest, "w").write(json.dumps(rows))
    with pytest.raises(manifest.ManifestError, match="row 3"):
        runner.run_eval(specs[:1], FakePredictor(), tmp_path / "a", _opts(plots=False))
    fake = FakePredictor()
    m = runner.run_eval(specs[:1], fake, tmp_path / "b", _opts(plots=False, bad_rows="skip"))
    m = m["KADID"]
    assert m["n_bad_rows"] == 1 and m["n_records"] == 23 and 3 not in fake.rows_seen("KADID")
    errs = outputs.read_jsonl(str(tmp_path / "b" / "KADID" / "errors.jsonl"))
    assert {(e["kind"], e["row_id"]) for e in errs} == {("bad_row", 3), ("image", 4)}


def test_limit_and_token_counter(tmp_path, specs):
    fake = FakePredictor()
    m = runner.run_eval(
        specs[1:], fake, tmp_path / "o", _opts(limit=6, plots=False), count_tokens=len
    )["AVA"]
    assert sorted(fake.rows_seen("AVA")) == list(range(6)) and m["n_records"] == 6
    rows = outputs.read_jsonl(str(tmp_path / "o" / "AVA" / "predictions.jsonl"))
    # think text is "word word ..." -> len() counts characters: 5 * words - 1
    assert all(r["think_tokens"] == 5 * r["think_words"] - 1 for r in rows)
    assert m["mean_think_tokens"] == pytest.approx(np.mean([r["think_tokens"] for r in rows]))


def test_reference_compat_parses_leniently(tmp_path, specs):
    m = runner.run_eval(
        specs[:1], FakePredictor(), tmp_path / "o", _opts(reference_compat=True, plots=False)
    )["KADID"]
    assert m["mode"] == "reference_compat" and m["n_unparsed"] == 0 and "srcc_reference" in m


# ---------------------------------------------------------------------------------------------
# B1: the shared benchmark rows the reference maps wrongly map by declared range here.

B1_ROWS = {
    "KonIQ-10K": ("3632417985.jpg",),
    "SPAQ": ("03464.jpg", "05240.jpg", "08456.jpg", "08648.jpg", "10032.jpg"),
    "PIPAL": ("A0243_03_23.bmp",),
}
# The datasets' native scales written out (shared/benchmarks/README.md): 0-100 MOS is kept,
# PIPAL's 1-5 becomes 25 (x - 1).
NATIVE_TO_100 = {"KonIQ-10K": lambda x: x, "SPAQ": lambda x: x, "PIPAL": lambda x: 25 * (x - 1)}


@pytest.mark.parametrize("name", sorted(B1_ROWS))
def test_b1_rows_map_by_declared_range(tmp_path, benchmarks_dir, name):
    bench = benchmarks_dir
    full = datasets.get(name, bench)
    rows = json.loads(open(full.manifest).read())
    pick = [r for r in rows if r["image"] in B1_ROWS[name]] + rows[:30]
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    _image(img_dir / "one.png")
    for r in pick:
        if not (img_dir / r["image"]).exists():
            os.link(img_dir / "one.png", img_dir / r["image"])  # PIL reads by content
    sub = tmp_path / f"{name}.json"
    sub.write_text(json.dumps(pick))
    spec = datasets.get(name, bench, manifest=sub, image_root=img_dir)
    assert spec.score_range == datasets.BUILTINS[name].score_range

    res = runner.run_eval([spec], FakePredictor(exact=True), tmp_path / "fixed", _opts())[name]
    got = {
        r["image"]: r["gt_100"]
        for r in outputs.read_jsonl(str(tmp_path / "fixed" / name / "predictions.jsonl"))
    }
    for img in B1_ROWS[name]:
        want = NATIVE_TO_100[name](got_raw(pick, img))
        assert want < 5.0  # all of them are among the worst images
        assert got[img] == pytest.approx(want, abs=1e-9), img
    # A perfect predictor of the raw labels scores exactly 1 (the reference mapping cannot).
    assert res["srcc"] == pytest.approx(1.0, abs=1e-12)
    assert res["plcc"] == pytest.approx(1.0, abs=1e-12)

    ref_dir = tmp_path / "ref"
    runner.run_eval([spec], FakePredictor(exact=True), ref_dir, _opts(reference_compat=True))
    ref_gt = {
        r["image"]: r["gt_100"]
        for r in outputs.read_jsonl(str(ref_dir / name / "predictions.jsonl"))
    }
    for img in B1_ROWS[name]:
        assert ref_gt[img] == pytest.approx(manifest.reference_score_100(got_raw(pick, img), "iqa"))
        assert ref_gt[img] >= 75.0  # the reference's jump to the top of the scale
    shutil.rmtree(img_dir)


def got_raw(rows, img):
    return next(r["gt_score"] for r in rows if r["image"] == img)


# ---------------------------------------------------------------------------------------------
# Summary layout


def test_summary_has_paper_layout():
    def m(s, p, task):
        return {"srcc": s, "plcc": p, "task": task, "n_records": 10, "n_scored": 10}

    results = {
        "KonIQ-10K": m(0.9, 0.92, "iqa"),
        "SPAQ": m(0.8, 0.82, "iqa"),
        "KADID": m(0.7, 0.72, "iqa"),
        "PIPAL": m(0.6, 0.62, "iqa"),
        "ArtiMuse-10K": m(0.5, 0.52, "iaa"),
        "AVA": m(0.4, 0.42, "iaa"),
        "TAD66K": m(0.3, None, "iaa"),  # not computable -> excluded from the average
        "custom": m(0.1, 0.1, "iaa"),
    }
    text = report.summary_markdown(results, title="model-A")
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("| Method"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == [
        "Method",
        "KonIQ",
        "SPAQ",
        "KADID",
        "PIPAL",
        "IQA avg",
        "ArtiMuse-10K",
        "AVA",
        "TAD66K",
        "FLICKR-AES",
        "IAA avg",
        "Overall avg",
    ]
    row = next(ln for ln in lines if ln.startswith("| model-A"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.900 / 0.920"
    assert cells[5] == "0.750 / 0.770"  # IQA average over all four
    assert cells[8] == "0.300 / —" and cells[9] == "—"
    assert cells[10] == "0.450* / 0.470*"  # two of four IAA datasets
    assert cells[11] == "0.650* / 0.670*"
    assert "covers 2 of 4" in text and "covers 6 of 8" in text
    assert "| custom | IAA |" in text  # non-benchmark sets appear in the details table


def test_record_failure_from_predict_fn_is_listed_and_counted(tmp_path, specs):
    inner = FakePredictor()

    def predict_fn(records):
        out = inner(records)
        return [
            runner.RecordFailure("aspect ratio 250 > 200") if r["row_id"] == 7 else t
            for r, t in zip(records, out, strict=True)
        ]

    m = runner.run_eval(specs[:1], predict_fn, tmp_path / "o", _opts(plots=False))["KADID"]
    assert m["n_predict_errors"] == 1 and m["n_image_errors"] == 1 and m["n_scored"] == 21
    assert m["n_missing"] == 0
    errs = outputs.read_jsonl(str(tmp_path / "o" / "KADID" / "errors.jsonl"))
    assert ("predict", 7, "aspect ratio 250 > 200") in {
        (e["kind"], e["row_id"], e["reason"]) for e in errs
    }


def test_metrics_from_completions_matches_the_runner(tmp_path, specs):
    res = runner.run_eval(specs[1:], FakePredictor(), tmp_path / "o", _opts(plots=False))["AVA"]
    rows = outputs.read_jsonl(str(tmp_path / "o" / "AVA" / "predictions.jsonl"))
    recs = [{"gt_100": r["gt_100"], "task": "iaa"} for r in rows]
    m = scoring.metrics_from_completions(recs, [r["completion"] for r in rows], name="AVA")
    for key in ("srcc", "plcc", "plcc_logistic", "krcc", "n_pairs", "n_unparsed", "frac_unparsed"):
        assert m[key] == res[key], key
    with pytest.raises(ValueError, match="one task"):
        scoring.metrics_from_completions(
            [{"gt_100": 1.0, "task": "iqa"}, {"gt_100": 2.0, "task": "iaa"}], ["", ""]
        )


def test_separate_runs_share_one_summary_and_range_change_is_refused(tmp_path, specs):
    out = tmp_path / "o"
    a = runner.run_eval(specs[:1], FakePredictor(), out, _opts(plots=False))
    b = runner.run_eval(specs[1:], FakePredictor(), out, _opts(plots=False))
    every = json.loads((out / "metrics.json").read_text())
    assert every == {**a, **b}
    summary = (out / "summary.md").read_text()
    assert "| KADID | IQA |" in summary and "| AVA | IAA |" in summary
    with pytest.raises(outputs.EvalError, match="gt_100"):
        runner.run_eval(
            [specs[0].replace(score_range=(0.0, 5.0))], FakePredictor(), out, _opts(plots=False)
        )
