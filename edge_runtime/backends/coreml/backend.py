"""The Core ML backend: a `coreml` bundle behind the three-graph contract, with two engines.

* `mil` (everywhere): the numpy MIL executor runs the programs the packages carry.
* `coremltools` (macOS only): `MLModel.predict` with `MLState`; states are read out with
  `read_state` after each call so DecoderState stays a plain dict of arrays on both engines.
The prefill function takes exactly `chunk` rows: shorter chunks are zero-padded (n_valid masks
them), as the generation loop expects of every backend. Canvas families' decoder functions also
take `position_ids` int32 [3, C], the host's RoPE rows (padding repeats the last column); a canvas
bundle without that input is refused on open.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BundleError
from ..base import (
    Backend,
    DecoderState,
    ModelInfo,
    cache_index_rows_only,
    position_rows,
    takes_position_ids,
)
from .executor import MILProgram

ENGINES = ("mil", "coremltools")
ENGINE_ENV = "MINICPMV_EDGE_COREML_ENGINE"


def default_engine() -> str:
    """`$MINICPMV_EDGE_COREML_ENGINE` when set (on a Mac, `mil` checks a bundle with the same
    executor CI uses); otherwise Core ML itself where it exists, the executor elsewhere."""
    return os.environ.get(ENGINE_ENV) or ("coremltools" if platform.system() == "Darwin" else "mil")


class CoreMLBackend(Backend):
    def __init__(self, root: Path, manifest: dict[str, Any], max_context: int | None = None, engine=None):
        self.root = Path(root)
        self.engine = engine or default_engine()
        if self.engine not in ENGINES:
            raise BundleError(f"unknown Core ML engine {self.engine!r} (choose {', '.join(ENGINES)})")
        self.name = f"coreml-{self.engine}:{manifest['quantization']}"
        graphs = manifest["graphs"]
        self._graphs = graphs
        self.chunk = int(graphs["text_decoder"]["chunk"]["prefill"])
        model = manifest["model"]
        self.info = ModelInfo(
            family=manifest["family"],
            hidden_size=model["hidden_size"],
            vocab_size=model["vocab_size"],
            max_context=min(max_context or manifest["max_context"], manifest["max_context"]),
            chunk_size=self.chunk,
            patch_size=model["patch_size"],
            image_token_id=model["image_token_id"],
            video_token_id=model["video_token_id"],
        )
        self._state_names = {s["coreml_name"]: s["name"] for s in manifest["state"]}
        self._rows = takes_position_ids(manifest, str(self.root))
        self._programs: dict[str, Any] = {}

    # --- engines -------------------------------------------------------------------------------
    def _program(self, key: str):
        if key not in self._programs:
            path = self.root / self._graphs[key]["file"]
            self._programs[key] = MILProgram(path) if self.engine == "mil" else _CoreMLToolsPackage(path)
        return self._programs[key]

    def _call(self, key: str, function: str, inputs: dict, states: dict | None = None) -> np.ndarray:
        fn = self._program(key).function(function)
        out = fn(inputs, states if states is not None else {})
        return np.asarray(out[fn.outputs[0]], dtype=np.float32)

    # --- the contract --------------------------------------------------------------------------
    def vision_encoder(self, patches: np.ndarray, position_ids: np.ndarray, mode: str) -> np.ndarray:
        function = self._graphs["vision_encoder"]["functions"][mode]
        inputs = {
            "patches": np.asarray(patches, np.float32),
            "position_ids": np.asarray(position_ids, np.int32),
        }
        return self._call("vision_encoder", function, inputs)

    def token_embedding(self, ids: np.ndarray) -> np.ndarray:
        return self._call("token_embedding", None, {"ids": np.asarray(ids, np.int32)})

    def new_state(self) -> DecoderState:
        return DecoderState(self._program("text_decoder").new_states("decode"))

    def _run(
        self,
        function: str,
        embeds: np.ndarray,
        n_valid: int,
        start_pos: int,
        state: DecoderState,
        positions: np.ndarray | None = None,
    ):
        states = dict(state.tensors)  # the executor replaces arrays, never writes into them
        inputs = {
            "embeds": np.asarray(embeds, np.float32)[None],
            "start_pos": np.array([start_pos], np.int32),
            "n_valid": np.array([n_valid], np.int32),
        }
        if self._rows:
            inputs["position_ids"] = position_rows(positions, start_pos, len(embeds)).astype(np.int32)
        elif positions is not None:
            cache_index_rows_only(np.asarray(positions)[:, :n_valid], start_pos, n_valid)
        logits = self._call("text_decoder", function, inputs, states)
        return logits.reshape(-1), DecoderState(states)

    def prefill_chunk(self, embeds, n_valid, start_pos, state, positions=None):
        embeds = np.asarray(embeds, np.float32)
        rows = embeds.shape[0]
        if rows > self.chunk:
            raise BundleError(f"prefill chunk of {rows} rows exceeds the bundle's chunk {self.chunk}")
        padded = np.zeros((self.chunk, embeds.shape[1]), np.float32)
        padded[:rows] = embeds
        if positions is not None and rows < self.chunk:  # padding repeats the last column
            positions = np.pad(np.asarray(positions), ((0, 0), (0, self.chunk - rows)), mode="edge")
        return self._run("prefill", padded, n_valid, start_pos, state, positions)

    def decode_step(self, embed, pos, state, positions=None):
        embed = np.asarray(embed, np.float32).reshape(1, -1)
        return self._run("decode", embed, 1, pos, state, positions)

    def state_arrays(self, state: DecoderState) -> dict[str, np.ndarray]:
        return {self._state_names.get(k, k): np.asarray(v, np.float32) for k, v in state.tensors.items()}


class _CoreMLToolsPackage:
    """macOS engine: one MLModel per function, with the same call shape as MILProgram."""

    def __init__(self, path: Path):
        import coremltools as ct

        self.ct = ct
        self.path = path
        self.models: dict[str | None, Any] = {}

    def function(self, name: str | None):
        if name not in self.models:
            self.models[name] = self.ct.models.MLModel(str(self.path), function_name=name)
        model = self.models[name]
        return _PredictFunction(model)

    def new_states(self, function: str | None = None) -> dict[str, np.ndarray]:
        model = self.function(function).model
        return {s.name: np.zeros(tuple(s.type.stateType.arrayType.shape), np.float16)
                for s in model.get_spec().description.state}  # fmt: skip


class _PredictFunction:
    def __init__(self, model):  # noqa: ANN001
        self.model = model
        self.outputs = [o.name for o in model.get_spec().description.output]

    def __call__(self, inputs: dict, states: dict) -> dict:
        mlstate = self.model.make_state() if states else None
        for name, value in states.items():
            mlstate.write_state(name, value)
        out = self.model.predict(inputs, mlstate) if mlstate is not None else self.model.predict(inputs)
        for name in list(states):
            states[name] = mlstate.read_state(name)
        return out


def open_coreml_bundle(bundle, max_context: int | None, threads: int | None) -> Backend:  # noqa: ANN001
    """The bundle registry's opener for format `coreml`."""
    return CoreMLBackend(bundle.path, bundle.manifest.to_dict(), max_context)
