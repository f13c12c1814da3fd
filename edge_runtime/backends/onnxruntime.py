"""The onnxruntime backend: runs an `onnx` bundle (target harmonyos) behind the three-graph contract.

Five sessions over one weight file: vision encoder per downsample mode, token embedding, and the
text decoder at the prefill chunk C and at C = 1. All sessions open when the backend opens, as an
app would at start-up, so session creation never lands inside a measured TTFT. Decoder state stays
in onnxruntime as OrtValues between calls, so the KV cache is not converted to numpy and back on
every token. The state entries the manifest lists under `onnx.in_place_state` (KV caches that
GroupQueryAttention updates) are bound as input and output to the same buffer, so each call writes
its new rows in place instead of copying the whole static cache: the state passed in is consumed,
as with the ExecuTorch backend's one-sequence state; only the returned one is current.

The decoder graphs take RoPE position rows `position_ids` int64 [3, C] apart from the cache index:
the generation loop's rows where the family computes them (Canvas M-RoPE), else the cache index in
all three rows, built here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, InputError
from .base import Backend, DecoderState, ModelInfo, position_rows

# onnxruntime fuses DequantizeLinear(int8 weight) + MatMul into an 8-bit MatMulNBits (weights stay
# int8 in memory, read once per call). Its default accuracy level 4 also quantizes the activations
# to int8, which costs parity on outlier-heavy LLMs (prior-art.md §4.1); level 1 keeps them fp32.
QDQ_MATMUL_ACCURACY_LEVEL = "1"


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Threads: intra-op threads (None or 0 = onnxruntime's default, one per physical core)."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", QDQ_MATMUL_ACCURACY_LEVEL)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads or 0)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def make_session(path: Path, threads: int | None = None, prepack: bool = True) -> ort.InferenceSession:
    """`prepack=False` skips the kernels' repacked weight copies (a one-off check does not need the
    speed, and at full size the copies are gigabytes)."""
    options = session_options(threads)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types; report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path.name}: onnxruntime cannot load it ({first})") from None


class _OrtState(DecoderState):
    """Decoder state as OrtValues (copy() goes through numpy, which only forks/snapshots need)."""

    def copy(self) -> _OrtState:
        return _OrtState(
            {k: ort.OrtValue.ortvalue_from_numpy(v.numpy().copy()) for k, v in self.tensors.items()}
        )


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, root: Path, manifest: dict[str, Any], max_context: int | None = None, threads=None):
        self.root = Path(root)
        self.manifest = manifest
        self.threads = threads
        graphs = manifest["graphs"]
        self._files = {
            **{f"vision_{m}": f for m, f in graphs["vision_encoder"]["files"].items()},
            "token_embedding": graphs["token_embedding"]["file"],
            "decoder_prefill": graphs["text_decoder"]["files"]["prefill"],
            "decoder_decode": graphs["text_decoder"]["files"]["decode"],
        }
        self._sessions: dict[str, ort.InferenceSession] = {}
        model = manifest["model"]
        bundle_context = int(manifest["max_context"])
        self.info = ModelInfo(
            family=manifest["family"],
            hidden_size=int(model["hidden_size"]),
            vocab_size=int(model["vocab_size"]),
            max_context=min(max_context or bundle_context, bundle_context),
            chunk_size=int(manifest["chunk_size"]),
            patch_size=int(model["patch_size"]),
            image_token_id=int(model["image_token_id"]),
            video_token_id=int(model["video_token_id"]),
        )
        _require_position_ids(graphs["text_decoder"])
        self._state = [(s["name"], tuple(s["shape"]), np.dtype(s["dtype"])) for s in manifest["state"]]
        self._in_place = frozenset(manifest.get("onnx", {}).get("in_place_state", ()))
        self.name = f"onnxruntime:{manifest.get('quantization', '?')}"
        for key in self._files:
            self.session(key)

    def session(self, key: str) -> ort.InferenceSession:
        if key not in self._sessions:
            self._sessions[key] = make_session(self.root / self._files[key], self.threads)
        return self._sessions[key]

    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        if f"vision_{mode}" not in self._files:
            modes = [k.removeprefix("vision_") for k in self._files if k.startswith("vision_")]
            raise InputError(f"unknown downsample mode {mode!r} (this bundle has {' or '.join(modes)})")
        feeds = {
            "patches": np.ascontiguousarray(patches, dtype=np.float32),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        return self.session(f"vision_{mode}").run(None, feeds)[0]

    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        return self.session("token_embedding").run(None, {"ids": ids})[0]

    def new_state(self) -> DecoderState:
        return _OrtState(
            {
                name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
                for name, shape, dtype in self._state
            }
        )

    def _run(
        self,
        key: str,
        embeds: np.ndarray,
        n_valid: int,
        start_pos: int,
        state: DecoderState,
        positions: np.ndarray | None,
    ):
        sess = self.session(key)
        rows = position_rows(positions, start_pos, embeds.shape[0])
        feeds = {
            "embeds": ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(embeds[None], dtype=np.float32)),
            "start_pos": ort.OrtValue.ortvalue_from_numpy(np.array([start_pos], dtype=np.int64)),
            "n_valid": ort.OrtValue.ortvalue_from_numpy(np.array([n_valid], dtype=np.int64)),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(rows),
        }
        tensors = state.tensors
        for name, _, dtype in self._state:
            value = tensors[name]
            feeds[f"past.{name}"] = (
                value
                if isinstance(value, ort.OrtValue)
                else ort.OrtValue.ortvalue_from_numpy(np.asarray(value, dtype))
            )
        binding = sess.io_binding()
        for key, value in feeds.items():
            binding.bind_ortvalue_input(key, value)
        binding.bind_output("logits")
        for name, _, _ in self._state:
            if name in self._in_place:
                binding.bind_ortvalue_output(f"present.{name}", feeds[f"past.{name}"])
            else:
                binding.bind_output(f"present.{name}")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()
        # in place: keep the bound input object, which owns the buffer (the output object returned
        # by the binding is a view that does not keep a numpy-backed buffer alive)
        new = _OrtState(
            {
                name: feeds[f"past.{name}"] if name in self._in_place else outs[i + 1]
                for i, (name, _, _) in enumerate(self._state)
            }
        )
        return outs[0].numpy()[0], new

    def prefill_chunk(self, embeds, n_valid, start_pos, state, positions=None):
        chunk = self.info.chunk_size
        rows = embeds.shape[0]
        if rows > chunk:
            raise InputError(f"prefill chunk of {rows} rows exceeds the bundle's chunk size {chunk}")
        if rows < chunk:
            embeds = np.concatenate([embeds, np.zeros((chunk - rows, embeds.shape[1]), np.float32)])
            if positions is not None:  # padding repeats the last column, as the generation loop pads
                positions = np.pad(np.asarray(positions), ((0, 0), (0, chunk - rows)), mode="edge")
        return self._run("decoder_prefill", embeds, n_valid, start_pos, state, positions)

    def decode_step(self, embed, pos, state, positions=None):
        embed = np.asarray(embed, np.float32).reshape(1, -1)
        return self._run("decoder_decode", embed, 1, pos, state, positions)

    def state_arrays(self, state: DecoderState) -> dict[str, np.ndarray]:
        return {
            k: np.array(v.numpy() if isinstance(v, ort.OrtValue) else v, np.float32)
            for k, v in state.tensors.items()
        }

    def close(self) -> None:
        self._sessions.clear()


def _require_position_ids(decoder: dict[str, Any]) -> None:
    """Bundles exported before the decoder took position rows lack the input: one line, not a crash
    inside onnxruntime at the first prefill."""
    if "position_ids" not in {i.get("name") for i in decoder.get("inputs", [])}:
        raise BundleError(
            "this onnx bundle's text decoder has no position_ids input (exported by an older "
            "minicpmv-edge); re-export it with this version"
        )


def open_onnx_bundle(bundle: Any, max_context: int | None, threads: int | None) -> Backend:
    """The bundle registry's opener for format `onnx` (bundle: a verified edge_runtime.bundle.Bundle)."""
    return OnnxRuntimeBackend(bundle.path, bundle.manifest.to_dict(), max_context, threads)


def _register() -> None:
    from ..bundle import register_backend

    register_backend("onnx", open_onnx_bundle)


_register()
