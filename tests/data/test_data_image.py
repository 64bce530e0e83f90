"""Image loading and preprocessing vs transformers' ``Qwen2VLImageProcessorPil`` (the PIL one,
constructed offline from kwargs), plus patch layout, EXIF, high bit depth and load errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil

from tatar_jax.data import image

MIN_PX, MAX_PX = 3136, 1572864


def _hf(im, min_pixels=MIN_PX, max_pixels=MAX_PX):
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=im, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"][0]


def _random_image(rng, mode, h, w):
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, a[..., 3])  # some fully transparent pixels
    im = Image.fromarray(a, "RGBA")
    if mode == "P+transparency":
        im = im.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        im.info["transparency"] = 3
        return im
    return im.convert(mode)


MODES = ["RGB", "L", "LA", "P", "P+transparency", "RGBA", "CMYK", "PA", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_equal_to_hf_processor(mode):
    rng = np.random.default_rng(MODES.index(mode))
    worst = 0.0
    for _ in range(3):
        h, w = (int(v) for v in rng.integers(28, 400, 2))
        im = _random_image(rng, mode, h, w)
        want_pv, want_thw = _hf(im)
        pv, thw = image.preprocess_image(im, min_pixels=MIN_PX, max_pixels=MAX_PX)
        assert pv.dtype == np.float32 and pv.shape == want_pv.shape and pv.shape[1] == 1176
        np.testing.assert_array_equal(thw, want_thw)
        worst = max(worst, float(np.abs(pv - want_pv).max()))
    assert worst <= 1e-6


@pytest.mark.parametrize(
    "hw,min_px,max_px",
    [
        ((33, 1000), MIN_PX, MAX_PX),
        ((500, 377), 3136, 28 * 28 * 40),
        ((30, 31), 28 * 28 * 9, MAX_PX),
    ],
)
def test_equal_to_hf_when_budget_binds(hw, min_px, max_px):
    rng = np.random.default_rng(1)
    im = _random_image(rng, "RGB", *hw)
    want_pv, want_thw = _hf(im, min_px, max_px)
    pv, thw = image.preprocess_image(im, min_pixels=min_px, max_pixels=max_px)
    np.testing.assert_array_equal(thw, want_thw)
    assert float(np.abs(pv - want_pv).max()) <= 1e-6
    assert min_px <= thw[1] * thw[2] * 14 * 14 <= max_px


def test_smart_resize_and_num_patches_match_hf():
    rng = np.random.default_rng(2)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(4, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        mn = int(rng.choice([3136, 28 * 28 * 16]))
        mx = int(rng.choice([MAX_PX, 28 * 28 * 64]))
        assert image.smart_resize(h, w, 28, mn, mx) == hf_pil.smart_resize(h, w, 28, mn, mx)
        gh, gw = (v // 14 for v in hf_pil.smart_resize(h, w, 28, mn, mx))
        assert image.num_patches(h, w, mn, mx) == gh * gw
    with pytest.raises(ValueError, match="aspect ratio"):
        image.smart_resize(10, 2100)


def test_patch_layout_is_merge_window_order():
    """Independent of HF: a 56x84 image needs no resize; patch k of window (i, j) at (a, b) covers
    rows 28i+14a.., cols 28j+14b..; each row is (channel, temporal, 14, 14) with equal frames."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pv, thw = image.preprocess_image(Image.fromarray(rgb))
    np.testing.assert_array_equal(thw, [1, 4, 6])
    norm = (rgb.astype(np.float64) / 255 - np.array(image.CLIP_MEAN)) / np.array(image.CLIP_STD)
    p = pv.reshape(4 // 2, 6 // 2, 2, 2, 3, 2, 14, 14)
    for i in range(2):
        for j in range(3):
            for a in range(2):
                for b in range(2):
                    r, c = 28 * i + 14 * a, 28 * j + 14 * b
                    want = norm[r : r + 14, c : c + 14].transpose(2, 0, 1)
                    for t in range(2):
                        np.testing.assert_allclose(p[i, j, a, b, :, t], want, atol=1e-6)


def test_upscale_small_images():
    rng = np.random.default_rng(4)
    im = _random_image(rng, "RGB", 10, 45)  # h=10 < 28
    up = image.upscale_small(im)
    assert up.size == (126, 28)  # short side 28, long side round(45 * 2.8)
    pv, thw = image.preprocess_image(im)
    want_pv, want_thw = _hf(up)
    np.testing.assert_array_equal(thw, want_thw)
    assert float(np.abs(pv - want_pv).max()) <= 1e-6
    # Disabled: the plain HF path on the small image.
    pv0, thw0 = image.preprocess_image(im, upscale_min_side=None)
    want0, want_thw0 = _hf(im)
    np.testing.assert_array_equal(thw0, want_thw0)
    assert float(np.abs(pv0 - want0).max()) <= 1e-6
    big = _random_image(rng, "RGB", 28, 40)
    assert image.upscale_small(big) is big


def test_high_bit_depth():
    rng = np.random.default_rng(5)
    a16 = rng.integers(0, 65536, (60, 70), dtype=np.uint16)
    im16 = Image.fromarray(a16)
    assert im16.mode == "I;16"
    as8 = Image.fromarray(np.clip(np.rint(a16 / 257.0), 0, 255).astype(np.uint8), "L")
    pv, _ = image.preprocess_image(im16)
    want, _ = _hf(as8)
    assert float(np.abs(pv - want).max()) <= 1e-6
    im32 = Image.fromarray(a16.astype(np.int32))
    assert im32.mode == "I"
    np.testing.assert_array_equal(image.preprocess_image(im32)[0], pv)
    # "pil": PIL's clipping convert, which is what HF does.
    pv_pil, _ = image.preprocess_image(im16, high_bit_depth="pil")
    assert float(np.abs(pv_pil - _hf(im16)[0]).max()) <= 1e-6
    f = Image.fromarray(a16.astype(np.float32) / 65535.0)
    assert f.mode == "F"
    pv_f, _ = image.preprocess_image(f)
    ref_f = Image.fromarray(np.rint(a16 / 65535.0 * 255).astype(np.uint8), "L")
    assert float(np.abs(pv_f - _hf(ref_f)[0]).max()) <= 1e-6


def test_alpha_composited_on_white():
    a = np.zeros((28, 28, 4), np.uint8)  # fully transparent black
    rgb = image.to_rgb(Image.fromarray(a, "RGBA"))
    assert rgb.mode == "RGB" and np.asarray(rgb).min() == 255


def _jpeg_bytes(rgb, **kw):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_load_image_exif_orientation(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10] = 255  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    path.write_bytes(_jpeg_bytes(rgb, exif=exif))
    im = image.load_image(path)
    assert im.size == (40, 60)  # (w, h) after the transpose
    top = np.asarray(im.convert("L"))[:5].mean()
    assert top > 200  # the left band is now on top
    assert image.load_image(path, exif=False).size == (60, 40)
    assert image.load_image(path.read_bytes()).size == (40, 60)


def test_load_image_errors_name_the_file(tmp_path):
    rgb = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _jpeg_bytes(rgb)
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    cases = {
        "missing.jpg": "file not found",
        "trunc.jpg": "truncated",
        "junk.jpg": "not a readable image",
        "empty.png": "empty file",
        "sub": "directory",
    }
    for name, reason in cases.items():
        with pytest.raises(image.ImageLoadError) as err:
            image.load_image(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and reason in err.value.reason
    with pytest.raises(image.ImageLoadError, match=r"row7\.jpg: truncated"):
        image.load_image(data[:200], name="row7.jpg")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = buf.getvalue()
    with pytest.raises(image.ImageLoadError, match="truncated|cannot decode"):
        image.load_image(png[: len(png) - 100])
