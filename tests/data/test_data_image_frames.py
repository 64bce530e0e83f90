"""Multi-frame files (data/image.py): an animation or a multi-page TIFF is refused with its frame
count; a single-frame GIF and an MPO photo (primary image = frame 0) load."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tatar_jax.data import image


def _frames(n):
    return [Image.fromarray(np.full((8, 10, 3), 40 * k, np.uint8)) for k in range(n)]


@pytest.mark.parametrize("ext,fmt", [(".gif", "GIF"), (".png", "PNG"), (".tif", "TIFF")])
def test_multi_frame_files_are_refused(tmp_path, ext, fmt):
    path = tmp_path / f"anim{ext}"
    first, *rest = _frames(3)
    first.save(path, format=fmt, save_all=True, append_images=rest)
    with pytest.raises(image.ImageLoadError, match=r"anim.*: 3 frames \(.* animation or multi"):
        image.load_image(path)


def test_single_frame_gif_and_mpo_load(tmp_path):
    (still,) = _frames(1)
    still.save(tmp_path / "one.gif")
    assert image.load_image(tmp_path / "one.gif").size == (10, 8)
    primary, preview = _frames(2)
    primary.save(tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=[preview])
    with Image.open(tmp_path / "photo.jpg") as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    got = np.asarray(image.load_image(tmp_path / "photo.jpg"))
    assert abs(float(got.mean()) - 0.0) < 2.0  # frame 0 (black), not the grey preview
