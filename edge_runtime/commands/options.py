"""Option sets shared by several subcommands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..processing.image import DEFAULT_MAX_PIXELS
from ..processing.slicing import vision_mode_names

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "demo-checkpoint"


def model_source(func: Callable) -> Callable:
    """--checkpoint / --bundle / --max-context / --threads."""
    func = click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads.")(func)
    func = click.option(
        "--max-context", type=click.IntRange(16, 1 << 20), default=None, help="Context length (default 4096)."
    )(func)
    func = click.option(
        "--bundle", type=click.Path(path_type=Path), default=None, help="Exported bundle directory."
    )(func)
    func = click.option(
        "--checkpoint",
        type=click.Path(path_type=Path),
        default=None,
        help="Hugging Face-format checkpoint directory (default: the embedded demo model).",
    )(func)
    return func


def preprocessing(func: Callable) -> Callable:
    """--downsample-mode / --max-slice-nums / --max-pixels."""
    func = click.option(
        "--max-pixels",
        type=click.IntRange(1, None),
        default=DEFAULT_MAX_PIXELS,
        show_default=True,
        help="Refuse larger images (decompression-bomb guard).",
    )(func)
    func = click.option("--max-slice-nums", type=click.IntRange(1, 64), default=None)(func)
    func = click.option("--downsample-mode", type=click.Choice(vision_mode_names()), default=None)(func)
    return func


def resolve_source(checkpoint: Path | None, bundle: Path | None) -> tuple[Path | None, Path | None]:
    """No source given: the embedded demo checkpoint."""
    if checkpoint is None and bundle is None:
        return DEFAULT_CHECKPOINT, None
    return checkpoint, bundle


def check_prompt(ctx: click.Context | None, param: click.Parameter | None, value: str) -> str:
    """A click callback: the prompt must be non-empty UTF-8 text (bytes that are not UTF-8 arrive as
    lone surrogates from the command line)."""
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start].encode("utf-8", "surrogateescape")
        raise click.BadParameter(
            f"not valid UTF-8 text (byte 0x{bad.hex()} at character {exc.start})", ctx, param
        ) from None
    if not value.strip():
        raise click.BadParameter("is empty; ask a question", ctx, param)
    return value
