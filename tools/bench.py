"""`make bench`: the standard benchmark, written to reports/bench-<date>.{md,json,png} (not committed).

Builds (once) a checkpoint of the chosen preset and its desktop (torch) bundle under build/bench/,
then benchmarks both in one interleaved run, so the report carries the bundle/reference ratios.
The phone formats join the run as their exporters land (pass more --bundle directories).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_runtime.bench import BenchSettings, candidates_from, run_bench, write_atomic  # noqa: E402
from edge_runtime.errors import EdgeError  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from export.pipeline import ExportRequest, export_bundle  # noqa: E402


def log(message: str) -> None:
    print(f"[make bench] {message}", file=sys.stderr, flush=True)


def build_models(preset: str) -> tuple[Path, Path]:
    """The preset's checkpoint and its desktop bundle; reused when already built."""
    build = ROOT / "build" / "bench"
    ckpt = build / f"{preset}-checkpoint"
    bundle = build / f"{preset}-desktop"
    if not (ckpt / "config.json").is_file():
        log(f"writing a {preset} checkpoint to {ckpt}")
        init_checkpoint("minicpm-v-4.6", preset, ckpt, seed=0)
    if (
        not (bundle / "manifest.json").is_file()
        or (bundle / "manifest.json").stat().st_mtime < (ckpt / "config.json").stat().st_mtime
    ):
        export_bundle(ExportRequest(ckpt, bundle, "desktop"), progress=lambda m: log(f"export: {m}"))
    return ckpt, bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--bundle", action="append", default=[], type=Path, help="More bundles to compare.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=None, help="Default: 1 for tiny (steadier), all for full."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    args = parser.parse_args()
    try:
        ckpt, bundle = build_models(args.preset)
        threads = args.threads or (1 if args.preset == "tiny" else None)
        settings = BenchSettings(warmup=args.warmup, repeats=args.repeats, threads=threads)
        report = run_bench(candidates_from([ckpt], [bundle, *args.bundle]), settings, progress=log)
        stem = args.out / f"bench-{datetime.date.today().isoformat()}"
        write_atomic(stem.with_suffix(".json"), json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
        write_atomic(stem.with_suffix(".md"), report.to_markdown())
        report.plot(stem.with_suffix(".png"))
    except EdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(report.to_markdown())
    log(f"wrote {stem}.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
