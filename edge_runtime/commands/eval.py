"""`minicpmv-edge eval`: exact-match accuracy on the demo task's fixed eval split.

Runs every eval sample through the same `Session` path as `chat` (slicing, prompt, vision,
greedy generation) on a checkpoint or a bundle, in one or both downsample modes, and reports
accuracy per question type and overall. The `--json` object is documented in docs/eval.md.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from ..demo_task import DEFAULT_SEED, EVAL, EVAL_SIZE, LANGUAGES, QUESTION_TYPES, Sample, eval_samples
from ..families import family_by_name
from ..processing.slicing import slice_image, vision_mode_names
from ..runtime import open_session
from ..session import Session
from .options import model_source, resolve_source

SCHEMA_VERSION = 1
MAX_NEW_TOKENS = 8  # the longest answer is 3 digits or one short word
MAX_FAILURES = 20


def answer(session: Session, sample: Sample, mode: str) -> str:
    """Greedy answer of the model to one sample, stripped of surrounding whitespace."""
    image = slice_image(sample.image, session.slice_config(downsample_mode=mode))
    prepared = session.prepare(sample.question, [image], downsample_mode=mode)
    result = session.generate(prepared, session.sampling(max_new_tokens=MAX_NEW_TOKENS))
    return result.text.strip()


def _tally(rows: list[dict[str, Any]], key: str, values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for value in values:
        hits = [r["correct"] for r in rows if r[key] == value]
        out[value] = {
            "accuracy": sum(hits) / len(hits) if hits else None,
            "n": len(hits),
            "correct": sum(hits),
        }
    return out


def evaluate(session: Session, samples: list[Sample], mode: str, progress: bool = True) -> dict[str, Any]:
    """Accuracy of one downsample mode: overall, per question type, per language, first failures."""
    rows = []
    t0 = time.perf_counter()
    for i, sample in enumerate(samples):
        got = answer(session, sample, mode)
        rows.append(
            {
                "index": sample.index,
                "qtype": sample.qtype,
                "lang": sample.lang,
                "question": sample.question,
                "expected": sample.answer,
                "got": got,
                "correct": got == sample.answer,
            }
        )
        if progress and ((i + 1) % 50 == 0 or i + 1 == len(samples)):
            done = sum(r["correct"] for r in rows)
            click.echo(
                f"[eval {mode}] {i + 1}/{len(samples)}  running accuracy {done / (i + 1):.1%}", err=True
            )
    correct = sum(r["correct"] for r in rows)
    failures = [{k: v for k, v in r.items() if k != "correct"} for r in rows if not r["correct"]]
    return {
        "accuracy": correct / len(rows) if rows else None,
        "n": len(rows),
        "correct": correct,
        "per_type": _tally(rows, "qtype", QUESTION_TYPES),
        "per_language": _tally(rows, "lang", LANGUAGES),
        "per_type_language": {
            qtype: _tally([r for r in rows if r["qtype"] == qtype], "lang", LANGUAGES)
            for qtype in QUESTION_TYPES
        },
        "failures": failures[:MAX_FAILURES],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _print_table(report: dict[str, Any]) -> None:
    modes = list(report["modes"])
    click.echo(f"{'question type':<14}" + "".join(f"{m:>10}" for m in modes))
    for qtype in QUESTION_TYPES:
        cells = [report["modes"][m]["per_type"][qtype] for m in modes]
        click.echo(f"{qtype:<14}" + "".join(_pct(c["accuracy"]) for c in cells))
    click.echo(f"{'overall':<14}" + "".join(_pct(report["modes"][m]["accuracy"]) for m in modes))
    n = report["n_samples"]
    click.echo(f"({n} samples per mode, split {report['split']!r}, seed {report['seed']})")


def _pct(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{100 * value:>9.1f}%"


@click.command("eval")
@model_source
@click.option(
    "--downsample-mode",
    type=click.Choice([*vision_mode_names(), "both"]),
    default="both",
    show_default=True,
    help="Which visual token compression to evaluate (both: every variant the model has).",
)
@click.option(
    "--limit", type=click.IntRange(1), default=None, help=f"First N eval samples (default all {EVAL_SIZE})."
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=DEFAULT_SEED,
    show_default=True,
    help="Seed of the eval split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see docs/eval.md).")
def eval_command(checkpoint, bundle, max_context, threads, downsample_mode, limit, seed, as_json) -> None:
    """Exact-match accuracy of a checkpoint or bundle on the demo task's eval split."""
    from ..cli import print_json

    checkpoint, bundle = resolve_source(checkpoint, bundle)
    session = open_session(checkpoint, bundle, max_context=max_context or 1024, threads=threads)
    samples = eval_samples(limit or EVAL_SIZE, seed)
    family = family_by_name(session.backend.info.family)
    modes = list(family.vision_modes) if downsample_mode == "both" else [downsample_mode]
    t0 = time.perf_counter()
    per_mode = {m: evaluate(session, samples, m, progress=sys.stderr.isatty() or not as_json) for m in modes}
    total = sum(r["n"] for r in per_mode.values())
    report = {
        "schema_version": SCHEMA_VERSION,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "bundle": None if bundle is None else str(bundle),
        "backend": session.backend.name,
        "split": EVAL,
        "seed": seed,
        "n_samples": len(samples),
        "modes": per_mode,
        "overall": sum(r["correct"] for r in per_mode.values()) / total if total else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if as_json:
        print_json(report)
    else:
        _print_table(report)


COMMANDS = [eval_command]
