"""timm's SigLIP ViT (`vit_so400m_patch14_siglip_384`) over ONE slice, as MiniCPM-V 2.0 runs it.

Module names are timm's (`patch_embed.proj`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm`), so `vpm.*` checkpoint tensors load by name. The learned position table
(27 x 27 for 384 px) is resized to the slice's patch grid by antialiased bicubic interpolation
(timm's `resample_abs_pos_embed`: `F.interpolate(mode="bicubic", antialias=True)`). That
interpolation is separable and linear, so the graph computes it as a weight matrix per axis from
each patch's row and column and the grid size, with the arithmetic of PyTorch's antialiased kernel
(`aa_weights`): the host passes only integer ids, as for the other families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BICUBIC_A = -0.5  # the antialiased bicubic kernel's a (PIL's), not plain bicubic's -0.75


@dataclass
class VisionConfig:
    """The tower's sizes (Hugging Face names; the release fixes them by timm model name)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """The antialiased bicubic filter (a = -0.5), zero outside |x| < 2."""
    x = x.abs()
    a = BICUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def aa_weights(index: torch.Tensor, out_size: torch.Tensor, in_size: int) -> torch.Tensor:
    """[N, in_size] weights of output positions `index` (float [N]) when resizing in_size -> out_size
    (a float scalar tensor) with antialiased bicubic interpolation, align_corners=False: PyTorch's
    `_compute_weights_aa` (center = scale * (i + 0.5), support 2 * max(scale, 1), taps
    [trunc(center - support + 0.5), trunc(center + support + 0.5)) clipped to the input, filter at
    (j - center + 0.5) / max(scale, 1), normalised to sum 1)."""
    scale = in_size / out_size
    stretch = torch.clamp(scale, min=1.0)
    support = 2.0 * stretch
    center = scale * (index + 0.5)
    lo = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    hi = torch.clamp(torch.floor(center + support + 0.5), max=float(in_size))
    taps = torch.arange(in_size, dtype=torch.float32)[None, :]
    # a product of the two bounds, not a logical and (Core ML's converter has no `and`)
    inside = (taps >= lo[:, None]).to(torch.float32) * (taps < hi[:, None]).to(torch.float32)
    weights = _cubic((taps - center[:, None] + 0.5) / stretch) * inside
    return weights / weights.sum(dim=1, keepdim=True)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(t, 3, heads, d // heads).permute(1, 2, 0, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)) * ((d // heads) ** -0.5)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.proj(torch.matmul(probs, v).transpose(0, 1).reshape(t, d))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU, timm's ViT default -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)


class VisionTransformer(nn.Module):
    """Patch embedding + resized position table, `num_layers` blocks (2.0 drops the last), norm."""

    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches_per_side**2, cfg.hidden_size))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def position_embedding(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[L, D]: the table resized to the slice grid (rows.max() + 1, cols.max() + 1), at each
        patch's (row, col)."""
        side = self.cfg.num_patches_per_side
        h = (rows.max() + 1).to(torch.float32)
        w = (cols.max() + 1).to(torch.float32)
        w_rows = aa_weights(rows.to(torch.float32), h, side)  # [L, side]
        w_cols = aa_weights(cols.to(torch.float32), w, side)
        # sum_a sum_b w_rows[l, a] w_cols[l, b] table[a * side + b]: one [L, side^2] matmul
        weights = (w_rows[:, :, None] * w_cols[:, None, :]).reshape(-1, side * side)
        return weights @ self.pos_embed[0].float()

    def forward(self, patches: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """patches [L, C*P*P] (row-major, each (c, y, x)), rows / cols [L] -> [L, D] after `norm`."""
        weight = self.patch_embed.proj.weight.flatten(1)
        x = F.linear(patches.to(weight.dtype), weight, self.patch_embed.proj.bias)
        x = x + self.position_embedding(rows, cols).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
