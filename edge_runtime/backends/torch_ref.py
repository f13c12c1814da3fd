"""The PyTorch reference backend: the checkpoint's weights run by edge_runtime.models, fp32 on CPU.

Every bundle backend is judged against this one, so it does nothing clever: the same three
entry points, state as tensors, numpy at the boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from .base import Backend, DecoderState, ModelInfo

DEFAULT_MAX_CONTEXT = 4096
DEFAULT_CHUNK = 64


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint,
        max_context: int = DEFAULT_MAX_CONTEXT,
        chunk_size: int = DEFAULT_CHUNK,
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        cfg = checkpoint.config
        self.max_context = min(max_context, cfg.text.max_position_embeddings)
        self.cache_len = self.max_context + chunk_size  # padding of the last prefill chunk lands here
        self.info = ModelInfo(
            family=checkpoint.family.name,
            hidden_size=cfg.text.hidden_size,
            vocab_size=cfg.text.vocab_size,
            max_context=self.max_context,
            chunk_size=chunk_size,
            patch_size=cfg.vision.patch_size,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
        )
        self._names = [s.name for s in checkpoint.family.state_specs(cfg, self.cache_len)]

    @torch.inference_mode()
    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        out = self.model.encode_slice(
            torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            mode,
        )
        return out.float().numpy()

    @torch.inference_mode()
    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        return self.model.embed(torch.from_numpy(np.asarray(ids, dtype=np.int64))).float().numpy()

    def new_state(self) -> DecoderState:
        return DecoderState(dict(zip(self._names, self.model.new_state(self.cache_len), strict=True)))

    @torch.inference_mode()
    def _run(
        self,
        embeds: np.ndarray,
        n_valid: int,
        start_pos: int,
        state: DecoderState,
        positions: np.ndarray | None,
    ):
        x = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))[None]
        extra = {}
        if positions is not None:  # only families with explicit RoPE rows take the keyword
            rows = np.ascontiguousarray(positions, dtype=np.int64)
            if rows.shape != (3, x.shape[1]):
                raise ValueError(f"positions must have shape (3, {x.shape[1]}), got {rows.shape}")
            extra["rope_positions"] = torch.from_numpy(rows)
        logits, new = self.model.decode(
            x, torch.tensor([start_pos]), torch.tensor([n_valid]), list(state.tensors.values()), **extra
        )
        return logits[0].float().numpy(), DecoderState(dict(zip(self._names, new, strict=True)))

    def prefill_chunk(self, embeds, n_valid, start_pos, state, positions=None):
        return self._run(embeds, n_valid, start_pos, state, positions)

    def decode_step(self, embed, pos, state, positions=None):
        return self._run(embed, 1, pos, state, positions)
