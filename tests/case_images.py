"""Parity cases on synthetic images, written to disk: shared by the tests that need slices whose
contents differ (smooth colour fields plus noise) without the samples' fixed sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# (name, image sizes (w, h), prompt, downsample mode)
CaseSpec = tuple[str, list[tuple[int, int]], str, str]


def write_cases(base: Path, specs: list[CaseSpec]) -> Path:
    """One PNG per distinct size and a cases.json naming them; returns the cases file."""
    for i, (w, h) in enumerate(sorted({s for _, sizes, _, _ in specs for s in sizes})):
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        pixels = pixels + np.random.default_rng(i).normal(0, 40, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(base / f"{w}x{h}.png")
    entries = [
        {"name": n, "images": [f"{w}x{h}.png" for w, h in sizes], "prompt": p, "downsample_mode": m}
        for n, sizes, p, m in specs
    ]
    (base / "cases.json").write_text(json.dumps({"cases": entries}))
    return base / "cases.json"
