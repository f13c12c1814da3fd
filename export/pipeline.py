"""checkpoint -> bundle orchestration: pick the format's exporter, write the bundle atomically, fill the manifest.

Every exporter writes through `export_bundle`: the graph files go into a temporary directory, the
host files are copied as they are, every file is hashed, the manifest is written last, and only
then is the directory renamed into place. An interrupted or failed export leaves nothing that
looks like a bundle. Exporters register here by format name (`EXPORTERS`), so a format whose
module is not present fails with one line before any work is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edge_runtime import __version__
from edge_runtime.bundle import (
    HOST_FILES,
    REQUIRED_HOST_FILES,
    SCHEMA_VERSION,
    TARGET_FORMATS,
    file_entry,
    iter_bundle_files,
    not_a_bundle,
    read_manifest,
    write_manifest,
)
from edge_runtime.checkpoint import read_config
from edge_runtime.errors import InputError
from edge_runtime.families import Family, family_of
from edge_runtime.outputs import atomic_output_dir, preflight
from edge_runtime.parity import GATES

QUANTIZATIONS = tuple(GATES)  # a bundle's quantization must have parity gates
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_CHUNK = 64
# format -> exporter module. An exporter module defines SUPPORTED_QUANTIZATIONS and
# `export_graphs(ctx: ExportContext) -> GraphSet`; a format whose module is absent from an install
# is reported as not available. CoreML adds its line when export/coreml has `export_graphs`.
EXPORTERS: dict[str, str] = {
    "torch": "export.torch_bundle",
    "onnx": "export.onnx",
    "executorch": "export.executorch",
    "coreml": "export.coreml",
}

# Formats whose decoder takes RoPE position rows apart from the cache index (the graph input
# position_ids [3, C]), so they can carry families with host-computed rows (Family.rope_positions
# "canvas", MiniCPM-V 4.7); the others are refused those families before any work.
POSITION_ROW_FORMATS = ("onnx", "executorch", "coreml")

Progress = Callable[[str], None]


@dataclass
class ExportContext:
    """What an exporter gets: the source checkpoint, where to write, and the export settings."""

    checkpoint: Path
    config: Any  # the family's config class
    raw_config: dict[str, Any]
    out: Path  # the temporary bundle directory; write graph files here
    target: str
    format: str
    quantization: str
    max_context: int
    chunk_size: int
    progress: Progress
    max_undelegated: float | None = None  # formats with a delegate: the share of ops it may leave behind
    onnx_fusions: bool = True  # ONNX: decoder contrib ops (export/onnx/fuse.py)
    int4_compute: str | None = None  # ONNX int4: MatMulNBits compute, "fp32" or "int8"; None: default
    vision_quant: str | None = None  # ONNX int4: the vision linears, "int8" or "int4"; None: default

    @property
    def family(self) -> Family:
        """The checkpoint's model family (edge_runtime.families): state layout, vision variants, ..."""
        return family_of(self.config)


@dataclass
class GraphSet:
    """What an exporter produced: entry points (file, I/O names/shapes/dtypes) and the weight bytes
    each decoded token reads at run time (for the bandwidth bound in `bench`)."""

    graphs: dict[str, Any]
    decode_weight_bytes: int
    state: list[dict[str, Any]] | None = None  # default: state_specs of the checkpoint, fp32
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific manifest keys


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    out: Path
    target: str
    format: str | None = None  # None: the target's default format
    quantization: str = "fp32"
    max_context: int = DEFAULT_MAX_CONTEXT
    chunk_size: int = DEFAULT_CHUNK
    max_undelegated: float | None = None  # None: the format's default
    onnx_fusions: bool = True  # ONNX: decoder contrib ops; False = standard ops only
    int4_compute: str | None = None  # ONNX int4: "fp32" or "int8" MatMulNBits compute; None: default
    vision_quant: str | None = None  # ONNX int4: "int8" or "int4" vision linears; None: default (int8)


@contextlib.contextmanager
def heartbeat(say: Progress, stage: str, every_s: float = 30.0) -> Iterator[None]:
    """Report `stage ... N s` every `every_s` while a long call that has no progress of its own runs
    (XNNPACK lowering, Core ML conversion), so a user can tell slow from stuck."""
    done = threading.Event()
    started = time.perf_counter()

    def tick() -> None:
        while not done.wait(every_s):
            say(f"{stage}: still running, {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def register_exporter(format_name: str, module: str) -> None:
    """Register (or replace) the exporter module of a format."""
    EXPORTERS[format_name] = module


def resolve_format(target: str, format_name: str | None) -> str:
    if target not in TARGET_FORMATS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGET_FORMATS)}")
    return format_name or TARGET_FORMATS[target]


def exporter_module(target: str, format_name: str) -> ModuleType:
    """The exporter of a format, or one line saying it is not part of this version."""
    module = EXPORTERS.get(format_name)
    if module is None or importlib.util.find_spec(module) is None:
        available = ", ".join(
            f"{f} (target {', '.join(t for t, d in TARGET_FORMATS.items() if d == f) or 'any'})"
            for f, m in sorted(EXPORTERS.items())
            if importlib.util.find_spec(m) is not None
        )
        raise InputError(
            f"the {target} exporter (format {format_name}) is not available in this version; "
            f"available: {available or 'none'}"
        )
    return importlib.import_module(module)


def export_bundle(request: ExportRequest, progress: Progress | None = None) -> Path:
    """Export a checkpoint to a bundle directory, atomically; returns the bundle path."""
    say = progress or (lambda _msg: None)
    fmt = resolve_format(request.target, request.format)
    if request.quantization not in QUANTIZATIONS:
        raise InputError(
            f"unknown quantization {request.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    module = exporter_module(request.target, fmt)
    supported = tuple(getattr(module, "SUPPORTED_QUANTIZATIONS", QUANTIZATIONS))
    if request.quantization not in supported:
        raise InputError(
            f"format {fmt} does not support --quant {request.quantization} (supported: {', '.join(supported)})"
        )
    if request.int4_compute not in (None, "fp32", "int8"):
        raise InputError(f"unknown --int4-compute {request.int4_compute!r}; choose fp32 or int8")
    if request.vision_quant not in (None, "int8", "int4"):
        raise InputError(f"unknown --vision-quant {request.vision_quant!r}; choose int8 or int4")
    if request.vision_quant == "int4" and (fmt != "onnx" or request.quantization != "int4"):
        raise InputError(
            f"--vision-quant int4 needs an ONNX bundle (target harmonyos) with --quant int4; "
            f"this export is format {fmt}, --quant {request.quantization}"
        )
    if request.chunk_size < 1 or request.max_context < request.chunk_size:
        raise InputError(
            f"need 1 <= chunk size ({request.chunk_size}) <= max context ({request.max_context})"
        )
    replacing = preflight(request.out, "bundle", not_a_bundle)  # before any work: nothing is lost
    config, raw = read_config(request.checkpoint)  # bad input is one line before any progress line
    family = family_of(config)
    if family.rope_positions != "cache" and fmt not in POSITION_ROW_FORMATS:
        raise InputError(
            f"{family.name} cannot be exported to format {fmt} yet: its decoder takes "
            f"{family.rope_positions} RoPE position rows apart from the cache index, and {fmt} bundles "
            f"do not take position rows; export it to {', '.join(POSITION_ROW_FORMATS)} "
            f"(target {', '.join(t for t, f in TARGET_FORMATS.items() if f in POSITION_ROW_FORMATS)}) "
            "or use the checkpoint with the PyTorch reference (chat --checkpoint)"
        )
    missing = [n for n in REQUIRED_HOST_FILES if not (request.checkpoint / n).is_file()]
    if missing:
        raise InputError(f"{request.checkpoint}: host file {missing[0]} is missing (the bundle needs it)")
    say(f"read checkpoint {request.checkpoint}")
    max_context = min(request.max_context, config.text.max_position_embeddings)

    if replacing:
        say(f"{request.out} holds a bundle of ours: it will be replaced when the export succeeds")
    with atomic_output_dir(request.out, "bundle", not_a_bundle, say=say) as tmp:
        ctx = ExportContext(
            request.checkpoint, config, raw, tmp, request.target, fmt, request.quantization,
            max_context, request.chunk_size, say, request.max_undelegated, request.onnx_fusions,
            request.int4_compute, request.vision_quant,
        )  # fmt: skip
        say(f"exporting graphs (format {fmt}, {request.quantization})")
        graph_set: GraphSet = module.export_graphs(ctx)
        say("copying host files")
        copied = copy_host_files(request.checkpoint, tmp)
        say("hashing files and writing the manifest")
        write_manifest(tmp, build_manifest(ctx, graph_set, copied))
        read_manifest(tmp)  # what we write must be what readers accept: schema and its own checksum
    say(f"bundle written to {request.out}")
    return request.out


def copy_host_files(checkpoint: Path, out: Path) -> list[str]:
    """Copy the host files the checkpoint has, unchanged."""
    copied = []
    for name in HOST_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
            copied.append(name)
    return copied


def state_entries(specs: list) -> list[dict[str, Any]]:
    """The manifest's `state` list for these StateSpecs: name, shape and numpy dtype name."""
    return [
        {"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")} for s in specs
    ]


def build_manifest(ctx: ExportContext, graph_set: GraphSet, host_files: list[str]) -> dict[str, Any]:
    """Every manifest field (docs/bundle.md), with the sha256 and size of every file now in ctx.out."""
    from edge_runtime.processing.canvas_positions import CanvasTokens
    from edge_runtime.processing.tokenizer import Tokenizer

    cfg = ctx.config
    tok = Tokenizer(ctx.checkpoint, dict(ctx.family.prompt_tokens or {}) or None)
    pre_path = ctx.checkpoint / "preprocessor_config.json"
    preprocessing = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else {}
    cache_len = ctx.max_context + ctx.chunk_size
    state = graph_set.state or state_entries(ctx.family.state_specs(cfg, cache_len))
    named = {
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "endoftext": "<|endoftext|>",
        **{k.removesuffix("_token"): v for k, v in tok.extra_special_tokens.items()},
    }
    special = {
        name: tok.token_to_id(token) for name, token in named.items() if tok.token_to_id(token) is not None
    }
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "family": ctx.family.name,
        "target": ctx.target,
        "format": ctx.format,
        "quantization": ctx.quantization,
        "model": {
            "hidden_size": cfg.text.hidden_size,
            "vocab_size": cfg.text.vocab_size,
            "num_layers": cfg.text.num_hidden_layers,
            "layer_types": list(cfg.text.layer_types),
            "vision_hidden_size": cfg.vision.hidden_size,
            "vision_layers": cfg.vision.num_hidden_layers,
            "patch_size": cfg.vision.patch_size,
            "num_patches_per_side": cfg.vision.num_patches_per_side,
            "image_token_id": cfg.image_token_id,
            "video_token_id": cfg.video_token_id,
            "downsample_modes": list(ctx.family.vision_modes),
            "default_downsample_mode": cfg.downsample_mode,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "decode_weight_bytes": int(graph_set.decode_weight_bytes),
            # "cache": RoPE positions are the cache index; "canvas": the host computes 3 rows per
            # token (MiniCPM-V 4.7's Canvas M-RoPE, edge_runtime/processing/canvas_positions.py)
            "rope_positions": ctx.family.rope_positions,
        },
        "graphs": graph_set.graphs,
        "state": state,
        "preprocessing": preprocessing,
        "prompt": {
            "chat_template": "chat_template.jinja" if "chat_template.jinja" in host_files else None,
            "special_token_ids": special,
            "stop_ids": list(tok.stop_ids),
        },
        "max_context": ctx.max_context,
        "chunk_size": ctx.chunk_size,
        "files": {rel: file_entry(ctx.out / rel) for rel in iter_bundle_files(ctx.out)},
        "toolkit_version": __version__,
        "created_by": f"minicpmv-edge {__version__} export (format {ctx.format})",
    }
    if ctx.family.rope_positions == "canvas":  # the host computes the rows from these marker ids
        manifest["model"]["canvas_tokens"] = dataclasses.asdict(CanvasTokens.from_config(ctx.raw_config))
    manifest.update(graph_set.extra)
    return manifest
