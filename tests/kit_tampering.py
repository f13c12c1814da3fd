"""Tampered copies of a conformance kit, for the app suites' tests that must fail on one (Android, iOS)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def copy_kit(kit: Path, dest: Path) -> tuple[Path, dict[str, Any]]:
    """A writable copy of `kit` at `dest` and its parsed index."""
    shutil.copytree(kit, dest)
    return dest, json.loads((dest / "conformance.json").read_text(encoding="utf-8"))


def flip_refine_pixel(kit: Path, index: dict[str, Any]) -> dict[str, Any]:
    """One level off in the middle of the first sliced image's refined view; returns that image case."""
    case = next(c for c in index["images"] if c["resized"]["refine"] is not None)
    ref = kit / case["resized"]["refine"]["file"]
    data = bytearray(ref.read_bytes())
    data[len(data) // 2] ^= 1
    ref.write_bytes(bytes(data))
    return case


def write_index(kit: Path, index: dict[str, Any]) -> None:
    (kit / "conformance.json").write_text(
        json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
