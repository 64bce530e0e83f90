"""Pack a manifest and its images into a TFDS dataset (array_record) and read it back - no TF.

This is how data is staged for pods: build once on a machine that sees the images, copy the
folder to GCS (or build straight to ``gs://...`` as ``data_dir``), and read it everywhere with
random access through ``tfds`` / ``array_record`` (no TensorFlow needed; tfds 4.9).

Stored per example (one TFDS example per manifest record, manifest order kept)::

    image_bytes  bytes    the image file's bytes, unchanged (decoded later with PIL, so EXIF,
                          16-bit and alpha handling are those of ``tatar_jax.data.image``)
    record       text     JSON of the manifest record (image path, score_raw, gt_100, row_id,
                          source, dataset, task, target and every extra field)
    gt_100       float64  copy of record["gt_100"] (for quick statistics)
    row_id       int64    copy of record["row_id"]

Images are stored as encoded bytes (``tfds.features.Tensor(dtype=object)``), not
``tfds.features.Image``: that feature keeps only 8-bit 1/3/4-channel arrays and re-encodes some
inputs, while bytes keep the file exactly.

Layout: ``<data_dir>/tatar_manifest/<config>/<version>/`` with one split per build call (the
config name is the dataset name, lower-cased, non ``[a-z0-9_]`` characters replaced by ``_``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from tatar_jax.data import manifest as manifest_lib

VERSION = "1.0.0"
BUILDER_NAME = "tatar_manifest"


def config_name(dataset_name: str) -> str:
    """TFDS config name for a dataset name (``"KonIQ-10K"`` -> ``"koniq_10k"``)."""
    name = re.sub(r"[^a-z0-9_]", "_", dataset_name.lower())
    return name if name and name[0].isalpha() else f"d_{name}"


def _builder_class():
    """The builder class, created on first use so importing this module does not import tfds."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds

    class TatarManifest(tfds.core.GeneratorBasedBuilder):
        """Records of one tatar-jax manifest with their image bytes."""

        VERSION = tfds.core.Version(VERSION)
        # Records are passed in, so there is nothing to download; TFDS would otherwise look for
        # checksums and metadata next to this source file.
        BUILDER_CONFIGS = []
        # No downloads: skip TFDS's search for a checksums file next to the code (that lookup
        # needs the `importlib_resources` backport, absent on TF-less installs).
        url_infos = None

        def __init__(self, *, records=None, split="train", **kwargs):
            self._records = records
            self._split = split
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="tatar-jax manifest records with their image file bytes.",
                features=tfds.features.FeaturesDict(
                    {
                        "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
                        "record": tfds.features.Text(),
                        "gt_100": tfds.features.Scalar(dtype=np.float64),
                        "row_id": tfds.features.Scalar(dtype=np.int64),
                    }
                ),
                disable_shuffling=True,  # keep manifest order
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            for i, rec in enumerate(self._records):
                path = rec["image"]
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as err:
                    raise manifest_lib.ManifestError(
                        f"{rec.get('source', '?')}: row {rec.get('row_id', i)} "
                        f"(image {path!r}): cannot read image ({err.strerror or err})"
                    ) from err
                yield (
                    i,
                    {
                        "image_bytes": data,
                        "record": json.dumps(rec, ensure_ascii=False, sort_keys=True),
                        "gt_100": float(rec["gt_100"]),
                        "row_id": int(rec["row_id"]),
                    },
                )

    _BUILDER = TatarManifest
    return _BUILDER


_BUILDER = None


def build(
    spec: manifest_lib.DatasetSpec,
    data_dir: str | os.PathLike,
    *,
    split: str = "train",
    on_error: str = "error",
    reference_compat: bool = False,
    check_images: bool = True,
    seed: int = 42,
    num_threads: int = 8,
) -> str:
    """Pack ``spec``'s records (sampling and 0-100 mapping applied) with their image bytes.

    With ``check_images`` every image is decoded first (``manifest.validate``); a bad row raises
    ManifestError (file, row, reason) or, with ``on_error="skip"``, is left out and listed in
    ``tatar_<split>_skipped.json`` next to the data (``TfdsRecords.skipped()``).
    Returns the dataset directory (``<data_dir>/tatar_manifest/<config>/<version>``). Building an
    existing dataset again reuses it; ``data_dir`` may be a ``gs://`` path.
    """
    loaded = manifest_lib.load_records(
        spec, on_error=on_error, reference_compat=reference_compat, seed=seed
    )
    records = loaded.records
    skipped = list(loaded.skipped)
    if check_images:
        reasons = manifest_lib.check_image_files([r["image"] for r in records], num_threads)
        keep = []
        for rec, reason in zip(records, reasons, strict=True):
            if reason is not None:
                bad = manifest_lib.BadRow(
                    spec.manifest, rec["row_id"], reason, rec["image"], "image"
                )
                if on_error == "error":
                    raise manifest_lib.ManifestError(f"dataset {spec.name!r}: {bad}")
                skipped.append(bad)
                continue
            keep.append(rec)
        records = keep
    import tensorflow_datasets as tfds

    builder = _builder_class()(
        records=records,
        split=split,
        data_dir=os.fspath(data_dir),
        config=tfds.core.BuilderConfig(name=config_name(spec.name)),
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    if split not in builder.info.splits:
        raise ValueError(
            f"{builder.data_path} already holds splits {list(builder.info.splits)}, not {split!r}: "
            "build each split under its own dataset name (spec.replace(name=...)) or data_dir"
        )
    out = builder.data_path
    (out / f"tatar_{split}_skipped.json").write_text(
        json.dumps([dataclasses.asdict(b) for b in skipped], indent=1)
    )
    return os.fspath(out)


class TfdsRecords(Sequence):
    """Random-access records of a built split, in the manifest record format plus
    ``image_bytes`` (what :class:`tatar_jax.data.pipeline.Source` takes as ``records``).

    Reads through ``tfds.builder_from_directory(path).as_data_source(split)``; no TensorFlow.
    Picklable (grain workers reopen the data source lazily).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = os.fspath(path)
        self.split = split
        self._source = None
        self._len = len(self._ds())

    def _ds(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(self.path)
            if self.split not in builder.info.splits:
                raise KeyError(
                    f"{self.path}: no split {self.split!r} (have {', '.join(builder.info.splits)})"
                )
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "_len": self._len, "_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ex = self._ds()[i]
        rec: dict[str, Any] = json.loads(_text(ex["record"]))
        rec["image_bytes"] = bytes(ex["image_bytes"])
        return rec

    def skipped(self) -> list[dict[str, Any]]:
        """Rows left out when the split was built (``on_error="skip"``)."""
        from etils import epath

        p = epath.Path(self.path) / f"tatar_{self.split}_skipped.json"
        return json.loads(p.read_text()) if p.exists() else []


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def load(path: str | os.PathLike, split: str = "train") -> TfdsRecords:
    """Records of a split built by :func:`build` (``path`` = the returned directory)."""
    return TfdsRecords(path, split)
