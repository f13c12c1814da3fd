"""CoreML int4 with searched block scales: the pre-rounded weights survive coremltools' absmax int4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")

from export.coreml.quantize import BLOCK, presearch_int4_scales  # noqa: E402


def _absmax_int4(w: np.ndarray) -> np.ndarray:
    """coremltools' linear_symmetric int4 per block of 32 along the input axis: s = amax / 7,
    q = round(w / s) in [-7, 7]; returns the dequantized weights."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    scale = np.abs(blocks).max(-1, keepdims=True) / 7
    scale[scale == 0] = 1
    return (np.clip(np.rint(blocks / scale), -7, 7) * scale).reshape(n, k)


def test_searched_scales_round_trip_through_absmax_and_lower_the_error():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(128, 96, bias=False), nn.Linear(136, 64, bias=False))
    original = [m.weight.detach().clone().numpy() for m in layers]
    assert presearch_int4_scales([layers]) == 1  # 136 is not a multiple of 32: left alone
    searched = layers[0].weight.detach().numpy()
    np.testing.assert_array_equal(layers[1].weight.detach().numpy(), original[1])
    # what the Core ML package will hold: fp16 weights, then absmax int4 of those
    stored = _absmax_int4(searched.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(stored, searched, rtol=0, atol=1e-3 * np.abs(searched).max())
    plain = _absmax_int4(original[0])
    assert np.square(stored - original[0]).sum() < 0.95 * np.square(plain - original[0]).sum()
