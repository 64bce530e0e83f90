"""The eight benchmarks' label files ship with tatar-jax (package data), checked by sha256."""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil

import pytest

from tatar_jax.data import datasets, manifest


def test_shipped_label_files_equal_the_shared_ones_and_are_listed(shared_dir):
    listed = datasets._sha256_list(datasets.PACKAGED_ROOT)
    rels = sorted(datasets.BUILTINS[n].relpath for n in datasets.BENCHMARKS)
    assert sorted(listed) == rels
    for rel in rels:
        ours = pathlib.Path(datasets.PACKAGED_ROOT, rel).read_bytes()
        assert ours == (shared_dir / "benchmarks" / rel).read_bytes(), rel
        assert hashlib.sha256(ours).hexdigest() == listed[rel]


def test_default_root_is_the_shipped_files_and_rows_load():
    spec = datasets.get("KADID", image_root="/data/kadid")
    assert spec.manifest == os.path.join(datasets.PACKAGED_ROOT, "IQA", "KADID", "KADID.json")
    loaded = manifest.load_records(spec)
    assert len(loaded.records) == 2000  # shared/benchmarks/README.md
    assert loaded.records[0]["image"].startswith("/data/kadid/")
    with pytest.raises(datasets.NoImageFolder, match=r"AVA: no image folder \(the shipped"):
        datasets.get("AVA")
    assert datasets.get("AVA", images=False).image_root == ""  # label-only checks
    with pytest.raises(ValueError, match="koniq-train: its label file is not shipped"):
        datasets.get("koniq-train")


def test_a_damaged_or_missing_label_file_is_named(tmp_path):
    root = tmp_path / "bench"
    shutil.copytree(datasets.PACKAGED_ROOT, root)
    datasets.get("SPAQ", root)  # a user's copy with the list checks clean
    target = root / "IQA" / "SPAQ" / "SPAQ.json"
    target.write_bytes(target.read_bytes().replace(b"4.0", b"5.0", 1))
    with pytest.raises(
        manifest.ManifestError, match=r"SPAQ\.json: sha256 .* differs from .*SHA256SUMS"
    ):
        datasets.get("SPAQ", root)
    target.unlink()
    with pytest.raises(manifest.ManifestError, match=r"SPAQ\.json: label file missing"):
        datasets.get("SPAQ", root)
    (root / "SHA256SUMS").unlink()  # a user's own folder without a list: not checked
    assert datasets.get("KADID", root).image_root == ""


def test_every_shipped_file_is_declared_package_data():
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    package_dir = pathlib.Path(datasets.__file__).parent  # tatar_jax/data
    declared = {p for pat in patterns["tatar_jax.data"] for p in package_dir.glob(pat)}
    shipped = {p for p in pathlib.Path(datasets.PACKAGED_ROOT).rglob("*") if p.is_file()}
    assert shipped and shipped == declared
