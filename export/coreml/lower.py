"""Graphs of export/graphs.py -> torch.export programs shaped the way coremltools wants them.

* The decoder's flat state becomes registered buffers updated in place (`copy_`): coremltools
  turns buffer mutations of an ExportedProgram into `read_state` / `coreml_update_state`, i.e.
  `MLState`. Buffer names are the state names with `.` -> `__` (MIL names cannot hold dots).
* Integer inputs are int32 (Core ML has no int64 I/O); the graph upcasts them itself.
* `aten.alias` nodes that torch 2.13's export leaves around mutated buffers are dropped here
  (coremltools 9 has no converter for them; they are identities).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_runtime.families import StateSpec
from export.graphs import TokenEmbeddingGraph, VisionEncoderGraph

_IDENTITY_OPS = (torch.ops.aten.alias.default, torch.ops.aten.lift_fresh_copy.default)


def state_buffer_name(state_name: str) -> str:
    return state_name.replace(".", "__")


class StatefulDecoder(nn.Module):
    """embeds [1, C, D], start_pos/n_valid int32 [1] -> logits [1, V]; state lives in buffers."""

    def __init__(self, model: nn.Module, specs: list[StateSpec], state_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.names = [state_buffer_name(s.name) for s in specs]
        for spec, name in zip(specs, self.names, strict=True):
            dtype = torch.float32 if "recurrent" in spec.name else state_dtype
            self.register_buffer(name, torch.zeros(spec.shape, dtype=dtype))

    def forward(self, embeds: torch.Tensor, start_pos: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        state = [getattr(self, n).float() for n in self.names]
        logits, new = self.model.decode(embeds, start_pos.long(), n_valid.long(), state)
        for name, tensor in zip(self.names, new, strict=True):
            buf = getattr(self, name)
            buf.copy_(tensor.to(buf.dtype))
        return logits


class VisionGraph32(nn.Module):
    """VisionEncoderGraph with int32 position ids (Core ML I/O)."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.inner = VisionEncoderGraph(model, mode)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(patches, position_ids.long())


class Embedding32(TokenEmbeddingGraph):
    """int32 ids (Core ML's integer type)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids.long())


def export_program(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic_shapes=None):
    """torch.export + core-ATen decompositions + identity cleanup."""
    program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes, strict=False)
    program = program.run_decompositions({})
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _IDENTITY_OPS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program
