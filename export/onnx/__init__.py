"""Format `onnx` (target harmonyos): MiniCPM-V 4.6 as five ONNX graphs sharing one weight file.

`export_graphs(ctx)` is the exporter entry point of export/pipeline.py: lower the checkpoint with
the torch dynamo exporter (lower.py), quantize the graphs (quantize.py), write them with one
deduplicated weight file (store.py), then load every written graph in onnxruntime and check its
output shapes (check.py) before the pipeline hashes the files into the manifest.
"""

from __future__ import annotations

from typing import Any

from .quantize import QUANTIZATIONS

SUPPORTED_QUANTIZATIONS = QUANTIZATIONS


def export_graphs(ctx: Any):
    """checkpoint -> <ctx.out>/{vision_16x,vision_4x,token_embedding,decoder_prefill,decoder_decode}.onnx
    + weights.bin; returns the pipeline's GraphSet."""
    from .bundle import export_onnx

    return export_onnx(ctx)
