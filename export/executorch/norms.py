"""Norms XNNPACK can take whole, swapped in while the ExecuTorch methods are traced.

Why: XNNPACK has no kernel for a mean over the last axis of a [1, T, D] tensor (its mean is a 4-D
global pooling) nor for `native_layer_norm`, so every RMSNorm's `mean(x^2)` and every vision
LayerNorm stayed on ExecuTorch's portable kernels: 79 `mean` nodes in each decoder method and 58
layer norms in the vision methods of the full preset (docs/executorch.md). Each one also splits the
method's XNNPACK delegate in two, so a decode step made ~160 delegate calls instead of a few.

The swapped forms compute the same means as a fully connected layer with a constant weight of 1/D,
which XNNPACK runs:
    mean(y, -1) = linear(y, W) with W = [1/D] * D     (exact up to fp32 summation order)
so RMSNorm is x * rsqrt(linear(x^2, W) + eps) and LayerNorm is
(x - linear(x, W)) * rsqrt(linear((x - mu)^2, W) + eps) * w + b; DeltaNet's q / k l2norm (36
`sum` nodes per decoder method) takes sum(x^2) = linear(x^2, ones) the same way. The weights are untouched; the
classes and the constant buffers are restored / removed on exit, so the PyTorch model stays the
reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.models.blocks import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm

MEAN_BUFFER = "_mean_weight"


def _mean_last(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """mean(y, -1, keepdim=True) as a linear layer (the module's constant 1/D row)."""
    return F.linear(y, getattr(module, MEAN_BUFFER))


def _rms_normalize(module: nn.Module, xf: torch.Tensor, eps: float) -> torch.Tensor:
    return xf * torch.rsqrt(_mean_last(module, xf * xf) + eps)


class LinearMeanRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * _rms_normalize(self, x.float(), self.eps)).to(x.dtype)


class LinearMeanZeroCenteredRMSNorm(ZeroCenteredRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _rms_normalize(self, x.float(), self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class LinearMeanGatedRMSNorm(GatedRMSNorm):
    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.weight * _rms_normalize(self, x.float(), self.eps).to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)


class LinearMeanLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - _mean_last(self, x)
        out = centred * torch.rsqrt(_mean_last(self, centred * centred) + self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out + self.bias if self.bias is not None else out


SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    RMSNorm: LinearMeanRMSNorm,
    ZeroCenteredRMSNorm: LinearMeanZeroCenteredRMSNorm,
    GatedRMSNorm: LinearMeanGatedRMSNorm,
    nn.LayerNorm: LinearMeanLayerNorm,
}


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        (width,) = module.normalized_shape  # a norm over more than the last axis is not swapped
        return int(width)
    return int(module.weight.shape[-1])


ONES_BUFFER = "_l2norm_ones"
# key width -> the DeltaNet layer holding that width's ones row as a buffer: read through the module
# at call time, so torch.export sees a registered buffer (a bare tensor would be a lifted constant,
# which the XNNPACK lowering cannot place)
_ONES_OWNER: dict[int, nn.Module] = {}


def linear_sum_l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """qwen35_text.l2norm (DeltaNet q / k) with its sum(x^2) as a linear layer of ones."""
    owner = _ONES_OWNER.get(x.shape[-1])
    if owner is None:  # a width delegable_norms did not see: the reference form
        return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
    return x * torch.rsqrt(F.linear(x * x, getattr(owner, ONES_BUFFER).to(x.dtype)) + eps)


def delegable_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = relu(x) + log(1 + exp(-|x|)) in relu, abs, neg, exp, add and log, all XNNPACK
    operators. torch's form, where(x > 20, x, log1p(exp(x))), leaves gt / where / log1p to portable
    kernels, splitting each decoder method's delegate once per DeltaNet layer. The two agree within
    fp32 rounding: 1.2e-7 absolute plus 1.2e-7 relative (tests/test_executorch_norms.py)."""
    return F.relu(x) + torch.log(torch.exp(-torch.abs(x)) + 1.0)


@contextlib.contextmanager
def delegable_norms(model: nn.Module) -> Iterator[None]:
    """Every RMS norm and last-axis LayerNorm of `model` computes its means as linear layers, and so
    does the DeltaNet q / k l2norm; the DeltaNet decay's softplus takes its delegable form (both
    module-level functions of qwen35_text, swapped for the duration)."""
    from edge_runtime.models import qwen35_text

    swapped = [
        (m, type(m))
        for m in model.modules()
        if type(m) in SWAPS and not (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1)
    ]
    reference_l2norm, reference_softplus = qwen35_text.l2norm, qwen35_text.softplus
    owners = {}
    for module in model.modules():
        width = getattr(module, "d_k", None)
        if isinstance(width, int) and width not in owners:
            owners[width] = module
    try:
        for width, module in owners.items():
            module.register_buffer(ONES_BUFFER, torch.ones(1, width), persistent=False)
            _ONES_OWNER[width] = module
        qwen35_text.l2norm = linear_sum_l2norm
        qwen35_text.softplus = delegable_softplus
        for module, cls in swapped:
            width = _width(module)
            module.register_buffer(MEAN_BUFFER, torch.full((1, width), 1.0 / width), persistent=False)
            module.__class__ = SWAPS[cls]
        yield
    finally:
        qwen35_text.l2norm, qwen35_text.softplus = reference_l2norm, reference_softplus
        for width, module in owners.items():
            _ONES_OWNER.pop(width, None)
            module._buffers.pop(ONES_BUFFER, None)
        for module, cls in swapped:
            module.__class__ = cls
            module._buffers.pop(MEAN_BUFFER, None)
