"""tools/bench_matmul_kernels.py: every variant computes the product of the weights it stores."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_matmul_kernels as bmk  # noqa: E402


def test_variants_compute_their_stored_weights_and_errors_rank_by_arithmetic():
    report = bmk.measure(8, 128, 64, threads=1, repeats=1, say=lambda _: None)
    err = {name: r["relative_error_vs_float64"] for name, r in report["variants"].items()}
    # fp32 arithmetic on exactly decoded weights: float32 rounding only (so the packing is right)
    for name in ("fp32 MatMul", "MatMulNBits 8-bit, level 0", "MatMulNBits 4-bit, level 0"):
        assert err[name] < 1e-5, (name, err[name])
    # int8 activations per block of 32 lose more; one uint8 scale for the whole tensor more still
    assert 1e-5 < err["MatMulNBits 4-bit, level 4"] < err["DynamicQuantizeMatMul (uint8 per tensor)"]
    assert all(r["gflops"] > 0 for r in report["variants"].values())
    assert "| MatMulNBits 8-bit, level 4 |" in bmk.to_markdown(report)


def test_bad_shape_is_one_line(capsys):
    assert bmk.main(["--k", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 32" in err[0]
