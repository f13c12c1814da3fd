"""Every chunked / fused gated delta rule we ship against a float64 token-by-token recurrence, on the
inputs that break unstable forms: near-parallel keys inside a chunk, beta near 1, slow decay (as
trained DeltaNet heads keep for long memory), long sequences, chunk sizes that are not powers of
two, padded tails and a non-zero starting state.

The ground truth is the definition of the recurrence in float64 (S = e^g S; S += k beta (v - k^T S);
o = q^T S) in tools/delta_rule_reference.py, beside the Neumann-product inverse the runtime used
before issue 26, kept only to show that these inputs are hard: it is off by orders of magnitude.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper

from edge_runtime.models.qwen35_text import chunked_delta_rule, recurrent_delta_rule, unit_lower_inverse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from delta_rule_reference import make_inputs, neumann_inverse, recurrence_float64  # noqa: E402

TOLERANCE = 2e-5  # outputs and states are O(1); float32 forms that are stable land near 1e-6


CASES = {
    "parallel-keys": dict(t=256),  # issue 26's reproduction
    "beta-to-1-no-decay": dict(t=192, key_noise=0.05, log_decay=-1e-4, beta=0.999),
    "beta-1-zero-decay": dict(t=128, key_noise=0.1, log_decay=0.0, beta=1.0, state_scale=0.5),
    "trained-like-long": dict(t=1000, key_noise=0.5, log_decay=None, beta=None, state_scale=0.5, seed=1),
    "random-keys-slow": dict(t=300, key_noise=None, log_decay=-1e-3, beta=0.95, seed=2),
    "padded-tail": dict(t=150, pad=22, log_decay=-5e-3, beta=0.95, state_scale=0.3, seed=3),
    "odd-chunk-37": dict(t=37, key_noise=0.1, log_decay=-1e-3, beta=0.97, seed=4),
    "odd-chunk-10": dict(t=10, key_noise=0.1, log_decay=-1e-3, beta=0.97, seed=5),
}


def _max_errors(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    return tuple(float((a.double() - b).abs().max()) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_rule_matches_float64_recurrence(case):
    inputs = make_inputs(**CASES[case])
    want = recurrence_float64(*inputs)
    out_err, state_err = _max_errors(chunked_delta_rule(*inputs), want)
    assert out_err < TOLERANCE and state_err < TOLERANCE, (case, out_err, state_err)


def test_padded_tail_leaves_state_as_the_valid_tokens_left_it():
    inputs = make_inputs(**CASES["padded-tail"])
    n = 150 - 22
    q, k, v, g, beta, state0 = inputs
    want_out, want_state = recurrence_float64(*(x[:, :, :n] for x in (q, k, v, g, beta)), state0)
    out, state = chunked_delta_rule(*inputs)
    assert float((state.double() - want_state).abs().max()) < TOLERANCE
    assert float((out[:, :, :n].double() - want_out).abs().max()) < TOLERANCE


def test_one_token_rule_matches_float64_recurrence():
    inputs = make_inputs(**{**CASES["beta-1-zero-decay"], "t": 64})
    state = inputs[5]
    for t in range(64):  # decode token by token from the carried state
        _, state = recurrent_delta_rule(*(x[:, :, t : t + 1] for x in inputs[:5]), state)
    _, want = recurrence_float64(*inputs)
    assert float((state.double() - want).abs().max()) < TOLERANCE


@pytest.mark.parametrize("c", [2, 3, 10, 37, 64])
def test_inverse_is_the_inverse(c):
    """Block doubling inverts I + A for any chunk length, not only powers of two."""
    torch.manual_seed(c)
    a = (0.9 * torch.rand(2, c, c, dtype=torch.float64)).tril(-1)
    eye = torch.eye(c, dtype=torch.float64)
    assert torch.allclose(unit_lower_inverse(a) @ (eye + a), eye.expand(2, c, c), atol=1e-10)


def test_the_cases_break_the_neumann_form(monkeypatch):
    """Teeth: with the replaced inverse the same check fails by far more than its tolerance."""
    from edge_runtime.models import qwen35_text

    monkeypatch.setattr(qwen35_text, "unit_lower_inverse", neumann_inverse)
    inputs = make_inputs(**CASES["parallel-keys"])
    out_err, _ = _max_errors(qwen35_text.chunked_delta_rule(*inputs), recurrence_float64(*inputs))
    assert not out_err < 1.0, out_err  # NaN or huge


@pytest.mark.parametrize("case", ["parallel-keys", "beta-to-1-no-decay", "trained-like-long", "padded-tail"])
def test_onnxruntime_linear_attention_matches_float64_recurrence(case):
    """The ONNX bundles' fused prefill runs onnxruntime's own LinearAttention kernel."""
    from test_onnx_fuse import MS, _one_node

    q, k, v, g, beta, state = make_inputs(**CASES[case])
    heads, t = q.shape[1], q.shape[2]
    pack = lambda x: x.transpose(1, 2).reshape(1, t, -1).numpy()  # noqa: E731
    node = helper.make_node("LinearAttention", ["q", "k", "v", "s", "g", "b"], ["o", "s2"], domain=MS,
                            q_num_heads=heads, kv_num_heads=heads, update_rule="gated_delta", scale=1.0)  # fmt: skip
    feeds = {"q": pack(q), "k": pack(k), "v": pack(v), "s": state.numpy(), "g": pack(g[..., None]),
             "b": pack(beta[..., None])}  # fmt: skip
    out, new_state = _one_node(node, feeds, 2)
    want_out, want_state = recurrence_float64(q, k, v, g, beta, state)
    assert np.abs(out - pack(want_out)).max() < TOLERANCE
    assert np.abs(new_state - want_state.numpy()).max() < TOLERANCE


@pytest.mark.parametrize("case", ["parallel-keys", "beta-to-1-no-decay", "padded-tail"])
def test_executorch_kernel_matches_float64_recurrence(case):
    """The ExecuTorch bundles' prefill and decode run `llama::gated_delta_rule`."""
    pytest.importorskip("executorch")
    from export.executorch.custom_ops import _op_delta_rule, register_kernels

    register_kernels()
    inputs = make_inputs(**CASES[case])
    out_err, state_err = _max_errors(_op_delta_rule(*inputs), recurrence_float64(*inputs))
    assert out_err < TOLERANCE and state_err < TOLERANCE, (out_err, state_err)
