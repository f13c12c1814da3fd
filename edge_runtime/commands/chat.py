"""`minicpmv-edge chat`: answer a question about images, streaming text or printing --json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..runtime import open_session
from .options import check_prompt, model_source, preprocessing, resolve_source


@click.command("chat")
@model_source
@preprocessing
@click.option(
    "--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable)."
)
@click.option(
    "--video",
    "videos",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Video file (needs PyAV; repeatable).",
)
@click.option("--prompt", required=True, callback=check_prompt, help="The question or instruction.")
@click.option("--max-new-tokens", type=click.IntRange(1, 1 << 20), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option(
    "--repetition-penalty", type=click.FloatRange(0.0, min_open=True), default=1.0, show_default=True
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def chat(
    checkpoint, bundle, max_context, threads, downsample_mode, max_slice_nums, max_pixels,
    images, videos, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, as_json,
) -> None:  # fmt: skip
    """Ask PROMPT about the --image files with a checkpoint (reference) or a bundle."""
    from ..cli import print_json

    checkpoint, bundle = resolve_source(checkpoint, bundle)
    session = open_session(
        checkpoint, bundle, max_context=max_context, threads=threads,
        downsample_mode=downsample_mode, max_slice_nums=max_slice_nums, max_pixels=max_pixels,
    )  # fmt: skip
    prepared = session.prepare(prompt, list(images), videos=list(videos))
    sampling = session.sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    if as_json:
        print_json(session.generate(prepared, sampling).to_json())
        return
    out = sys.stdout

    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    result = session.generate(prepared, sampling, on_text=write)
    out.write("\n")
    info = result.to_json()
    click.echo(
        f"[{session.backend.name}] {info['n_prompt_tokens']} prompt tokens ({info['n_image_tokens']} image, "
        f"{info['n_slices']} slices), TTFT {info['ttft_ms']:.0f} ms, decode {info['decode_tok_s']:.1f} tok/s",
        err=True,
    )


COMMANDS = [chat]
