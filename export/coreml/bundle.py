"""The Core ML exporter proper: checkpoint -> three .mlpackage files + manifest fragments.

* `vision_encoder.mlpackage`: functions `vision_16x` and `vision_4x`, fp16, L a range dim.
* `token_embedding.mlpackage`: ids [T] -> [T, D]. Separate from the decoder because the decoder's
  input is embeddings (image embeddings are spliced in by the host, DESIGN.md), so one decoder
  serves text and image tokens; the cost is a second copy of the (tied) table — see docs/coreml.md.
* `text_decoder.mlpackage`: functions `prefill` (C = chunk) and `decode` (C = 1) sharing one
  weight file, every state an MLState (fp16: Core ML has no fp32 states).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from edge_runtime.backends.coreml.executor import MILProgram
from edge_runtime.checkpoint import load_checkpoint

from ..graph_table import TableStyle, graph_table
from ..pipeline import ExportContext, GraphSet, heartbeat
from .convert import convert_decoder, convert_embedding, convert_vision, save_multifunction
from .lower import state_buffer_name
from .quantize import presearch_int4_scales, quantize

FILES = {
    "vision": "vision_encoder.mlpackage",
    "embedding": "token_embedding.mlpackage",
    "decoder": "text_decoder.mlpackage",
}
EMBEDDING_CHOICE = (
    "separate token_embedding.mlpackage: the decoder takes embeddings so host-spliced image "
    "embeddings and text share one decoder; the tied table is stored twice (once per package)"
)


# The vision tower stays int8 where the decoder goes int4, as in the ONNX bundles: measured on the
# tiny checkpoint, int4 per channel costs the vision embeddings cosine 0.978 (gate 0.98), and the
# vision encoder runs once per slice, so its weight bytes barely move decode speed.
VISION_QUANT = {"int4": "int8", "int4-channel": "int8"}


def export_coreml(ctx: ExportContext) -> GraphSet:
    say = ctx.progress
    model = load_checkpoint(ctx.checkpoint).model.eval()
    if ctx.quantization == "int4":
        n = presearch_int4_scales([model.text_model, model.output_head])
        say(f"int4: block scales searched for {n} text linear weights")
    cfg = ctx.config
    cache_len = ctx.max_context + ctx.chunk_size
    specs = ctx.family.state_specs(cfg, cache_len)
    max_patches = (cfg.vision.num_patches_per_side**2) // 16 * 16
    timings: dict[str, float] = {}
    vision_quant = VISION_QUANT.get(ctx.quantization, ctx.quantization)
    with tempfile.TemporaryDirectory(prefix="coreml-parts-") as scratch:
        parts = Path(scratch)

        def build(key: str, make) -> Path:  # noqa: ANN001
            start = time.perf_counter()
            path = parts / f"{key}.mlpackage"
            quant = vision_quant if key.startswith("vision") else ctx.quantization
            say(f"converting {key}")
            with heartbeat(say, f"converting {key}"):
                quantize(make(), quant).save(str(path))
            timings[key] = round(time.perf_counter() - start, 2)
            say(f"converted {key} in {timings[key]} s")
            return path

        prefill = build("prefill", lambda: convert_decoder(model, specs, ctx.chunk_size))
        decode = build("decode", lambda: convert_decoder(model, specs, 1))
        save_multifunction({"prefill": prefill, "decode": decode}, ctx.out / FILES["decoder"], "decode")
        modes = ctx.family.vision_modes
        vision = {
            f"vision_{m}": build(f"vision_{m}", lambda m=m: convert_vision(model, m, max_patches))
            for m in modes
        }
        save_multifunction(vision, ctx.out / FILES["vision"], f"vision_{modes[0]}")
        embed = build("token_embedding", lambda: convert_embedding(model, ctx.max_context))
        shutil.copytree(embed, ctx.out / FILES["embedding"])

    decoder = MILProgram(ctx.out / FILES["decoder"])  # loads every op: unsupported ones fail the export
    MILProgram(ctx.out / FILES["vision"])
    MILProgram(ctx.out / FILES["embedding"])
    decode_fn = decoder.function("decode")
    state = [
        {"name": s.name, "shape": list(st.shape), "dtype": st.dtype.name, "coreml_name": st.name}
        for s, st in zip(specs, decode_fn.states, strict=True)
    ]
    if [st.name for st in decode_fn.states] != [state_buffer_name(s.name) for s in specs]:
        raise RuntimeError("Core ML state order differs from state_specs")
    weight_bytes = decoder.weight_bytes_by_dtype()
    graphs = graph_table(
        ctx,
        TableStyle(ints="int32", outputs="float16", position_rows=ctx.family.rope_positions == "canvas"),
        vision={
            "file": FILES["vision"],
            "functions": {m: f"vision_{m}" for m in ctx.family.vision_modes},
            "max_patches": max_patches,
        },
        embedding={"file": FILES["embedding"]},
        decoder={
            "file": FILES["decoder"],
            "functions": {"prefill": "prefill", "decode": "decode"},
            "chunk": {"prefill": ctx.chunk_size, "decode": 1},
            "cache_len": cache_len,
            "state": "mlstate",
        },
    )
    extra = {
        "coreml": {
            "minimum_deployment_target": "iOS18",
            "token_embedding": EMBEDDING_CHOICE,
            "state_dtype": "float16 (Core ML states are fp16 only; the converter casts fp32 buffers)",
            "compute_precision": "fp16, position path (RoPE angles, masks) fp32",
            "decoder_weight_bytes_by_dtype": weight_bytes,
            "vision_quantization": vision_quant,
            "conversion_seconds": timings,
        }
    }
    return GraphSet(graphs=graphs, decode_weight_bytes=sum(weight_bytes.values()), state=state, extra=extra)
