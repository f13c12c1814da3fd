"""The manifest's `graphs` table, built once for every format (docs/bundle.md).

Every bundle exposes the same three entry points: the vision encoder, the token embedding and the
text decoder. Formats differ only in where an entry point lives (files, methods, functions), in
their I/O types (Core ML's int32 indices and fp16 outputs, ExecuTorch's batch axis and in-graph
preprocessing) and in how the decoder's state travels. An exporter states those differences as a
`TableStyle` plus its location fields; the inputs and outputs are written here, from the family's
vision variants and the config, so a new family or format never writes an I/O list by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CHUNK_ROWS = "C (prefill) or 1 (decode)"
POSITION_ROWS = 3  # export.graphs.POSITION_ROWS (not imported: this module stays torch-free)


def io_spec(name: str, shape: list, dtype: str) -> dict[str, Any]:
    """One graph input/output as the manifest describes it (docs/bundle.md)."""
    return {"name": name, "shape": shape, "dtype": dtype}


@dataclass(frozen=True)
class TableStyle:
    """How one format types the entry points' I/O."""

    ints: str = "int64"  # token ids, positions, start_pos / n_valid
    outputs: str = "float32"  # embeddings and logits as the graphs return them
    batch_axis: bool = False  # ids [1, T], embeds [1, T, d] (ExecuTorch's method signatures)
    chunked: bool = True  # the decoder runs fixed chunks with n_valid (else any T rows, no n_valid)
    pixels_in: bool = False  # the vision entry takes the image itself (preprocessing in the graph)
    position_rows: bool = (
        False  # the decoder takes position_ids [3, rows] (RoPE rows apart from the cache index)
    )


def vision_output_rows(ctx: Any, length: str = "L") -> str:
    """The vision entry's output rows per variant of the family, e.g. "L/16 (16x) or L/4 (4x)", or
    "64 (resampler)" for a fixed-token variant. `length`: what L is called (pixels-in graphs: H*W
    over the patch area)."""
    from edge_runtime.processing.slicing import vision_mode

    reduction = ctx.family.vision_reduction
    return " or ".join(
        f"{ctx.config.query_num} ({m})" if vision_mode(m).fixed_tokens else f"{length}/{reduction[m]} ({m})"
        for m in ctx.family.vision_modes
    )


def vision_inputs(ctx: Any, ids_dtype: str = "int64") -> list[dict[str, Any]]:
    """The vision entry's inputs: patches [L, 3*P*P] and the family's position ids ([L] or [K, L])."""
    from export.graphs import vision_position_example

    cfg = ctx.config
    rows = {vision_position_example(cfg, m, 1).shape[:-1] for m in ctx.family.vision_modes}
    if len(rows) != 1:
        raise ValueError(f"{ctx.family.name}: vision variants disagree on the position-id shape")
    return [
        io_spec("patches", ["L", cfg.vision.patch_dim], "float32"),
        io_spec("position_ids", [*rows.pop(), "L"], ids_dtype),
    ]


def _vision_io(ctx: Any, style: TableStyle) -> dict[str, Any]:
    d = ctx.config.text.hidden_size
    if style.pixels_in:
        p = ctx.config.vision.patch_size
        rows = vision_output_rows(ctx, length=f"(H*W/({p}*{p}))")
        return {
            "inputs": [io_spec("image", [1, 3, "H", "W"], "uint8")],
            "outputs": [io_spec("embeds", [1, rows, d], style.outputs)],
        }
    return {
        "inputs": vision_inputs(ctx, ids_dtype=style.ints),
        "outputs": [io_spec("embeds", [vision_output_rows(ctx), d], style.outputs)],
    }


def _embedding_io(ctx: Any, style: TableStyle) -> dict[str, Any]:
    d = ctx.config.text.hidden_size
    lead = [1] if style.batch_axis else []
    return {
        "inputs": [io_spec("ids", [*lead, "T"], style.ints)],
        "outputs": [io_spec("embeds", [*lead, "T", d], style.outputs)],
    }


def _decoder_io(ctx: Any, style: TableStyle, state: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = ctx.config
    d, v = cfg.text.hidden_size, cfg.text.vocab_size
    inputs = [
        io_spec("embeds", [1, CHUNK_ROWS if style.chunked else "T", d], "float32"),
        io_spec("start_pos", [1], style.ints),
    ]
    if style.chunked:
        inputs.append(io_spec("n_valid", [1], style.ints))
    if style.position_rows:
        inputs.append(
            io_spec("position_ids", [POSITION_ROWS, CHUNK_ROWS if style.chunked else "T"], style.ints)
        )
    return {
        "inputs": inputs + [io_spec(f"past.{s['name']}", s["shape"], s["dtype"]) for s in state],
        "outputs": [io_spec("logits", [1, v], style.outputs)]
        + [io_spec(f"present.{s['name']}", s["shape"], s["dtype"]) for s in state],
    }


def graph_table(
    ctx: Any,
    style: TableStyle,
    vision: dict[str, Any],
    embedding: dict[str, Any],
    decoder: dict[str, Any],
    state_io: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest's `graphs`: each entry is the format's location fields (`vision`, `embedding`,
    `decoder`: files / methods / functions and format keys, in manifest order) followed by its
    inputs and outputs. `state_io`: state entries the decoder takes and returns as past.X /
    present.X tensors (ONNX); formats that keep state inside the graph pass None."""
    return {
        "vision_encoder": {**vision, **_vision_io(ctx, style)},
        "token_embedding": {**embedding, **_embedding_io(ctx, style)},
        "text_decoder": {**decoder, **_decoder_io(ctx, style, state_io or [])},
    }
