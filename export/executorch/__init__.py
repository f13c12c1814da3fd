"""Format `executorch` (target android): the whole model as one XNNPACK-delegated `model.pte`.

Entry point for export/pipeline.py: `export_graphs(ctx)` writes `model.pte` into the bundle's
temporary directory and returns the manifest's graph table. Methods (see methods.py): the vision
encoder per downsample mode, the token embedding, the text decoder (embeddings in) and `forward`
(token ids in) with a dynamic T sharing state in mutable buffers, and the metadata methods
ExecuTorch's LLM runners read (`get_max_seq_len`, `get_eos_ids`, ...).
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..graph_table import TableStyle, graph_table
from ..pipeline import heartbeat
from .custom_ops import ATTENTION_OPS
from .custom_ops import OP_NAME as DELTA_RULE_OP
from .lower import DEFAULT_MAX_UNDELEGATED, check_delegation, lower, to_pte_bytes
from .methods import (
    DECODER,
    FORWARD,
    TOKEN_EMBEDDING,
    buffer_name,
    export_methods,
    max_seq_len,
    max_slice_side,
    vision_methods,
)
from .quantize import QUANTIZATIONS, quantize_model

SUPPORTED_QUANTIZATIONS = QUANTIZATIONS
PTE_FILE = "model.pte"
MAX_UNDELEGATED_ENV = "MINICPMV_EDGE_MAX_UNDELEGATED"
# Decoder methods that call ExecuTorch's gated delta rule kernel instead of our maths in XNNPACK
# (custom_ops.py): both, since their T is dynamic (the runners' ABI) and our chunked form loops over
# a number of chunks that must be known at export. Measured on one DeltaNet core at the released
# widths (16 heads, 128 x 128 state), docs/executorch.md: one token 0.24-0.32 ms (kernel) vs
# 0.59-0.71 ms (ours in XNNPACK); a 64-token chunk 8.8-9.9 ms (kernel) vs 7.4-8.2 ms (ours).
DECODER_METHODS = (DECODER, FORWARD)
DELTA_RULE_METHODS = frozenset(DECODER_METHODS)
# Both decoder methods update the KV cache in place and attend through ExecuTorch's kernels
# (custom_ops.py): measured on the full preset, see docs/executorch.md.
ATTENTION_KERNELS = True


def custom_op_methods() -> dict[str, list[str]]:
    """Each ExecuTorch kernel outside XNNPACK and the portable / quantized libraries the program
    calls, with the methods that call it: a runtime must register these before loading."""
    ops = {DELTA_RULE_OP: sorted(DELTA_RULE_METHODS)} if DELTA_RULE_METHODS else {}
    if ATTENTION_KERNELS:
        ops.update({op: sorted(DECODER_METHODS) for op in ATTENTION_OPS})
    return ops


def max_undelegated(ctx: Any) -> float:
    """The user's threshold: ExportContext.max_undelegated when the pipeline carries it, else the
    environment variable, else the default."""
    value = getattr(ctx, "max_undelegated", None)
    if value is None:
        value = os.environ.get(MAX_UNDELEGATED_ENV, DEFAULT_MAX_UNDELEGATED)
    return float(value)


def metadata_methods(ctx: Any, stop_ids: list[int], bos_id: int) -> dict[str, Any]:
    """Constant methods of ExecuTorch's runner ABI (extension/llm/runner/constants.h) plus ours.

    `get_max_seq_len` is the most tokens one decoder call takes (the TextLLMRunner splits longer
    prompts), `get_max_context_len` the positions the caches hold; `enable_dynamic_shape` makes the
    TextLLMRunner prefill a prompt in one call instead of token by token."""
    cfg = ctx.config
    return {
        "get_bos_id": bos_id,
        "get_eos_ids": list(stop_ids),
        "get_max_seq_len": max_seq_len(ctx.chunk_size, ctx.max_context),
        "get_max_context_len": ctx.max_context,
        "get_vocab_size": cfg.text.vocab_size,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": ATTENTION_KERNELS,
        "enable_dynamic_shape": True,
        "get_chunk_size": ctx.chunk_size,
        "get_hidden_size": cfg.text.hidden_size,
        "get_image_token_id": cfg.image_token_id,
    }


def export_graphs(ctx: Any) -> Any:
    from edge_runtime.checkpoint import load_checkpoint
    from edge_runtime.processing.tokenizer import Tokenizer
    from export.pipeline import GraphSet

    started = time.perf_counter()
    # fp32 weights stay views of the memory-mapped checkpoint: quantization reads each one once and
    # keeps only its quantized form, so a 16 GB checkpoint is never held in memory whole
    ckpt = load_checkpoint(ctx.checkpoint, mapped=True)
    tok = Tokenizer(ctx.checkpoint, dict(ctx.family.prompt_tokens or {}) or None)
    bos = tok.bos_id  # the runner ABI wants one; Qwen3.5 has none: then the chat turn opener
    meta = metadata_methods(ctx, list(tok.stop_ids), bos)
    ctx.progress(f"quantizing ({ctx.quantization})")
    model, summary = quantize_model(ckpt.model, ctx.quantization, in_place=True)
    del ckpt
    cache_len = ctx.max_context + ctx.chunk_size
    slicing = _slice_config(ctx)
    max_side = max_slice_side(model, slicing.scale_resolution)
    max_tokens = meta["get_max_seq_len"]
    default_mode = ctx.config.downsample_mode
    normalisation = (slicing.image_mean, slicing.image_std, slicing.rescale_factor)
    ctx.progress(f"torch.export: 5 methods (T <= {max_tokens}, cache {cache_len}, slice side <= {max_side})")
    programs = export_methods(
        model,
        cache_len,
        max_side,
        max_tokens,
        default_mode,
        normalisation,
        bool(DELTA_RULE_METHODS),
        ATTENTION_KERNELS,
    )
    ctx.progress("lowering to XNNPACK (to_edge_transform_and_lower)")
    with heartbeat(ctx.progress, "lowering to XNNPACK"):
        edge, report = lower(programs, meta, ctx.quantization)
    del programs
    ctx.progress(
        f"delegation: {report.total_delegated} operators in XNNPACK, {report.total_undelegated} left "
        f"({report.fraction_undelegated:.1%})"
    )
    check_delegation(report, max_undelegated(ctx))
    kernels = custom_op_methods()
    ctx.progress("serializing model.pte")
    data = to_pte_bytes(edge)
    (ctx.out / PTE_FILE).write_bytes(data)
    ctx.progress(f"model.pte: {len(data) / 1e6:.1f} MB in {time.perf_counter() - started:.0f} s")
    return GraphSet(
        graphs=manifest_graphs(ctx, max_side, default_mode),
        decode_weight_bytes=summary.decode_weight_bytes,
        extra={
            "executorch": {
                "pte": PTE_FILE,
                "metadata": meta,
                "state_buffers": [buffer_name(s.name) for s in _specs(ctx, cache_len)],
                "linear_schemes": summary.linear_schemes,
                "embedding_scheme": summary.embedding_scheme,
                "delegation": report.to_json(),
                "max_slice_side": max_side,
                "normalisation": {
                    "mean": list(slicing.image_mean),
                    "std": list(slicing.image_std),
                    "rescale": slicing.rescale_factor,
                },
                # kernels outside XNNPACK and the portable / quantized libraries that a runtime
                # must register before loading the program, and the methods that call them
                "custom_ops": sorted(kernels),
                "custom_op_methods": kernels,
            }
        },
    )


def _slice_config(ctx: Any) -> Any:
    """The checkpoint's preprocessing (scale resolution, normalisation) the vision methods bake in."""
    import json

    from edge_runtime.processing.slicing import SliceConfig

    path = ctx.checkpoint / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return SliceConfig.from_preprocessor_config(raw)


def _specs(ctx: Any, cache_len: int) -> list[Any]:
    return ctx.family.state_specs(ctx.config, cache_len)


def manifest_graphs(ctx: Any, max_side: int, default_mode: str) -> dict[str, Any]:
    """The manifest's `graphs`: every entry point names its method in model.pte; the vision methods
    take the image (preprocessing in the graph) and the decoder keeps its state in mutable buffers."""
    methods = vision_methods(default_mode, ctx.family.vision_modes)
    return graph_table(
        ctx,
        TableStyle(
            batch_axis=True,
            chunked=False,
            pixels_in=True,
            # canvas families: text_decoder also takes the RoPE rows (methods.py); `forward` does not
            position_rows=ctx.family.rope_positions == "canvas",
        ),
        vision={
            "file": PTE_FILE,
            "methods": methods,
            "modes": list(methods),
            "input": "image",
            "max_side_patches": max_side,
        },
        embedding={"file": PTE_FILE, "method": TOKEN_EMBEDDING},
        decoder={
            "file": PTE_FILE,
            # one method for both: T is dynamic; `forward` is the same decoder taking token ids
            # (ExecuTorch's TextLLMRunner), sharing the state
            "methods": {"prefill": DECODER, "decode": DECODER, "tokens": FORWARD},
            "state": "mutable_buffers",
            "max_tokens": max_seq_len(ctx.chunk_size, ctx.max_context),
            "reset": "start_pos == 0",
        },
    )
