"""SigLIP2 NaViT vision tower of MiniCPM-V 4.6 over ONE slice, plus the 2x2 MLP merger into LLM space.

Graph contract (DESIGN.md): the host feeds the patches of a slice in window-major order with
their position ids. Attention inside a slice ignores token order (positions enter only through
the added position embedding), so the order is ours to choose, and window-major order turns
both 2x2 mergers into plain reshapes with one dynamic length L:

* 16x: every 4x4 block of patches (blocks row-major), its four 2x2 sub-windows (row-major),
  each with its four patches (row-major). The in-ViT window merger groups rows [L/4, 4, D]; the
  final merger groups [L/16, 4 * D]; the output comes out row-major on the merged grid.
* 4x: 2x2 windows row-major, each with its four patches row-major; the in-ViT merger is
  skipped and the final merger groups [L/4, 4 * D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BidirectionalAttention, SiglipEncoderLayer, gelu_tanh


@dataclass
class VisionConfig:
    """`vision_config` of a MiniCPM-V 4.6 checkpoint (Hugging Face field names)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    insert_layer_id: int = 6
    window_kernel_size: tuple[int, int] = (2, 2)

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


class VisionEmbeddings(nn.Module):
    """Patch embedding (a 14x14 stride-14 conv, applied as a matmul on flattened patches) + 70x70 table."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Embedding(cfg.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight.flatten(1)  # [D, C*P*P], (c, y, x) order like the patches
        x = F.linear(patches.to(weight.dtype), weight, self.patch_embedding.bias)
        return x + self.position_embedding(position_ids)


class WindowAttentionMerger(nn.Module):
    """LLaVA-UHD v4 in-ViT merger: attention inside each 2x2 window, then a 4-token -> 1 MLP.

    Input rows come in groups of four (one window each), so the window split is a reshape.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kh, kw = cfg.window_kernel_size
        if (kh, kw) != (2, 2):
            raise ValueError(f"only 2x2 window merging is supported, got {cfg.window_kernel_size}")
        dim = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.self_attn = BidirectionalAttention(dim, cfg.num_attention_heads)
        self.pre_norm = nn.LayerNorm(4 * dim, eps=cfg.layer_norm_eps)
        self.linear_1 = nn.Linear(4 * dim, 4 * cfg.intermediate_size)
        self.linear_2 = nn.Linear(4 * cfg.intermediate_size, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, dim = x.shape[-2], x.shape[-1]
        windows = x.reshape(length // 4, 4, dim)
        windows = windows + self.self_attn(self.layer_norm1(windows))
        mean = windows.mean(dim=1)
        flat = windows.reshape(length // 4, 4 * dim)
        out = self.linear_2(gelu_tanh(self.linear_1(self.pre_norm(flat))))
        return (out + mean).unsqueeze(0)


class VisionTower(nn.Module):
    """Embeddings, encoder layers with the window merger after `insert_layer_id` (16x), post norm.

    `window_merger=False` builds the plain NaViT tower of MiniCPM-V 2.5-4.0 (no in-ViT merger)."""

    def __init__(self, cfg: VisionConfig, drop_last_layer: bool = False, window_merger: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        n_layers = cfg.num_hidden_layers - (1 if drop_last_layer else 0)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            SiglipEncoderLayer(
                cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.layer_norm_eps
            )
            for _ in range(n_layers)
        )
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if window_merger:
            self.vit_merger = WindowAttentionMerger(cfg)

    def forward(
        self, patches: torch.Tensor, position_ids: torch.Tensor, use_vit_merger: bool
    ) -> torch.Tensor:
        """patches [L, C*P*P], position_ids [L] (window-major) -> [1, L/4 or L, D]."""
        x = self.embeddings(patches, position_ids).unsqueeze(0)
        insert_at = self.cfg.insert_layer_id if use_vit_merger else -1
        for index, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if index == insert_at:
                x = self.vit_merger(x[0])
        return self.post_layernorm(x)


class MergerMLP(nn.Module):
    """pre_norm LN(4D) -> linear_1 -> exact (erf) GELU -> linear_2 into the LLM width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.linear_1 = nn.Linear(in_dim, in_dim)
        self.linear_2 = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.pre_norm(x))))


class Merger(nn.Module):
    """2x2 token merger into LLM space; rows arrive grouped by 2x2 window (window-major order).

    Only one merge round (`merger_times == 1`, the 4.6 release): a second round would need an
    8x8-block patch order, which the host does not produce, so the config loader refuses it.
    """

    def __init__(self, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.mlp = nn.ModuleList([MergerMLP(4 * vision_hidden, llm_hidden)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[1, L', D] -> [L'/4, D_llm]."""
        x = x[0]
        return self.mlp[0](x.reshape(x.shape[0] // 4, 4 * x.shape[1]))
