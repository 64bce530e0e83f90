"""scripts/eval.py + scripts/score.py wiring: flags -> config -> declarations -> runner.

The model is replaced by a test double (``_fake_factory``); the real factory needs
``tatar_jax.generate`` and must say so clearly when it is missing.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tatar_jax.data import datasets
from tatar_jax.evaluation import cli, predict, specs

REPO = pathlib.Path(__file__).resolve().parents[2]


def _eval_config(arg=None):
    from configs import eval as eval_configs

    return eval_configs.get_config(arg)


def _fake_factory(cfg, *, checkpoint="", step=-1):
    def predict_fn(records):
        return [f"<think>ok</think><answer>{r['gt_100']:.2f}</answer>" for r in records]

    return predict.Predictor(predict_fn, lambda s: len(s.split()), "fake", {"model": "fake"})


def test_config_presets_and_overrides():
    cfg = _eval_config()
    assert cfg.eval.max_new_tokens == 256 and cfg.eval.max_pixels == 1_572_864
    assert cfg.eval.reference_compat is False and cfg.eval.prompt_variant == "reference_eval"
    assert _eval_config("reference").eval.reference_compat is True
    cli.apply_overrides(
        cfg,
        {
            "datasets": "KADID,AVA",
            "score_range": "1,5",
            "limit": 7,
            "hf_dir": "/ckpt",
            "mesh_shape": "data=4,fsdp=2",
            "batch_size": None,
        },
    )
    assert cfg.eval.datasets == "KADID,AVA" and cfg.eval.score_range == (1.0, 5.0)
    assert cfg.eval.limit == 7 and cfg.model.hf_dir == "/ckpt" and cfg.eval.batch_size == 16
    assert cfg.mesh.shape.data == 4 and cfg.mesh.shape.fsdp == 2
    with pytest.raises(ValueError, match="not both"):
        cli.apply_overrides(_eval_config(), {"datasets": "AVA", "manifest": "/x.json"})
    with pytest.raises(ValueError, match="LO < HI"):
        cli.parse_range("5,1")
    with pytest.raises(ValueError, match="not data"):
        cli.parse_axes("model=2", "mesh_shape")


def test_builtin_declarations_with_per_dataset_image_roots(benchmarks_dir):
    cfg = _eval_config()
    cfg.eval.benchmark_root = str(benchmarks_dir)
    roots = specs.parse_mapping("koniq-10k=/img/koniq,SPAQ=/img/spaq")
    cfg.eval.image_roots.KADID = "/img/kadid"
    out = {s.name: s for s in specs.specs_from_config(cfg.eval, roots)}
    assert list(out) == [
        "KonIQ-10K",
        "SPAQ",
        "KADID",
        "PIPAL",
        "ArtiMuse-10K",
        "AVA",
        "TAD66K",
        "FLICKR-AES",
    ]
    assert out["KonIQ-10K"].image_root == "/img/koniq" and out["KADID"].image_root == "/img/kadid"
    assert out["PIPAL"].image_root == ""  # default: the label file's folder
    assert out["FLICKR-AES"].score_range == (0.0, 1.0) and out["AVA"].task == "iaa"
    with pytest.raises(ValueError, match="NAME=PATH"):
        specs.parse_mapping("KonIQ-10K")
    with pytest.raises(ValueError, match="unknown dataset"):
        specs.parse_mapping("Nope=/x")
    cfg.eval.image_root = "/img/one"
    with pytest.raises(ValueError, match="ambiguous"):
        specs.specs_from_config(cfg.eval)
    cfg.eval.datasets = "pipal"
    (only,) = specs.specs_from_config(cfg.eval)
    assert only.name == "PIPAL" and only.image_root == "/img/one"
    cfg.eval.benchmark_root = ""  # the label files shipped with tatar-jax
    (only,) = specs.specs_from_config(cfg.eval)
    assert only.manifest == os.path.join(datasets.PACKAGED_ROOT, "IQA", "PIPAL", "PIPAL.json")
    cfg.eval.image_root = ""
    with pytest.raises(ValueError, match="PIPAL: no image folder .*--image_roots=PIPAL="):
        specs.specs_from_config(cfg.eval)
    cfg.eval.datasets = "KADID,LIVE"
    with pytest.raises(ValueError, match="--datasets: unknown dataset 'LIVE'; choose from KonIQ"):
        specs.specs_from_config(cfg.eval)


def test_custom_manifest_needs_task_and_range(tmp_path):
    cfg = _eval_config()
    cfg.eval.manifest = str(tmp_path / "mine.jsonl")
    with pytest.raises(ValueError, match="--task"):
        specs.specs_from_config(cfg.eval)
    cfg.eval.task = "iqa"
    with pytest.raises(ValueError, match="--score_range"):
        specs.specs_from_config(cfg.eval)
    cfg.eval.score_range = (1.0, 5.0)
    (s,) = specs.specs_from_config(cfg.eval)
    assert s.name == "mine" and s.score_range == (1.0, 5.0) and s.task == "iqa"


def test_run_eval_from_config_end_to_end(tmp_path, capsys):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((5, 7, 3), 40 * i, np.uint8)).save(img_dir / f"{i}.png")
        rows.append({"image": f"{i}.png", "gt_score": 1.0 + 0.7 * i})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _eval_config("tiny")
    cli.apply_overrides(
        cfg,
        {
            "manifest": str(tmp_path / "m.jsonl"),
            "task": "iqa",
            "score_range": "1,5",
            "image_root": str(img_dir),
            "out_dir": str(tmp_path / "out"),
        },
    )
    res = cli.run_eval_from_config(cfg, predictor_factory=_fake_factory)
    assert res["m"]["n_scored"] == 6 and res["m"]["srcc"] == pytest.approx(1.0)
    assert res["m"]["mean_think_tokens"] == 1.0
    assert "| Method | KonIQ |" in capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["model"] == "fake" and info["datasets"]["m"]["score_range"] == [1.0, 5.0]

    cfg.eval.manifest = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cli.run_eval_from_config(cfg, predictor_factory=_fake_factory)


def test_no_weights_is_a_clear_error():
    with pytest.raises(predict.ModelUnavailableError, match="no weights.*--checkpoint.*--hf_dir"):
        predict.build_predict_fn(_eval_config("tiny"))


def test_score_images_and_formatting(tmp_path):
    for name in ("b.png", "a.jpg"):
        Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = cli.collect_images([str(tmp_path)])
    assert [pathlib.Path(p).name for p in paths] == ["a.jpg", "b.png", "broken.png"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        cli.collect_images([str(tmp_path / "nope.png")])

    seen = []

    def predict_fn(records):
        seen.append([(pathlib.Path(r["image"]).name, r["task"]) for r in records])
        return [
            "<think>Sharp, low noise.</think><answer>81.5</answer>"
            if r["task"] == "iqa"
            else "<answer>about 60</answer>"
            for r in records
        ]

    res = cli.score_images(paths, ("iqa", "iaa"), predict_fn, batch_size=3)
    assert [len(c) for c in seen] == [3, 1]  # 2 readable images x 2 tasks, batches of 3
    assert [(pathlib.Path(r["image"]).name, r["task"]) for r in res] == [
        ("a.jpg", "iqa"),
        ("a.jpg", "iaa"),
        ("b.png", "iqa"),
        ("b.png", "iaa"),
        ("broken.png", "iqa"),
        ("broken.png", "iaa"),
    ]
    assert res[0]["score"] == 81.5 and res[0]["reasoning"] == "Sharp, low noise."
    assert res[1]["score"] is None  # strict parsing: "about 60" is not an answer
    assert res[4]["error"] and res[4]["score"] is None
    text = cli.format_results(res, as_json=False)
    assert "81.50 / 100" in text and "reasoning: Sharp, low noise." in text
    assert "unparsed answer" in text and "error:" in text
    lines = cli.format_results(res, as_json=True).splitlines()
    assert json.loads(lines[0])["score"] == 81.5 and len(lines) == 6


def test_score_script_reports_missing_image():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "score.py"), "--image", "/nonexistent/x.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "/nonexistent/x.png does not exist" in proc.stderr


def test_compare_table_over_runs(tmp_path):
    img = tmp_path / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rows = [{"image": "0.png", "gt_score": 1.0}]
    for i in range(1, 6):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "gt_score": 1.0 + 0.5 * i})
    (tmp_path / "KADID.json").write_text(json.dumps(rows))
    for run in ("a", "b"):
        cfg = _eval_config("tiny")
        cfg.eval.benchmark_root = str(tmp_path)
        cli.apply_overrides(
            cfg,
            {
                "manifest": str(tmp_path / "KADID.json"),
                "task": "iqa",
                "score_range": "1,5",
                "out_dir": str(tmp_path / run),
            },
        )
        cfg.eval.name = "KADID"
        cli.run_eval_from_config(cfg, predictor_factory=_fake_factory)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "eval.py"),
            f"--compare={tmp_path / 'a'},{tmp_path / 'b'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| fake")]
    assert len(lines) == 2 and "fake (b)" in lines[1]
    assert "1.000 / 1.000" in lines[0]


def test_out_of_range_answers_are_reported_not_clipped_silently(tmp_path):
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "a.png")
    answers = {"iqa": "<answer>60000</answer>", "iaa": "<answer>-3.5</answer>"}
    res = cli.score_images(
        [str(tmp_path / "a.png")],
        ("iqa", "iaa"),
        lambda recs: [answers[r["task"]] for r in recs],
        batch_size=2,
    )
    assert [(r["score"], r["answer"], r["out_of_range"]) for r in res] == [
        (None, 60000.0, True),
        (None, -3.5, True),
    ]
    text = cli.format_results(res, as_json=False)
    assert "score: out of range: the model answered 60000, outside 0-100" in text
    assert "score: out of range: the model answered -3.5, outside 0-100" in text
    assert "100.00" not in text and "0.00 / 100" not in text

    from tatar_jax.data.manifest import DatasetSpec
    from tatar_jax.evaluation import report, scoring

    texts = ["<answer>60000</answer>", "<answer>40</answer>", "<answer>1e9</answer>", "x"]
    rows = [
        {"row_id": i, "gt_100": 10.0 * i, **scoring.score_completion(t, "iqa")}
        for i, t in enumerate(texts)
    ]
    assert [r["prediction"] for r in rows] == [100.0, 40.0, 100.0, None]  # clipped for SRCC
    m = scoring.dataset_metrics(DatasetSpec("d", "iqa", "m.json"), rows, num_records=4)
    assert (m["n_out_of_range"], m["n_unparsed"], m["n_scored"]) == (2, 1, 4)
    assert "; 2 answers outside 0-100 (clipped) |" in report.details_table({"d": m})
