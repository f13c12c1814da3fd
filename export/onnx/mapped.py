"""Streaming export: ONNX graphs whose weights stay in the checkpoint's files until quantized.

A full 4.1 B checkpoint is 16 GB of fp32. The in-memory path holds it once as the model, once
more as the exporter's transposed copies of every linear weight (its constant folding), and again
as a serialized ModelProto. Here the model's fp32 weights are views of the memory-mapped
safetensors files (`load_checkpoint(mapped=True)`), so tracing never reads them; constant folding
leaves `Transpose(weight)` in the graph instead of materializing the transpose; and before the
graph is serialized each mapped initializer becomes an external reference to its own byte range
of the checkpoint file. The quantizer then reads one weight at a time from disk (quantize.py reads
`Transpose -> MatMul` as a linear layer with the weight in [N, K]), and the weight store copies or
writes the results into the bundle's weights.bin (store.py). Peak memory is one graph's structure,
one weight being quantized, and the quantized tensors of that graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import torch
from onnxscript.optimizer import optimize_ir
from onnxscript.rewriter import onnx_fusions

from edge_runtime.checkpoint import FileSlice

MappedWeights = dict[int, FileSlice]  # data_ptr of a mapped weight -> its bytes in the checkpoint


def _slice_of(value: ir.Value | None, mapped: MappedWeights) -> FileSlice | None:
    """The file range of an initializer that is a whole mapped weight, else None."""
    tensor = value.const_value if value is not None else None
    raw: Any = getattr(tensor, "raw", None)
    if not isinstance(raw, torch.Tensor) or not raw.is_contiguous():
        return None
    where = mapped.get(raw.data_ptr())
    if where is None or raw.dtype != torch.float32 or raw.numel() * 4 != where.length:
        return None
    return where


def keep_weight_transposes(mapped: MappedWeights) -> Callable[[ir.Node], bool | None]:
    """A constant-folding rule: never fold a Transpose of a mapped weight (folding would read the
    whole weight and hold its transpose in memory); every other node by the default rules."""

    def should_fold(node: ir.Node) -> bool | None:
        if node.domain == "" and node.op_type == "Transpose":
            if any(_slice_of(v, mapped) is not None for v in node.inputs):
                return False
        return None

    return should_fold


def optimize_mapped(model: ir.Model, mapped: MappedWeights) -> None:
    """The torch exporter's own optimization (onnxscript's optimize_ir, then its ONNX fusions),
    with mapped weights' transposes left unfolded."""
    optimize_ir(model, should_fold=keep_weight_transposes(mapped))
    onnx_fusions.fuse(model)


def reference_mapped_weights(model: ir.Model, mapped: MappedWeights) -> int:
    """Turn every initializer that is a mapped weight into an external reference to its byte range
    of the checkpoint file, so serializing the graph copies no weight. Returns how many."""
    count = 0
    for value in model.graph.initializers.values():
        where = _slice_of(value, mapped)
        if where is None:
            continue
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(
            location=str(where.file.resolve()),
            offset=where.offset,
            length=where.length,
            dtype=ir.DataType.FLOAT,
            shape=ir.Shape(tuple(tensor.shape)),
            name=value.name,
        )
        count += 1
    return count
