"""Random RGB images written as PNG files for the input-pipeline tests (numpy + PIL only)."""

from __future__ import annotations

import pathlib

import numpy as np


def write_random_images(
    root: pathlib.Path, n: int, rng: np.random.Generator, prefix: str, *, max_side: int
) -> list[str]:
    """Writes ``root/<prefix><i>.png`` for i < n: uniform random uint8 pixels, height and width
    each drawn from [28, max_side) (28 = one merged 2x2 patch unit of 14-pixel patches), so the
    rows differ in patch count. Returns the paths as strings, in order."""
    from PIL import Image

    paths = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(28, max_side, size=2))
        p = root / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths
