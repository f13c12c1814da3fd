"""The `.pte` methods as exported programs: the three graphs of export/graphs.py, with decoder state in
mutable buffers.

ExecuTorch keeps state as mutable buffers of the program. Prefill (C = chunk) and decode (C = 1) are
two methods traced from the *same* module instance, so their buffers have the same fully qualified
names; `MemoryPlanningPass(share_mutable_buffers=True)` then places each buffer at one address shared
by every method, so a decode step sees what prefill wrote. A third method, `reset_state`, zeroes the
buffers for a new sequence (the state is per program, so a program runs one sequence at a time).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram, export

from edge_runtime.models.minicpm_v46 import MiniCPMV46
from edge_runtime.models.qwen35_text import state_specs
from export.graphs import TokenEmbeddingGraph, VisionEncoderGraph

from .custom_ops import attention_ops, delta_rule_op

# Method names follow ExecuTorch's multimodal runner (extension/llm/runner/constants.h) where one
# exists: `vision_encoder`, `token_embedding`, `text_decoder`. The rest are ours.
VISION_METHODS = {"16x": "vision_encoder", "4x": "vision_encoder_4x"}
TOKEN_EMBEDDING = "token_embedding"
PREFILL = "text_decoder"
DECODE = "text_decoder_decode"
RESET = "reset_state"


def buffer_name(state_name: str) -> str:
    """Buffer names cannot contain dots: `layers.3.k_cache` -> `state_layers_3_k_cache`."""
    return "state_" + state_name.replace(".", "_")


class StatefulDecoder(nn.Module):
    """TextDecoderGraph with the state held in buffers, written back in place after every call.

    `seq_major_cache` lays the KV caches out [1, S, n_kv, D] (ExecuTorch's cache kernels update
    them in place and hand the buffer itself back, which then needs no write-back) instead of the
    reference's [1, n_kv, S, D]."""

    def __init__(self, model: MiniCPMV46, cache_len: int, seq_major_cache: bool = False):
        super().__init__()
        self.model = model
        self.specs = state_specs(model.cfg.text, cache_len)
        self.names = [buffer_name(s.name) for s in self.specs]
        for name, spec in zip(self.names, self.specs, strict=True):
            shape = spec.shape
            if seq_major_cache and spec.name.endswith(("k_cache", "v_cache")):
                shape = (shape[0], shape[2], shape[1], shape[3])
            self.register_buffer(name, torch.zeros(shape, dtype=spec.dtype), persistent=False)
        self.reset_mode = False  # traced as a python constant: selects which method is exported

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        state = [getattr(self, n) for n in self.names]
        if self.reset_mode:
            for buf in state:
                buf.zero_()
            return args[0] * 0  # a method needs an output; the runtime ignores it
        embeds, start_pos, n_valid = args
        logits, new_state = self.model.decode(embeds, start_pos, n_valid, state)
        for buf, new in zip(state, new_state, strict=True):
            if new is not buf:
                buf.copy_(new)
        return logits


def max_slice_patches(model: MiniCPMV46, scale_resolution: int) -> int:
    """Upper bound on patches per slice: memory planning sizes buffers for the largest L, so it must
    be realistic. A slice has ~scale_resolution^2 pixels at any aspect; allow twice that."""
    side = scale_resolution // model.cfg.vision.patch_size
    return 2 * side * side // 16 * 16


def export_methods(
    model: MiniCPMV46,
    chunk: int,
    cache_len: int,
    max_patches: int,
    max_tokens: int,
    delta_rule_methods: frozenset[str] = frozenset(),
    attention_kernels: bool = False,
) -> dict[str, ExportedProgram]:
    """torch.export every method. Vision has one dynamic dim L (a multiple of 16 / 4), token
    embedding a dynamic T; the decoder is static (C = chunk and C = 1). The decoder methods named
    in `delta_rule_methods` call ExecuTorch's gated delta rule kernel; with `attention_kernels`
    both decoder methods (they share the cache layout) use its cache-update and SDPA kernels
    (custom_ops.py)."""
    model = model.eval()
    d = model.cfg.text.hidden_size
    patch_dim = model.cfg.vision.patch_dim
    programs: dict[str, ExportedProgram] = {}
    with torch.no_grad():
        for mode, name in VISION_METHODS.items():
            step = 16 if mode == "16x" else 4
            n = Dim(f"n_{mode}", min=1, max=max_patches // step)
            example = (torch.zeros(64, patch_dim), torch.arange(64, dtype=torch.int64))
            programs[name] = export(
                VisionEncoderGraph(model, mode), example, dynamic_shapes=({0: step * n}, {0: step * n})
            )
        t = Dim("tokens", min=1, max=max_tokens)
        programs[TOKEN_EMBEDDING] = export(
            TokenEmbeddingGraph(model), (torch.zeros(4, dtype=torch.int64),), dynamic_shapes=({0: t},)
        )
        decoder = StatefulDecoder(model, cache_len, seq_major_cache=attention_kernels)
        for name, c in ((PREFILL, chunk), (DECODE, 1)):
            with delta_rule_op(name in delta_rule_methods), attention_ops(attention_kernels):
                programs[name] = export(decoder, (torch.zeros(1, c, d), torch.tensor([0]), torch.tensor([c])))
        decoder.reset_mode = True
        programs[RESET] = export(decoder, (torch.zeros(1),))
        decoder.reset_mode = False
    return programs
