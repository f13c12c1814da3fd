"""Outputs built from a checkpoint (converted weights, peer models, our bundles), reused while fresh.

Each output gets a stamp beside it, not in it (a bundle directory holds only what its manifest
lists): a JSON fingerprint of the checkpoint it was made from (path and weight mtimes) and of the
settings that decide its bytes. An output is reused only when its key file exists and its stamp
equals the fingerprint the caller computes now; otherwise it is rebuilt and stamped again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAMP_SUFFIX = ".genai-compare.json"  # the name the first tool gave its stamps; kept so they stay valid


def fingerprint(checkpoint: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's identity (path, config and weight mtimes) and `extra` settings."""
    config = checkpoint / "config.json"
    weights = sorted(checkpoint.glob("*.safetensors"))
    return {
        "checkpoint": str(checkpoint.resolve()),
        "mtimes": [config.stat().st_mtime] + [w.stat().st_mtime for w in weights],
        **extra,
    }


def is_fresh(path: Path, stamp_value: dict[str, Any], key_file: str | None) -> bool:
    """`path` (a directory with `key_file` in it, or a file when key_file is None) exists and was made
    with this fingerprint; a stale stamp is dropped."""
    stamp_file = stamp_path(path)
    try:
        key = path / key_file if key_file else path
        if key.is_file() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp_value)):
            return True
        stamp_file.unlink(missing_ok=True)
        return False
    except (OSError, ValueError):
        return False


def stamp(path: Path, stamp_value: dict[str, Any]) -> None:
    stamp_path(path).write_text(json.dumps(stamp_value, indent=2) + "\n")


def stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{STAMP_SUFFIX}")


def reuse_or_make(
    path: Path, stamp_value: dict[str, Any], key_file: str | None, make: Callable[[], dict[str, Any] | None]
) -> dict[str, Any]:
    """{"reused": True} for a fresh output, else make() (its record) timed and stamped."""
    if is_fresh(path, stamp_value, key_file):
        return {"reused": True}
    t0 = time.perf_counter()
    record = make() or {}
    stamp(path, stamp_value)
    return {**record, "seconds": round(time.perf_counter() - t0, 1)}
