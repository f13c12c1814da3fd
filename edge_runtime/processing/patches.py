"""The vision graph's input contract for one slice: flattened 14x14 patches in window-major order.

Window-major order puts every group of tokens that a merger fuses next to each other, so the graph
merges with plain reshapes instead of gathers: in "16x" mode each 4x4 block of patches is four 2x2
windows (the ViT merger fuses each window, the MLP merger then fuses the block's four results); in
"4x" mode each 2x2 window is fused once. Blocks/windows themselves are row-major, so the merged
tokens come out in the same row-major order as the reference model.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_runtime.errors import InputError
from edge_runtime.processing.slicing import merge_factor, vision_mode

DEFAULT_PATCH_SIZE = 14
DEFAULT_NUM_PATCHES_PER_SIDE = 70  # vision_config.image_size (980) // patch_size (14)


def check_patch_grid(h: int, w: int, mode: str) -> None:
    """Both sides must be multiples of the merge factor (4 for "16x", 2 for "4x")."""
    m = merge_factor(mode)
    if h < 1 or w < 1 or h % m or w % m:
        raise InputError(
            f"slice patch grid {h}x{w} is not a positive multiple of {m} per side, as {mode!r} mode needs"
        )


def window_order(h: int, w: int, mode: str) -> np.ndarray:
    """int64 [h*w]: the row-major patch index at each window-major position (a permutation)."""
    check_patch_grid(h, w, mode)
    idx = np.arange(h * w, dtype=np.int64)
    if merge_factor(mode) == 1:
        return idx
    if mode == "16x":
        # (block_row, sub_row, row_in_window, block_col, sub_col, col_in_window)
        grid = idx.reshape(h // 4, 2, 2, w // 4, 2, 2)
        return np.ascontiguousarray(grid.transpose(0, 3, 1, 4, 2, 5)).reshape(-1)
    grid = idx.reshape(h // 2, 2, w // 2, 2)  # (window_row, row_in_window, window_col, col_in_window)
    return np.ascontiguousarray(grid.transpose(0, 2, 1, 3)).reshape(-1)


def row_major_patches(pixels: np.ndarray, patch_size: int = DEFAULT_PATCH_SIZE) -> np.ndarray:
    """float32 [3,H,W] -> [h*w, 3*p*p]; row i is `pixels[:, y0:y0+p, x0:x0+p].reshape(-1)` (c, y, x)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise InputError(f"expected a [3, H, W] slice, got shape {pixels.shape}")
    c, height, width = pixels.shape
    if height % patch_size or width % patch_size:
        raise InputError(f"slice {height}x{width} px is not a multiple of the {patch_size}-px patch")
    h, w = height // patch_size, width // patch_size
    grid = pixels.reshape(c, h, patch_size, w, patch_size).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid, dtype=np.float32).reshape(h * w, c * patch_size * patch_size)


def position_ids(h: int, w: int, num_patches_per_side: int = DEFAULT_NUM_PATCHES_PER_SIDE) -> np.ndarray:
    """int64 [h*w], row-major: ids into the num_patches_per_side^2 position table.

    Computed with torch exactly as transformers' `get_vision_nearest_position_ids` (float32
    boundaries from `arange(1/n, 1, 1/n)`, `bucketize(arange(h)/h, right=True)`), so the bucket
    edges, which sit on float32 rounding boundaries, come out bit-identical.
    """
    n = num_patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n, dtype=torch.float32)
    rows = torch.bucketize(torch.arange(h, dtype=torch.int64) / h, boundaries, right=True)
    cols = torch.bucketize(torch.arange(w, dtype=torch.int64) / w, boundaries, right=True)
    return (rows[:, None] * n + cols[None, :]).reshape(-1).numpy().astype(np.int64)


def slice_to_patches(
    pixels: np.ndarray,
    mode: str,
    patch_size: int = DEFAULT_PATCH_SIZE,
    num_patches_per_side: int = DEFAULT_NUM_PATCHES_PER_SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """One normalised slice [3,H,W] -> (patches float32 [L, 3*p*p], position ids), window-major.

    The position ids are int64 [L] NaViT bucket ids, or what the mode's family defines (e.g.
    [3, L] for a resampler that also needs each patch's row and column)."""
    patches = row_major_patches(pixels, patch_size)
    h, w = pixels.shape[1] // patch_size, pixels.shape[2] // patch_size
    order = window_order(h, w, mode)
    custom = vision_mode(mode).position_ids
    ids = position_ids(h, w, num_patches_per_side) if custom is None else custom(h, w, num_patches_per_side)
    return np.ascontiguousarray(patches[order]), np.ascontiguousarray(ids[..., order])
