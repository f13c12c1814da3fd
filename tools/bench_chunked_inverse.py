"""The chunked DeltaNet's UT inverse before and after issue 26: accuracy against a float64 recurrence,
and prefill time at the released widths (16 heads, d_k = d_v = 128, chunk 64).

    python tools/bench_chunked_inverse.py [--threads 1] [--repeats 7] [--tokens 64 512]

`neumann` is the form the runtime used before ((I - A)(I + A^2)(I + A^4)..., kept here only as the
baseline); `blocked` is today's `qwen35_text.unit_lower_inverse` (recursive block doubling). Both run
the same `chunked_delta_rule`, interleaved run by run; times are medians. A third timing runs one
whole decoder (3 DeltaNet layers + 1 attention layer at the released widths, random weights) through
a chunked prefill, the cost a user sees.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from delta_rule_reference import make_inputs, neumann_inverse, recurrence_float64  # noqa: E402

from edge_runtime.models import qwen35_text  # noqa: E402
from edge_runtime.models.qwen35_text import TextConfig  # noqa: E402

BLOCKED = qwen35_text.unit_lower_inverse


FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"neumann": neumann_inverse, "blocked": BLOCKED}


ACCURACY_CASES = {
    "random keys, fast decay (g=-1, beta=0.5)": (None, -1.0, 0.5),
    "random keys, slow decay (g=-0.001, beta=0.95)": (None, -1e-3, 0.95),
    "near-parallel keys (noise 0.3, g=-0.02, beta=0.9)": (0.3, -0.02, 0.9),
    "near-parallel keys (noise 0.05, g=-1e-4, beta=0.999)": (0.05, -1e-4, 0.999),
}


def with_form(name: str):
    qwen35_text.unit_lower_inverse = FORMS[name]


def accuracy(t: int) -> None:
    print(f"max |error| against a float64 recurrence, T={t}, 16 heads x 128:")
    for label, (noise, g, b) in ACCURACY_CASES.items():
        args = make_inputs(t, heads=16, dim=128, key_noise=noise, log_decay=g, beta=b)
        want_out, want_state = recurrence_float64(*args)
        row = []
        for name in FORMS:
            with_form(name)
            out, state = qwen35_text.chunked_delta_rule(*args)
            err = max(
                float((out.double() - want_out).abs().max()), float((state.double() - want_state).abs().max())
            )
            row.append(f"{name} {err:.2e}")
        print(f"  {label:<55} " + "   ".join(row))


def median_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def timing(label: str, run: Callable[[], object], repeats: int, calls: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    with torch.no_grad():
        for name in FORMS:  # warm-up
            with_form(name)
            run()
        for _ in range(repeats):
            for name in FORMS:
                with_form(name)
                times[name].append(median_ms(run, calls))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"  {label:<48} neumann {med['neumann']:8.2f} ms   blocked {med['blocked']:8.2f} ms   "
          f"blocked / neumann {med['blocked'] / med['neumann']:.3f}")  # fmt: skip


def decoder_prefill(t: int) -> Callable[[], object]:
    cfg = TextConfig(vocab_size=1024, num_hidden_layers=4)  # released widths, 3 DeltaNet + 1 attention
    torch.manual_seed(0)
    model = qwen35_text.Qwen35TextModel(cfg).eval()
    for m in model.modules():
        if isinstance(m, qwen35_text.GatedDeltaNet):
            m.A_log.data.uniform_(math.log(1e-3), math.log(16.0))
    state = [torch.zeros(s.shape, dtype=s.dtype) for s in qwen35_text.state_specs(cfg, t + 64)]
    embeds = torch.randn(1, t, cfg.hidden_size) * 0.1

    def run():
        s = state
        for begin in range(0, t, 64):
            _, s = model(embeds[:, begin : begin + 64], torch.tensor([begin]), torch.tensor([64]), s)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accuracy(256)
    print(f"time, {args.threads} thread(s), medians of {args.repeats} interleaved runs:")
    for t in args.tokens:
        core = make_inputs(t, heads=16, dim=128, key_noise=None, log_decay=-0.1, beta=0.9)
        timing(
            f"chunked_delta_rule T={t}",
            lambda core=core: qwen35_text.chunked_delta_rule(*core),
            args.repeats,
            20,
        )
    for t in args.tokens:
        timing(f"decoder prefill (3 DeltaNet + 1 attn) T={t}", decoder_prefill(t), args.repeats, 3)
    qwen35_text.unit_lower_inverse = BLOCKED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
