"""The three exportable graphs of DESIGN.md, built from the reference modules; shared by every format.

* `VisionEncoderGraph(model, mode)`: one slice, patches [L, 3*P*P] + position ids [L] in
  window-major order -> [L/16 | L/4, D]. One graph per downsample mode; L is the one dynamic
  dimension (a multiple of 16 for 16x, of 4 for 4x).
* `TokenEmbeddingGraph(model)`: ids [T] -> [T, D].
* `TextDecoderGraph(model)`: embeds [1, C, D], start_pos [1], n_valid [1], then every state
  tensor -> logits [1, V] of the last valid position, then every updated state tensor. Called
  with C = chunk for prefill and C = 1 for decode; formats that need static shapes export it
  twice and share the weights.

State tensors travel flat, in `state_specs` order, so ONNX inputs/outputs, ExecuTorch buffers
and CoreML states all carry the same names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edge_runtime.models.minicpm_v46 import MiniCPMV46
from edge_runtime.models.qwen35_text import StateSpec, state_specs


class VisionEncoderGraph(nn.Module):
    def __init__(self, model: MiniCPMV46, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_slice(patches, position_ids, self.mode)


class TokenEmbeddingGraph(nn.Module):
    def __init__(self, model: MiniCPMV46):
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class TextDecoderGraph(nn.Module):
    def __init__(self, model: MiniCPMV46):
        super().__init__()
        self.model = model

    def forward(
        self, embeds: torch.Tensor, start_pos: torch.Tensor, n_valid: torch.Tensor, *state: torch.Tensor
    ):
        logits, new_state = self.model.decode(embeds, start_pos, n_valid, list(state))
        return (logits, *new_state)


@dataclass(frozen=True)
class DecoderSignature:
    """Names and shapes of the decoder graph's inputs and outputs for a given cache length."""

    state: list[StateSpec]
    hidden_size: int
    vocab_size: int

    @property
    def input_names(self) -> list[str]:
        return ["embeds", "start_pos", "n_valid", *(f"past.{s.name}" for s in self.state)]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(f"present.{s.name}" for s in self.state)]


def decoder_signature(
    model: MiniCPMV46, cache_len: int, kv_dtype: torch.dtype = torch.float32
) -> DecoderSignature:
    cfg = model.cfg.text
    return DecoderSignature(state_specs(cfg, cache_len, kv_dtype), cfg.hidden_size, cfg.vocab_size)


def decoder_example_inputs(
    model: MiniCPMV46, chunk: int, cache_len: int, kv_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing the decoder at chunk length `chunk` (zeros: values do not matter to export)."""
    sig = decoder_signature(model, cache_len, kv_dtype)
    embeds = torch.zeros(1, chunk, sig.hidden_size)
    state = [torch.zeros(s.shape, dtype=s.dtype) for s in sig.state]
    return (embeds, torch.tensor([0]), torch.tensor([chunk]), *state)


def vision_example_inputs(model: MiniCPMV46, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and position ids of an L-patch slice (L a multiple of 16)."""
    patch_dim = model.cfg.vision.patch_dim
    return torch.zeros(length, patch_dim), torch.zeros(length, dtype=torch.int64)
