"""TFDS staging: manifest + images -> array_record TFDS -> records with identical bytes and
labels, read without TensorFlow; bad images raise (file, row) or are skipped and listed."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tatar_jax.data import image, manifest, synthetic, tfds_builder


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("syn") / "s", image_size=32)


def test_round_trip(syn, tmp_path):
    spec = syn["synthetic-iqa-test"].replace(sampling="first:20")
    path = tfds_builder.build(spec, tmp_path / "tfds", split="test")
    assert path.endswith("tatar_manifest/synthetic_iqa_test/1.0.0")
    recs = tfds_builder.load(path, "test")
    want = manifest.load_records(spec).records
    assert len(recs) == len(want) == 20
    for a, b in zip(want, recs, strict=True):
        b = dict(b)
        with open(a["image"], "rb") as f:
            assert b.pop("image_bytes") == f.read()
        assert b == a  # every field, same types (row_id int, gt_100 float, synthetic bool, ...)
    assert recs[-1]["row_id"] == 19 and recs[3:5] == [recs[3], recs[4]]
    pv1, thw1 = image.preprocess_image(image.load_image(recs[7]["image_bytes"]))
    pv2, thw2 = image.preprocess_image(image.load_image(want[7]["image"]))
    np.testing.assert_array_equal(pv1, pv2)
    np.testing.assert_array_equal(thw1, thw2)
    again = pickle.loads(pickle.dumps(recs))  # grain workers get a copy
    assert again[0] == recs[0] and len(again) == 20
    assert recs.skipped() == []
    # Rebuilding reuses the data; another split name under the same dataset is refused.
    assert tfds_builder.build(spec, tmp_path / "tfds", split="test") == path
    with pytest.raises(ValueError, match="own dataset name"):
        tfds_builder.build(spec, tmp_path / "tfds", split="train")
    with pytest.raises(KeyError, match="no split 'train'"):
        tfds_builder.load(path, "train")


def test_read_with_tfds_data_source_without_tensorflow(syn, tmp_path, repo_root):
    spec = syn["synthetic-iaa-train"].replace(sampling="end:5")
    tfds_builder.build(spec, tmp_path / "tfds")
    code = f"""
import json, sys
import tensorflow_datasets as tfds
ds = tfds.data_source("tatar_manifest/synthetic_iaa_train", data_dir={str(tmp_path / "tfds")!r},
                      split="train")
rec = json.loads(ds[4]["record"])
print(len(ds), rec["row_id"], rec["gt_100"], len(ds[4]["image_bytes"]), "tensorflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    last = manifest.load_records(spec).records[-1]
    n, row, gt, nbytes, tf_loaded = out.stdout.split()
    assert (int(n), int(row), float(gt)) == (5, last["row_id"], last["gt_100"])
    with open(last["image"], "rb") as f:
        assert int(nbytes) == len(f.read())
    assert tf_loaded == "False"


def test_bad_images(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (30, 30), (10, 20, 30)).save(img / "a.png")
    (img / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [
        {"image": "a.png", "gt_score": 2.0},
        {"image": "b.png", "gt_score": 3.0},
        {"image": "c.png", "gt_score": 4.0},
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    spec = manifest.DatasetSpec("Toy-Set", "iqa", str(tmp_path / "m.json"), str(img), (1, 5))
    with pytest.raises(manifest.ManifestError, match=r"m\.json: row 1 \(image .*b\.png'\)"):
        tfds_builder.build(spec, tmp_path / "t1")
    path = tfds_builder.build(spec, tmp_path / "t2", on_error="skip")
    recs = tfds_builder.load(path)
    assert [r["row_id"] for r in recs] == [0] and recs[0]["gt_100"] == 25.0
    skipped = recs.skipped()
    assert [(s["row"], s["kind"]) for s in skipped] == [(1, "image"), (2, "image")]
    assert "file not found" in skipped[1]["reason"]
    assert tfds_builder.config_name("KonIQ-10K") == "koniq_10k"
