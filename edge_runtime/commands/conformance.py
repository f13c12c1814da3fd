"""`minicpmv-edge conformance`: write the conformance kit every app checks itself against."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..runtime import open_session
from .options import model_source, resolve_source


@click.command("conformance")
@model_source
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Kit directory to write.")
@click.option(
    "--in-bundle",
    is_flag=True,
    help="Write the kit into the --bundle itself (BUNDLE/conformance/, listed in its manifest) instead of --out.",
)
@click.option(
    "--questions",
    "n_questions",
    type=click.IntRange(0, 64),
    default=3,
    show_default=True,
    help="Greedy runs: the first N demo sample questions.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Greedy runs stop after this many tokens (or at a stop token).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the path.")
def conformance(
    checkpoint, bundle, max_context, threads, out, in_bundle, n_questions, max_new_tokens, as_json
) -> None:
    """Write language-neutral test vectors (docs/conformance.md) from the host code and this model."""
    from ..cli import print_json
    from ..conformance import BUNDLE_KIT_DIR, INDEX, is_kit, kit_source, list_kit_in_manifest, write_kit
    from ..errors import InputError
    from ..outputs import atomic_output_dir, preflight

    def say(msg: str) -> None:
        click.echo(f"[conformance] {msg}", err=True)

    if in_bundle:
        if bundle is None or out is not None:
            raise InputError("--in-bundle writes into the --bundle given; give --bundle and no --out")
        out = bundle / BUNDLE_KIT_DIR
    elif out is None:
        raise InputError("give --out KIT (or --bundle B --in-bundle)")
    preflight(out, "conformance kit", is_kit)  # before the model is loaded
    checkpoint, bundle = resolve_source(checkpoint, bundle)
    t0 = time.perf_counter()
    session = open_session(checkpoint, bundle, max_context=max_context, threads=threads)
    source = kit_source(session, checkpoint, bundle)
    say(f"model: {source['kind']} {source['path']} ({session.backend.name})")
    with atomic_output_dir(out, "conformance kit", is_kit, say=say) as tmp:
        index = write_kit(
            session, tmp, source, n_questions=n_questions, max_new_tokens=max_new_tokens, say=say
        )
    if in_bundle:
        listed = list_kit_in_manifest(bundle)
        say(f"listed {listed} kit files in {bundle / 'manifest.json'}")
    size = sum(index["files"].values()) + (out / INDEX).stat().st_size
    say(
        f"wrote {out} ({len(index['files']) + 1} files, {size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
    )
    if not as_json:
        click.echo(str(out))
        return
    print_json(
        {
            "kit": str(out),
            "schema": index["schema"],
            "schema_version": index["schema_version"],
            "source": index["source"],
            "counts": {
                key: len(index[key]) for key in ("images", "texts", "prompts", "sampling", "generations")
            },
            "files": {**index["files"], INDEX: (out / INDEX).stat().st_size},
            "size_bytes": size,
        }
    )


COMMANDS = [conformance]
