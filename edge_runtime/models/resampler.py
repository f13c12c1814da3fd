"""The perceiver resampler of MiniCPM-V 2.5 / 2.6 / 4.0: a fixed set of learned queries attends
over one slice's vision tokens, so every slice becomes `query_num` LLM tokens whatever its size.

Keys carry a 2D sin-cos embedding of each patch's absolute (row, column) in its slice. The
reference crops a precomputed 70x70 table (grown when a slice is larger); computing the same
values from the row and column ids in the graph needs no table and no size limit, and the ids
come with the slice like its vision position ids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def query_grid_sincos(dim: int, num_queries: int) -> torch.Tensor:
    """[Q, dim]: the sin-cos of the queries' own sqrt(Q) x sqrt(Q) grid (2.0's `pos_embed`)."""
    side = math.isqrt(num_queries)
    rows, cols = (
        torch.div(torch.arange(side * side), side, rounding_mode="floor"),
        torch.arange(side * side) % side,
    )
    return sincos_2d(dim, rows, cols)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[L, dim] fp32: the first half encodes the column, the second the row; each half is
    [sin(p * w_k), cos(p * w_k)] with w_k = 1 / 10000^(k / (dim / 4)), k < dim / 4 (MAE layout)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.to(torch.float32)[:, None] * omega[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    return torch.cat((encode(cols), encode(rows)), dim=-1)


class PackedMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention`'s maths and parameter names (packed q/k/v `in_proj_*`, `out_proj`),
    written out so that every exporter sees plain matmuls; one unbatched query set, no masks."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler width {dim} is not a multiple of its {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query [Q, D], key / value [L, D] -> [Q, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads, dim = self.num_heads, query.shape[-1]
        head_dim = dim // heads
        q = F.linear(query, w_q, b_q).view(-1, heads, head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).view(-1, heads, head_dim).transpose(0, 1)
        v = F.linear(value, w_v, b_v).view(-1, heads, head_dim).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (head_dim**-0.5)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(-1, dim)
        return self.out_proj(out)


class Resampler(nn.Module):
    """`resampler.*` of a 2.5/2.6/4.0 checkpoint: 2D sin-cos on the keys only, queries without.
    With `query_pos` (MiniCPM-V 2.0, Qwen-VL style) the queries also get the stored `pos_embed`
    (the sin-cos of their own sqrt(Q) x sqrt(Q) grid)."""

    def __init__(
        self,
        num_queries: int,
        dim: int,
        num_heads: int,
        kv_dim: int,
        eps: float = 1e-6,
        query_pos: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.zeros(num_queries, dim))
        if query_pos:
            self.pos_embed = nn.Parameter(torch.zeros(num_queries, dim), requires_grad=False)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = PackedMultiheadAttention(dim, num_heads)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """x [L, kv_dim] vision tokens of one slice with their patch rows / cols [L] -> [Q, dim]."""
        kv = self.ln_kv(self.kv_proj(x))
        pos = sincos_2d(self.dim, rows, cols).to(kv.dtype)
        query = self.ln_q(self.query)
        if hasattr(self, "pos_embed"):
            query = query + self.pos_embed
        out = self.attn(query, kv + pos, kv)
        return torch.matmul(self.ln_post(out), self.proj)
