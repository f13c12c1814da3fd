"""MiniCPM-OCR 1.0's `small_image_upsize`: the size given to an image (or a grid cell) that fits in
scale_resolution^2 pixels.

* "always": upscale it to about scale_resolution^2 (the other families' only behaviour, the default);
* "never": keep its native size, snapped to the patch grid;
* "adaptive": look at the pixels. Small, dense text is upscaled to scale_resolution, a tiny image to
  84 (`TINY_RESOLUTION`), anything else keeps its native size; in a sliced image each grid cell is
  decided the same way from the original pixels, and a cell only replaces its tile when that costs
  fewer pixels. The glyph measure (Otsu threshold, 8-connected components) is the one the
  checkpoint's classifier was calibrated with, so it needs OpenCV: the optional `ocr` extra,
  imported only when "adaptive" meets an image.

The decision mirrors transformers 5.23's `adaptive_upsize_resolution` and
`MiniCPMOcrImageProcessor._resolve_tile_size` (tests/test_minicpm_ocr.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from edge_runtime.errors import InputError

CHOICES = ("always", "never", "adaptive")

# the classifier's calibration (transformers' constants of the same meaning)
SMALL_FONT_PX = 12.0  # median glyph height at or below which text counts as small
DENSE_GLYPHS_PER_KPX = 2.0  # glyphs per 1000 pixels at or above which text counts as dense
TINY_PIXELS = 6272  # an image with fewer pixels (and no small dense text) is tiny
TINY_RESOLUTION = 84  # ... and is sized towards 84^2 pixels

OPENCV_HINT = "pip install 'minicpmv-edge[ocr]' (opencv-python-headless)"


def check_choice(value: str) -> None:
    if value not in CHOICES:
        raise InputError(
            f"small_image_upsize must be one of {', '.join(repr(c) for c in CHOICES)}, got {value!r}"
        )


def opencv() -> Any:
    """The cv2 module, or a one-line InputError naming the extra that provides it."""
    try:
        import cv2
    except ImportError:
        raise InputError(f"small_image_upsize 'adaptive' needs OpenCV: {OPENCV_HINT}") from None
    return cv2


@dataclass(frozen=True)
class GlyphStats:
    """What the classifier sees: the median glyph height (0 without glyphs) and glyphs per 1000 px."""

    font_px: float
    density: float


def glyph_stats(image: Image.Image) -> GlyphStats:
    """Glyph height and density of an RGB (or L) image.

    Luma as PIL's "L" conversion; Otsu splits ink from paper, the darker side being ink unless it
    covers more than half the image (then the page is dark and the text light). Every 8-connected
    ink blob of 3+ pixels, 2+ rows high and narrower and shorter than 90% of the image is a glyph.
    """
    cv2 = opencv()
    gray = np.ascontiguousarray(np.asarray(image if image.mode == "L" else image.convert("L")))
    height, width = gray.shape
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    ink = binary == 0
    if ink.mean() > 0.5:
        ink = np.logical_not(ink)
    _, _, stats, _ = cv2.connectedComponentsWithStats(ink.astype(np.uint8), connectivity=8)
    blobs = stats[1:]  # row 0 is the background
    blob_w = blobs[:, cv2.CC_STAT_WIDTH]
    blob_h = blobs[:, cv2.CC_STAT_HEIGHT]
    keep = (
        (blobs[:, cv2.CC_STAT_AREA] >= 3) & (blob_h >= 2) & (blob_w < 0.9 * width) & (blob_h < 0.9 * height)
    )
    heights = blob_h[keep]
    font_px = float(np.median(heights)) if heights.size else 0.0
    return GlyphStats(font_px, heights.size * 1000.0 / (width * height))


def adaptive_resolution(image: Image.Image, scale_resolution: int) -> int | None:
    """The resolution an image (or cell) that fits in scale_resolution^2 is sized towards, upscaling
    allowed: scale_resolution for small dense text, TINY_RESOLUTION for a tiny image; None keeps it
    native (no upscale)."""
    if image.width < 1 or image.height < 1:
        return None
    stats = glyph_stats(image)
    if 0 < stats.font_px <= SMALL_FONT_PX and stats.density >= DENSE_GLYPHS_PER_KPX:
        return scale_resolution
    if image.width * image.height < TINY_PIXELS:
        return TINY_RESOLUTION
    return None


def cell_box(
    image_size: tuple[int, int], grid: tuple[int, int], row: int, col: int
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of grid cell (row, col) in the original image's pixels; the
    boundaries are the nearest pixels (Python's round, as the reference)."""
    height, width = image_size
    rows, cols = grid
    return (
        round(height * row / rows),
        round(width * col / cols),
        round(height * (row + 1) / rows),
        round(width * (col + 1) / cols),
    )
