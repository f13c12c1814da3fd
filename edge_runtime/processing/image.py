"""Image file loading and pixel normalisation, matching transformers' PIL backend for MiniCPM-V 4.6.

Every failure a user can cause (bad path, empty or corrupt file, oversized image) becomes a one-line
`InputError`, never a PIL traceback or a PIL DecompressionBomb warning.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edge_runtime.errors import InputError
from edge_runtime.paths import link_problem

DEFAULT_MAX_PIXELS = 50_000_000
"""Decompression-bomb guard: the largest width*height we agree to decode (50 megapixels)."""

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
DEFAULT_RESCALE = 1 / 255
BICUBIC = int(Image.Resampling.BICUBIC)


@contextlib.contextmanager
def _pil_bomb_guard_off() -> Iterator[None]:
    """Let our own `max_pixels` check speak first: PIL's guard would warn or raise with its own message."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def check_pixel_limit(width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    """Refuse images above `max_pixels` before their pixels are decoded (None disables the check)."""
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"{what} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
            f"(raise --max-pixels if this is intended)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB the way transformers' `convert_to_rgb` does for PIL input.

    Any alpha (an "A" band, or a palette/grey `transparency` entry) is composited onto WHITE; every
    other mode (L, P, CMYK, ...) goes through a plain `convert("RGB")`. 16-bit greyscale (I;16) is
    scaled to 8 bits (65535 -> 255) first: PIL's own conversion clips every value above 255 to white,
    so a 16-bit PNG would come out almost blank (transformers' convert_to_rgb does that; we do not).
    """
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Open, validate and decode an image file into an RGB PIL image.

    `exif_transpose` applies the EXIF orientation like transformers' `load_image` (which is what a
    path given to the HF processor / chat template goes through), so phone photos come out upright.
    """
    p = Path(path)
    if not p.exists():
        problem = link_problem(p)
        raise InputError(f"image {p} is {problem}" if problem else f"image not found: {p}")
    if not p.is_file():
        raise InputError(f"image path is not a file: {p}")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"image file is empty (0 bytes): {p}")
    try:
        with _pil_bomb_guard_off(), Image.open(p) as img:
            check_pixel_limit(img.width, img.height, max_pixels, what=f"image {p.name}")
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError(f"not a readable image file: {p}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"corrupt or truncated image {p}: {reason}") from None


def resize(image: Image.Image, height: int, width: int, resample: int = BICUBIC) -> Image.Image:
    """PIL resize to (height, width); BICUBIC on uint8 RGB is what the reference processor does."""
    return image.resize((width, height), resample=resample)


def normalize(
    image: Image.Image | np.ndarray,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    rescale_factor: float = DEFAULT_RESCALE,
) -> np.ndarray:
    """uint8 RGB (PIL or [H,W,3] array) -> float32 [3,H,W] = (x*rescale - mean) / std.

    Same arithmetic as the reference (rescale in float64 then cast to float32; subtract and divide in
    float32), so the result is bit-identical.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected a uint8 RGB image, got array of shape {arr.shape} and dtype {arr.dtype}")
    # A 256-entry table per channel computes each possible value once with the reference's exact ops.
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1)
    table = (levels[None, :] - m) / s  # [3, 256] float32
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], arr[:, :, c], out=out[c])
    return out
