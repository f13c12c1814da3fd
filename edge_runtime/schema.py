"""Declared schemas of the JSON files we read: a bundle's `manifest.json` and a checkpoint's `config.json`.

Both are pydantic models in strict mode (no "64" -> 64 coercion, no bool for an int), nested fields
included, so a damaged or hand-edited file fails on read with one line naming the field
(`field 'model.hidden_size' must be an integer, got '64'`) instead of crashing a backend later or
silently falling back to full-size defaults. `validate_manifest` / `validate_config` are the only
entry points; they raise the caller's error type (BundleError / CheckpointError).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import EdgeError

MANIFEST = "manifest.json"
MANIFEST_CHECKSUM_FIELD = "manifest_sha256"
TARGETS = ("ios", "android", "harmonyos", "desktop")

# Sizes: positive and below a bound no real model reaches, so a typo cannot ask for a 10^30-wide tensor.
Dim = Annotated[int, Field(gt=0, le=1 << 20)]
Count = Annotated[int, Field(gt=0, le=4096)]
Vocab = Annotated[int, Field(gt=0, le=1 << 24)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 24)]
NonNeg = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1)]
Mode = Literal["16x", "4x"]
# a vision variant of any family in a manifest (4.6: 16x / 4x; 4.0: resampler)
VisionModeName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_]*$", max_length=32)]
LayerType = Literal["full_attention", "linear_attention"]
DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class _Strict(BaseModel):
    """Strict types; keys we do not know are kept (exporters add format-specific ones)."""

    model_config = ConfigDict(strict=True, extra="allow")


# ---------------------------------------------------------------------------------------------------
# manifest.json (docs/bundle.md)


class IOSpec(_Strict):
    name: Name
    shape: list[Annotated[int, Field(ge=0)] | str]
    dtype: str


class Graph(_Strict):
    inputs: list[IOSpec] = []
    outputs: list[IOSpec] = []


class FileGraph(Graph):
    file: Name


class TorchGraph(FileGraph):
    method: Name


class OnnxDecoderFiles(_Strict):
    prefill: Name
    decode: Name


class OnnxVision(Graph):
    files: dict[VisionModeName, Name] = Field(min_length=1)


class OnnxDecoder(Graph):
    files: OnnxDecoderFiles


class ExecuTorchVision(FileGraph):
    methods: dict[VisionModeName, Name] = Field(min_length=1)


class ExecuTorchEmbedding(FileGraph):
    method: Name


class ExecuTorchDecoderMethods(_Strict):
    prefill: Name
    decode: Name


class ExecuTorchDecoder(FileGraph):
    methods: ExecuTorchDecoderMethods


class CoreMLVision(FileGraph):
    functions: dict[VisionModeName, Name] = Field(min_length=1)


class CoreMLChunk(_Strict):
    prefill: Dim


class CoreMLDecoder(FileGraph):
    chunk: CoreMLChunk


class Graphs(_Strict):
    """Every format has the three entry points; their per-format shape is checked by `_GRAPHS`."""

    vision_encoder: Graph
    token_embedding: Graph
    text_decoder: Graph


class TorchGraphs(Graphs):
    vision_encoder: TorchGraph
    token_embedding: TorchGraph
    text_decoder: TorchGraph


class OnnxGraphs(Graphs):
    vision_encoder: OnnxVision
    token_embedding: FileGraph
    text_decoder: OnnxDecoder


class ExecuTorchGraphs(Graphs):
    vision_encoder: ExecuTorchVision
    token_embedding: ExecuTorchEmbedding
    text_decoder: ExecuTorchDecoder


class CoreMLGraphs(Graphs):
    vision_encoder: CoreMLVision
    token_embedding: FileGraph
    text_decoder: CoreMLDecoder


_GRAPHS: dict[str, type[Graphs]] = {
    "torch": TorchGraphs,
    "onnx": OnnxGraphs,
    "executorch": ExecuTorchGraphs,
    "coreml": CoreMLGraphs,
}


class StateEntry(_Strict):
    name: Name
    shape: list[NonNeg] = Field(min_length=1)
    dtype: DType


class ModelDims(_Strict):
    hidden_size: Dim
    vocab_size: Vocab
    num_layers: Count
    layer_types: list[LayerType] = Field(min_length=1)
    vision_hidden_size: Dim
    vision_layers: Count
    patch_size: Dim
    num_patches_per_side: Dim
    image_token_id: TokenId
    video_token_id: Annotated[int, Field(ge=-1, lt=1 << 24)]  # -1: the family takes no video
    downsample_modes: list[VisionModeName] = Field(min_length=1)
    default_downsample_mode: VisionModeName
    tie_word_embeddings: bool
    decode_weight_bytes: NonNeg

    @model_validator(mode="after")
    def _layers(self) -> ModelDims:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, num_layers is {self.num_layers}"
            )
        return self


class PromptInfo(_Strict):
    chat_template: Name | None
    special_token_ids: dict[str, TokenId]
    stop_ids: list[TokenId] = Field(min_length=1)


class FileEntry(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: NonNeg


class ManifestSchema(_Strict):
    schema_version: int
    family: Name
    target: str
    format: Name
    quantization: Name
    model: ModelDims
    graphs: Graphs
    state: list[StateEntry]
    preprocessing: dict[str, Any]
    prompt: PromptInfo
    max_context: Dim
    chunk_size: Dim
    files: dict[str, FileEntry]
    toolkit_version: str
    created_by: str
    manifest_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(f"target {value!r} is not one of {', '.join(TARGETS)}")
        return value

    @field_validator("files")
    @classmethod
    def _paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in files:
            path = PurePosixPath(rel)
            if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or rel == MANIFEST:
                raise ValueError(f"files lists an invalid path {rel!r} (relative, inside the bundle)")
        return files

    @model_validator(mode="after")
    def _consistent(self) -> ManifestSchema:
        if self.chunk_size > self.max_context:
            raise ValueError(f"chunk_size {self.chunk_size} is larger than max_context {self.max_context}")
        names = [s.name for s in self.state]
        if len(set(names)) != len(names):
            raise ValueError("state lists a name twice")
        return self


def _named_files(graphs: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, file name) of every file a graph entry names."""
    out = []
    for entry, graph in graphs.items():
        if not isinstance(graph, dict):
            continue
        for key in ("file", "data_file", "config"):
            if isinstance(graph.get(key), str):
                out.append((f"graphs.{entry}.{key}", graph[key]))
        files = graph.get("files")
        if isinstance(files, dict):
            out += [(f"graphs.{entry}.files.{k}", v) for k, v in files.items() if isinstance(v, str)]
    return out


def validate_manifest(raw: Any, where: str, error: type[EdgeError]) -> dict[str, Any]:
    """Validate a parsed manifest against the schema (the version first: a newer manifest fails on
    its version, not on a field it renamed); returns `raw` unchanged."""
    from .bundle import SCHEMA_VERSION

    if not isinstance(raw, dict):
        raise error(f"{where}: not a JSON object")
    version = raw.get("schema_version")
    if type(version) is not int:
        raise error(f"{where}: schema_version missing or not an integer ({version!r:.60})")
    if version != SCHEMA_VERSION:
        raise error(
            f"{where}: unknown schema_version {version}; this toolkit reads schema_version "
            f"{SCHEMA_VERSION} (re-export the bundle with a matching minicpmv-edge)"
        )
    _validate(ManifestSchema, raw, where, error)
    graphs_schema = _GRAPHS.get(raw["format"])
    if graphs_schema is not None:
        _validate(graphs_schema, raw["graphs"], where, error, prefix=("graphs",))
    for field, name in _named_files(raw["graphs"]):
        if name not in raw["files"] and not any(f.startswith(name.rstrip("/") + "/") for f in raw["files"]):
            raise error(f"{where}: field {field!r} names {name!r}, which files does not list")
    return raw


def manifest_checksum(raw: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its own checksum field."""
    body = {k: v for k, v in raw.items() if k != MANIFEST_CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_manifest_checksum(raw: dict[str, Any], where: str, error: type[EdgeError]) -> None:
    """A manifest that records its checksum must match it; older bundles record none."""
    recorded = raw.get(MANIFEST_CHECKSUM_FIELD)
    if recorded is None:
        return
    actual = manifest_checksum(raw)
    if actual != recorded:
        raise error(
            f"{where}: {MANIFEST_CHECKSUM_FIELD} mismatch (records {recorded[:12]}..., content hashes to "
            f"{actual[:12]}...); the manifest was changed or corrupted"
        )


# ---------------------------------------------------------------------------------------------------
# config.json of a checkpoint (the Hugging Face MiniCPMV4_6 layout)


class VisionConfigSchema(_Strict):
    hidden_size: Dim
    intermediate_size: Dim
    num_hidden_layers: Count
    num_attention_heads: Count
    num_channels: Annotated[int, Field(gt=0, le=4)] = 3
    image_size: Dim
    patch_size: Dim
    layer_norm_eps: PosFloat = 1e-6
    hidden_act: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"  # the activation the tower implements
    window_kernel_size: Annotated[list[Dim], Field(min_length=2, max_length=2)] = [2, 2]

    @model_validator(mode="after")
    def _heads(self) -> VisionConfigSchema:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        return self


class RopeSchema(_Strict):
    rope_type: str = "default"
    rope_theta: PosFloat = 10_000_000.0
    partial_rotary_factor: Annotated[float, Field(gt=0, le=1)] = 0.25


class TextConfigSchema(_Strict):
    vocab_size: Vocab
    hidden_size: Dim
    intermediate_size: Dim
    num_hidden_layers: Count
    num_attention_heads: Count
    num_key_value_heads: Count
    head_dim: Dim
    max_position_embeddings: Dim = 262144
    rms_norm_eps: PosFloat = 1e-6
    rope_parameters: RopeSchema | None = None
    rope_theta: PosFloat | None = None
    partial_rotary_factor: Annotated[float, Field(gt=0, le=1)] | None = None
    hidden_act: Literal["silu"] = "silu"  # the activation the decoder implements
    attention_bias: bool = False
    attn_output_gate: bool = True
    linear_conv_kernel_dim: Annotated[int, Field(gt=0, le=64)]
    linear_key_head_dim: Dim
    linear_value_head_dim: Dim
    linear_num_key_heads: Count
    linear_num_value_heads: Count
    layer_types: list[LayerType] | None = None
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _shapes(self) -> TextConfigSchema:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads {self.linear_num_key_heads}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is {self.num_hidden_layers}"
            )
        return self


class ConfigSchema(_Strict):
    model_type: Literal["minicpmv4_6"] | None = None
    vision_config: VisionConfigSchema
    text_config: TextConfigSchema
    insert_layer_id: Annotated[int, Field(ge=0, le=4096)] = 6
    drop_vision_last_layer: bool = False
    image_size: Dim = 448
    image_token_id: TokenId
    video_token_id: TokenId
    downsample_mode: Mode = "16x"
    merge_kernel_size: Annotated[list[Dim], Field(min_length=2, max_length=2)] = [2, 2]
    merger_times: Annotated[int, Field(gt=0, le=16)] = 1
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _ids(self) -> ConfigSchema:
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id"):
            if getattr(self, name) >= vocab:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary ({vocab})")
        if self.insert_layer_id > self.vision_config.num_hidden_layers:
            raise ValueError(
                f"insert_layer_id {self.insert_layer_id} is past the vision tower's "
                f"{self.vision_config.num_hidden_layers} layers"
            )
        return self


class OcrConfigSchema(ConfigSchema):
    """config.json of MiniCPM-OCR: 4.6's fields under its own model_type and defaults."""

    model_type: Literal["minicpm_ocr"]
    downsample_mode: Mode = "4x"
    tie_word_embeddings: bool = True


class MRopeSchema(RopeSchema):
    """Qwen3.5's rope_parameters with the (t, h, w) split MiniCPM-V 4.7 needs."""

    mrope_section: Annotated[list[Annotated[int, Field(ge=0, le=4096)]], Field(min_length=3, max_length=3)]
    mrope_interleaved: Literal[True] = True


class V47TextConfigSchema(TextConfigSchema):
    rope_parameters: MRopeSchema


class V47ConfigSchema(ConfigSchema):
    """config.json of MiniCPM-V 4.7: 4.6's fields, the Canvas M-RoPE marker ids and mrope_section."""

    model_type: Literal["minicpmv4_7"]
    text_config: V47TextConfigSchema
    image_start_id: TokenId | None = None
    image_end_id: TokenId | None = None
    slice_start_id: TokenId | None = None
    slice_end_id: TokenId | None = None
    newline_id: TokenId | None = None


class LongRopeSchema(_Strict):
    rope_type: Literal["longrope", "default"] = "default"
    factor: PosFloat | None = None
    original_max_position_embeddings: Dim | None = None
    long_factor: list[PosFloat] | None = None
    short_factor: list[PosFloat] | None = None


class LlamaVLConfigSchema(_Strict):
    """config.json of a remote-code MiniCPM-V 4.0 checkpoint: Llama fields at the top level."""

    model_type: Literal["minicpmv"]
    version: float | str
    vision_config: VisionConfigSchema
    vocab_size: Vocab
    hidden_size: Dim
    intermediate_size: Dim
    num_hidden_layers: Count
    num_attention_heads: Count
    num_key_value_heads: Count
    head_dim: Dim | None = None
    max_position_embeddings: Dim = 32768
    rms_norm_eps: PosFloat = 1e-6
    rope_theta: PosFloat = 10000.0
    rope_scaling: LongRopeSchema | None = None
    hidden_act: Literal["silu"] = "silu"
    attention_bias: bool = False
    mlp_bias: Literal[False] = False
    tie_word_embeddings: bool = False
    query_num: Annotated[int, Field(gt=0, le=4096)] = 64
    drop_vision_last_layer: bool = False

    @model_validator(mode="after")
    def _heads(self) -> LlamaVLConfigSchema:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        return self


def validate_config(
    raw: Any, where: str, error: type[EdgeError], schema: type[BaseModel] = ConfigSchema
) -> dict[str, Any]:
    """Validate a parsed config.json against a family's schema; returns `raw` unchanged."""
    if not isinstance(raw, dict):
        raise error(f"{where}: not a JSON object")
    _validate(schema, raw, where, error)
    return raw


# ---------------------------------------------------------------------------------------------------
# One line per validation failure

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "string_type": "a string",
    "float_type": "a number",
    "bool_type": "true or false",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "none_required": "null",
}


def _loc(prefix: tuple[Any, ...], loc: tuple[Any, ...]) -> str:
    # pydantic puts union member names ("int", "str", "constrained-str") in loc: drop them
    parts = [p for p in (*prefix, *loc) if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_UNION_TAGS = {"int", "str", "float", "bool", "none", "constrained-int", "constrained-str", "function-after"}


def _validate(
    schema: type[BaseModel], raw: dict[str, Any], where: str, error: type[EdgeError], prefix: tuple = ()
) -> None:
    try:
        schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = _loc(prefix, tuple(first["loc"]))
        kind = first["type"]
        got = first.get("input")
        if kind == "missing":
            raise error(f"{where}: required field {name!r} is missing") from None
        if kind in _TYPE_WORDS:
            raise error(f"{where}: field {name!r} must be {_TYPE_WORDS[kind]}, got {got!r:.60}") from None
        message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind == "value_error" or not name:
            prefix = "" if not name or message.startswith(name.rsplit(".", 1)[-1]) else f"{name}: "
            raise error(f"{where}: {prefix}{message}") from None
        raise error(
            f"{where}: field {name!r}: {message[:1].lower() + message[1:]}, got {got!r:.60}"
        ) from None
