"""`minicpmv-edge bench`: TTFT split, decode tok/s, peak RSS, size and the bandwidth bound; or, with
--device-report, numbers measured on a phone checked against the published targets (exit 1 on a miss)."""

from __future__ import annotations

from pathlib import Path

import click

from ..bench import DEFAULT_DECODE_TOKENS, DEFAULT_IMAGE, DEFAULT_PROMPT
from ..processing.slicing import vision_mode_names
from .options import DEFAULT_CHECKPOINT, check_prompt


@click.command("bench")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Repeatable. With no --checkpoint and no --bundle: the embedded demo model.",
)
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path), help="Repeatable.")
@click.option(
    "--image", "images", multiple=True, type=click.Path(path_type=Path), help="Default: wide.png sample."
)
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, callback=check_prompt)
@click.option("--downsample-mode", type=click.Choice(vision_mode_names()), default=None)
@click.option("--max-slice-nums", type=click.IntRange(1, 64), default=None)
@click.option(
    "--new-tokens",
    type=click.IntRange(DEFAULT_DECODE_TOKENS),
    default=DEFAULT_DECODE_TOKENS,
    show_default=True,
    help="Decode steps timed per run (stop ids are ignored).",
)
@click.option("--warmup", type=click.IntRange(0, 100), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads per model.")
@click.option("--max-context", type=click.IntRange(16, 1 << 20), default=None)
@click.option("--bandwidth-mb", type=click.IntRange(16, 1 << 16), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option(
    "--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write Markdown."
)
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG chart.")
@click.option(
    "--device-report",
    type=click.Path(path_type=Path),
    default=None,
    help="Check a phone's JSON against targets.",
)
def bench(
    checkpoints, bundles, images, prompt, downsample_mode, max_slice_nums, new_tokens, warmup, repeats,
    threads, max_context, bandwidth_mb, as_json, report_path, plot_path, device_report,
) -> None:  # fmt: skip
    """Benchmark checkpoints (first) and bundles, interleaved; ratios are against the first model."""
    from ..bench import BenchSettings, candidates_from, is_bench_chart, is_bench_report, run_bench
    from ..cli import print_json
    from ..errors import InputError
    from ..outputs import check_output_file, write_output_file

    if device_report is not None:
        if checkpoints or bundles:
            raise InputError("give either --device-report or models to benchmark, not both")
        _device_report(device_report, as_json)
        return
    outputs = [
        (path, what, is_ours, flag)
        for path, what, is_ours, flag in (
            (report_path, "benchmark report", is_bench_report, "--report"),
            (plot_path, "benchmark chart", is_bench_chart, "--plot"),
        )
        if path is not None
    ]
    for path, what, is_ours, flag in outputs:  # an unwritable or foreign path fails before the runs
        check_output_file(path, what, is_ours, flag)
    if not checkpoints and not bundles:  # as every command: no model given = the embedded demo model
        checkpoints = (DEFAULT_CHECKPOINT,)
    settings = BenchSettings(
        images=tuple(images) or (DEFAULT_IMAGE,), prompt=prompt, downsample_mode=downsample_mode,
        max_slice_nums=max_slice_nums, decode_tokens=new_tokens, warmup=warmup, repeats=repeats,
        threads=threads, max_context=max_context, bandwidth_mb=bandwidth_mb,
    )  # fmt: skip
    say = lambda m: click.echo(f"[bench] {m}", err=True)  # noqa: E731
    report = run_bench(candidates_from(checkpoints, bundles), settings, progress=say)
    for path, what, is_ours, flag in outputs:
        data = report.to_markdown() if flag == "--report" else report.png()
        write_output_file(path, data, what, is_ours, flag, say=say)
    if as_json:
        print_json(report.to_json())
    else:
        click.echo(report.to_markdown(), nl=False)


def _device_report(path: Path, as_json: bool) -> None:
    from ..bench import check_device_report, device_check_lines, read_device_report
    from ..cli import print_json

    report = read_device_report(path)
    checks = check_device_report(report)
    missed = any(c.status == "fail" for c in checks)
    if as_json:
        print_json(
            {
                "passed": not missed,
                "device": report["device"],
                "family": report["family"],
                "targets": [c.__dict__ for c in checks],
            }
        )
    else:
        click.echo("\n".join(device_check_lines(checks)))
    if missed:
        from ..errors import CheckFailed

        raise CheckFailed(f"{path}: missed " + ", ".join(c.target for c in checks if c.status == "fail"))


COMMANDS = [bench]
