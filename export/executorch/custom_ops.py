"""ExecuTorch's own LLM kernels, swapped into the decoder methods at export: the gated delta rule, and
the KV-cache update plus SDPA of the attention layers.

`llama::gated_delta_rule(q, k, v, decay, beta, state) -> (out, new_state)` (executorch
extension/llm/custom_ops) runs the same recurrence as our `recurrent_delta_rule` /
`chunked_delta_rule` (S = decay S; S += k beta (v - k^T S); o = q^T S) token by token in one C++
kernel, with the decay already exponentiated. It is not an XNNPACK op: the method calls it between
delegates, and a runtime must have the kernel registered (the Python runtime: import
`executorch.extension.llm.custom_ops.custom_ops` before loading the program; an Android app links
`custom_ops`). Padded prefill rows have beta = 0 and decay = exp(0) = 1, so they leave the state
untouched, as in the reference.

`llama::update_cache(value, cache, start_pos)` writes rows in place into a cache laid out
[1, S, n_kv, D], and `llama::custom_sdpa(q, k_cache, v_cache, start_pos, mask, dropout, is_causal,
scale)` attends causally over positions 0 .. start_pos + T - 1 only, reading the grouped K/V heads
without expanding them. Our reference (`qwen35_text.cached_attention`) instead copies the whole
functional cache, repeats K/V per query head and multiplies over all S positions; at S = 4160 that
was most of a full-preset decode step (docs/executorch.md). The in-place update needs the state
buffers in the kernel's [1, S, n_kv, D] layout, which `StatefulDecoder` uses when the attention
kernels are on (the state lives inside the program, so no caller sees the layout).

Which methods use which kernel is a measured choice (__init__.py); see docs/executorch.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from edge_runtime.models import qwen35_text

OP_NAME = "llama::gated_delta_rule"
ATTENTION_OPS = ("llama::update_cache", "llama::custom_sdpa")


def register_kernels() -> None:
    """Load ExecuTorch's LLM custom-op library (torch op + ExecuTorch kernel registrations)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


# Absolute positions of the tokens of the decoder call being traced (a stack: innermost wins). Set
# by `fresh_state_at_position_zero`; `_op_delta_rule` zeroes the recurrent state before a token at
# position 0 through that token's decay.
_POSITIONS: list[torch.Tensor] = []


@contextlib.contextmanager
def fresh_state_at_position_zero(positions: torch.Tensor) -> Iterator[None]:
    """While active, the kernel's decay of a token at absolute position 0 is 0: the recurrence
    S = decay * S + k (x) delta then starts that token from an empty state, so a call at
    start_pos 0 begins a new sequence whatever the buffers held. Folding the reset into the
    [1, H, T] decay costs nothing per call; zeroing the [1, H, d_k, d_v] state itself would stream
    it once more per layer per decoded token."""
    _POSITIONS.append(positions)
    try:
        yield
    finally:
        _POSITIONS.pop()


def _op_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as qwen35_text.delta_rule (g: log decay [1, H, T]), any T."""
    decay = g.exp()
    if _POSITIONS:
        decay = decay * (_POSITIONS[-1] != 0).to(decay.dtype)
    return torch.ops.llama.gated_delta_rule(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        decay.contiguous(),
        beta.contiguous(),
        state.contiguous(),
    )


@contextlib.contextmanager
def delta_rule_op(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), every GatedDeltaNet calls the ExecuTorch kernel instead of our
    recurrent / chunked maths, for every T; the reference function is restored afterwards."""
    if not enabled:
        yield
        return
    register_kernels()
    saved = qwen35_text.delta_rule
    qwen35_text.delta_rule = _op_delta_rule
    try:
        yield
    finally:
        qwen35_text.delta_rule = saved


def _op_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as qwen35_text.cached_attention, but the caches are [1, S, n_kv, D] buffers
    updated in place (returned as they are, so the caller skips its write-back)."""
    n_heads, t, head_dim = q.shape[1], q.shape[2], q.shape[3]
    start = positions[0].item()
    torch._check(start >= 0)
    torch._check(start + t <= k_cache.shape[1])
    torch.ops.llama.update_cache(k.transpose(1, 2).to(k_cache.dtype).contiguous(), k_cache, start)
    torch.ops.llama.update_cache(v.transpose(1, 2).to(v_cache.dtype).contiguous(), v_cache, start)
    out = torch.ops.llama.custom_sdpa(
        q.transpose(1, 2).contiguous(), k_cache, v_cache, start, None, 0.0, True, head_dim**-0.5
    )
    return out.reshape(1, t, n_heads * head_dim), k_cache, v_cache


@contextlib.contextmanager
def attention_ops(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), every GatedAttention updates its cache and attends through
    ExecuTorch's kernels; the caches passed in must be in the [1, S, n_kv, D] layout."""
    if not enabled:
        yield
        return
    register_kernels()
    saved = qwen35_text.cached_attention
    qwen35_text.cached_attention = _op_cached_attention
    try:
        yield
    finally:
        qwen35_text.cached_attention = saved
