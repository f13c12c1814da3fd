"""RMS norms that fp16 compute cannot overflow, swapped in while the Core ML decoder is traced.

Why: Core ML runs the decoder in fp16, and `x.pow(2)` of an RMSNorm overflows once a residual-stream
value passes 255.9 (256^2 > 65504, fp16's largest). `mean(inf)` is inf, rsqrt gives 0, and the norm
returns zeros: the logits of that step are all 0. Trained checkpoints get there (the MiniCPM-V 2.0
demo model's residual stream reaches ~380 at its first decode step; real LLMs carry outlier
channels in the hundreds to thousands), random tiny presets do not.

The swapped forms divide by the row's largest magnitude m = max(|x|, 1) first:
    x * rsqrt(mean(x^2) + eps) = (x/m) * rsqrt(mean((x/m)^2) + eps/m^2)
which is the same function (exactly, in real arithmetic) whose squares stay <= 1. With m = 1 (every
|x| <= 1) it is the reference formula itself. eps/m^2 may underflow to 0 in fp16, which only
matters where mean((x/m)^2) is itself near eps, and it is at least 1/d since one entry is +-1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.blocks import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm


def scaled_rms_normalize(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis, with no square above 1."""
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1.0)
    xs = xf / scale
    return xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps / (scale * scale))


class ScaledRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * scaled_rms_normalize(x.float(), self.eps)).to(x.dtype)


class ScaledZeroCenteredRMSNorm(ZeroCenteredRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = scaled_rms_normalize(x.float(), self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class ScaledGatedRMSNorm(GatedRMSNorm):
    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.weight * scaled_rms_normalize(x.float(), self.eps).to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)


SCALED = {
    RMSNorm: ScaledRMSNorm,
    ZeroCenteredRMSNorm: ScaledZeroCenteredRMSNorm,
    GatedRMSNorm: ScaledGatedRMSNorm,
}


@contextlib.contextmanager
def fp16_safe_norms(model: nn.Module) -> Iterator[None]:
    """Every RMS norm of `model` computes the scaled form inside the block; the classes are restored
    on exit (the weights are untouched, so the PyTorch model stays the reference)."""
    swapped = [(m, type(m)) for m in model.modules() if type(m) in SCALED]
    try:
        for module, cls in swapped:
            module.__class__ = SCALED[cls]
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls
