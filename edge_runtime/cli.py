"""`minicpmv-edge` command line.

Exit codes (docs/errors.md): 0 ok; 1 a check ran and failed (a parity gate, a damaged bundle file
found by `inspect`, a missed device target); 2 bad input or environment (flags, files, checkpoints,
bundles, prompts, an output path we may not write); 3 an internal error, i.e. a bug: one line saying
so and naming the file its traceback was written to (MINICPMV_EDGE_DEBUG=1 prints it instead).
Every failure is one `error:` line on stderr; no path prints a raw traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import INTERNAL_ERROR, EdgeError


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
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
def init_checkpoint_cmd(family: str, preset_name: str, out: Path, seed: int, dtype: str) -> None:
    """Write a random-weight checkpoint of FAMILY (e.g. minicpm-v-4.6) in the Hugging Face layout."""
    from .init_checkpoint import init_checkpoint

    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    init_checkpoint(family, preset_name, out, seed=seed, dtype=dtype, progress=say)
    click.echo(str(out))


def _register_optional_commands() -> None:
    """Commands living in their own modules, added here so `cli` stays one group."""
    from .commands import register

    register(cli)


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOMEM}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the group, turning every failure into one line and an exit code."""
    from .outputs import restore_sigterm, sigterm_raises

    previous = sigterm_raises()  # SIGTERM unwinds like Ctrl-C, so temp directories are removed
    try:
        return _main(argv)
    finally:
        restore_sigterm(previous)  # main() called in-process (tests) leaves the handler as it was


def _main(argv: list[str] | None) -> int:
    from .outputs import Terminated, signal_received

    try:
        _register_optional_commands()  # imports: Ctrl-C here is still one line
        # make_context + invoke is click's main() without its KeyboardInterrupt handler, which
        # prints an empty line before its Abort: Ctrl-C here is our one `error: interrupted` line
        args = list(argv) if argv is not None else sys.argv[1:]
        with cli.make_context("minicpmv-edge", args) as ctx:
            rc = cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:  # `minicpmv-edge` or a group with no command
        click.echo(exc.ctx.get_help() if exc.ctx is not None else "")
        click.echo("error: no command given (the commands are listed above)", err=True)
        return 2
    except click.ClickException as exc:  # unknown flag, missing option, bad choice
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return 2
    except EdgeError as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted(signal.SIGINT)
    except Terminated:
        return _interrupted(signal.SIGTERM)
    except BrokenPipeError:
        return 0
    except OSError as exc:
        if exc.errno in _ENVIRONMENT_ERRNOS:  # a full disk, a read-only or forbidden path
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where}", err=True)
            return 2
        received = signal_received()
        return _interrupted(received) if received is not None else _internal_error(exc)
    except Exception as exc:  # a bug of ours: one line, the traceback in a file
        received = signal_received()
        if received is not None:  # a signal arrived inside a C extension's import, which hid it
            return _interrupted(received)
        return _internal_error(exc)
    return rc if isinstance(rc, int) else 0


def _interrupted(signum: int) -> int:
    if signum == signal.SIGTERM:
        click.echo("error: terminated (SIGTERM); nothing was left behind", err=True)
        return 143
    click.echo("error: interrupted", err=True)
    return 130


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _internal_error(exc: BaseException) -> int:
    """A bug: say so in one line; the traceback goes to a file (or stderr with MINICPMV_EDGE_DEBUG=1)."""
    text = "".join(traceback.format_exception(exc))
    summary = _one_line(f"{type(exc).__name__}: {exc}")[:300]
    if os.environ.get("MINICPMV_EDGE_DEBUG", "") not in ("", "0"):
        sys.stderr.write(text)
        click.echo(f"error: internal error (a bug in minicpmv-edge): {summary}", err=True)
        return INTERNAL_ERROR
    try:
        fd, path = tempfile.mkstemp(
            prefix=f"minicpmv-edge-traceback-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt"
        )
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        where = f"traceback in {path}"
    except OSError:
        where = "rerun with MINICPMV_EDGE_DEBUG=1 for the traceback"
    click.echo(f"error: internal error (a bug in minicpmv-edge): {summary}; {where}", err=True)
    return INTERNAL_ERROR


def print_json(obj: object) -> None:
    """Stable, documented --json output: sorted keys, one object."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
