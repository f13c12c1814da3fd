"""The JSON header of a safetensors file, read and checked in one place for the checkpoint loader and
`inspect`: 8 bytes of little-endian length, then that many bytes of a JSON object."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .errors import EdgeError

MAX_HEADER_BYTES = 100 << 20  # a real header is a few KB per thousand tensors


def read_header(path: Path, error: type[EdgeError]) -> tuple[int, dict[str, Any]]:
    """(header length, header); `error` with one line when the file is unreadable, shorter than the
    length it announces, announces an implausible length, or its header is not a JSON object."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            header_len = struct.unpack("<Q", fh.read(8))[0]
            if header_len > size - 8:
                raise ValueError("header longer than file")
            if header_len == 0 or header_len > MAX_HEADER_BYTES:
                raise ValueError(f"implausible header length {header_len}")
            header = json.loads(fh.read(header_len))
    except (struct.error, OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path}: not a safetensors file or truncated ({exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header_len, header
