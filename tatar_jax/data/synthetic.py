"""Embedded synthetic IQA + IAA dataset (the default when no data is configured).

Built offline, deterministically, from photographs scikit-image ships inside its wheel
(``skimage.data``; only images that load without a download). Every record carries
``"synthetic": true`` and the dataset names start with ``synthetic-``: results on it say nothing
about real image quality or aesthetics; it exists so the whole pipeline (manifests, images, SFT
targets, GRPO rewards, evaluation) runs anywhere, and so a model can be seen to learn something.

Layout under ``root`` (manifests in the real format, paths relative to ``root``)::

    meta.json                                   tool, version + build parameters (idempotency
                                                key) and the sha256 of every file it wrote
    iqa_train.jsonl  iqa_test.jsonl             {"image", "gt_score" (1-5), "rationale", ...}
    iaa_train.jsonl  iaa_test.jsonl             {"image", "gt_score" (0-10), "rationale", ...}
    images/iqa/<ref>_v<view>_<distortion>_<level>.png   lossless: only the intended distortion
    images/iaa/<ref>_v<view>_s<sat>_c<cast>.jpg  JPEG quality 95, as aesthetics sets are

Split by reference photo: ``TEST_REFERENCES`` are only in the test split. Each photo gives
``VIEWS[task][split]`` *views*, the scenes that are then distorted or edited: view 0 is the whole
photo, the others deterministic random crops (45-90 % of each side, half of them mirrored), all
resized so the long side is ``image_size``, then brought to one mean luminance
(``VIEW_LUMINANCE``) by a gamma curve. Views multiply the content a model sees: with 9 training
photos alone a small model memorises the photos instead of the distortions. The common luminance
makes the darkening level readable on any photo: in version 3 the test photos' own brightness
(mean luma 20 for the Hubble deep field, 94-115 for the others) capped the held-out SRCC of mean
luma against the IQA label at 0.571 (0.904 on the training photos); the SFT warm-up reached 0.556
and GRPO, which raised the training reward, lowered it. Version 4: 0.986 on both splits.

**IQA labels** (KADID-style: every view at its pristine level 0 plus each distortion of
``IQA_DISTORTIONS`` at 5 levels)::

    gt_score = 5 - 4 * w[distortion] * level / 5          (native range 1..5, pristine = 5)

with per-distortion weights ``w`` (how damaging the strongest level is). The one distortion is
underexposure, a drop in brightness that even the random embedded model's image features carry,
so a tiny model can learn to rank it on unseen photos within CPU minutes. Version 1 had 8
distortions (blur, noise, impulse noise, JPEG, over/underexposure, contrast, pixelation): a
regression probe on the tiny vision tower, trained from scratch on them, did not rank unseen
photos (test SRCC about 0 after 2,000 steps of 16 images). Noise alone it does learn (0.86 after
1,000 such steps), but that is more images than the embedded default's SFT warm-up sees.

**IAA labels** (controlled edits of a view: colour cast, saturation)::

    gt_score = IAA_BASE - 2.0 * cast - 2.0 * |ln(sat)| * colour[ref]     (native range 0..10)

``colour`` is 1 for colour photos and 0 for grey ones (saturation does not change them); the
saturations only mute colour, so the penalty grows one way. ``cast`` (0, 1, 2) is a green
colour cast added to every pixel (it tints grey photos too), the kind of global colour shift
the tiny random model's patch features carry, as they carry IQA's underexposure. Version 2 edited
tilt (black corners), three saturations and a centre zoom crop, and its rationale began by naming
the photo: after the embedded default's SFT warm-up the model wrote the same rationale and answer
for almost every IAA image, training images included (held-out SRCC between -0.15 and +0.22 over
five warm-ups), so GRPO had no ranking to refine; with a cast added and tilt kept, the warm-up
still perceived neither tilt nor cast (measured on 120 training images). The base is one
constant: a per-photo "content" score cannot be learned from 9 photos, and it would make the
held-out ranking a guess about 3 photos.

Each record also holds a short templated ``rationale`` (``<think>`` + ``<answer>``) describing
the known edit and ending in the 0-100 gt (``%.2f``), used as the SFT target.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable

import numpy as np
import scipy.optimize
from PIL import Image, ImageEnhance

from tatar_jax import answer_format
from tatar_jax.data.manifest import DatasetSpec, to_score_100, write_manifest

VERSION = 4
# name -> colour photo. Only files bundled with scikit-image.
REFERENCES: dict[str, bool] = {
    "astronaut": True,
    "coffee": True,
    "chelsea": True,
    "rocket": True,
    "immunohistochemistry": True,
    "hubble_deep_field": True,
    "stereo_motorcycle": True,
    "retina": True,
    "camera": False,
    "coins": False,
    "clock": False,
    "moon": False,
}
TEST_REFERENCES = ("chelsea", "hubble_deep_field", "coins")
# Views (scenes) per photo, per task and split.
VIEWS = {"iqa": {"train": 16, "test": 8}, "iaa": {"train": 8, "test": 6}}
# Every view is brought to this mean luminance (0-255) by a gamma curve before it is distorted or
# edited, so the level of a brightness distortion can be read from any photo (version 4).
VIEW_LUMINANCE = 118.0
IAA_BASE = 7.5
LEVELS = (1, 2, 3, 4, 5)
IAA_SATURATIONS = (0.3, 1.0)
IAA_CASTS = (0, 1, 2)  # green colour cast, in steps of IAA_CAST_RGB
IAA_CAST_RGB = (-20.0, 36.0, -20.0)  # added to the 0-255 pixel values per cast step
TASK_RANGES = {"iqa": (1.0, 5.0), "iaa": (0.0, 10.0)}


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _array_op(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Image.Image], Image.Image]:
    def op(im: Image.Image) -> Image.Image:
        x = fn(np.asarray(im, dtype=np.float64))
        return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")

    return op


def _darken(level: int, key):
    gain = (0.8, 0.62, 0.46, 0.32, 0.2)[level - 1]
    return _array_op(lambda x: x * gain)


# name -> (weight w: share of the 1..5 range the strongest level removes, op factory, words)
IQA_DISTORTIONS = {
    "darken": (0.9, _darken, "underexposure crushes the shadows and hides detail"),
}
SEVERITY_WORDS = ("no", "slight", "mild", "moderate", "strong", "severe")


def iqa_score(distortion: str | None, level: int) -> float:
    """Native 1-5 IQA label of a distortion at a level (0 = pristine)."""
    if level == 0:
        return 5.0
    return round(5.0 - 4.0 * IQA_DISTORTIONS[distortion][0] * level / 5.0, 4)


def iaa_score(ref: str, sat: float, cast: int) -> float:
    """Native 0-10 IAA label of an edit of reference photo ``ref``."""
    colour = REFERENCES[ref]
    s = IAA_BASE - 2.0 * cast - 2.0 * abs(math.log(sat)) * colour
    return round(min(10.0, max(0.0, s)), 4)


def _load_photo(name: str) -> Image.Image:
    import skimage.data  # only needed to build

    x = getattr(skimage.data, name)()
    if isinstance(x, tuple):  # stereo_motorcycle returns (left, right, disparity)
        x = x[0]
    x = np.asarray(x)
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    return Image.fromarray(x[..., :3].astype(np.uint8), "RGB")


def _fit(im: Image.Image, image_size: int) -> Image.Image:
    """Resized so the long side is at most ``image_size``."""
    w, h = im.size
    s = image_size / max(w, h)
    if s < 1:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return im


def _normalise_luminance(im: Image.Image, target: float = VIEW_LUMINANCE) -> Image.Image:
    """``im`` through the gamma curve ``255 (x / 255) ** g`` whose output has mean luma (ITU-R 601,
    as PIL's "L") ``target``; the mean falls monotonically as ``g`` grows, so one root in log g."""
    x = np.asarray(im, np.float64) / 255.0
    luma = np.array([0.299, 0.587, 0.114])

    def excess(log_g: float) -> float:
        return float((x ** math.exp(log_g) @ luma).mean() * 255.0 - target)

    g = math.exp(scipy.optimize.brentq(excess, -4.0, 4.0))  # gamma between 0.018 and 55
    return Image.fromarray(np.clip(np.rint(255.0 * x**g), 0, 255).astype(np.uint8), "RGB")


def _views(name: str, n: int, image_size: int) -> list[Image.Image]:
    """``n`` scenes of photo ``name``: the whole photo, then deterministic crops (45-90 % of each
    side at a random place, every other one mirrored), each fitted to ``image_size`` and brought
    to mean luminance ``VIEW_LUMINANCE``."""
    photo = _load_photo(name)
    out = [_fit(photo, image_size)]
    r = _rng("views", name)
    w, h = photo.size
    for k in range(1, n):
        cw, ch = round(w * r.uniform(0.45, 0.9)), round(h * r.uniform(0.45, 0.9))
        left, top = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
        view = photo.crop((left, top, left + cw, top + ch))
        if k % 2:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(_fit(view, image_size))
    return [_normalise_luminance(v) for v in out]


def _iaa_edit(im: Image.Image, sat: float, cast: int) -> Image.Image:
    if sat != 1.0:
        im = ImageEnhance.Color(im).enhance(sat)
    if cast:
        # After the saturation, so the cast also tints the muted colours.
        im = _array_op(lambda x: x + cast * np.asarray(IAA_CAST_RGB))(im)
    return im


def _score_text(score: float, task: str) -> str:
    """The score on 0-100, as the answer is written (two decimals)."""
    return answer_format.score_text(to_score_100(score, TASK_RANGES[task]))


def _iqa_rationale(distortion: str | None, level: int) -> str:
    if level == 0:
        thought = "The image is clean: edges are sharp, noise is absent and exposure is balanced."
    else:
        words = IQA_DISTORTIONS[distortion][2]
        thought = f"There is {SEVERITY_WORDS[level]} degradation: {words}."
    return answer_format.render(thought, _score_text(iqa_score(distortion, level), "iqa"))


def _iaa_rationale(ref: str, sat: float, cast: int) -> str:
    # The cast first: it is what the image shows most (the photo's name is not said: on a
    # held-out photo it can only be a wrong guess that the rest of the rationale follows).
    parts = [
        (
            "The white balance is neutral.",
            "A slight green cast tints the whole frame.",
            "A strong green cast makes every tone look sickly.",
        )[cast]
    ]
    if REFERENCES[ref]:
        if sat < 0.5:
            parts.append("Colours are washed out and the palette feels dull.")
        else:
            parts.append("The colour palette is natural and harmonious.")
    else:
        parts.append("It is a monochrome image, so tonal balance carries the mood.")
    return answer_format.render(" ".join(parts), _score_text(iaa_score(ref, sat, cast), "iaa"))


def rationales() -> dict[str, list[str]]:
    """Every SFT target text the set can hold, per task (the embedded tokenizer's corpus,
    ``tatar_jax.data.embedded_tokenizer``), in a fixed order."""
    iqa = [_iqa_rationale(None, 0)] + [
        _iqa_rationale(d, lv) for d in IQA_DISTORTIONS for lv in LEVELS
    ]
    iaa = [
        _iaa_rationale(ref, sat, cast)
        for ref in REFERENCES
        for sat, cast in itertools.product(IAA_SATURATIONS, IAA_CASTS)
    ]
    return {"iqa": iqa, "iaa": iaa}


def _iqa_records(out: str, ref: str, v: int, base: Image.Image, common: dict) -> list[dict]:
    """The pristine view and each distortion at each level, written under ``out``."""
    recs = []
    for dist, level in [(None, 0)] + [(d, lv) for d in IQA_DISTORTIONS for lv in LEVELS]:
        im = base if level == 0 else IQA_DISTORTIONS[dist][1](level, (ref, v, dist, level))(base)
        rel = f"images/iqa/{ref}_v{v}_{dist or 'pristine'}_{level}.png"
        im.save(os.path.join(out, rel), "PNG", compress_level=1)
        recs.append(
            {
                "image": rel,
                "gt_score": iqa_score(dist, level),
                "distortion": dist or "pristine",
                "level": level,
                "rationale": _iqa_rationale(dist, level),
                **common,
            }
        )
    return recs


def _iaa_records(out: str, ref: str, v: int, base: Image.Image, common: dict) -> list[dict]:
    """Every saturation x cast edit of the view, written under ``out``."""
    recs = []
    for sat, cast in itertools.product(IAA_SATURATIONS, IAA_CASTS):
        rel = f"images/iaa/{ref}_v{v}_s{sat:g}_c{cast}.jpg"
        _iaa_edit(base, sat, cast).save(os.path.join(out, rel), "JPEG", quality=95)
        recs.append(
            {
                "image": rel,
                "gt_score": iaa_score(ref, sat, cast),
                "saturation": sat,
                "cast": cast,
                "rationale": _iaa_rationale(ref, sat, cast),
                **common,
            }
        )
    return recs


def _build(out: str, image_size: int) -> dict[str, int]:
    rows: dict[str, list[dict]] = {
        f"{t}_{s}": [] for t in ("iqa", "iaa") for s in ("train", "test")
    }
    os.makedirs(os.path.join(out, "images", "iqa"))
    os.makedirs(os.path.join(out, "images", "iaa"))
    for ref in REFERENCES:
        split = "test" if ref in TEST_REFERENCES else "train"
        n_views = max(VIEWS["iqa"][split], VIEWS["iaa"][split])
        for v, base in enumerate(_views(ref, n_views, image_size)):
            common = {"synthetic": True, "reference": ref, "view": v, "split": split}
            for task, records in (("iqa", _iqa_records), ("iaa", _iaa_records)):
                if v < VIEWS[task][split]:
                    rows[f"{task}_{split}"] += records(out, ref, v, base, common)
    for name, rs in rows.items():
        write_manifest(os.path.join(out, f"{name}.jsonl"), rs)
    return {name: len(rs) for name, rs in rows.items()}


def specs(root: str | os.PathLike) -> dict[str, DatasetSpec]:
    """Declarations of the four synthetic datasets under ``root`` (built or not).

    Keys and names: ``synthetic-iqa-train``, ``synthetic-iqa-test``, ``synthetic-iaa-train``,
    ``synthetic-iaa-test``. The SFT target is the record's ``rationale``.
    """
    root = os.path.abspath(os.fspath(root))
    out = {}
    for task in ("iqa", "iaa"):
        for split in ("train", "test"):
            name = f"synthetic-{task}-{split}"
            out[name] = DatasetSpec(
                name=name,
                task=task,
                manifest=os.path.join(root, f"{task}_{split}.jsonl"),
                image_root=root,
                score_range=TASK_RANGES[task],
                target_field="rationale",
                synthetic=True,
            )
    return out


TOOL = "tatar_jax.data.synthetic"  # the marker in meta.json: this module wrote the folder


def _meta(image_size: int) -> dict:
    import skimage

    return {"version": VERSION, "image_size": image_size, "skimage": skimage.__version__}


def _read_meta(meta_path: str) -> dict | None:
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_build(meta_path: str, want: dict) -> bool:
    """A complete build with the parameters ``want`` (every listed file present; a build of an
    earlier release, without the list, by its four manifests): reused, never replaced."""
    meta = _read_meta(meta_path)
    if meta is None or meta.get("params") != want or meta.get("synthetic") is not True:
        return False
    root = os.path.dirname(meta_path)
    manifests = [f"{t}_{s}.jsonl" for t in ("iqa", "iaa") for s in ("train", "test")]
    files = meta.get("files") or manifests
    return all(os.path.isfile(os.path.join(root, f)) for f in files)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_list(root: str) -> dict[str, str]:
    """{path relative to ``root``: sha256} of every file under ``root`` but ``meta.json``."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            if rel != "meta.json":
                out[rel] = _sha256(path) if os.path.isfile(path) else "not a regular file"
    return out


def not_replaceable(root: str) -> str | None:
    """Why the existing ``root`` must not be replaced by a new build, or None when it provably
    holds nothing but an earlier build of this module: ``meta.json`` names :data:`TOOL` and
    lists every file, and the folder holds exactly those files, unchanged (sha256)."""
    if not os.path.lexists(root):
        return None
    if os.path.islink(root) or not os.path.isdir(root):
        return "it is not a folder"
    if not os.listdir(root):
        return None
    meta = _read_meta(os.path.join(root, "meta.json"))
    if meta is None:
        return "it is not a synthetic dataset build (no readable meta.json)"
    if meta.get("tool") != TOOL or not isinstance(meta.get("files"), dict):
        return (
            f"it is not a synthetic dataset build of this version (its meta.json does not name "
            f"{TOOL} and list its files)"
        )
    have, listed = _file_list(root), meta["files"]
    extra = sorted(set(have) - set(listed))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"it holds files the build did not write: {', '.join(extra[:3])}{more}"
    changed = sorted(f for f in listed if have.get(f) != listed[f])
    if changed:
        return f"{changed[0]} was changed or removed since the build"
    return None


def ensure_synthetic(root: str | os.PathLike, image_size: int = 128) -> dict[str, DatasetSpec]:
    """Build the synthetic set under ``root`` unless an identical build is there; its specs.

    Deterministic (same files for the same parameters and scikit-image version) and idempotent:
    a complete build with the same ``meta.json`` is reused. An existing ``root`` is replaced
    only when it is empty or provably an earlier build of this module, unchanged
    (:func:`not_replaceable`); anything else (a user's folder, a file, a build with files added
    or edited) raises FileExistsError and nothing is deleted, moved or renamed.
    The build goes to a temporary folder renamed into place, so concurrent callers (several
    processes or hosts on a shared disk) never see a half-written set.
    """
    root = os.path.abspath(os.fspath(root))
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    want = _meta(image_size)
    meta_path = os.path.join(root, "meta.json")
    if _is_build(meta_path, want):
        return specs(root)
    why = not_replaceable(root)
    if why:
        raise FileExistsError(
            f"{root} exists and {why}: nothing was changed (give a new or empty folder)"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        counts = _build(tmp, image_size)
        meta = {"tool": TOOL, "params": want, "counts": counts, "synthetic": True}
        meta["files"] = _file_list(tmp)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        if _is_build(meta_path, want):
            # Another process finished an identical build meanwhile: it may be reading it, so it
            # must not be moved away under it; ours is dropped.
            return specs(root)
        if os.path.exists(root):
            if not_replaceable(root):  # something appeared meanwhile: keep it, drop ours
                raise FileExistsError(f"{root} changed while the build ran: nothing was changed")
            old = f"{root}.old-{os.getpid()}"
            os.replace(root, old)  # provably our earlier build (or empty): safe to drop
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first: use its (identical) build
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return specs(root)
