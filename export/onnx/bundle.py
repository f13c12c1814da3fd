"""The ONNX exporter proper: checkpoint -> graph files + manifest fragments in the bundle directory."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from torch import nn

from edge_runtime.checkpoint import load_checkpoint
from edge_runtime.errors import EdgeError

from ..graph_table import TableStyle, graph_table
from ..pipeline import ExportContext, GraphSet, state_entries
from .check import check_graphs
from .fuse import FUSIONS, contrib_op_counts
from .lower import describe, graph_names, kv_dtype, lower_graph, prepare, release_vision
from .quantize import (
    BLOCK,
    DEFAULT_INT4_COMPUTE,
    DEFAULT_VISION_QUANT,
    INT4_COMPUTE_LEVELS,
    VISION_INT4_ACCURACY_LEVEL,
    QuantStats,
    quantize_model,
)
from .store import WEIGHTS_FILE, WeightStore, write_graph


class _GraphFiles(dict):
    """Graph name -> file name: `NAME.onnx` for every graph, the family's vision variants included."""

    def __missing__(self, name: str) -> str:
        return f"{name}.onnx"


FILES = _GraphFiles()


def decode_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer the decode graph reads per token (as stored: quantized sizes)."""
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


def in_place_state(decoders: list[onnx.ModelProto]) -> list[str]:
    """State entries every decoder graph updates inside GroupQueryAttention (present.X is the op's
    output for input past.X): a runtime may bind present.X to past.X's buffer, and the op then
    writes the new rows in place instead of copying the whole cache (onnxruntime-genai's
    past_present_share_buffer). The other state entries must get fresh output buffers."""
    common: set[str] | None = None
    for graph in decoders:
        names = {
            out.removeprefix("present.")
            for node in graph.graph.node
            if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
            for out in node.output
            if out.startswith("present.") and f"past.{out.removeprefix('present.')}" in node.input
        }
        common = names if common is None else common & names
    return sorted(common or ())


def onnx_state(ctx: ExportContext, cache_len: int) -> list[dict[str, Any]]:
    """The manifest's state list: fp16 KV cache in the fp16 variant, fp32 everywhere else."""
    return state_entries(
        ctx.family.state_specs(ctx.config, cache_len, kv_dtype(ctx.quantization == "fp16"), torch.float32)
    )


def manifest_graphs(ctx: ExportContext, cache_len: int, state: list[dict[str, Any]]) -> dict[str, Any]:
    """One file per graph; the decoder's state travels as past.X inputs and present.X outputs."""
    return graph_table(
        ctx,
        TableStyle(position_rows=True),
        vision={"files": {m: FILES[f"vision_{m}"] for m in ctx.family.vision_modes}},
        embedding={"file": FILES["token_embedding"]},
        decoder={
            "files": {"prefill": FILES["decoder_prefill"], "decode": FILES["decoder_decode"]},
            "chunk": {"prefill": ctx.chunk_size, "decode": 1},
            "cache_len": cache_len,
            "state": "in_out",
        },
        state_io=state,
    )


# Checkpoints whose weight files exceed this lower each graph in a fresh child process: the torch
# exporter's memory is not returned between graphs (measured on the full preset, fp32 weights
# 5.2 GB: in one process the peak grew to 21 GB over the five lowerings). Their fp32 and quantized
# exports also stream: weights stay in the memory-mapped checkpoint until quantized (mapped.py).
ISOLATE_ABOVE_BYTES = 1 << 30


class LoweringProcessError(EdgeError):
    """The child process lowering a graph died without an answer (killed, e.g. out of memory)."""


@dataclass(frozen=True)
class GraphJob:
    """What lowering one graph needs; picklable, so a child process can run it."""

    checkpoint: Path
    name: str
    quantization: str
    chunk: int
    cache_len: int
    graph_path: Path
    fusions: tuple[str, ...] = FUSIONS
    mapped: bool = False  # weights stay in the memory-mapped checkpoint until quantized (mapped.py)
    accuracy_level: int = INT4_COMPUTE_LEVELS[DEFAULT_INT4_COMPUTE]  # int4: MatMulNBits' accuracy_level
    vision_quant: str = DEFAULT_VISION_QUANT  # int4 exports: the vision graphs' linears, int8 or int4


def run_graph_job(
    job: GraphJob, model: nn.Module | None, store: WeightStore
) -> tuple[dict[str, int], onnx.ModelProto]:
    """Lower, quantize and write one graph; returns its quantization counts and its written
    structure (weights moved to `store`). `model`: a `prepare`d model, or None to load the
    checkpoint here (child processes)."""
    half = job.quantization == "fp16"
    mapped = None
    if model is None:
        checkpoint = load_checkpoint(job.checkpoint, mapped=job.mapped)
        model, mapped = prepare(checkpoint.model, half), checkpoint.mapped
    if not job.name.startswith("vision_"):
        release_vision(model)
    graph = lower_graph(model, job.name, job.chunk, job.cache_len, half, job.fusions, mapped)
    result = quantize_model(
        graph,
        job.quantization,
        vision=job.name.startswith("vision"),
        accuracy_level=job.accuracy_level,
        vision_quant=job.vision_quant,
    )
    write_graph(graph, job.graph_path, store)
    return result.counts, graph


def _child_job(job: GraphJob, store: WeightStore) -> tuple[dict[str, int], onnx.ModelProto, WeightStore]:
    counts, graph = run_graph_job(job, None, store)
    store.close()  # flushed; unpickled in the parent, the store reopens its file (store.py)
    return counts, graph, store


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors"))


def _in_child(job: GraphJob, store: WeightStore) -> tuple[dict[str, int], onnx.ModelProto, WeightStore]:
    spawn = get_context("spawn")  # a fresh interpreter: nothing of the last lowering survives
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        try:
            return pool.submit(_child_job, job, store).result()
        except BrokenProcessPool:
            raise LoweringProcessError(
                f"the process lowering {job.name} died without an answer (out of memory?)"
            ) from None
        except BaseException:  # Ctrl-C / SIGTERM: leaving the pool would wait for the whole lowering
            _kill_workers(pool)
            raise


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's processes now (a full-size lowering runs for minutes). Python 3.14 has
    terminate_workers(); before it, the pool's own process table is the only handle on them."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def accuracy_level(ctx: ExportContext) -> int:
    """MatMulNBits' accuracy_level for `export --int4-compute` (None: DEFAULT_INT4_COMPUTE)."""
    return INT4_COMPUTE_LEVELS[ctx.int4_compute or DEFAULT_INT4_COMPUTE]


def vision_scheme(ctx: ExportContext) -> str:
    """The vision linears' scheme (manifest): `export --vision-quant` in int4 exports, else the
    export's own."""
    return (ctx.vision_quant or DEFAULT_VISION_QUANT) if ctx.quantization == "int4" else ctx.quantization


def lower_all(
    ctx: ExportContext, cache_len: int
) -> tuple[dict[str, dict[str, int]], dict[str, onnx.ModelProto], WeightStore]:
    """Every graph, one at a time: in this process for small checkpoints, each in its own child
    process above ISOLATE_ABOVE_BYTES. Returns counts, written structures, and the closed store."""
    say = ctx.progress
    out = Path(ctx.out)
    isolate = checkpoint_bytes(ctx.checkpoint) > ISOLATE_ABOVE_BYTES
    model = None if isolate else prepare(load_checkpoint(ctx.checkpoint).model, ctx.quantization == "fp16")
    stats: dict[str, dict[str, int]] = {}
    written: dict[str, onnx.ModelProto] = {}  # after write_graph: structure only, weights on disk
    store = WeightStore(out / WEIGHTS_FILE)
    fusions = FUSIONS if ctx.onnx_fusions else ()
    try:
        for name in graph_names(ctx.family.vision_modes):
            job = GraphJob(
                ctx.checkpoint,
                name,
                ctx.quantization,
                ctx.chunk_size,
                cache_len,
                out / FILES[name],
                fusions,
                mapped=isolate and ctx.quantization != "fp16",
                accuracy_level=accuracy_level(ctx),
                vision_quant=ctx.vision_quant or DEFAULT_VISION_QUANT,
            )
            say(describe(name, ctx.chunk_size, cache_len) + (" in a child process" if isolate else ""))
            if isolate:
                store.close()  # the child appends to the file; the store comes back reopened
                counts, graph, store = _in_child(job, store)
            else:
                counts, graph = run_graph_job(job, model, store)
            stats[name], written[name] = counts, graph
            if ctx.quantization != "fp32":
                say(f"quantized {name} ({ctx.quantization}): {QuantStats(counts).summary()}")
    finally:
        store.close()
    return stats, written, store


def export_onnx(ctx: ExportContext) -> GraphSet:
    """Lower, quantize and write one graph at a time, then check the written bundle in onnxruntime."""
    say = ctx.progress
    t0 = time.perf_counter()
    cache_len = ctx.max_context + ctx.chunk_size  # the padding of the last prefill chunk lands here
    state = onnx_state(ctx, cache_len)
    stats, written, store = lower_all(ctx, cache_len)
    out = Path(ctx.out)
    say(
        f"lowered and wrote {len(written)} graphs in {time.perf_counter() - t0:.1f} s; {WEIGHTS_FILE}: "
        f"{store.size / 1e6:.1f} MB ({store.shared_bytes / 1e6:.1f} MB shared between graphs, stored once)"
    )
    check_graphs(out, FILES, ctx.config, ctx.chunk_size, state, say)
    say(f"onnx export done in {time.perf_counter() - t0:.1f} s")
    vision = vision_scheme(ctx)
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
            "fusions": list(FUSIONS) if ctx.onnx_fusions and ctx.quantization != "fp16" else [],
            "decode_contrib_ops": contrib_op_counts(written["decoder_decode"]),
            "in_place_state": in_place_state([written["decoder_prefill"], written["decoder_decode"]]),
            "int4_block_size": BLOCK,
            "matmulnbits_accuracy_level": accuracy_level(ctx),
            "vision_quantization": vision,
            # the vision graphs' MatMulNBits compute, where they have 4-bit weights (else null)
            "vision_matmulnbits_accuracy_level": VISION_INT4_ACCURACY_LEVEL if vision == "int4" else None,
            "quantized_weights": stats,
        }
    }
    return GraphSet(
        graphs=manifest_graphs(ctx, cache_len, state),
        decode_weight_bytes=decode_weight_bytes(written["decoder_decode"]),
        state=state,
        extra=extra,
    )
