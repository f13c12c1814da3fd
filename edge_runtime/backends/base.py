"""The backend interface every runtime implements: the three graphs of DESIGN.md, in numpy.

The torch reference and every bundle backend (onnxruntime, executorch, coreml) expose the same
calls, so one generation loop and one parity harness serve them all. Arrays cross the interface
as numpy: float32 activations, int64 ids. Decoder state is opaque to callers: a backend hands
out a fresh one and returns an updated one from every decoder call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BundleError, InputError


@dataclass(frozen=True)
class ModelInfo:
    """What the host loop needs to know about the model behind a backend."""

    family: str
    hidden_size: int  # LLM embedding width
    vocab_size: int
    max_context: int  # prompt + generated tokens must fit
    chunk_size: int  # prefill chunk length C
    patch_size: int
    image_token_id: int
    video_token_id: int


class DecoderState:
    """Opaque per-sequence decoder state (KV cache, conv state, recurrent state)."""

    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors

    def copy(self) -> DecoderState:
        return DecoderState(
            {k: v.copy() if hasattr(v, "copy") else v.clone() for k, v in self.tensors.items()}
        )


class Backend(ABC):
    """One loaded model (reference or bundle) behind the three-graph contract."""

    name: str = "backend"
    info: ModelInfo
    # True where the vision graph normalises and patchifies a slice itself (executorch bundles, whose
    # vision method is the one ExecuTorch's multimodal runner calls): the host then hands it the
    # slice's 8-bit pixels through `vision_encoder_pixels` instead of patches.
    takes_pixels: bool = False

    @abstractmethod
    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        """One slice: patches [L, 3*P*P] and position ids [L] in window-major order -> [L/16 or L/4, D]."""

    def vision_encoder_pixels(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        """One slice as uint8 [3, H, W] pixels (resized, not normalised) -> [H*W/(P*P*16 or 4), D]."""
        raise NotImplementedError(f"{self.name} takes patches, not pixels")

    @abstractmethod
    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [T] (int64) -> embeddings [T, D] float32."""

    @abstractmethod
    def new_state(self) -> DecoderState:
        """An empty decoder state for a new sequence."""

    @abstractmethod
    def prefill_chunk(
        self,
        embeds: np.ndarray,
        n_valid: int,
        start_pos: int,
        state: DecoderState,
        positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, DecoderState]:
        """Embeddings [C, D] (rows past n_valid are padding) at cache indices start_pos.. -> logits
        of the last valid position [V] and the updated state.

        `positions` int64 [3, C]: RoPE position rows (t, h, w) of the chunk where the family's
        positions are not the cache index (Families with `rope_positions="canvas"`, MiniCPM-V 4.7);
        None = the cache index. The generation loop passes it only when it is not None, so a
        backend that cannot take rows keeps the four-argument form."""

    @abstractmethod
    def decode_step(
        self, embed: np.ndarray, pos: int, state: DecoderState, positions: np.ndarray | None = None
    ) -> tuple[np.ndarray, DecoderState]:
        """One token's embedding [1, D] at cache index pos -> logits [V] and the updated state;
        `positions` int64 [3, 1] as in prefill_chunk."""

    def state_arrays(self, state: DecoderState) -> dict[str, np.ndarray] | None:
        """The state as named float32 copies, for parity; None where a backend cannot expose it."""
        return {
            k: np.array(v.detach().float().numpy() if hasattr(v, "detach") else v, np.float32)
            for k, v in state.tensors.items()
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (sessions, memory maps)."""


def position_rows(positions: np.ndarray | None, start_pos: int, rows: int) -> np.ndarray:
    """The decoder's position_ids int64 [3, rows]: the host's RoPE rows (canvas families), or the
    cache index start_pos + i repeated in all three rows (every other family; padding included,
    as the cache slots)."""
    if positions is None:
        return np.ascontiguousarray(
            np.broadcast_to(np.arange(start_pos, start_pos + rows, dtype=np.int64), (3, rows))
        )
    out = np.ascontiguousarray(positions, dtype=np.int64)
    if out.shape != (3, rows):
        raise InputError(f"positions must have shape (3, {rows}), got {out.shape}")
    return out


def takes_position_ids(manifest: dict[str, Any], where: str) -> bool:
    """Whether the bundle's text decoder takes RoPE rows (`position_ids` among its inputs). A canvas
    family's bundle (manifest `model.rope_positions == "canvas"`) whose decoder lists none cannot
    be run right (the rows are how its positions reach RoPE) and is refused in one line."""
    decoder = manifest["graphs"]["text_decoder"]
    takes = "position_ids" in {i.get("name") for i in decoder.get("inputs", [])}
    if manifest["model"].get("rope_positions", "cache") == "canvas" and not takes:
        raise BundleError(
            f"{where}: {manifest['family']} computes its RoPE positions on the host (canvas rows), "
            "but this bundle's text decoder takes no position_ids; re-export it with this version"
        )
    return takes


def cache_index_rows_only(positions: np.ndarray | None, start_pos: int, rows: int) -> None:
    """For a decoder without position rows (RoPE at the cache index): rows other than the cache
    index cannot be honoured, so they are refused instead of ignored."""
    if positions is not None and not np.array_equal(
        position_rows(positions, start_pos, rows), position_rows(None, start_pos, rows)
    ):
        raise InputError(
            "this bundle's text decoder takes no RoPE position rows; its positions are the cache index"
        )
