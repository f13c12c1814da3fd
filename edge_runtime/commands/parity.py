"""`minicpmv-edge parity`: the checkpoint (reference) against a bundle, stage by stage; exit 1 on a failed gate."""

from __future__ import annotations

from pathlib import Path

import click

from ..outputs import check_output_file, write_output_file
from .options import DEFAULT_CHECKPOINT

REPORT_HEADER = "# Parity report"


@click.command("parity")
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    default=DEFAULT_CHECKPOINT,
    help="Reference checkpoint (default: the embedded demo model).",
)
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle to check.")
@click.option("--cases", "cases_file", type=click.Path(path_type=Path), default=None, help="Cases JSON file.")
@click.option("--steps", type=click.IntRange(1, 1024), default=32, show_default=True, help="Decode steps.")
@click.option("--quant", default=None, help="Gate table to apply (default: the bundle's quantization).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write Markdown."
)
def parity(checkpoint, bundle, cases_file, steps, quant, threads, as_json, report_path) -> None:
    """Compare BUNDLE with CHECKPOINT on the sample cases (or --cases) and apply DESIGN.md's gates."""
    from ..bundle import open_bundle_session, read_manifest
    from ..cli import print_json
    from ..errors import CheckFailed
    from ..parity import compare, default_cases, gates_for, load_cases
    from ..runtime import open_checkpoint_session

    is_report = lambda head: head.startswith(REPORT_HEADER.encode())  # noqa: E731
    if report_path is not None:  # an unwritable or foreign --report fails before minutes of work
        check_output_file(report_path, "parity report", is_report, "--report")
    quantization = quant or read_manifest(bundle).quantization
    gates_for(quantization)  # unknown quantization: fail before loading anything
    cases = load_cases(cases_file) if cases_file else default_cases()
    click.echo(f"[parity] opening reference {checkpoint} and bundle {bundle}", err=True)
    candidate = open_bundle_session(bundle, threads=threads)
    reference = open_checkpoint_session(
        checkpoint, max_context=candidate.backend.info.max_context, threads=threads
    )
    report = compare(
        reference,
        candidate,
        cases,
        quantization,
        n_steps=steps,
        progress=lambda m: click.echo(f"[parity] {m}", err=True),
    )
    if report_path is not None:
        write_output_file(
            report_path,
            report.to_markdown(),
            "parity report",
            is_report,
            "--report",
            say=lambda m: click.echo(f"[parity] {m}", err=True),
        )
    if as_json:
        print_json(report.to_json())
    else:
        click.echo("\n".join(report.summary_lines()))
    if not report.passed:
        first = report.first_failure
        raise CheckFailed(
            f"parity failed {len(report.failures)} gate(s); first: [{first.stage}] {first.message}"
        )


COMMANDS = [parity]
