"""Format `torch` (target desktop): the checkpoint's config and weights, repacked into one safetensors file.

The TorchBackend runs it, so the bundle path (manifest, checksums, registry, host files, parity,
bench) is exercised end to end before any phone format exists. Weights are stored as fp32 or fp16;
the backend computes in fp32 either way, so an fp16 bundle measures weight-rounding error alone.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from edge_runtime.bundle import TensorInfo, decode_weight_numel
from edge_runtime.checkpoint import WEIGHTS_FILE, weight_files, write_safetensors

from .graph_table import TableStyle, graph_table
from .pipeline import ExportContext, GraphSet

SUPPORTED_QUANTIZATIONS = ("fp32", "fp16")
_STORE = {"fp32": torch.float32, "fp16": torch.float16}
COMPUTE_BYTES = 4  # TorchBackend upcasts every weight to fp32 on load


def export_graphs(ctx: ExportContext) -> GraphSet:
    """Stream every model tensor of the checkpoint into <out>/model.safetensors at the stored dtype."""
    dtype = _STORE[ctx.quantization]
    sources: dict[str, str] = {}
    infos: list[TensorInfo] = []
    checkpoint_key_to_module = ctx.family.checkpoint_key_to_module
    for file in weight_files(ctx.checkpoint):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                if checkpoint_key_to_module(name) is None:
                    continue  # multi-token-prediction head and stored position ids: not used
                shape = tuple(handle.get_slice(name).get_shape())
                sources[name] = str(file)
                infos.append(TensorInfo(name, "float32", shape, 0))
    handles: dict[str, object] = {}

    def produce(name: str) -> torch.Tensor:
        path = sources[name]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path].get_tensor(name)

    ctx.progress(f"writing {WEIGHTS_FILE} ({len(infos)} tensors, {ctx.quantization})")
    try:
        write_safetensors(ctx.out / WEIGHTS_FILE, [(t.name, t.shape, dtype) for t in infos], produce)
    finally:
        handles.clear()  # release the memory maps
    config = dict(ctx.raw_config, torch_dtype="float32" if dtype == torch.float32 else "float16")
    (ctx.out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return GraphSet(
        graphs=_graphs(ctx),
        decode_weight_bytes=decode_weight_numel(infos, ctx.family) * COMPUTE_BYTES,
    )


def _graphs(ctx: ExportContext) -> dict:
    """The three entry points as methods of the reference model in `weights.safetensors`."""
    weights = {"file": WEIGHTS_FILE, "config": "config.json"}
    return graph_table(
        ctx,
        TableStyle(),
        vision={**weights, "method": "encode_slice", "modes": list(ctx.family.vision_modes)},
        embedding={**weights, "method": "embed"},
        decoder={**weights, "method": "decode", "state": "in_out"},
    )
