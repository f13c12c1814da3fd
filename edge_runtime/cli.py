"""`minicpmv-edge` command line.

Every user-facing failure is one line on stderr and a non-zero exit: 2 for bad input (flags,
files, checkpoints, bundles, prompts), 1 for a failed check (a parity gate). Tracebacks are
reserved for our own bugs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import EdgeError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minicpmv-edge")
def cli() -> None:
    """Export MiniCPM-V to phone bundles, run them, check parity, measure speed."""


@cli.command("init-checkpoint")
@click.argument("family")
@click.option(
    "--preset", "preset_name", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
def init_checkpoint_cmd(family: str, preset_name: str, out: Path, seed: int, dtype: str) -> None:
    """Write a random-weight checkpoint of FAMILY (e.g. minicpm-v-4.6) in the Hugging Face layout."""
    from .init_checkpoint import init_checkpoint

    click.echo(f"writing {family} {preset_name} checkpoint to {out} ...", err=True)
    init_checkpoint(family, preset_name, out, seed=seed, dtype=dtype)
    click.echo(str(out))


def _register_optional_commands() -> None:
    """Commands living in their own modules, added here so `cli` stays one group."""
    from .commands import register

    register(cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the group, turning user errors into one line and an exit code."""
    _register_optional_commands()
    try:
        rc = cli.main(args=argv, prog_name="minicpmv-edge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.ClickException as exc:  # unknown flag, missing option, bad choice
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except EdgeError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return rc if isinstance(rc, int) else 0


def print_json(obj: object) -> None:
    """Stable, documented --json output: sorted keys, one object."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
