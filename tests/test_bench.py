"""`bench`: every documented --json field on a tiny checkpoint and its bundle, readable Markdown and PNG,
a measured bandwidth, and phone reports checked against the published targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_runtime.bench import (
    RATIO_KEYS,
    TTFT_PARTS,
    Bandwidth,
    BenchReport,
    BenchSettings,
    Candidate,
    CandidateResult,
    check_device_report,
    is_bench_chart,
    is_bench_report,
    load_device_targets,
    measure_bandwidth,
    stats,
)
from edge_runtime.cli import main
from edge_runtime.parity import SAMPLES_DIR


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def test_bandwidth_is_measured(monkeypatch):
    bw = measure_bandwidth(size_mb=16, repeats=3)
    assert bw.array_bytes == 16 << 20 and len(bw.samples_gbs) == 3
    assert bw.gbs == float(np.median(bw.samples_gbs)) > 0.1
    assert "numpy copyto" in bw.method


def test_stats():
    assert stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert stats([]) == {"median": None, "min": None, "max": None}


def test_bench_json_report_and_plot(ckpt, tmp_path, capsys):
    """The acceptance run: the CLI on the tiny checkpoint (one worker process, 64 decode tokens)."""
    report, plot = tmp_path / "r" / "bench.md", tmp_path / "r" / "bench.png"
    args = ["bench", "--checkpoint", str(ckpt), "--image", str(SAMPLES_DIR / "square.png"), "--warmup", "0"]
    args += ["--repeats", "1", "--threads", "1", "--max-context", "256", "--bandwidth-mb", "32"]
    assert main([*args, "--json", "--report", str(report), "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert f"[bench] run 1/1: checkpoint:{ckpt.name}" in captured.err

    machine = data["machine"]
    assert machine["memory_bandwidth_gbs"] > 0 and len(machine["bandwidth"]["samples_gbs"]) >= 1
    assert data["settings"]["decode_tokens"] == 64 and data["settings"]["order"] == "interleaved"
    (cand,) = data["candidates"]
    assert cand["kind"] == "checkpoint" and cand["label"] == f"checkpoint:{ckpt.name}"
    for key in (*TTFT_PARTS, "ttft_ms", "decode_tok_s"):
        assert set(cand[key]) == {"median", "min", "max"} and cand[key]["median"] >= 0, key
    parts = sum(cand[k]["median"] for k in TTFT_PARTS)
    assert cand["ttft_ms"]["median"] == pytest.approx(parts, abs=1.0)  # the parts cover the whole TTFT
    assert len(cand["vision_slice_ms"]) == cand["n_slices"] == 1
    assert cand["decode_tokens"] == 64 and cand["decode_tok_s"]["median"] > 0
    assert cand["peak_rss_mb"] > cand["baseline_rss_mb"] > 0
    assert cand["size_bytes"] > 1e6 and cand["weight_bytes_per_token"] > 0
    bound = machine["memory_bandwidth_gbs"] * 1e9 / cand["weight_bytes_per_token"]
    assert cand["bandwidth_bound_tok_s"] == pytest.approx(bound)
    assert cand["bandwidth_fraction"] == pytest.approx(cand["decode_tok_s"]["median"] / bound)
    assert set(cand["ratios"]) == set(RATIO_KEYS) and cand["ratios"]["ttft_ms"] == 1.0
    assert len(cand["runs"]) == 1

    assert report.read_text().startswith("# Benchmark report")
    with Image.open(plot) as png:
        assert png.format == "PNG" and png.size[0] > 500
    # a later run may replace both: they are recognised as ours (a foreign file is refused: test_bad_inputs)
    assert is_bench_report(report.read_bytes()[:4096]) and is_bench_chart(plot.read_bytes()[:4096])


def _result(label: str, kind: str, ttft: list[float], tok_s: list[float], wbytes: int) -> CandidateResult:
    runs = [
        {
            **dict.fromkeys(TTFT_PARTS, t / 5),
            "ttft_ms": t,
            "decode_tok_s": d,
            "vision_slice_ms": [t / 5],
            "decode_tokens": 64,
            "n_prompt_tokens": 90,
            "n_slices": 1,
        }
        for t, d in zip(ttft, tok_s, strict=True)
    ]
    info = {
        "format": "torch",
        "quantization": "fp32",
        "size_bytes": 4_000_000,
        "weight_bytes_per_token": wbytes,
    }
    return CandidateResult(Candidate(label, kind, Path(label)), info, runs, peak_rss_mb=400.0)


def test_ratios_bound_and_reports_for_several_models(tmp_path):
    """Ratios against the first model and the bandwidth bound, from known figures (no processes)."""
    bw = Bandwidth(gbs=10.0, samples_gbs=[10.0], array_bytes=1, method="test")
    report = BenchReport(
        BenchSettings(),
        bw,
        [
            _result("a", "checkpoint", [100, 120, 110], [50, 40, 45], 10**8),
            _result("b", "bundle", [55, 50], [90, 95], 10**8),
        ],
        {"platform": "test", "cpu_count": 2, "python": "3.11", "processor": "x"},
    )
    a, b = report.to_json()["candidates"]
    assert a["ttft_ms"] == {"median": 110.0, "min": 100.0, "max": 120.0}
    assert b["ratios"]["ttft_ms"] == pytest.approx(52.5 / 110) and b["ratios"][
        "decode_tok_s"
    ] == pytest.approx(92.5 / 45)
    assert a["bandwidth_bound_tok_s"] == pytest.approx(100.0) and b["bandwidth_fraction"] == pytest.approx(
        0.925
    )
    text = report.to_markdown()
    assert "| b (torch, fp32) |" in text and "Ratios against a" in text
    with Image.open(report.plot(tmp_path / "p.png")) as png:
        assert png.format == "PNG"


def test_bench_refuses_short_decode_and_bad_bundle(tmp_path, capsys):
    assert main(["bench", "--bundle", str(tmp_path), "--new-tokens", "8"]) == 2
    assert "8 is not in the range x>=64" in capsys.readouterr().err
    assert main(["bench", "--bundle", str(tmp_path / "none"), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def _device_report(tmp_path, **changes):
    report = {
        "schema_version": 1,
        "family": "minicpm-v-4.6",
        "device": "iPhone 16 Pro Max",
        "platform": "ios",
        "bundle": {"format": "coreml", "quantization": "int4"},
        "runs": [{"ttft_ms": 1500.0, "decode_tok_s": 24.0}, {"ttft_ms": 1700.0, "decode_tok_s": 22.0}],
    }
    report.update(changes)
    path = tmp_path / "device.json"
    path.write_text(json.dumps(report))
    return path


def test_device_targets_file_has_sources():
    targets = load_device_targets()
    ids = {t["id"] for t in targets}
    assert "minicpm-v-4.0-iphone-16-pro-max" in ids
    iphone = next(t for t in targets if t["id"] == "minicpm-v-4.0-iphone-16-pro-max")
    assert iphone["metrics"] == {"ttft_ms": {"max": 2000}, "decode_tok_s": {"min": 17}}
    assert all(t["source"] and t["applies_to"] and t["metrics"] for t in targets)


def test_device_report_pass(tmp_path, capsys):
    assert main(["bench", "--device-report", str(_device_report(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert (
        "PASS    minicpm-v-4.0-iphone-16-pro-max: ttft_ms 1600.0 <= 2000 ok; decode_tok_s 23.0 >= 17 ok"
        in out
    )
    assert "SKIPPED qwen3.5-0.8b-coreai-int8-iphone" in out  # int8 target, int4 report


def test_device_report_miss_exits_1(tmp_path, capsys):
    runs = [{"ttft_ms": 2500.0, "decode_tok_s": 30.0}]
    assert main(["bench", "--device-report", str(_device_report(tmp_path, runs=runs)), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False
    iphone = next(t for t in data["targets"] if t["target"] == "minicpm-v-4.0-iphone-16-pro-max")
    assert iphone["status"] == "fail"
    assert [c["passed"] for c in iphone["checks"]] == [False, True]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schema_version": 7}, "schema_version must be 1"),
        ({"runs": []}, "runs must be a non-empty list"),
        ({"runs": [{"ttft_ms": -1, "decode_tok_s": 3}]}, "runs\\[0\\].ttft_ms must be a positive number"),
        ({"bundle": "coreml"}, "bundle must be an object"),
        ({"platform": ""}, "platform must be a non-empty string"),
    ],
)
def test_malformed_device_report_exits_2(tmp_path, capsys, changes, message):
    assert main(["bench", "--device-report", str(_device_report(tmp_path, **changes))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert __import__("re").search(message, err)


def test_android_report_checks_only_android_targets(tmp_path):
    from edge_runtime.bench import read_device_report

    report = read_device_report(_device_report(tmp_path, platform="android", device="Galaxy S23"))
    checks = {c.target: c.status for c in check_device_report(report)}
    assert checks["qwen3.5-0.8b-llamacpp-q4-phone"] == "fail"  # 23 tok/s < 41.2
    assert checks["minicpm-v-4.0-iphone-16-pro-max"] == "skipped"


def test_bench_without_a_model_benchmarks_the_demo_model(capsys):
    """As every command: no --checkpoint and no --bundle means the embedded demo model."""
    args = ["bench", "--warmup", "0", "--repeats", "1", "--threads", "1", "--max-context", "512"]
    assert main([*args, "--bandwidth-mb", "16", "--json"]) == 0
    captured = capsys.readouterr()
    (cand,) = json.loads(captured.out)["candidates"]
    assert cand["label"] == "checkpoint:demo-checkpoint"
    assert "[bench] run 1/1: checkpoint:demo-checkpoint" in captured.err
