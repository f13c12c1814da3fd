"""Ground truth for the chunked gated delta rule: the recurrence itself in float64, the inverse the
runtime used before issue 26 (kept only as a baseline that fails), and inputs that break unstable
forms. Used by tests/test_delta_rule_stability.py and tools/bench_chunked_inverse.py."""

from __future__ import annotations

import math

import torch

from edge_runtime.models.qwen35_text import l2norm


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
