"""Format `coreml` (target ios): MiniCPM-V 4.6 as three iOS 18 `.mlpackage`s with MLState decoding.

`export_graphs(ctx)` is the exporter entry point of export/pipeline.py (registry key `coreml`).
"""

from __future__ import annotations

from typing import Any

from .quantize import QUANTIZATIONS

SUPPORTED_QUANTIZATIONS = QUANTIZATIONS


def export_graphs(ctx: Any):
    from .bundle import export_coreml

    return export_coreml(ctx)
