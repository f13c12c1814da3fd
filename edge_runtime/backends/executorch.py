"""The ExecuTorch backend: runs an android bundle's `model.pte` through ExecuTorch's Python runtime.

The decoder state lives inside the program (mutable buffers shared by the prefill and decode
methods), not in the caller's hands, so this backend runs one sequence at a time: `new_state()`
zeroes the buffers through the `reset_state` method and hands out a token; a decoder call with a
token other than the newest one fails with one line instead of silently mixing two sequences.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, InputError
from .base import Backend, DecoderState, ModelInfo

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


class ExecuTorchBackend(Backend):
    name = "executorch"

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
        needed = [*vision.values(), graphs["token_embedding"]["method"], *decoder.values()]
        missing = [m for m in needed if m not in self.method_names]
        if missing:
            raise BundleError(f"{pte}: methods {', '.join(missing)} named in the manifest are missing")
        self._vision = {mode: self.program.load_method(m) for mode, m in vision.items()}
        self._embed = self.program.load_method(graphs["token_embedding"]["method"])
        self._prefill = self.program.load_method(decoder["prefill"])
        self._decode = self.program.load_method(decoder["decode"])
        self._reset = self.program.load_method(decoder["reset"])
        self.max_patches = int(graphs["vision_encoder"].get("max_patches", 0)) or None
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

    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        if mode not in self._vision:
            raise InputError(f"downsample mode {mode!r} is not in this bundle ({', '.join(self._vision)})")
        n = len(patches)
        if self.max_patches and n > self.max_patches:
            raise InputError(f"slice of {n} patches exceeds the bundle's maximum of {self.max_patches}")
        out = self._vision[mode].execute(
            [self._tensor(patches, np.float32), self._tensor(position_ids, np.int64)]
        )
        return out[0].numpy().copy()

    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) > self.max_context:  # the method was exported with T <= max_context
            return np.concatenate(
                [
                    self.token_embedding(ids[i : i + self.max_context])
                    for i in range(0, len(ids), self.max_context)
                ]
            )
        return self._embed.execute([self._tensor(ids, np.int64)])[0].numpy().copy()

    def new_state(self) -> DecoderState:
        self._reset.execute([self._torch.zeros(1)])
        self._current = next(self._ids)
        return DecoderState({SEQUENCE_KEY: self._current})

    def _check(self, state: DecoderState) -> None:
        if state.tensors.get(SEQUENCE_KEY) != self._current:
            raise InputError(
                "the executorch backend keeps one sequence's state inside the program; "
                "this state belongs to an older sequence (call new_state() again)"
            )

    def _run(self, method: Any, embeds: np.ndarray, n_valid: int, start_pos: int, state: DecoderState):
        self._check(state)
        if start_pos + n_valid > self.max_context:
            raise InputError(
                f"position {start_pos + n_valid} exceeds the bundle's max context {self.max_context}"
            )
        torch = self._torch
        x = self._tensor(embeds, np.float32)[None]
        out = method.execute([x, torch.tensor([start_pos]), torch.tensor([n_valid])])
        return out[0].numpy()[0].copy(), state

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        if len(embeds) != self.chunk_size:
            raise InputError(
                f"prefill chunk of {len(embeds)} rows; this bundle was exported for {self.chunk_size}"
            )
        return self._run(self._prefill, embeds, n_valid, start_pos, state)

    def decode_step(self, embed, pos, state):
        return self._run(self._decode, np.asarray(embed).reshape(1, -1), 1, pos, state)

    def state_arrays(self, state: DecoderState) -> dict[str, np.ndarray] | None:
        """The state lives in the program's mutable buffers, which the runtime does not expose."""
        return None

    def close(self) -> None:
        self._vision, self._embed = {}, None
        self._prefill = self._decode = self._reset = None
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
