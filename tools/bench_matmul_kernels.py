"""onnxruntime's CPU matmul kernels at one shape: which weight format computes fastest, and how exactly.

    python tools/bench_matmul_kernels.py [--m 1024 --k 1152 --n 4304] [--threads 2] [--repeats 5]

Why: the ONNX bundle's vision graph is compute-bound (1024 patches per 448x448 slice), and its int8
weights run as onnxruntime's 8-bit `MatMulNBits` after the DequantizeLinear + MatMul fusion; whether
another formulation of the same weights would be faster on this CPU is a kernel question, answered
here on one isolated node per variant (random weights, a fixed input with a few outlier channels as
activations of real transformers have). Variants, all with weights of the same int8 / int4 grid
family a bundle would store:

| variant | weights | arithmetic |
|---|---|---|
| fp32 MatMul | fp32 (what a dequantized copy would cost in memory) | fp32 |
| MatMulNBits 8-bit, level 0 / 4 | int8 blocks of 32 | fp32 / int8 activations per block |
| MatMulNBits 4-bit, level 0 / 4 | int4 blocks of 32 | fp32 / int8 activations per block |
| DynamicQuantizeMatMul | int8 per column | activations uint8 per tensor |

Each variant is timed interleaved with the others (`--repeats` rounds, median), and its output is
compared with a float64 product of the same dequantized weights, so the error column is the
arithmetic's own, not the weight quantization's. Prints a markdown table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 32
MS = "com.microsoft"


@dataclass
class Variant:
    name: str
    session: ort.InferenceSession
    weights_f64: np.ndarray  # [K, N], what the stored weights decode to


def _session(nodes: list, inits: list, m: int, k: int, n: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _blocks(w_kn: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric blocks of 32 along K per output column: (packed [N, K/32, 32*bits/8] uint8,
    scales [N * K/32], dequantized [K, N])."""
    k, n = w_kn.shape
    qmax, zero = (127, 128) if bits == 8 else (7, 8)
    blocks = w_kn.T.reshape(n, k // BLOCK, BLOCK)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale), -qmax, qmax).astype(np.int32) + zero
    deq = ((q - zero) * scale).reshape(n, k).T.astype(np.float64)
    if bits == 8:
        packed = q.astype(np.uint8)
    else:
        u = q.astype(np.uint8)
        packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1), deq


def variants(m: int, k: int, n: int, threads: int, seed: int = 0) -> list[Variant]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    out: list[Variant] = []
    out.append(
        Variant(
            "fp32 MatMul",
            _session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")], m, k, n, threads),
            w.astype(np.float64),
        )
    )  # fmt: skip
    for bits in (8, 4):
        packed, scale, deq = _blocks(w, bits)
        for level in (0, 4):
            node = helper.make_node(
                "MatMulNBits", ["x", "q", "s"], ["y"], domain=MS,
                K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=level,
            )  # fmt: skip
            inits = [numpy_helper.from_array(packed, "q"), numpy_helper.from_array(scale, "s")]
            out.append(
                Variant(
                    f"MatMulNBits {bits}-bit, level {level}", _session([node], inits, m, k, n, threads), deq
                )
            )
    col_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q8 = np.clip(np.rint(w / col_scale), -127, 127).astype(np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s", "z"], ["y"], domain=MS)
    inits = [
        numpy_helper.from_array(q8, "q"),
        numpy_helper.from_array(col_scale, "s"),
        numpy_helper.from_array(np.zeros(n, np.int8), "z"),
    ]
    deq = q8.astype(np.float64) * col_scale.astype(np.float64)
    out.append(
        Variant("DynamicQuantizeMatMul (uint8 per tensor)", _session([node], inits, m, k, n, threads), deq)
    )
    return out


def activations(m: int, k: int, seed: int = 1) -> np.ndarray:
    """Unit-scale activations with 4 outlier channels 20x larger (as transformer residuals have)."""
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    x[:, :4] *= 20.0
    return x


def measure(m: int, k: int, n: int, threads: int, repeats: int, say: Callable[[str], None]) -> dict:
    x = activations(m, k)
    found = variants(m, k, n, threads)
    times: dict[str, list[float]] = {v.name: [] for v in found}
    errors: dict[str, float] = {}
    for v in found:
        y = v.session.run(None, {"x": x})[0]  # warm-up (prepacking) and the exactness check
        ref = x.astype(np.float64) @ v.weights_f64
        errors[v.name] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    for r in range(repeats):
        for v in found:
            t0 = time.perf_counter()
            v.session.run(None, {"x": x})
            times[v.name].append((time.perf_counter() - t0) * 1000)
        say(f"round {r + 1}/{repeats} done")
    flops = 2.0 * m * k * n
    rows = {}
    for v in found:
        ms = statistics.median(times[v.name])
        rows[v.name] = {
            "ms_median": ms,
            "ms_min": min(times[v.name]),
            "ms_max": max(times[v.name]),
            "gflops": flops / (ms / 1000) / 1e9,
            "relative_error_vs_float64": errors[v.name],
        }
    return {
        "schema": "minicpmv-edge/bench-matmul-kernels/1",
        "shape": {"m": m, "k": k, "n": n},
        "threads": threads,
        "repeats": repeats,
        "onnxruntime": ort.__version__,
        "variants": rows,
    }


def to_markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"M={s['m']} K={s['k']} N={s['n']}, {report['threads']} threads, onnxruntime {report['onnxruntime']}, "
        f"median of {report['repeats']} interleaved rounds",
        "",
        "| variant | ms (min-max) | GFLOP/s | relative error vs float64 |",
        "|---|---|---|---|",
    ]
    for name, r in report["variants"].items():
        lines.append(
            f"| {name} | {r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['gflops']:.0f} | "
            f"{r['relative_error_vs_float64']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1024, help="rows (1024 = one 448x448 slice's patches)")
    parser.add_argument("--k", type=int, default=1152, help="input width (multiple of 32)")
    parser.add_argument("--n", type=int, default=4304, help="output width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.k % BLOCK or min(args.m, args.k, args.n, args.threads, args.repeats) < 1:
        print(
            f"error: --m, --n, --threads, --repeats must be positive and --k a multiple of {BLOCK}",
            file=sys.stderr,
        )
        return 2
    report = measure(args.m, args.k, args.n, args.threads, args.repeats, lambda m: print(m, file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
