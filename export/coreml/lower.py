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
from export.graphs import StatefulDecoder, TokenEmbeddingGraph, VisionEncoderGraph

_IDENTITY_OPS = (torch.ops.aten.alias.default, torch.ops.aten.lift_fresh_copy.default)


def state_buffer_name(state_name: str) -> str:
    return state_name.replace(".", "__")


def stateful_decoder(
    model: nn.Module,
    specs: list[StateSpec],
    state_dtype: torch.dtype = torch.float32,
    position_rows: bool = False,
) -> StatefulDecoder:
    """embeds [1, C, D], start_pos / n_valid int32 [1] (with `position_rows`, then position_ids
    int32 [3, C]: canvas families' RoPE rows) -> logits [1, V]; state lives in Core ML states
    (`state_dtype`, the recurrent state fp32); the host starts a sequence with fresh states."""

    def dtype(spec: StateSpec) -> torch.dtype:
        return torch.float32 if "recurrent" in spec.name else state_dtype

    return StatefulDecoder(model, specs, state_buffer_name, buffer_dtype=dtype, position_rows=position_rows)


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
