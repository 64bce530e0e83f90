"""Check datasets row by row before training: every problem with file, row and reason.

    # a manifest of your own
    python scripts/check_data.py --manifest=/data/koniq/train.jsonl --image_root=/data/koniq/img \
        --task=iqa --score_range=1,5 [--label_field=gt_score_norm]
    # built-in declarations (the shipped benchmark label files, or --benchmark_root=<yours>)
    python scripts/check_data.py --dataset=KonIQ-10K --dataset=AVA \
        --image_root=KonIQ-10K=/data/koniq/1024x768 --image_root=AVA=/data/ava/images
    python scripts/check_data.py --dataset=benchmarks --noimages

    # check, then stage for pods as TFDS array_record (readable without TensorFlow)
    python scripts/check_data.py --dataset=KonIQ-10K --benchmark_root=/data/VR \
        --image_root=/data/koniq/1024x768 --tfds_dir=gs://my-bucket/tfds --tfds_split=test

Checks: missing / empty image field or label, non-numeric / NaN / out-of-declared-range score,
duplicate image, and (unless --noimages) missing, unreadable or truncated image files (each
image is fully decoded), an empty manifest, a quoted (string) score. Exit status 1 when any
problem is found (also when --skip_bad staged the good rows), 2 on a usage error (one line).
"""

from __future__ import annotations

import collections
import pathlib
import time

from absl import app, flags

from tatar_jax import cli_errors
from tatar_jax.data import datasets, manifest, synthetic
from tatar_jax.evaluation import cli

_MANIFEST = flags.DEFINE_string("manifest", None, "Manifest (JSON list or JSONL) to check.")
_TASK = flags.DEFINE_enum("task", "iqa", list(manifest.TASKS), "Task of --manifest.")
_RANGE = flags.DEFINE_list("score_range", None, "Declared native range 'lo,hi' of --manifest.")
_LABEL = flags.DEFINE_string("label_field", None, "Label field (default gt_score / built-in).")
_DATASET = flags.DEFINE_multi_string(
    "dataset",
    [],
    f"Built-in dataset(s): {', '.join(datasets.BUILTINS)}, 'benchmarks' (all eight), or "
    "synthetic-{iqa,iaa}-{train,test} (built under --benchmark_root by make_synthetic.py).",
)
_ROOT = flags.DEFINE_string(
    "benchmark_root", None, "Root of <IQA|IAA>/<name>/<name>.json (default: the shipped files)."
)
_IMAGE_ROOT = flags.DEFINE_multi_string(
    "image_root", [], "Image folder; for several datasets NAME=PATH (default: manifest folder)."
)
_IMAGES = flags.DEFINE_boolean("images", True, "Decode every image (--noimages: rows only).")
_THREADS = flags.DEFINE_integer("num_threads", 8, "Threads decoding images.")
_MAX = flags.DEFINE_integer("max_report", 200, "Problems printed per dataset (all are counted).")
_TFDS = flags.DEFINE_string(
    "tfds_dir", None, "After the check, stage each dataset as TFDS array_record here (gs:// ok)."
)
_SPLIT = flags.DEFINE_string("tfds_split", "train", "Split name of the staged datasets.")
_ABSOLUTE = flags.DEFINE_boolean(
    "allow_absolute_images",
    False,
    "Accept absolute image paths in --manifest (by default every image entry must stay inside "
    "the image root).",
)
_SKIP_BAD = flags.DEFINE_boolean(
    "skip_bad", False, "Stage even with bad rows, leaving them out (listed next to the data)."
)


def _score_range() -> tuple[float, float]:
    try:
        return cli.parse_range(",".join(_RANGE.value))
    except ValueError as err:
        raise app.UsageError(str(err)) from None


def _specs() -> list[manifest.DatasetSpec]:
    roots = dict(r.split("=", 1) for r in _IMAGE_ROOT.value if "=" in r)
    plain = [r for r in _IMAGE_ROOT.value if "=" not in r]
    if len(plain) > 1:
        raise app.UsageError("give one plain --image_root, or NAME=PATH per dataset")
    if _MANIFEST.value:
        if _DATASET.value:
            raise app.UsageError("give either --manifest or --dataset, not both")
        if not _RANGE.value:
            raise app.UsageError("--manifest needs --score_range=lo,hi (the declared native range)")
        lo, hi = _score_range()
        return [
            manifest.DatasetSpec(
                name=pathlib.Path(_MANIFEST.value).stem,
                task=_TASK.value,
                manifest=_MANIFEST.value,
                image_root=plain[0] if plain else "",
                score_range=(lo, hi),
                label_field=_LABEL.value or "gt_score",
                allow_absolute_images=_ABSOLUTE.value,
            )
        ]
    if not _DATASET.value:
        raise app.UsageError("give --manifest=... or --dataset=...")
    names = []
    for n in _DATASET.value:
        names.extend(datasets.BENCHMARKS if n == "benchmarks" else [n])
    if plain and len(names) > 1:
        raise app.UsageError("several datasets: give --image_root=NAME=PATH per dataset")
    out = []
    for n in names:
        if n.startswith("synthetic-"):  # the embedded set, built under --benchmark_root
            if not _ROOT.value:
                raise app.UsageError(f"--dataset={n} needs --benchmark_root (its folder)")
            syn = synthetic.specs(_ROOT.value)
            if n not in syn:
                raise app.UsageError(f"unknown synthetic dataset {n!r}; have {', '.join(syn)}")
            out.append(syn[n])
            continue
        try:
            c = datasets.canonical_name(n)
            image_root = roots.get(c) or roots.get(n) or (plain or [None])[0]
            spec = datasets.get(c, _ROOT.value, image_root=image_root, images=_IMAGES.value)
        except KeyError as err:
            raise app.UsageError(f"--dataset: {err.args[0]}") from None
        except datasets.NoImageFolder as err:
            raise app.UsageError(
                f"--dataset={n}: {err}; give --image_root={c}=/path/to/its/images or --noimages"
            ) from None
        except ValueError as err:  # a training set's label file is not shipped
            raise app.UsageError(f"--dataset={n}: {err}") from None
        if _LABEL.value:
            spec = spec.replace(label_field=_LABEL.value)
        if _RANGE.value:
            spec = spec.replace(score_range=_score_range())
        out.append(spec)
    return out


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    total_rows = total_bad = 0
    failed_files = 0
    for spec in _specs():
        t0 = time.time()
        try:
            rows = manifest.read_rows(spec.manifest)
        except manifest.ManifestError as err:
            print(f"ERROR {err}")
            failed_files += 1
            continue
        problems = manifest.validate(
            spec, check_images=_IMAGES.value, num_threads=_THREADS.value, rows=rows
        )
        for p in problems[: _MAX.value]:
            print(f"ERROR {p}")
        if len(problems) > _MAX.value:
            print(f"... {len(problems) - _MAX.value} more problems in {spec.manifest}")
        kinds = collections.Counter(p.kind for p in problems)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) or "ok"
        print(
            f"{spec.name}: {len(rows)} rows, {len(problems)} bad ({detail}); "
            f"range {spec.score_range}, images {'checked' if _IMAGES.value else 'not checked'}, "
            f"{time.time() - t0:.1f}s"
        )
        total_rows += len(rows)
        total_bad += len(problems)
        if _TFDS.value:
            if problems and not _SKIP_BAD.value:
                print(f"{spec.name}: not staged (bad rows; fix them or pass --skip_bad)")
                continue
            from tatar_jax.data import tfds_builder

            try:
                path = tfds_builder.build(
                    spec,
                    _TFDS.value,
                    split=_SPLIT.value,
                    on_error="skip" if _SKIP_BAD.value else "error",
                    check_images=bool(problems) or not _IMAGES.value,
                )
            except (manifest.ManifestError, ValueError) as err:
                print(f"ERROR {spec.name}: not staged: {err}")
                failed_files += 1
                continue
            n = len(tfds_builder.load(path, _SPLIT.value))
            print(f"{spec.name}: staged {n} records as TFDS split {_SPLIT.value!r} at {path}")
    status = "FAILED" if total_bad or failed_files else "OK"
    print(
        f"{status}: {total_rows} rows checked, {total_bad} bad rows, "
        f"{failed_files} unreadable manifests"
    )
    return 1 if total_bad or failed_files else 0


if __name__ == "__main__":
    cli_errors.run_script(main)
