"""export/executorch/norms.py: the norms traced for ExecuTorch compute their means as linear layers
(which XNNPACK runs) and give the reference norms' outputs; the model is restored on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_runtime.models.blocks import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm
from export.executorch.norms import MEAN_BUFFER, delegable_norms


@pytest.mark.parametrize("cls", [RMSNorm, ZeroCenteredRMSNorm, GatedRMSNorm, nn.LayerNorm])
def test_linear_mean_norms_equal_the_reference(cls):
    torch.manual_seed(0)
    norm = cls(96)
    with torch.no_grad():
        norm.weight.normal_()
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = torch.randn(2, 5, 96) * 30 + 3  # an offset and a spread, as residual streams have
    args = (x, torch.randn(2, 5, 96)) if cls is GatedRMSNorm else (x,)
    want = norm(*args)
    model = nn.Sequential(norm)
    with delegable_norms(model):
        assert type(norm) is not cls and hasattr(norm, MEAN_BUFFER)
        got = norm(*args)
        traced = torch.export.export(model if cls is not GatedRMSNorm else norm, args)
        ops = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
        assert not {o for o in ops if "mean" in o or "layer_norm" in o or "var" in o}, ops
        assert any("linear" in o for o in ops), ops
    assert type(norm) is cls and not hasattr(norm, MEAN_BUFFER)
    assert MEAN_BUFFER not in dict(norm.named_buffers())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_linear_sum_l2norm_equals_the_reference_and_is_restored():
    from edge_runtime.models import qwen35_text
    from export.executorch.norms import linear_sum_l2norm

    x = torch.randn(1, 7, 4, 128) * 5
    holder = nn.Module()
    holder.d_k = 128  # as a DeltaNet layer carries its key width
    reference = qwen35_text.l2norm
    with delegable_norms(holder):
        assert qwen35_text.l2norm is linear_sum_l2norm
        torch.testing.assert_close(linear_sum_l2norm(x), reference(x), atol=1e-6, rtol=1e-5)

        class L2(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = holder  # the ones row is this layer's buffer, as in a decoder

            def forward(self, y):
                return qwen35_text.l2norm(y)

        program = torch.export.export(L2(), (x,))
        assert "layer._l2norm_ones" in program.state_dict or any(
            "l2norm_ones" in name for name in program.graph_signature.buffers
        ), program.graph_signature
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("linear" in o for o in ops) and not any("sum" in o for o in ops), ops
    assert qwen35_text.l2norm is reference


def test_delegable_softplus_equals_torchs_and_traces_without_portable_ops():
    from edge_runtime.models import qwen35_text
    from export.executorch.norms import delegable_softplus

    x = torch.cat([torch.linspace(-40, 40, 8001), torch.tensor([-1e4, -88.0, 0.0, 20.0, 20.5, 1e4])])
    got, want = delegable_softplus(x), torch.nn.functional.softplus(x)
    torch.testing.assert_close(got, want, atol=1.2e-7, rtol=1.2e-7)
    reference = qwen35_text.softplus
    with delegable_norms(nn.Module()):
        assert qwen35_text.softplus is delegable_softplus

        class Decay(nn.Module):
            def forward(self, y):
                return qwen35_text.softplus(y)

        program = torch.export.export(Decay(), (x,)).run_decompositions()
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not {o for o in ops if "log1p" in o or "where" in o or "softplus" in o or ".gt" in o}, ops
    assert qwen35_text.softplus is reference
