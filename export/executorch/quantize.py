"""Quantization variants (torchao `quantize_`, applied to a copy of the model before torch.export).

* fp32: nothing.
* int8: every Linear int8 per output channel; embeddings int8 per row. The linears run as 8da8w
  (int8 dynamic per-token activations): torchao's weight-only int8 linears export and run correctly
  in eager mode but came out of XNNPACK lowering wrong (vision cosine 0.19 on the tiny model,
  measured), while 8da8w is XNNPACK's native per-channel int8 kernel and matches (see the tests).
* 8da4w: Linear int8 dynamic per-token activations x int4 weights in groups of 32; a Linear whose
  in_features is not a multiple of 32 (SigLIP's MLP width 4304, the tiny preset's 136) falls back to
  8da8w per channel, as optimum-executorch does; embeddings int4 in groups of 32.

Weights that only feed elementwise maths (norms, conv1d of DeltaNet, A_log, dt_bias) stay fp32, and
so does the DeltaNet recurrent state (DESIGN.md §Decoder state).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from export.onnx.quantize import int4_blocks, unpack_int4

QUANTIZATIONS = ("fp32", "int8", "8da4w")
GROUP_SIZE = 32


@dataclass
class QuantSummary:
    """Which linears got which scheme (for the manifest) and the bytes per decoded token."""

    linear_schemes: dict[str, int]  # scheme -> number of Linear modules
    embedding_scheme: str
    decode_weight_bytes: int


def _bytes(numel: int, in_features: int, scheme: str) -> int:
    """Stored bytes of one weight: values plus one fp32 scale per group / row."""
    if scheme == "fp32":
        return numel * 4
    if scheme in ("int8", "8da8w"):
        return numel + 4 * (numel // in_features)
    return numel // 2 + 4 * (numel // GROUP_SIZE)  # 8da4w / int4 g32


def _is_text(model: nn.Module, module_name: str) -> bool:
    """A module of the text decoder (language model or head): the weights decode reads per token."""
    return module_name.startswith(model.TEXT_MODULE + ".") or module_name == model.HEAD_MODULE


def _linear_scheme(quantization: str, is_text: bool, layer: nn.Linear) -> str:
    """8da4w is for the text decoder (its weights are what decode reads per token); the vision tower
    and merger stay 8da8w, as the ONNX int4 bundles keep vision int8: with int4 vision the demo
    checkpoint's vision cosine was 0.997 and one answer token of case tall-sliced-4x flipped."""
    if quantization == "fp32":
        return "fp32"
    if quantization == "int8" or not is_text:
        return "8da8w"
    return "8da4w" if layer.in_features % GROUP_SIZE == 0 else "8da8w"


def quantize_model(
    model: nn.Module, quantization: str, in_place: bool = False
) -> tuple[nn.Module, QuantSummary]:
    """A quantized copy of `model` (the original is left untouched unless `in_place`: the exporter
    does not need it, and a copy of the full preset's fp32 weights is 5.2 GB) and what was done."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}")
    model = (model if in_place else copy.deepcopy(model)).eval()
    schemes = {
        name: _linear_scheme(quantization, _is_text(model, name), m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }
    decode_bytes = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and _is_text(model, name):
            decode_bytes += _bytes(m.weight.numel(), m.in_features, schemes[name])
    embed_scheme = {"fp32": "fp32", "int8": "int8", "8da4w": "int4-g32"}[quantization]
    counts: dict[str, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    if quantization != "fp32":
        _apply(model, quantization, schemes)
    return model, QuantSummary(counts, embed_scheme, decode_bytes)


def _apply(model: nn.Module, quantization: str, schemes: dict[str, str]) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig

    if model.cfg.tie_word_embeddings:
        # The head and the table are quantized differently (matmul vs gather): untie them first.
        model.output_head.weight = nn.Parameter(model.output_head.weight.detach().clone())
    with torch.no_grad():
        if quantization == "int8":
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                filter_fn=lambda m, fqn: isinstance(m, nn.Linear),
            )
            embed = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
        else:
            names = {n for n, s in schemes.items() if s == "8da4w"}
            searched = {
                n: int4_blocks(m.weight.detach().float().numpy())
                for n, m in model.named_modules()
                if n in names
            }
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(
                    weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)
                ),
                filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names,
            )
            quantize_(
                model,
                Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in names,
            )
            _use_searched_scales(model, searched)
            embed = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP_SIZE))
        quantize_(model, embed, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))


def _use_searched_scales(model: nn.Module, searched: dict[str, tuple]) -> None:
    """Replace torchao's absmax int4 codes and scales (scale = amax / 7.5, codes in [-8, 7]) by the
    ONNX exporter's searched ones (`int4_blocks`: least squared error over 1.0 ... 0.75 x amax / 7 per
    block of 32; same group size, same storage). With plain absmax the demo checkpoint's 8da4w
    bundle failed the decode gate by one flipped answer token (top-1 88.9 % of 9 steps)."""
    for name, module in model.named_modules():
        if name not in searched:
            continue
        packed, scales = searched[name]
        weight = module.weight
        codes = torch.from_numpy(unpack_int4(packed))
        scale = torch.from_numpy(scales).to(weight.scale.dtype).reshape(weight.scale.shape)
        weight.qdata.copy_(codes.reshape(weight.qdata.shape))
        weight.scale.copy_(scale)
        weight.zero_point.zero_()
