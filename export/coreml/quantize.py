"""Post-conversion weight compression (ct.optimize.coreml) per `--quant`.

* fp16: the converted fp16 program as is.
* int8: linear symmetric, per output channel: the Neural Engine's preferred int8 layout.
* int4: linear symmetric, blocks of 32 along the input axis: the GPU-friendly iOS 18 layout.
* int4-channel: linear symmetric int4, per output channel (Neural-Engine friendly).
All become `constexpr_blockwise_shift_scale` ops in the program, which the MIL executor runs.
Weights whose input axis no block of 32 divides (SigLIP's MLP width) are left fp16 by
coremltools; `inspect` shows the resulting bytes per dtype.
"""

from __future__ import annotations

import warnings

import coremltools as ct
import coremltools.optimize.coreml as cto
import torch
from torch import nn

from export.onnx.quantize import dequant_int4, int4_blocks

QUANTIZATIONS = ("fp16", "int8", "int4", "int4-channel")
BLOCK = 32
WEIGHT_THRESHOLD = 1024  # elements; smaller tensors (norms, biases) stay fp16

_CONFIGS = {
    "int8": dict(mode="linear_symmetric", dtype="int8", granularity="per_channel"),
    "int4": dict(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=BLOCK),
    "int4-channel": dict(mode="linear_symmetric", dtype="int4", granularity="per_channel"),
}


def presearch_int4_scales(modules: list[nn.Module]) -> int:
    """Before conversion: replace each Linear weight that int4 will quantize per block by its int4
    rounding with searched block scales (the ONNX exporter's `int4_blocks`: least squared error over
    fractions of amax / 7). Every block then holds a weight of exactly 7 x scale, so coremltools'
    absmax int4 (scale = amax / 7, q in [-7, 7]) recovers the same scale and codes (fp16 storage
    moves a weight by far less than half a step). Plain absmax rounding flipped one answer token of
    the demo checkpoint; the searched scales are what made the ONNX int4 bundle pass. Returns the
    number of weights replaced."""
    count = 0
    with torch.no_grad():
        for root in modules:
            for layer in root.modules():
                if not isinstance(layer, nn.Linear) or layer.in_features % BLOCK:
                    continue
                w = layer.weight
                if w.numel() < WEIGHT_THRESHOLD:
                    continue
                rounded = dequant_int4(*int4_blocks(w.detach().float().numpy()))
                w.copy_(torch.from_numpy(rounded).to(w.dtype))
                count += 1
    return count


def quantize(model: ct.models.MLModel, quantization: str) -> ct.models.MLModel:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown Core ML quantization {quantization!r}")
    if quantization == "fp16":
        return model
    op_config = cto.OpLinearQuantizerConfig(weight_threshold=WEIGHT_THRESHOLD, **_CONFIGS[quantization])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
