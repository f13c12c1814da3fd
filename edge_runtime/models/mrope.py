"""Multimodal RoPE (M-RoPE) cos/sin for three position rows (t, h, w), as Qwen3.5 computes them.

MiniCPM-V 4.7 feeds its Qwen3.5 text model Canvas M-RoPE positions
(`edge_runtime.processing.canvas_positions`): each rotary frequency of the partial rotary dims
reads one of the three rows. Qwen3.5 interleaves them (transformers 5.23
`models/qwen3_5/modeling_qwen3_5.py`, `Qwen3_5TextRotaryEmbedding.recomposition_frequencies`):
frequency i reads row h when i % 3 == 1 and i < 3 * mrope_section[1], row w when i % 3 == 2 and
i < 3 * mrope_section[2], row t otherwise (mrope_section[0] is not read). The non-interleaved
(Qwen2-VL) layout gives the first mrope_section[0] frequencies to t, the next mrope_section[1] to
h and the rest to w.

The output layout is `blocks.rope_cos_sin`'s ([T, rotary_dim] fp32, frequencies duplicated as
cat(f, f)), so `apply_partial_rope` takes it unchanged, and when the three rows are equal the
values equal `rope_cos_sin` of that row bit for bit. The row choice is a constant index built from
Python ints, so the graph has no branching on tensor values (exportable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """Default RoPE inverse frequencies [rotary_dim // 2] fp32 (as qwen35_text.Qwen35TextModel)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def mrope_rows(num_freqs: int, mrope_section: Sequence[int], interleaved: bool = True) -> list[int]:
    """Which position row (0 t, 1 h, 2 w) each of the `num_freqs` rotary frequencies reads."""
    if len(mrope_section) != 3:
        raise ValueError(f"mrope_section must have 3 entries (t, h, w), got {list(mrope_section)}")
    if interleaved:
        rows = [0] * num_freqs
        for row in (1, 2):
            for i in range(row, min(num_freqs, 3 * mrope_section[row]), 3):
                rows[i] = row
        return rows
    if sum(mrope_section) != num_freqs:
        raise ValueError(f"mrope_section {list(mrope_section)} must sum to {num_freqs} rotary frequencies")
    return [row for row, n in enumerate(mrope_section) for _ in range(n)]


def mrope_row_index(num_freqs: int, mrope_section: Sequence[int], interleaved: bool = True) -> torch.Tensor:
    """`mrope_rows` as an int64 tensor [num_freqs]; a model keeps it as a (non-persistent) buffer."""
    return torch.tensor(mrope_rows(num_freqs, mrope_section, interleaved), dtype=torch.int64)


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, row_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [3, T] (t, h, w) -> cos, sin [T, 2 * len(inv_freq)] fp32.

    `row_index` [len(inv_freq)] is `mrope_row_index(...)`: frequency i rotates by
    positions[row_index[i]] * inv_freq[i].
    """
    picked = positions.index_select(0, row_index.to(positions.device))  # [F, T]
    freqs = picked.float().transpose(0, 1) * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def decode_rows(positions: torch.Tensor) -> torch.Tensor:
    """1-D decode positions [T] -> [3, T] (all rows equal; add rope_delta before)."""
    return positions[None, :].expand(3, -1)
