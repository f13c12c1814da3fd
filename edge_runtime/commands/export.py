"""`minicpmv-edge export`: checkpoint -> bundle for a target (progress on stderr, path or --json on stdout).

The runtime never imports the exporters; this command does, lazily, so a phone-side install
without `export/` still has every other command.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..bundle import TARGETS
from ..parity import GATES
from .options import DEFAULT_CHECKPOINT

QUANTS = tuple(GATES)  # every quantization has a parity gate table, and only those
INT4_COMPUTE = ("fp32", "int8")  # export/onnx/quantize.py INT4_COMPUTE_LEVELS (not imported: lazy)


@click.command("export")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=DEFAULT_CHECKPOINT,
    show_default="the embedded demo model",
    help="Checkpoint directory.",
)
@click.option("--target", type=click.Choice(TARGETS), required=True, help="Where the bundle runs.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--format", "format_name", default=None, help="Override the target's format (e.g. torch).")
@click.option("--quant", type=click.Choice(QUANTS), default="fp32", show_default=True)
@click.option("--max-context", type=click.IntRange(16, 1 << 20), default=4096, show_default=True)
@click.option("--chunk-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option(
    "--max-undelegated",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="ExecuTorch: fail when the delegate leaves more than this share of operators (default 0.5).",
)
@click.option(
    "--onnx-fusions",
    type=click.Choice(["all", "none"]),
    default="all",
    show_default=True,
    help="ONNX: contrib ops (decoders: LinearAttention, CausalConvWithState, GroupQueryAttention, "
    "SimplifiedLayerNormalization; vision: MultiHeadAttention); none = standard ops, for "
    "onnxruntime builds without them.",
)
@click.option(
    "--int4-compute",
    type=click.Choice(INT4_COMPUTE),
    default=None,
    help="ONNX int4: MatMulNBits arithmetic; int8 activations (accuracy_level 4, faster) or fp32 "
    "(accuracy_level 0). Default int8. Other formats and quantizations ignore it, as they ignore "
    "--onnx-fusions.",
)
@click.option(
    "--vision-quant",
    type=click.Choice(["int8", "int4"]),
    default=None,
    help="ONNX int4: the vision tower's linear weights. int8 per channel (default) or the decoder's "
    "4-bit blocks computed in fp32 (half the vision bytes, faster on CPUs, a little less exact; "
    "parity's vision cosine gate applies). Other formats and quantizations reject int4.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the path.")
def export(
    checkpoint,
    target,
    out,
    format_name,
    quant,
    max_context,
    chunk_size,
    max_undelegated,
    onnx_fusions,
    int4_compute,
    vision_quant,
    as_json,
) -> None:
    """Export CHECKPOINT to a bundle for --target (ios|android|harmonyos|desktop)."""
    from export.pipeline import ExportRequest, export_bundle

    from ..bundle import read_manifest
    from ..cli import print_json

    request = ExportRequest(
        checkpoint, out, target, format_name, quant, max_context, chunk_size, max_undelegated,
        onnx_fusions == "all", int4_compute, vision_quant,
    )  # fmt: skip
    path = export_bundle(request, progress=lambda msg: click.echo(f"[export] {msg}", err=True))
    if not as_json:
        click.echo(str(path))
        return
    manifest = read_manifest(path)
    print_json(
        {
            "bundle": str(path),
            "target": manifest.target,
            "format": manifest.format,
            "quantization": manifest.quantization,
            "schema_version": manifest.schema_version,
            "files": {rel: e["bytes"] for rel, e in manifest.files.items()},
            "size_bytes": sum(e["bytes"] for e in manifest.files.values())
            + (path / "manifest.json").stat().st_size,
        }
    )


COMMANDS = [export]
