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

QUANTIZATIONS = ("fp16", "int8", "int4", "int4-channel")
BLOCK = 32
WEIGHT_THRESHOLD = 1024  # elements; smaller tensors (norms, biases) stay fp16

_CONFIGS = {
    "int8": dict(mode="linear_symmetric", dtype="int8", granularity="per_channel"),
    "int4": dict(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=BLOCK),
    "int4-channel": dict(mode="linear_symmetric", dtype="int4", granularity="per_channel"),
}


def quantize(model: ct.models.MLModel, quantization: str) -> ct.models.MLModel:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown Core ML quantization {quantization!r}")
    if quantization == "fp16":
        return model
    op_config = cto.OpLinearQuantizerConfig(weight_threshold=WEIGHT_THRESHOLD, **_CONFIGS[quantization])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
