"""ExecuTorch's own LLM kernel for the gated delta rule, swapped into the decoder methods at export.

`llama::gated_delta_rule(q, k, v, decay, beta, state) -> (out, new_state)` (executorch
extension/llm/custom_ops) runs the same recurrence as our `recurrent_delta_rule` /
`chunked_delta_rule` (S = decay S; S += k beta (v - k^T S); o = q^T S) token by token in one C++
kernel, with the decay already exponentiated. It is not an XNNPACK op: the method calls it between
delegates, and a runtime must have the kernel registered (the Python runtime: import
`executorch.extension.llm.custom_ops.custom_ops` before loading the program; an Android app links
`custom_ops`). Padded prefill rows have beta = 0 and decay = exp(0) = 1, so they leave the state
untouched, as in the reference.

Which methods use it is a measured choice (DELTA_RULE_METHODS in __init__.py); see docs/executorch.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from edge_runtime.models import qwen35_text

OP_NAME = "llama::gated_delta_rule"


def register_kernels() -> None:
    """Load ExecuTorch's LLM custom-op library (torch op + ExecuTorch kernel registrations)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def _op_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as qwen35_text.chunked_delta_rule (g: log decay [1, H, T])."""
    return torch.ops.llama.gated_delta_rule(
        q.contiguous(), k.contiguous(), v.contiguous(), g.exp(), beta.contiguous(), state.contiguous()
    )


@contextlib.contextmanager
def delta_rule_op(enabled: bool) -> Iterator[None]:
    """While active (and `enabled`), every GatedDeltaNet calls the ExecuTorch kernel instead of our
    recurrent / chunked maths; the reference functions are restored afterwards."""
    if not enabled:
        yield
        return
    register_kernels()
    saved = qwen35_text.recurrent_delta_rule, qwen35_text.chunked_delta_rule
    qwen35_text.recurrent_delta_rule = qwen35_text.chunked_delta_rule = _op_delta_rule
    try:
        yield
    finally:
        qwen35_text.recurrent_delta_rule, qwen35_text.chunked_delta_rule = saved
