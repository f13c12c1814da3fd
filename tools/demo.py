"""`make demo`: the main job end to end on the embedded default model.

1. The reference answers the shipped sample questions (edge_runtime/data/samples-demo).
2. For every target whose exporter is installed, the demo model is exported (cached under
   build/demo/bundles; delete it to re-export), answers the same questions through the bundle,
   and is checked with `parity` on those questions.
3. One table: answers, TTFT, decode speed and the parity verdict side by side.

Without a shipped trained checkpoint it falls back to a tiny random one and says so.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.bundle import load_bundle, sha256_file  # noqa: E402
from edge_runtime.commands.options import DEFAULT_CHECKPOINT  # noqa: E402
from edge_runtime.conformance import BUNDLE_KIT_DIR, attach_kit  # noqa: E402
from edge_runtime.errors import EdgeError  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from edge_runtime.parity import Case, compare  # noqa: E402
from edge_runtime.runtime import open_session  # noqa: E402
from edge_runtime.session import Session  # noqa: E402
from export.pipeline import EXPORTERS, ExportRequest, export_bundle  # noqa: E402

SAMPLES = ROOT / "edge_runtime" / "data" / "samples-demo"
BUILD = ROOT / "build" / "demo"
# (target, format, quantization): the default bundle of each phone platform. Exporting takes about
# 2 min (onnx), 2-3 min (coreml) and 5-18 min (executorch 8da4w) on a 2-core machine, so the default
# demo shows one target and stays within its 10-minute budget; --targets all shows every one.
TARGETS = {
    "harmonyos": ("onnx", "int4"),
    "ios": ("coreml", "int4"),
    "android": ("executorch", "8da4w"),
}
DEFAULT_TARGETS = "harmonyos"
PARITY_STEPS = 8


@dataclass
class Column:
    name: str
    answers: list[str] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    verdict: str = "reference"
    failure: str = ""  # the first failed gate's one-line message, printed under the table


def load_questions(limit: int) -> list[dict]:
    return json.loads((SAMPLES / "questions.json").read_text(encoding="utf-8"))["questions"][:limit]


def answer_all(session: Session, questions: list[dict], column: Column) -> None:
    for q in questions:
        prepared = session.prepare(q["question"], [SAMPLES / q["image"]])
        result = session.generate(prepared, session.sampling(max_new_tokens=16))
        info = result.to_json()
        column.answers.append(result.text.strip())
        column.ttft_ms.append(info["ttft_ms"])
        column.decode_tok_s.append(info["decode_tok_s"])


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 over the names and contents of the checkpoint's files."""
    digest = hashlib.sha256()
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def bundle_for(checkpoint: Path, target: str, fmt: str, quant: str) -> Path:
    """The cached bundle of this checkpoint, exported first when missing, broken or made from
    another checkpoint (the stamp next to it names its source: a retrained demo checkpoint must
    not be compared with bundles of the previous one)."""
    out = BUILD / "bundles" / f"{target}-{quant}"
    stamp = out.with_name(out.name + ".source")
    source = checkpoint_digest(checkpoint)
    if (out / "manifest.json").exists() and stamp.is_file() and stamp.read_text().strip() == source:
        try:
            load_bundle(out)  # verifies checksums
            if not (out / BUNDLE_KIT_DIR / "conformance.json").is_file():
                attach_kit(out, say=_quiet)  # a bundle cached before kits shipped inside bundles
            return out
        except EdgeError:
            print(f"cached {out.name} is broken; exporting it again", flush=True)
    stamp.unlink(missing_ok=True)
    t0 = time.perf_counter()
    print(f"exporting {target} ({fmt}, {quant}) ...", flush=True)
    export_bundle(ExportRequest(checkpoint, out, target, fmt, quant, max_context=1024, chunk_size=32), _quiet)
    attach_kit(out, say=_quiet)  # the vectors the apps' tests check, inside the bundle they load
    stamp.write_text(source + "\n")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _quiet(_msg: str) -> None:
    pass


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def print_failures(columns: list[Column]) -> None:
    """Why each failing bundle failed: the verdict cell only has room for the stage."""
    for column in columns:
        if column.failure:
            print(f"{column.name} parity: {column.failure}")


def print_table(questions: list[dict], columns: list[Column]) -> None:
    width = max(12, *(len(c.name) for c in columns))
    head = f"{'question':<52} {'expected':<9} " + " ".join(f"{c.name:<{width}}" for c in columns)
    print(head)
    print("-" * len(head))
    for i, q in enumerate(questions):
        cells = " ".join(f"{(c.answers[i] if i < len(c.answers) else '-')[:width]:<{width}}" for c in columns)
        print(f"{q['question'][:52]:<52} {q['answer']:<9} {cells}")
    print("-" * len(head))
    for label, values in (("TTFT median (ms)", "ttft_ms"), ("decode median (tok/s)", "decode_tok_s")):
        cells = " ".join(f"{median(getattr(c, values)):<{width}.1f}" for c in columns)
        print(f"{label:<62} {cells}")
    print(f"{'parity (' + str(PARITY_STEPS) + ' steps on these questions)':<62} "
          + " ".join(f"{c.verdict[:width]:<{width}}" for c in columns))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3, help="How many sample questions to ask.")
    parser.add_argument("--no-bundles", action="store_true", help="Reference only.")
    parser.add_argument(
        "--targets", default=DEFAULT_TARGETS, help=f"Comma-separated subset of {', '.join(TARGETS)}, or all."
    )
    args = parser.parse_args()

    checkpoint = DEFAULT_CHECKPOINT
    trained = (checkpoint / "config.json").exists() and (SAMPLES / "questions.json").exists()
    if not trained:
        checkpoint = BUILD / "tiny-random"
        if not (checkpoint / "config.json").exists():
            init_checkpoint("minicpm-v-4.6", "tiny", checkpoint, seed=0)
        print(
            f"note: no trained demo checkpoint shipped; random weights at {checkpoint}: answers are meaningless"
        )
        return _random_demo(checkpoint)

    questions = load_questions(args.questions)
    reference = open_session(checkpoint)
    columns = [Column("reference")]
    answer_all(reference, questions, columns[0])
    cases = [Case(f"q{i}", (SAMPLES / q["image"],), q["question"]) for i, q in enumerate(questions)]
    chosen = list(TARGETS) if args.targets == "all" else [t for t in args.targets.split(",") if t]
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s): {', '.join(unknown)}")
    for target in [] if args.no_bundles else chosen:
        fmt, quant = TARGETS[target]
        if importlib.util.find_spec(EXPORTERS.get(fmt, "-")) is None:
            continue
        column = Column(f"{target}/{quant}")
        try:
            session = open_session(bundle=bundle_for(checkpoint, target, fmt, quant))
            answer_all(session, questions, column)
            report = compare(reference, session, cases, quant, n_steps=PARITY_STEPS)
            column.verdict = "pass" if report.passed else f"FAIL {report.first_failure.stage}"
            column.failure = "" if report.passed else report.first_failure.message
        except EdgeError as exc:
            column.verdict = f"error: {exc}"[:40]
        columns.append(column)
    print()
    print_table(questions, columns)
    right = sum(a == q["answer"] for a, q in zip(columns[0].answers, questions, strict=True))
    print(f"\nreference: {right}/{len(questions)} answers right")
    print_failures(columns)
    return 0


def _random_demo(checkpoint: Path) -> int:
    session = open_session(checkpoint)
    samples = ROOT / "edge_runtime" / "data" / "samples"
    for image in sorted(samples.glob("*.png"))[:2]:
        prepared = session.prepare("What colour is the circle?", [image])
        result = session.generate(prepared, session.sampling(max_new_tokens=12))
        info = result.to_json()
        print(
            f"{image.name}: {result.text.strip()!r}  TTFT {info['ttft_ms']:.0f} ms, {info['decode_tok_s']:.1f} tok/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
