"""Image loading and Qwen2.5-VL preprocessing, equal to transformers' ``Qwen2VLImageProcessorPil``.

Steps of :func:`preprocess_image` (HF's order and arithmetic):

1. :func:`to_rgb`: modes with alpha (RGBA, LA, PA, P/L with a transparency entry) are composited
   on **white** with ``PIL.Image.alpha_composite``, the rest converted with ``convert("RGB")`` -
   exactly transformers' ``convert_to_rgb``. High bit-depth modes (I;16*, I, F) are first scaled
   to 8 bit (``high_bit_depth="scale"``, default) because PIL's ``convert`` clips them at 255 and
   saturates a 16-bit photo; ``"pil"`` keeps PIL's (and HF's) clipping.
2. Optional upscale of images whose short side is below ``upscale_min_side`` (28) so that it
   becomes 28, aspect kept, Lanczos (the reference GRPO loader, spec §3; HF would raise on them).
3. :func:`smart_resize` to multiples of 28 within ``[min_pixels, max_pixels]`` and a PIL BICUBIC
   resize (HF's resample).
4. ``(x * (1/255) in float64 -> float32 - mean) / std`` in float32 with the OpenAI CLIP mean/std,
   evaluated through a 256-entry lookup table per channel (bit-identical to HF's elementwise ops).
5. Patchify to ``(grid_h * grid_w, 3 * 2 * 14 * 14)``: patches ordered by 2x2 merge window
   (``(h/2, w/2, 2, 2)``), each patch flattened as ``(channel, temporal=2, 14, 14)`` with the image
   repeated on the temporal axis - the layout the vision tower's Conv3d patch embedding expects.

:func:`load_image` decodes a file fully (so truncation is found) and applies the EXIF orientation.
Only still images are scored: an animation (GIF, APNG, WebP) or a multi-page TIFF is an
:class:`ImageLoadError` naming the frame count, never silently its first frame. The one
multi-frame format taken as a still is MPO (phone JPEGs), whose first frame is by that standard
the primary image (the others are previews / depth or stereo views).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageOps

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
MIN_PIXELS = 3136  # 4 * 28**2 (spec §3)
MAX_PIXELS = 1572864  # 2006 * 28**2 (spec §3)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
UPSCALE_MIN_SIDE = 28
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers OPENAI_CLIP_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # transformers OPENAI_CLIP_STD

PathOrBytes = str | os.PathLike | bytes


def hf_preprocessor_config(
    min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> dict[str, object]:
    """``preprocessor_config.json`` of an HF export: transformers' Qwen2.5-VL image processor
    set to the preprocessing of :func:`preprocess_image` (same pixel budget, mean/std, patches).
    """
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": int(Image.Resampling.BICUBIC),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }


class ImageLoadError(OSError):
    """An image file is missing, unreadable or truncated; names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Loading


def _check_still(im: Image.Image, where: str) -> None:
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1 and im.format != "MPO":
        raise ImageLoadError(
            where,
            f"{frames} frames ({im.format} animation or multi-page file); only still images are "
            "scored: save the frame you mean as its own file",
        )


def symlink_problem(path: str) -> str | None:
    """For a path that does not resolve: why, when it is a symbolic link (a loop, a target that
    is gone), so that it is not reported as a plain missing file; else None."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as err:
        return f"symbolic link does not resolve ({err.strerror})"
    return None


def load_image(src: PathOrBytes, *, name: str | None = None, exif: bool = True) -> Image.Image:
    """Open and fully decode an image file (or encoded bytes); EXIF orientation applied.

    The mode is left as stored (``preprocess_image`` converts). Raises ImageLoadError naming
    ``name`` (default: the path, or ``"<bytes>"``) for missing, empty, unreadable or truncated
    input.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        where = name or "<bytes>"
        fp = io.BytesIO(bytes(src))
        if not fp.getbuffer().nbytes:
            raise ImageLoadError(where, "empty image data")
    else:
        where = name or os.fspath(src)
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageLoadError(where, symlink_problem(path) or "file not found")
        if os.path.isdir(path):
            raise ImageLoadError(where, "is a directory, not an image")
        if os.path.getsize(path) == 0:
            raise ImageLoadError(where, "empty file")
        fp = path
    try:
        with Image.open(fp) as im:
            _check_still(im, where)
            im.load()  # full decode: truncated data raises here, not later in a worker
            if exif:
                out = ImageOps.exif_transpose(im)
                # exif_transpose returns a copy when it rotates, else `im` itself (closed on exit)
                return out if out is not im else im.copy()
            return im.copy()
    except Image.DecompressionBombError as err:
        raise ImageLoadError(where, f"image too large ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(where, "not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        msg = str(err)
        if "truncated" in msg.lower():
            raise ImageLoadError(where, f"truncated image ({msg})") from err
        raise ImageLoadError(where, f"cannot decode image ({type(err).__name__}: {msg})") from err


# ---------------------------------------------------------------------------------------------
# Colour conversion


def _to_8bit(im: Image.Image) -> Image.Image:
    """Grey high bit-depth image -> mode L, scaled (not clipped) to 0..255."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        a = a.astype(np.float64) / 257.0  # 65535 -> 255
    elif im.mode == "I":  # PIL's mode for 16-bit PNG / TIFF samples
        a = a.astype(np.float64) / 257.0
    else:  # "F": float samples, taken as 0..1
        a = np.nan_to_num(a.astype(np.float64), nan=0.0) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, *, high_bit_depth: str = "scale") -> Image.Image:
    """RGB copy of ``im`` as transformers' ``convert_to_rgb`` makes it (alpha over white).

    ``high_bit_depth``: ``"scale"`` maps I;16 / I (÷257) and F (×255, 0..1 floats) to 8 bit
    first; ``"pil"`` lets PIL clip them (what HF does).
    """
    if high_bit_depth not in ("scale", "pil"):
        raise ValueError(f"high_bit_depth must be 'scale' or 'pil', got {high_bit_depth!r}")
    if high_bit_depth == "scale" and (im.mode.startswith("I") or im.mode == "F"):
        im = _to_8bit(im)
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Geometry


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect kept as closely as possible (transformers' ``smart_resize``, same rounding)."""
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def upscale_small(im: Image.Image, min_side: int = UPSCALE_MIN_SIDE) -> Image.Image:
    """Images with a side below ``min_side``: scale so the short side is ``min_side``, the long
    side rounded to keep the aspect, Lanczos (reference GRPO loader). Others are returned as is."""
    w, h = im.size
    if min(w, h) >= min_side:
        return im
    if w < h:
        size = (min_side, max(min_side, round(h * min_side / w)))
    else:
        size = (max(min_side, round(w * min_side / h)), min_side)
    return im.resize(size, Image.Resampling.LANCZOS)


def num_patches(
    height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> int:
    """Patches (rows of pixel_values) an image of this size gets (no upscale applied)."""
    h, w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return (h // PATCH_SIZE) * (w // PATCH_SIZE)


# ---------------------------------------------------------------------------------------------
# Normalisation + patchify

_LUT_CACHE: dict[tuple, np.ndarray] = {}


def _lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3*256,) float32: value ``v`` of channel ``c`` at ``256*c + v``, computed with HF's ops."""
    key = (mean, std)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        v = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # HF rescale
        m = np.asarray(mean, np.float32)[:, None]
        s = np.asarray(std, np.float32)[:, None]
        lut = ((v[None, :] - m) / s).astype(np.float32).reshape(-1)  # HF normalize (float32)
        _LUT_CACHE[key] = lut
    return lut


def _channel_offsets(c: int) -> np.ndarray:
    return (256 * np.arange(c, dtype=np.intp)).reshape(1, c, 1)


def patchify_rgb(
    rgb: np.ndarray,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and patchify an already resized ``(H, W, 3)`` uint8 image.

    Returns ``pixel_values`` ``(H/14 * W/14, 3 * T * 14 * 14)`` float32 and ``grid_thw``
    ``(3,)`` int32 = ``(1, H/14, W/14)``.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w, c = rgb.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"image {h}x{w} is not a multiple of {unit}")
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    n = gh * gw
    # One strided pass: uint8 view in patch order + channel offset -> intp LUT index.
    x = rgb.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    idx = x.reshape(n, c, p * p) + _channel_offsets(c)
    vals = _lut(tuple(mean), tuple(std)).take(idx, mode="clip")  # indices are in range
    out = np.empty((n, c, temporal_patch_size, p * p), np.float32)
    for t in range(temporal_patch_size):  # the still image repeated on the temporal axis
        out[:, :, t] = vals
    return out.reshape(gh * gw, c * temporal_patch_size * p * p), np.array([1, gh, gw], np.int32)


def preprocess_image(
    image: Image.Image | np.ndarray,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    *,
    upscale_min_side: int | None = UPSCALE_MIN_SIDE,
    high_bit_depth: str = "scale",
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """PIL image (any mode) -> ``pixel_values`` ``(P, 1176)`` float32, ``grid_thw`` ``(3,)`` int32.

    Equal to transformers' ``Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...)`` on the
    RGB image (after the optional upscale). ``upscale_min_side=None`` (or 0) disables the upscale.
    A ``(H, W, 3)`` uint8 array is accepted as an RGB image.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, np.uint8), mode="RGB")
    im = to_rgb(image, high_bit_depth=high_bit_depth)
    if upscale_min_side:
        im = upscale_small(im, upscale_min_side)
    w, h = im.size
    th, tw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    if (th, tw) != (h, w):
        im = im.resize((tw, th), resample=Image.Resampling.BICUBIC)
    return patchify_rgb(np.asarray(im), mean, std)
