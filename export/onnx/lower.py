"""Lowering: the three graphs of export/graphs.py -> in-memory ONNX models, with the torch dynamo exporter.

Five ONNX graphs come out of one checkpoint: the vision encoder per downsample mode (one dynamic
dimension L), the token embedding (dynamic T), and the text decoder twice, at the prefill chunk C
and at C = 1. The decoder is exported twice rather than once with a dynamic chunk because the
reference picks the recurrent DeltaNet form for C == 1 and the chunked form (a Python loop over
64-token sub-chunks) otherwise: a dynamic C would have to run the chunked form for decode too,
with its C x C UT-transform and log2(C) matmul squarings per layer for one token. Weights are
still stored once: both decoder graphs hold the same transposed weight bytes, and the shared
weight file (store.py) keeps each distinct tensor a single time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterable

import onnx
import torch
from torch import nn
from torch.export import Dim

from edge_runtime.errors import EdgeError
from edge_runtime.families import family_of
from export.graphs import (
    DECODER_ARGS,
    Fp32Boundary,
    TextDecoderGraph,
    TokenEmbeddingGraph,
    VisionEncoderGraph,
    decoder_example_inputs,
    decoder_signature,
    to_half_precision,
    vision_example_inputs,
)

from .fuse import FUSIONS, fused_decoder, fused_vision
from .mapped import MappedWeights, optimize_mapped, reference_mapped_weights

VISION_EXAMPLE_L = 64
EMBED_EXAMPLE_T = 8


def graph_names(vision_modes: Iterable[str]) -> list[str]:
    """One vision graph per variant of the family, then the embedding and both decoder graphs."""
    return [f"vision_{m}" for m in vision_modes] + ["token_embedding", "decoder_prefill", "decoder_decode"]


class LoweringError(EdgeError):
    """The torch exporter rejected a graph (an unsupported op or a shape it could not trace)."""


@contextlib.contextmanager
def _one_line_errors(module: torch.nn.Module):
    try:
        yield
    except EdgeError:
        raise
    except Exception as exc:  # torch.export / onnx translation errors are pages long
        text = str(exc).strip().splitlines()
        raise LoweringError(
            f"ONNX lowering of {type(module).__name__} failed: {type(exc).__name__}: {text[0] if text else ''}"
        ) from None


def _export(
    module: torch.nn.Module,
    args: tuple,
    inputs: list[str],
    outputs: list[str],
    dynamic=None,
    mapped: MappedWeights | None = None,
):
    """torch.onnx.export (dynamo) with its console chatter silenced; returns the optimized ModelProto.
    `mapped`: the model's memory-mapped weights, which stay in their files (mapped.py)."""
    if isinstance(module, Fp32Boundary) and dynamic is not None:
        dynamic = (dynamic,)  # its forward takes *args: one nested spec
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _one_line_errors(module):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            program = torch.onnx.export(
                module,
                args,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
                optimize=not mapped,
            )
            if mapped:
                optimize_mapped(program.model, mapped)
                reference_mapped_weights(program.model, mapped)
        finally:
            logging.disable(level)
    model = program.model_proto
    model.graph.ClearField("value_info")  # intermediate shapes: recomputed by onnxruntime, not needed
    model.graph.ClearField("metadata_props")  # the torch program's signature: every parameter's name
    for node in model.graph.node:
        node.ClearField("metadata_props")  # torch source locations: a third of the graph file
    return model


def kv_dtype(half: bool) -> torch.dtype:
    """KV cache dtype of a graph: fp16 in a half-precision graph (DeltaNet state stays fp32)."""
    return torch.float16 if half else torch.float32


def prepare(model: nn.Module, half: bool) -> nn.Module:
    """The model as the graphs are traced from: eval mode, and in `half` a half-precision copy
    (`to_half_precision` keeps norms, DeltaNet decay and recurrent + conv state fp32)."""
    model = model.eval()
    return to_half_precision(model) if half else model


def describe(name: str, chunk: int, cache_len: int) -> str:
    """The progress line of one graph's lowering."""
    if name.startswith("vision_"):
        return f"lowering vision encoder ({name.removeprefix('vision_')}, dynamic L)"
    if name == "token_embedding":
        return "lowering token embedding (dynamic T)"
    c = chunk if name == "decoder_prefill" else 1
    return f"lowering text decoder ({name.split('_')[1]}, C={c}, cache {cache_len})"


def lower_graph(
    model: nn.Module,
    name: str,
    chunk: int,
    cache_len: int,
    half: bool,
    fusions: Iterable[str] = FUSIONS,
    mapped: MappedWeights | None = None,
) -> onnx.ModelProto:
    """One entry point of a `prepare`d model as an ONNX model. `half`: fp16 weights and activations
    inside fp32 graph I/O; the KV cache is fp16. `fusions`: the contrib ops (fuse.py).
    `mapped`: weights left in the checkpoint's files (`Checkpoint.mapped`; mapped.py)."""

    def wrap(graph: torch.nn.Module, n_args: int, n_outs: int) -> torch.nn.Module:
        return Fp32Boundary(graph, torch.float16, n_args, n_outs) if half else graph

    kv = kv_dtype(half)
    with torch.inference_mode(False), torch.no_grad():
        if name.startswith("vision_"):
            mode = name.removeprefix("vision_")
            patches, ids = vision_example_inputs(model, mode, VISION_EXAMPLE_L)
            length = Dim("L")
            with fused_vision(model, fusions):
                return _export(
                    wrap(VisionEncoderGraph(model, mode), 2, 1),
                    (patches, ids),
                    ["patches", "position_ids"],
                    ["embeds"],
                    ({0: length}, {ids.ndim - 1: length}),
                    mapped,
                )
        if name == "token_embedding":
            return _export(
                wrap(TokenEmbeddingGraph(model), 1, 1),
                (torch.zeros(EMBED_EXAMPLE_T, dtype=torch.int64),),
                ["ids"],
                ["embeds"],
                ({0: Dim("T")},),
                mapped,
            )
        c = {"decoder_prefill": chunk, "decoder_decode": 1}[name]
        sig = decoder_signature(model, cache_len, kv, torch.float32)
        with fused_decoder(model, cache_len, fusions):  # onnxruntime contrib ops, fp32 graphs only
            return _export(
                wrap(TextDecoderGraph(model), DECODER_ARGS, 1),
                decoder_example_inputs(model, c, cache_len, kv, torch.float32),
                sig.input_names,
                sig.output_names,
                mapped=mapped,
            )


def release_vision(model: nn.Module) -> None:
    """Drop the vision tower and merger once their graphs are out: the token embedding and decoder
    graphs do not use them (1.7 GB at the full preset's fp32)."""
    model.release_vision()


def lower_graphs(
    model: nn.Module, chunk: int, cache_len: int, progress: Callable[[str], None], half: bool = False
) -> dict[str, onnx.ModelProto]:
    """Every graph of `model`, in graph_names() order, in this process (tests). The exporter lowers
    one graph at a time instead (bundle.py): a process keeps most of each lowering's memory
    (measured on the full preset: it grows with every graph, to about 21 GB)."""
    model = prepare(model, half)
    graphs = {}
    for name in graph_names(family_of(model.cfg).vision_modes):
        progress(describe(name, chunk, cache_len))
        graphs[name] = lower_graph(model, name, chunk, cache_len, half)
    return graphs
