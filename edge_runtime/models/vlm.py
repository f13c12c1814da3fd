"""What every family's model class shares: where the exporters find its parts, and, for the
Llama-decoder families (MiniCPM-V 2.0, 4.0), the embedding and decoder entry points."""

from __future__ import annotations

import torch
from torch import nn


class VisionLanguageModel(nn.Module):
    """Module paths of the text decoder, the vocabulary head and the vision parts (so quantizers can
    match modules by name), with accessors; subclasses set the three class attributes."""

    TEXT_MODULE: str
    HEAD_MODULE: str
    VISION_MODULES: tuple[str, ...]

    @property
    def text_model(self) -> nn.Module:
        """Token embedding, decoder layers, final norm and RoPE buffer."""
        return self.get_submodule(self.TEXT_MODULE)

    @property
    def output_head(self) -> nn.Linear:
        return self.get_submodule(self.HEAD_MODULE)

    @property
    def embed_scale(self) -> float:
        """What `embed` multiplies the table rows by (MiniCPM muP's scale_emb; 1 elsewhere)."""
        return 1.0

    def release_vision(self) -> None:
        """Drop the vision modules (once their graphs are out: the text graphs do not use them)."""
        for name in self.VISION_MODULES:
            if hasattr(self, name):
                delattr(self, name)

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.output_head.weight = self.text_model.embed_tokens.weight


class LlamaVisionLanguageModel(VisionLanguageModel):
    """A vision tower + resampler in front of `llm` (a llama_text.LlamaForCausalLM): graphs 2 and 3."""

    TEXT_MODULE = "llm.model"
    HEAD_MODULE = "llm.lm_head"
    VISION_MODULES = ("vpm", "resampler")

    @property
    def embed_scale(self) -> float:
        return self.cfg.text.embed_scale

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings as the decoder takes them (x scale_emb under muP); image features
        replace rows after this, unscaled, as upstream does."""
        return self.llm.embed(ids)

    def decode(
        self,
        embeds: torch.Tensor,
        start_pos: torch.Tensor,
        n_valid: torch.Tensor,
        state: list[torch.Tensor],
        all_logits: bool = False,
        rope_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """embeds [1, C, D] -> logits [1, V] of the last valid token (or [C, V]) and the new state.
        `rope_positions` int64 [3, C]: row 0 is the RoPE position (None = the cache index)."""
        hidden, new_state = self.llm.model(embeds, start_pos, n_valid, state, rope_positions)
        if all_logits:
            return self.llm.logits(hidden[0]), new_state
        return self.llm.logits(hidden[0].index_select(0, n_valid - 1)), new_state

    def new_state(self, cache_len: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        from .llama_text import state_specs

        return [torch.zeros(s.shape, dtype=s.dtype) for s in state_specs(self.cfg.text, cache_len, dtype)]
