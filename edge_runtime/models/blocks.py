"""Building blocks shared by every family: norms, activations, attention, MLPs.

Everything here is written to be exported: no Python branching on tensor values, shapes fixed
by the inputs, and module attribute names that match the Hugging Face checkpoints so weights
load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StateSpec:
    """One decoder state tensor: its name, shape and dtype (for manifests and graph signatures)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`gelu_pytorch_tanh` of the SigLIP configs."""
    return F.gelu(x, approximate="tanh")


class ZeroCenteredRMSNorm(nn.Module):
    """Qwen3.5 RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32.

    The stored weight is centred on zero; forgetting the `1 +` silently breaks a real checkpoint.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama RMSNorm: w * (x * rsqrt(mean(x^2) + eps)), computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)  # fp32 weight (kept in fp16 graphs) * fp32


class GatedRMSNorm(nn.Module):
    """Gated-DeltaNet output norm: rmsnorm(x) * w * silu(gate), plain w (not 1 + w), norm before gate."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(x.dtype)
        return (out * F.silu(gate.float())).to(x.dtype)


class SwiGLU(nn.Module):
    """gate/up/down MLP with SiLU, no bias (Qwen3.5, Llama)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BidirectionalAttention(nn.Module):
    """SigLIP self-attention (q/k/v/out projections with bias) over the last-but-one axis.

    Works on any leading shape [..., T, D]: one slice of patches ([1, L, D]) or a batch of
    independent windows ([L/4, 4, D]) — the window merger needs no gather this way.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, t, d = x.shape
        shape = (*lead, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(-2, -3)
        k = self.k_proj(x).view(shape).transpose(-2, -3)
        v = self.v_proj(x).view(shape).transpose(-2, -3)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(-2, -3).reshape(*lead, t, d)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    """fc1 -> gelu_tanh -> fc2, with bias."""

    def __init__(self, dim: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, intermediate)
        self.fc2 = nn.Linear(intermediate, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm SigLIP encoder layer."""

    def __init__(self, dim: int, intermediate: int, num_heads: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = BidirectionalAttention(dim, num_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SiglipMLP(dim, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of every head (rotate_half convention); pass the rest."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, 2 * len(inv_freq)] in fp32."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
