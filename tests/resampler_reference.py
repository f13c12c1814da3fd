"""Independent float64 pieces the resampler families' reference tests share (MiniCPM-V 2.0, 4.0):
the MAE sin-cos the remote code uses, greedy decoding with transformers' own KV cache, and the
error measure. Written from the spec (architectures.md §1.2, §2.2), not from our model code."""

from __future__ import annotations

import numpy as np
import torch


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
    """get_2d_sincos_pos_embed(dim, (h, w)) in float64: meshgrid(w, h) ("w goes first"), so the first
    half of the channels encodes the column, the second the row; [h*w, dim] row-major."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)))
    return np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)


def check_sincos_layout() -> None:
    """The reference itself: column in the first half, row in the second, sin then cos."""
    dim = 16
    pos = sincos_2d(dim, 3, 5)
    row, col = 2, 3
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    expected = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(pos[row * 5 + col], expected, rtol=0, atol=1e-15)


def max_rel(ours, ref) -> float:
    """max |ours - ref| over the reference's scale (its max |value|, at least 1)."""
    ours = np.asarray(torch.as_tensor(ours).double())
    ref = np.asarray(torch.as_tensor(ref).double())
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1.0))


def greedy(llm: torch.nn.Module, embeds: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decode with transformers' own KV cache; logits[i] is what token i was picked from."""
    tokens, logits = [], []
    with torch.no_grad():
        out = llm(inputs_embeds=torch.from_numpy(embeds)[None], use_cache=True)
        for _ in range(steps):
            last = out.logits[0, -1]
            logits.append(last.numpy())
            tokens.append(int(last.argmax()))
            out = llm(
                input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens, logits


def last_logits(llm: torch.nn.Module, embeds: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return llm(inputs_embeds=torch.from_numpy(embeds)[None]).logits[0, -1].numpy()


def rows_cols(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return torch.from_numpy(rows), torch.from_numpy(cols)
