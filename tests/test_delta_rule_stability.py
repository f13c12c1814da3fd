"""Every chunked / fused gated delta rule we ship against a float64 token-by-token recurrence, on the
inputs that break unstable forms: near-parallel keys inside a chunk, beta near 1, slow decay (as
trained DeltaNet heads keep for long memory), long sequences, chunk sizes that are not powers of
two, padded tails and a non-zero starting state.

The ground truth is the definition of the recurrence in float64 (S = e^g S; S += k beta (v - k^T S);
o = q^T S), written here and nowhere else. The Neumann-product inverse the runtime used before
issue 26 is kept in this file only to show that these inputs are hard: it is off by orders of
magnitude on them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import helper

from edge_runtime.models.qwen35_text import (
    chunked_delta_rule,
    l2norm,
    recurrent_delta_rule,
    unit_lower_inverse,
)

TOLERANCE = 2e-5  # outputs and states are O(1); float32 forms that are stable land near 1e-6


def recurrence_float64(q, k, v, g, beta, state):
    """The gated delta rule token by token in float64: the definition, not an optimised form."""
    q, k, v, g, beta, state = (x.double() for x in (q, k, v, g, beta, state))
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        remembered = (k[:, :, t].unsqueeze(-2) @ state).squeeze(-2)
        delta = (v[:, :, t] - remembered) * beta[:, :, t, None]
        state = state + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append((q[:, :, t].unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outs, dim=2), state


def neumann_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """The pre-issue-26 form: (I + A)^-1 = (I - A)(I + A^2)(I + A^4)..., unstable in float32."""
    c = strict_lower.shape[-1]
    power = -strict_lower
    result = torch.eye(c) + power
    for _ in range(max(math.ceil(math.log2(c)) - 1, 0)):
        power = power @ power
        result = result + result @ power
    return result


def make_inputs(
    t: int,
    *,
    heads: int = 4,
    dim: int = 32,
    key_noise: float | None = 0.3,
    log_decay: float | None = -0.02,
    beta: float | None = 0.9,
    pad: int = 0,
    state_scale: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """q (normalised and scaled), k, v, g, beta, state. `key_noise` None gives independent random
    keys; otherwise every key of a head is one direction plus that much noise (near-parallel).
    `log_decay` / `beta` None draw them per head and token like a trained model (A log-uniform in
    [1e-3, 16], so many heads barely decay; beta in (0.5, 1)). The last `pad` tokens are padding."""
    gen = torch.Generator().manual_seed(seed)
    if key_noise is None:
        k = torch.randn(1, heads, t, dim, generator=gen)
    else:
        k = torch.randn(1, heads, 1, dim, generator=gen) + key_noise * torch.randn(
            1, heads, t, dim, generator=gen
        )
    k = l2norm(k)
    q = l2norm(torch.randn(1, heads, t, dim, generator=gen)) * dim**-0.5
    v = torch.randn(1, heads, t, dim, generator=gen)
    if log_decay is None:
        a = torch.exp(torch.empty(1, heads, 1).uniform_(math.log(1e-3), math.log(16.0), generator=gen))
        g = -a * torch.nn.functional.softplus(torch.randn(1, heads, t, generator=gen) + 1.0)
    else:
        g = torch.full((1, heads, t), log_decay)
    b = (
        torch.empty(1, heads, t).uniform_(0.5, 1.0, generator=gen)
        if beta is None
        else torch.full((1, heads, t), beta)
    )
    valid = (torch.arange(t) < t - pad).float()
    state = state_scale * torch.randn(1, heads, dim, dim, generator=gen)
    return q, k, v, g * valid, b * valid, state


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
