"""The ExecuTorch backend: runs an android bundle's `model.pte` through ExecuTorch's Python runtime.

It calls the methods ExecuTorch's own LLM runners call, with the same shapes (docs/executorch.md):
`vision_encoder` on a slice's uint8 pixels [1, 3, H, W], `token_embedding` on ids [1, T],
`text_decoder` on embeddings [1, T, D] and start_pos [1] for prefill and decode alike. The decoder
state lives inside the program (mutable buffers), not in the caller's hands, and a call at
start_pos 0 starts a new sequence; so this backend runs one sequence at a time: `new_state()` hands
out a token, and a decoder call with a token other than the newest one fails with one line instead
of silently mixing two sequences.

Canvas families (manifest `model.rope_positions == "canvas"`, MiniCPM-V 4.7) export `text_decoder`
with a third input, the RoPE rows `position_ids` int64 [3, T]: the generation loop's rows are fed
there (the cache index in all three rows when it gives none). A canvas bundle whose decoder lists no
such input is refused on open.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, InputError
from ..processing.slicing import merge_factor, vision_mode
from .base import (
    Backend,
    DecoderState,
    ModelInfo,
    cache_index_rows_only,
    position_rows,
    takes_position_ids,
)

SEQUENCE_KEY = "executorch_sequence"


def _runtime(custom_ops: list[str]) -> Any:
    """ExecuTorch's runtime with the kernels the program needs registered: the quantized kernels
    always, ExecuTorch's LLM custom ops (`llama::*`) when the manifest lists one."""
    try:
        import executorch.kernels.quantized  # noqa: F401 - registers quantized_decomposed::embedding_*
        from executorch.runtime import Runtime

        if any(op.startswith("llama::") for op in custom_ops):
            from executorch.extension.llm.custom_ops import custom_ops as _llm_ops  # noqa: F401
    except ImportError as exc:  # pragma: no cover - executorch is a dependency of the project
        raise BundleError(
            f"executorch is not installed ({exc}); it is needed to run android bundles"
        ) from None
    return Runtime.get()


def _normalisation_table(mean: list[float], std: list[float], rescale: float) -> np.ndarray:
    """float32 [3, 256]: each 8-bit level normalised as processing.image.normalize does it."""
    levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1)
    return (levels[None, :] - m) / s


class ExecuTorchBackend(Backend):
    name = "executorch"
    takes_pixels = True

    def __init__(self, pte: Path, manifest: dict[str, Any], max_context: int | None = None):
        import torch

        self._torch = torch
        graphs = manifest["graphs"]
        try:
            runtime = _runtime(list(manifest.get("executorch", {}).get("custom_ops", [])))
            self.program = runtime.load_program(Path(pte))
        except Exception as exc:  # noqa: BLE001 - the runtime raises bare RuntimeError/MemoryError
            raise BundleError(f"{pte}: ExecuTorch could not load the program ({exc})") from None
        self.method_names = set(self.program.method_names)
        vision = graphs["vision_encoder"]["methods"]
        decoder = graphs["text_decoder"]["methods"]
        needed = [
            *vision.values(),
            graphs["token_embedding"]["method"],
            decoder["prefill"],
            decoder["decode"],
        ]
        missing = [m for m in needed if m not in self.method_names]
        if missing:
            raise BundleError(f"{pte}: methods {', '.join(missing)} named in the manifest are missing")
        if graphs["vision_encoder"].get("input") != "image" or decoder["prefill"] != decoder["decode"]:
            raise BundleError(
                f"{pte}: an older ExecuTorch bundle (patch-input vision, fixed-size prefill); "
                "export it again with this version"
            )
        self._vision = {mode: self.program.load_method(m) for mode, m in vision.items()}
        self._embed = self.program.load_method(graphs["token_embedding"]["method"])
        self._decoder = self.program.load_method(decoder["prefill"])
        self._rows = takes_position_ids(manifest, str(pte))
        self.max_side = int(graphs["vision_encoder"]["max_side_patches"])
        self.max_tokens = int(graphs["text_decoder"]["max_tokens"])
        norm = manifest["executorch"]["normalisation"]
        self._table = _normalisation_table(norm["mean"], norm["std"], norm["rescale"])
        self._mean, self._std, self._rescale = norm["mean"], norm["std"], float(norm["rescale"])
        self._side = int(manifest["model"]["num_patches_per_side"])
        model = manifest["model"]
        self.max_context = min(max_context or manifest["max_context"], manifest["max_context"])
        self.chunk_size = int(manifest["chunk_size"])
        self.info = ModelInfo(
            family=manifest["family"],
            hidden_size=model["hidden_size"],
            vocab_size=model["vocab_size"],
            max_context=self.max_context,
            chunk_size=self.chunk_size,
            patch_size=model["patch_size"],
            image_token_id=model["image_token_id"],
            video_token_id=model["video_token_id"],
        )
        self.name = f"executorch:{manifest.get('quantization', '?')}"
        self._ids = itertools.count(1)
        self._current = 0

    def metadata(self, name: str) -> Any:
        """Value of a constant method (get_max_seq_len, get_eos_ids, ...), as a python scalar/list."""
        out = self.program.load_method(name).execute([])
        values = [v.item() if hasattr(v, "item") else v for v in out]
        return values[0] if len(values) == 1 else values

    def _tensor(self, array: np.ndarray, dtype: Any) -> Any:
        return self._torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))

    def vision_encoder_pixels(self, pixels: np.ndarray, mode: str) -> np.ndarray:
        if mode not in self._vision:
            raise InputError(f"downsample mode {mode!r} is not in this bundle ({', '.join(self._vision)})")
        pixels = np.asarray(pixels)
        p, unit = self.info.patch_size, merge_factor(mode)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[0] != 3:
            raise InputError(f"a slice is uint8 [3, H, W]; got {pixels.dtype} {list(pixels.shape)}")
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        if pixels.shape[1] % (p * unit) or pixels.shape[2] % (p * unit):
            raise InputError(
                f"slice {pixels.shape[2]}x{pixels.shape[1]} px is not a multiple of {p * unit} px"
            )
        if min(h, w) < 2 * unit:
            raise InputError(
                f"slice of {w}x{h} patches; this bundle's vision method needs {2 * unit} per side"
            )
        if max(h, w) > self.max_side:
            raise InputError(
                f"slice of {w}x{h} patches exceeds the bundle's maximum of {self.max_side} patches per side"
            )
        out = self._vision[mode].execute([self._torch.from_numpy(np.ascontiguousarray(pixels))[None]])
        return out[0].numpy()[0].copy()

    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        """The base contract (patches + position ids) on a graph that takes pixels: patches the host
        made from 8-bit pixels (normalize + slice_to_patches) are turned back into those pixels
        exactly; anything else is refused."""
        return self.vision_encoder_pixels(self._pixels(patches, position_ids, mode), mode)

    def _pixels(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        from ..processing.patches import position_ids as grid_position_ids
        from ..processing.patches import window_order

        p = self.info.patch_size
        patches, ids = np.asarray(patches, dtype=np.float32), np.asarray(position_ids, dtype=np.int64)
        custom = vision_mode(mode).position_ids
        if custom is not None and ids.ndim == 2 and len(ids) == 3:  # (table ids, rows, cols)
            row, col = ids[1], ids[2]
        else:
            _, row = np.unique(ids // self._side, return_inverse=True)
            _, col = np.unique(ids % self._side, return_inverse=True)
        h, w = int(row.max()) + 1, int(col.max()) + 1
        cell = row * w + col
        if h * w != len(patches) or np.bincount(cell, minlength=h * w).max() != 1:
            raise InputError("position ids do not form a patch grid")
        # the graph computes the ids of an h x w slice itself: they must be these
        expected = grid_position_ids(h, w, self._side) if custom is None else custom(h, w, self._side)
        if not np.array_equal(expected[..., window_order(h, w, mode)], ids):
            raise InputError(f"position ids are not those of a {h}x{w} slice in {mode} window order")
        values = patches.reshape(len(patches), 3, p * p)
        codes = np.empty(values.shape, dtype=np.uint8)
        for c in range(3):
            # the table is increasing, so its inverse is the rounded affine inverse, then checked
            level = np.rint((values[:, c].astype(np.float64) * self._std[c] + self._mean[c]) / self._rescale)
            codes[:, c] = np.clip(level, 0, 255).astype(np.uint8)
            if not np.array_equal(self._table[c][codes[:, c]], values[:, c]):
                raise InputError(
                    "this bundle's vision method takes 8-bit pixels; the patches are not normalised 8-bit pixels"
                )
        grid = np.zeros((h * w, 3, p, p), dtype=np.uint8)
        grid[cell] = codes.reshape(-1, 3, p, p)
        return np.ascontiguousarray(
            grid.reshape(h, w, 3, p, p).transpose(2, 0, 3, 1, 4).reshape(3, h * p, w * p)
        )

    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) > self.max_tokens:  # the method was exported with T <= max_tokens
            return np.concatenate(
                [
                    self.token_embedding(ids[i : i + self.max_tokens])
                    for i in range(0, len(ids), self.max_tokens)
                ]
            )
        return self._embed.execute([self._tensor(ids, np.int64)[None]])[0].numpy()[0].copy()

    def new_state(self) -> DecoderState:
        """A token for the next sequence; its first call (at start_pos 0) resets the program's state."""
        self._current = next(self._ids)
        return DecoderState({SEQUENCE_KEY: self._current})

    def _check(self, state: DecoderState) -> None:
        if state.tensors.get(SEQUENCE_KEY) != self._current:
            raise InputError(
                "the executorch backend keeps one sequence's state inside the program; "
                "this state belongs to an older sequence (call new_state() again)"
            )

    def _run(self, embeds: np.ndarray, start_pos: int, state: DecoderState, positions: np.ndarray | None):
        self._check(state)
        if start_pos + len(embeds) > self.max_context:
            raise InputError(
                f"position {start_pos + len(embeds)} exceeds the bundle's max context {self.max_context}"
            )
        inputs = [self._tensor(embeds, np.float32)[None], self._torch.tensor([start_pos])]
        if self._rows:
            inputs.append(self._torch.from_numpy(position_rows(positions, start_pos, len(embeds))))
        else:
            cache_index_rows_only(positions, start_pos, len(embeds))
        out = self._decoder.execute(inputs)
        return out[0].numpy()[0].copy(), state

    def prefill_chunk(self, embeds, n_valid, start_pos, state, positions=None):
        """Only the valid rows go in (and their position columns): the method's T is dynamic, so
        there is no padding."""
        if not 1 <= n_valid <= min(len(embeds), self.max_tokens):
            raise InputError(
                f"prefill chunk of {n_valid} valid rows; this bundle takes 1 .. {self.max_tokens}"
            )
        rows = None if positions is None else np.asarray(positions)[:, :n_valid]
        return self._run(np.asarray(embeds)[:n_valid], start_pos, state, rows)

    def decode_step(self, embed, pos, state, positions=None):
        return self._run(np.asarray(embed).reshape(1, -1), pos, state, positions)

    def state_arrays(self, state: DecoderState) -> dict[str, np.ndarray] | None:
        """The state lives in the program's mutable buffers, which the runtime does not expose."""
        return None

    def close(self) -> None:
        self._vision, self._embed, self._decoder = {}, None, None
        self.program = None


def set_threads(threads: int) -> None:
    """XNNPACK's threadpool is process-wide in the Python runtime."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


def open_executorch_bundle(bundle: Any, max_context: int | None, threads: int | None) -> Backend:
    """Opener for edge_runtime.bundle's registry (format `executorch`)."""
    if threads:
        set_threads(threads)
    raw = bundle.manifest.to_dict()
    pte = raw.get("executorch", {}).get("pte", "model.pte")
    return ExecuTorchBackend(bundle.file(pte), raw, max_context=max_context)
