"""One Gated DeltaNet core as an ExecuTorch program: our maths (lowered to XNNPACK) against ExecuTorch's
`llama::gated_delta_rule` kernel, for one token (decode) and a 64-token chunk (prefill).

    python tools/bench_delta_rule.py [--heads 16] [--dim 128] [--repeats 5] [--calls 20]

Both forms are lowered alone and run by ExecuTorch's Python runtime on the same inputs; prints the
median ms per call of `repeats` x `calls` and the largest output / state difference. This is the
measurement behind `DELTA_RULE_METHODS` in export/executorch/__init__.py (docs/executorch.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_runtime.models.qwen35_text import chunked_delta_rule, recurrent_delta_rule  # noqa: E402
from export.executorch.custom_ops import _op_delta_rule, register_kernels  # noqa: E402


class Ours(nn.Module):
    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rule = recurrent_delta_rule if args[0].shape[2] == 1 else chunked_delta_rule
        return rule(*args)


class Kernel(nn.Module):
    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _op_delta_rule(*args)


def inputs(heads: int, dim: int, t: int) -> tuple[torch.Tensor, ...]:
    """Normalised q (scaled) and k, log decay g < 0, beta in (0, 1), a small state."""
    torch.manual_seed(0)
    q = nn.functional.normalize(torch.randn(1, heads, t, dim), dim=-1) * dim**-0.5
    k = nn.functional.normalize(torch.randn(1, heads, t, dim), dim=-1)
    return (
        q,
        k,
        torch.randn(1, heads, t, dim),
        -torch.rand(1, heads, t),
        torch.rand(1, heads, t),
        0.1 * torch.randn(1, heads, dim, dim),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    register_kernels()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    for t in (1, 64):
        example = inputs(args.heads, args.dim, t)
        outs = {}
        for label, module in (("ours (XNNPACK)", Ours()), ("llama::gated_delta_rule", Kernel())):
            program = to_edge_transform_and_lower(
                torch.export.export(module, example),
                partitioner=[XnnpackPartitioner()],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            ).to_executorch()
            method = runtime.load_program(program.buffer).load_method("forward")
            outs[label] = method.execute(list(example))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.calls):
                    method.execute(list(example))
                times.append((time.perf_counter() - start) / args.calls * 1e3)
            print(f"T={t:<3} {label:<24} {statistics.median(times):.3f} ms")
        a, b = outs.values()
        print(
            f"T={t:<3} max |diff| out {(a[0] - b[0]).abs().max():.2e}, state {(a[1] - b[1]).abs().max():.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
