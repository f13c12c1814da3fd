"""tools/bench_peers.py: how it reads llama-bench, how it turns runs into ratios and target checks, that a
failed peer stays in the report, and that our worker process measures a real bundle. No figure here is a
speed claim: the timing itself belongs to `make bench-peers`."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import bench_peers as bp  # noqa: E402
import llama_cpp_peer as lp  # noqa: E402


def _fake_llama_bench(tmp_path: Path, rows: list[dict]) -> lp.LlamaCpp:
    """A llama-bench stand-in: records its argv and prints `rows` as llama-bench's -o json does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "llama-bench"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" > {tmp_path / 'argv'}\ncat <<'EOF'\nbuild: fake\n{json.dumps(rows)}\nEOF\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return lp.LlamaCpp(tmp_path / "src", bin_dir)


def test_llama_bench_rows_are_prefill_from_empty_and_decode_at_prompt_depth(tmp_path):
    rows = [
        {"n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ts": 170.5},
        {"n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ts": 25.0},  # decode from an empty context: not ours
        {"n_prompt": 128, "n_gen": 0, "n_depth": 128, "avg_ts": 150.0},
        {"n_prompt": 0, "n_gen": 64, "n_depth": 128, "avg_ts": 19.4},
    ]
    tree = _fake_llama_bench(tmp_path, rows)
    got = tree.bench(tmp_path / "m.gguf", threads=2, n_prompt=128, n_gen=64)
    assert got == {"prefill_tok_s": 170.5, "decode_tok_s": 19.4}
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("-d") + 1] == "0,128" and argv[argv.index("-t") + 1] == "2"
    assert argv[argv.index("-r") + 1] == "1"  # one repetition: the caller interleaves rounds


def test_llama_bench_without_the_rows_is_a_peer_error(tmp_path):
    tree = _fake_llama_bench(tmp_path, [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 1.0}])
    with pytest.raises(lp.PeerError, match="no pp128 / tg64@d128 rows"):
        tree.bench(tmp_path / "m.gguf", threads=2, n_prompt=128, n_gen=64)


def _system(name: str, kind: str, prefill: list[float], decode: list[float], wbytes: int) -> bp.System:
    runs = [
        {"prefill_tok_s": p, "decode_tok_s": d, "bandwidth_gbs": 20.0}
        for p, d in zip(prefill, decode, strict=True)
    ]
    return bp.System(name, kind, runs=runs, weight_bytes_per_token=wbytes)


def test_summary_ratios_targets_and_a_failed_peer(tmp_path):
    systems = [
        _system(bp.OURS[0], "ours", [150, 160, 170], [20, 22, 21], 400_000_000),
        _system(bp.OURS[1], "ours", [100, 110, 90], [30, 29, 31], 500_000_000),
        _system(bp.GENAI, "genai", [180, 175, 170], [28, 27, 26], 450_000_000),
        _system(bp.LLAMA[0], "llama", [165, 170, 160], [19, 20, 18], 420_000_000),
        bp.System(bp.LLAMA[1], "llama", error="build: cmake configure failed (exit 1): no compiler"),
        bp.System(bp.OURS_INT4_VISION, "ours", text=False),  # vision only: no decode figures
    ]
    rounds = [{"round": i, "counted": i > 1, "busy_before": 0.01, "bandwidth_gbs": 20.0} for i in range(1, 5)]
    vision = {
        "ours_16x": [{"ttft_ms": 300.0, "vision_slice_ms": [100.0], "n_slices": 1}] * 3,
        "ours_4x": [{"ttft_ms": 500.0, "vision_slice_ms": [90.0], "n_slices": 1}] * 3,
        "ours_int4_vision_16x": [{"ttft_ms": 240.0, "vision_slice_ms": [70.0], "n_slices": 1}] * 3,
        "ours_int4_vision_4x": [{"ttft_ms": 480.0, "vision_slice_ms": [66.0], "n_slices": 1}] * 3,
        "llama_cpp_mmproj": [],
    }
    measured = {"rounds": rounds, "vision": vision, "vision_errors": {"llama_cpp_mmproj": "no mmproj line"}}
    settings = bp.Settings(tmp_path / "ck", tmp_path)
    report = bp.summarize(settings, systems, measured, {"cpu": "test", "cpu_count": 2})

    r = report["ratios"]
    assert r["best_ours_decode"] == bp.OURS[1] and r["best_peer_decode"] == bp.GENAI
    assert r["decode_ratio_vs_best_peer"] == pytest.approx(30 / 27)
    assert r["best_ours_prefill"] == bp.OURS[0] and r["best_peer_prefill"] == bp.GENAI
    assert r["prefill_ratio_vs_best_peer"] == pytest.approx(160 / 175)
    assert r["onnx_vs_genai_decode_ratio"] == pytest.approx(21 / 27)
    assert r["ttft_16x_over_4x"] == pytest.approx(0.6)
    assert r["vision_slice_ratio_vs_llama_cpp"] is None  # its peer failed: no ratio, not a made-up one
    assert r["int4_vision_slice_ratio_vs_llama_cpp"] is None
    assert r["int4_vision_ttft_16x_over_4x"] == pytest.approx(0.5)
    # decode / (bandwidth / bytes per token): 30 tok/s over 20e9 / 5e8 = 40 tok/s
    assert report["systems"][bp.OURS[1]]["decode_fraction_of_bound"] == pytest.approx(0.75)
    met = {c["ratio"]: c["met"] for c in report["targets"]}
    assert met["decode_ratio_vs_best_peer"] is False and met["best_ours_decode_fraction_of_bound"] is True
    assert met["ttft_16x_over_4x"] is False and met["vision_slice_ratio_vs_llama_cpp"] is None

    text = bp.to_markdown(report)
    assert f"| {bp.LLAMA[1]} | failed: build: cmake configure failed" in text
    assert "llama.cpp mmproj f16, 16x | failed: no mmproj line" in text
    assert "| ours onnx, int4 vision, 16x | 70 | 240 |" in text
    assert f"| {bp.OURS_INT4_VISION} |" not in text  # not in the decode table: it ran no text rounds
    json.loads(json.dumps(report))  # the JSON report is plain data


@pytest.mark.parametrize("kind", ["ours"])
def test_our_worker_measures_a_tiny_onnx_bundle(kind, tiny_checkpoint, tmp_path):
    from export.pipeline import ExportRequest, export_bundle

    bundle = tmp_path / "bundle"
    export_bundle(ExportRequest(tiny_checkpoint, bundle, "harmonyos", quantization="int4", max_context=320))
    ids = bp.prompt_ids(tiny_checkpoint, 16)
    assert len(ids) == 16 and len(set(ids)) > 4
    system = bp.System("ours onnx int4", kind, path=bundle)
    worker = bp.Worker(system, {"threads": 1, "max_context": 320, "prompt_ids": ids, "decode_tokens": 4})
    try:
        text = worker.reply_to({"op": "text"})
        assert text["prefill_tok_s"] > 0 and text["decode_tok_s"] > 0
        image = bp.vision_image(tmp_path)
        for mode in ("16x", "4x"):
            vision = worker.reply_to({"op": "vision", "image": str(image), "mode": mode})
            assert vision["n_slices"] == 1 and len(vision["vision_slice_ms"]) == 1 and vision["ttft_ms"] > 0
        with pytest.raises(RuntimeError, match="InputError|not|cannot"):
            worker.reply_to({"op": "vision", "image": str(tmp_path / "missing.png"), "mode": "16x"})
    finally:
        worker.close()
    assert bp.weight_bytes_per_token(system) > 0


def test_the_int4_vision_system_is_exported_with_its_option_and_measured_on_vision_only(
    tiny_checkpoint, tmp_path
):
    """prepare() exports `ours onnx int4, int4 vision` with `--vision-quant int4` (and reuses it while
    nothing changed); a round times its vision graphs in both modes and never its text."""
    settings = bp.Settings(tiny_checkpoint, tmp_path, rounds=1, warmup=0, threads=1, prompt_tokens=160,
                           decode_tokens=2, idle_max=1.0)  # fmt: skip
    others = [bp.OURS[0], bp.OURS[1], bp.GENAI, *bp.LLAMA]
    said: list[str] = []
    systems = bp.prepare(settings, said.append, skip=others)
    vision_system = next(x for x in systems if x.name == bp.OURS_INT4_VISION)
    assert vision_system.error is None and not vision_system.text
    assert vision_system.build["command"].endswith("--vision-quant int4")
    manifest = json.loads((vision_system.path / "manifest.json").read_text())
    assert manifest["onnx"]["vision_quantization"] == "int4"
    assert all(x.error == "skipped (--skip)" for x in systems if x.name in others)
    said.clear()
    bp.prepare(settings, said.append, skip=others)
    assert not any("exporting" in line for line in said), said  # stamped: reused
    measured = bp.run_rounds(settings, systems, bp.vision_image(tmp_path), None, said.append)
    assert vision_system.runs == []  # no text rounds
    assert len(measured["vision"]["ours_int4_vision_16x"]) == 1
    assert len(measured["vision"]["ours_int4_vision_4x"]) == 1
    assert measured["vision"]["ours_16x"] == [] and measured["vision_errors"] == {}, measured["vision_errors"]
