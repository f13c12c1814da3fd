"""The ONNX exporter proper: checkpoint -> graph files + manifest fragments in the bundle directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch

from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.models.qwen35_text import state_specs

from ..pipeline import ExportContext, GraphSet, io_spec, state_entries
from .check import check_graphs
from .fuse import contrib_op_counts
from .lower import iter_graphs, kv_dtype
from .quantize import ACCURACY_LEVEL, BLOCK, quantize_model
from .store import WEIGHTS_FILE, WeightStore, write_graph

FILES = {
    "vision_16x": "vision_16x.onnx",
    "vision_4x": "vision_4x.onnx",
    "token_embedding": "token_embedding.onnx",
    "decoder_prefill": "decoder_prefill.onnx",
    "decoder_decode": "decoder_decode.onnx",
}


def decode_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer the decode graph reads per token (as stored: quantized sizes)."""
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def onnx_state(ctx: ExportContext, cache_len: int) -> list[dict[str, Any]]:
    """The manifest's state list: fp16 KV cache in the fp16 variant, fp32 everywhere else."""
    return state_entries(
        state_specs(ctx.config.text, cache_len, kv_dtype(ctx.quantization == "fp16"), torch.float32)
    )


def manifest_graphs(ctx: ExportContext, cache_len: int, state: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = ctx.config
    d, v, patch_dim = cfg.text.hidden_size, cfg.text.vocab_size, cfg.vision.patch_dim
    past = [io_spec(f"past.{s['name']}", s["shape"], s["dtype"]) for s in state]
    present = [io_spec(f"present.{s['name']}", s["shape"], s["dtype"]) for s in state]
    return {
        "vision_encoder": {
            "files": {"16x": FILES["vision_16x"], "4x": FILES["vision_4x"]},
            "inputs": [
                io_spec("patches", ["L", patch_dim], "float32"),
                io_spec("position_ids", ["L"], "int64"),
            ],
            "outputs": [io_spec("embeds", ["L/16 (16x) or L/4 (4x)", d], "float32")],
        },
        "token_embedding": {
            "file": FILES["token_embedding"],
            "inputs": [io_spec("ids", ["T"], "int64")],
            "outputs": [io_spec("embeds", ["T", d], "float32")],
        },
        "text_decoder": {
            "files": {"prefill": FILES["decoder_prefill"], "decode": FILES["decoder_decode"]},
            "chunk": {"prefill": ctx.chunk_size, "decode": 1},
            "cache_len": cache_len,
            "state": "in_out",
            "inputs": [
                io_spec("embeds", [1, "C (prefill) or 1 (decode)", d], "float32"),
                io_spec("start_pos", [1], "int64"),
                io_spec("n_valid", [1], "int64"),
                *past,
            ],
            "outputs": [io_spec("logits", [1, v], "float32"), *present],
        },
    }


def export_onnx(ctx: ExportContext) -> GraphSet:
    """Lower, quantize and write one graph at a time, then check the written bundle in onnxruntime.
    (Streaming did not lower the full preset's measured peak, about 21 GB: memory still grows with
    every graph lowered; see export/onnx/lower.py.)"""
    say = ctx.progress
    t0 = time.perf_counter()
    model = load_checkpoint(ctx.checkpoint).model
    cache_len = ctx.max_context + ctx.chunk_size  # the padding of the last prefill chunk lands here
    state = onnx_state(ctx, cache_len)
    out = Path(ctx.out)
    stats: dict[str, dict[str, int]] = {}
    written: dict[str, onnx.ModelProto] = {}  # after write_graph: structure only, weights on disk
    store = WeightStore(out / WEIGHTS_FILE)
    try:
        graphs = iter_graphs(
            model, ctx.chunk_size, cache_len, say, half=ctx.quantization == "fp16", release_vision=True
        )
        for name, graph in graphs:
            result = quantize_model(graph, ctx.quantization, vision=name.startswith("vision"))
            stats[name] = result.counts
            if ctx.quantization != "fp32":
                say(f"quantized {name} ({ctx.quantization}): {result.summary()}")
            write_graph(graph, out / FILES[name], store)
            written[name] = graph
    finally:
        store.close()
    del model
    say(
        f"lowered and wrote {len(written)} graphs in {time.perf_counter() - t0:.1f} s; {WEIGHTS_FILE}: "
        f"{store.size / 1e6:.1f} MB ({store.shared_bytes / 1e6:.1f} MB shared between graphs, stored once)"
    )
    check_graphs(out, FILES, ctx.config, ctx.chunk_size, state, say)
    say(f"onnx export done in {time.perf_counter() - t0:.1f} s")
    extra = {
        "onnx": {
            "weights_file": WEIGHTS_FILE,
            "opset": next(
                o.version for o in written["decoder_decode"].opset_import if o.domain in ("", "ai.onnx")
            ),
            "onnxruntime_version": onnxruntime.__version__,
            # contrib ops in the decode graph (fuse.py; not in fp16 graphs). LinearAttention and
            # CausalConvWithState are recent (onnxruntime PR #27907): a runtime older than the one
            # above may not load them.
            "decode_contrib_ops": contrib_op_counts(written["decoder_decode"]),
            "int4_block_size": BLOCK,
            "matmulnbits_accuracy_level": ACCURACY_LEVEL,
            "quantized_weights": stats,
        }
    }
    return GraphSet(
        graphs=manifest_graphs(ctx, cache_len, state),
        decode_weight_bytes=decode_weight_bytes(written["decoder_decode"]),
        state=state,
        extra=extra,
    )
