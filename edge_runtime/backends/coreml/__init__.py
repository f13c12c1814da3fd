"""Core ML backend (format `coreml`): numpy MIL executor everywhere, coremltools predict on macOS."""

from __future__ import annotations

from .backend import CoreMLBackend, open_coreml_bundle

__all__ = ["CoreMLBackend", "open_coreml_bundle"]
