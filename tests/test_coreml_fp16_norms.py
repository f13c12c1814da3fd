"""RMS norms in Core ML's fp16 compute (export/coreml/norms.py).

fp16 `x^2` overflows once |x| passes 256, so the reference formula returns zeros on rows that
trained residual streams reach (found on the trained MiniCPM-V 2.0 demo model: its first decode
step's logits were all 0 through our MIL executor). The swapped, scaled forms must match the fp32
reference there, and the plain forms must not (so this test can fail).
"""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch
from torch import nn

from edge_runtime.backends.coreml.executor import MILProgram
from edge_runtime.models.blocks import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm
from export.coreml.lower import export_program
from export.coreml.norms import fp16_safe_norms, scaled_rms_normalize

DIM = 32


class Norm(nn.Module):
    """One norm over x (the gated norm gates by x / 100)."""

    def __init__(self, cls: type[nn.Module]):
        super().__init__()
        self.norm = cls(DIM, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 1.5, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, GatedRMSNorm):
            return self.norm(x, x / 100)
        return self.norm(x)


def _rows() -> torch.Tensor:
    """Rows at the magnitudes that matter: tiny, O(1), past 256 (one outlier channel), ~3000, zero."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, DIM)).astype(np.float32)
    rows[0] *= 0.01
    rows[2] *= 20
    rows[2, 3] = 400.0
    rows[3] *= 3000
    rows[4] = 0.0
    return torch.from_numpy(rows)[None]


def _fp16_run(module: nn.Module, x: torch.Tensor, tmp_path, safe: bool) -> np.ndarray:
    context = fp16_safe_norms(module) if safe else torch.no_grad()
    with context:
        program = export_program(module, (x,))
    model = ct.convert(
        program,
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    path = tmp_path / f"norm-{safe}.mlpackage"
    model.save(str(path))
    fn = MILProgram(path).function()
    return np.asarray(next(iter(fn({"x": x.numpy()}, {}).values())), np.float32)


@pytest.mark.parametrize("cls", [RMSNorm, ZeroCenteredRMSNorm, GatedRMSNorm])
def test_scaled_norms_survive_fp16_where_the_plain_ones_do_not(cls, tmp_path):
    module = Norm(cls).eval()
    x = _rows()
    with torch.no_grad():
        want = module(x).numpy()
    got = _fp16_run(module, x, tmp_path, safe=True)
    assert type(module.norm) is cls  # restored after tracing
    row_max = np.abs(want).max(-1, keepdims=True)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= 2e-3 * row_max + 1e-6)  # fp16 rounding, every row
    plain = _fp16_run(module, x, tmp_path, safe=False)
    assert np.abs(plain[0, 2:4]).max() < 1e-3 < np.abs(want[0, 2:4]).max()  # overflow: all zeros


def test_scaled_form_is_the_reference_in_fp32():
    x = _rows()[0].double()
    eps = 1e-6
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(scaled_rms_normalize(x, eps), want, rtol=1e-12, atol=1e-12)
