"""Canvas M-RoPE position rows of MiniCPM-V 4.7, computed on the host with numpy alone.

MiniCPM-V 4.7 is 4.6 plus "Canvas M-RoPE": every prompt token gets three position rows (t, h, w)
and the Qwen3.5 text model rotates its partial rotary dims with interleaved M-RoPE (see
`edge_runtime.models.mrope`). The rows depend only on the prompt ids and the patch grid of every
crop, so a phone runtime can compute them next to the prompt builder, with no torch or
transformers, and hand them to the exported prefill graph.

This is our own implementation of the rules of transformers 5.23
`models/minicpmv4_7/modeling_minicpmv4_7.py`: `MiniCPMV4_7Model._frame_end_idx` (l. 796-802),
`_group_visual_frames` (l. 804-888), `get_vision_position_ids` (l. 890-946) and `get_rope_index`
(l. 948-1150), for one unpadded sequence. The layout, in short:

* text is 1-D (all three rows equal) and advances by one per token;
* a *crop* is a maximal run of image (or video) placeholder tokens; a crop behind `<slice>` is a
  detail slice of the current frame, any other crop is a thumbnail opening a new *frame*;
* a frame spans from the token in front of its thumbnail (`<image>`) to one past the marker tokens
  (`<image>`, `</image>`, `<slice>`, `</slice>`, newline) that follow its last crop;
* a frame starting at position p lays its tokens on a canvas: t is p for the whole frame; the
  slices tile the canvas row-major, each slice's tokens at (p + row offset + i, p + col offset + j);
  the thumbnail is stretched over the full canvas (`stretch`); `<image>` sits at the halo
  (p - 1, p - 1), `</image>` at the far corner (p + H, p + W), `<slice>`/`</slice>` at their slice's
  first/last token, a newline between slice rows just right of that row's last token;
* after a frame the position continues at p + max(H, W) + 1 (H, W: canvas size in LLM tokens).

Decoding: `rope_delta = max(all rows) + 1 - len(prompt)`; the token written at cache index i (i >=
prompt length) uses position i + rope_delta in all three rows (upstream `compute_3d_position_ids`,
l. 1189-1200, and `_prepare_position_ids_for_generation`, l. 1334-1347). A text-only prompt gives
plain `arange` rows and rope_delta 0, as upstream's 1-D fallback does.

Upstream also gathers frames that only markers separate into "groups" (a clip's frames) and gives
text between two frames of a group one extra position step. That step never fires: a frame's end
already runs over every marker behind it, so the next frame of its group starts at or before that
end, and a grouped frame is then laid out exactly as an ungrouped one. We lay frames out one by one;
the tests compare against upstream on processor prompts, video clips and random token soups.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_runtime.errors import CheckpointError, InputError

TEXT, IMAGE, VIDEO = 0, 1, 2  # upstream's mm_token_type_ids values

Span = tuple[int, int]  # [start, end) token indices


@dataclass(frozen=True)
class CanvasTokens:
    """The token ids Canvas M-RoPE reads; all come from the checkpoint's config.json."""

    image_token_id: int
    image_start_id: int
    image_end_id: int
    slice_start_id: int
    slice_end_id: int
    newline_id: int
    video_token_id: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CanvasTokens:
        """Read the ids from a MiniCPM-V 4.7 config.json dict (upstream field names)."""
        names = (
            "image_token_id",
            "image_start_id",
            "image_end_id",
            "slice_start_id",
            "slice_end_id",
            "newline_id",
        )
        missing = [n for n in names if config.get(n) is None]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}, which Canvas M-RoPE needs")
        kwargs = {n: int(config[n]) for n in names}
        video = config.get("video_token_id")
        return cls(**kwargs, video_token_id=None if video is None else int(video))

    @property
    def markers(self) -> frozenset[int]:
        """Tokens a frame's span runs over after its last crop."""
        return frozenset(
            (self.image_start_id, self.image_end_id, self.slice_start_id, self.slice_end_id, self.newline_id)
        )


@dataclass(frozen=True)
class CanvasLayout:
    """Prefill positions int64 [3, T] (rows t, h, w) and the decode offset."""

    positions: np.ndarray
    rope_delta: int

    def decode_position(self, cache_len: int) -> int:
        """Position (all three rows) of the token written at cache index `cache_len` >= T."""
        return cache_len + self.rope_delta


@dataclass
class _Frame:
    modality: int
    thumb: Span
    slices: list[Span] = field(default_factory=list)
    end: int = 0  # one past the marker tokens closing the frame

    @property
    def open_idx(self) -> int:
        """Index of the token in front of the thumbnail (its `<image>`)."""
        return self.thumb[0] - 1

    @property
    def last_crop_end(self) -> int:
        return self.slices[-1][1] if self.slices else self.thumb[1]


def token_modalities(input_ids: Sequence[int] | np.ndarray, tokens: CanvasTokens) -> np.ndarray:
    """Per-token modality (0 text, 1 image, 2 video), as the processor's `mm_token_type_ids`."""
    ids = np.asarray(input_ids, dtype=np.int64)
    kinds = np.where(ids == tokens.image_token_id, IMAGE, TEXT)
    if tokens.video_token_id is not None:
        kinds = np.where(ids == tokens.video_token_id, VIDEO, kinds)
    return kinds.astype(np.int64)


def find_crops(modalities: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of one non-text modality, as (modality, start, end)."""
    bounds = np.flatnonzero(np.diff(modalities)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(modalities)]))
    return [
        (int(modalities[s]), int(s), int(e))
        for s, e in zip(starts, ends, strict=True)
        if modalities[s] != TEXT
    ]


def _skip_markers(ids: np.ndarray, idx: int, markers: frozenset[int]) -> int:
    """First index at or after `idx` that is not a marker token."""
    while idx < len(ids) and int(ids[idx]) in markers:
        idx += 1
    return idx


def find_frames(ids: np.ndarray, modalities: np.ndarray, tokens: CanvasTokens) -> list[_Frame]:
    """The frames of one sequence in order: each crop behind `<slice>` joins the frame before it."""
    frames: list[_Frame] = []
    for modality, start, end in find_crops(modalities):
        if start == 0:
            raise InputError("a visual placeholder run starts the prompt; it needs an opening marker")
        if frames and int(ids[start - 1]) == tokens.slice_start_id:
            frames[-1].slices.append((start, end))
        else:
            frames.append(_Frame(modality, (start, end)))
    for frame in frames:
        frame.end = _skip_markers(ids, frame.last_crop_end, tokens.markers)
    return frames


def stretch(n: int, extent: int) -> np.ndarray:
    """`torch.linspace(0, extent - 1, n).round()` in the same float32 arithmetic as torch on CPU.

    The values at exact halves are rounded half-to-even; computing them exactly (as fractions)
    disagrees with torch for some sizes, so the float32 formula (first half counted up from 0,
    second half down from the end) is reproduced instead.
    """
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    end = np.float32(extent - 1)
    step = np.float32(end / np.float32(n - 1))
    i = np.arange(n)
    up = step * i.astype(np.float32)
    down = end - step * (n - 1 - i).astype(np.float32)
    values = np.where(i < n // 2, up, down).astype(np.float32)
    return np.rint(values).astype(np.int64)


def _grid_positions(origin: int, grid: Span, canvas: Span, offset: Span) -> np.ndarray:
    """[3, h * w] positions of a row-major grid of LLM tokens spread over a canvas at an offset."""
    (h, w), (ch, cw) = grid, canvas
    rows = stretch(h, ch) + offset[0]
    cols = stretch(w, cw) + offset[1]
    out = np.empty((3, h * w), dtype=np.int64)
    out[0] = 0
    out[1] = np.repeat(rows, w)
    out[2] = np.tile(cols, h)
    return out + origin


def slice_layout(slices: Sequence[Span]) -> Span:
    """(rows, cols) of a frame's slices: a gap wider than `</slice><slice>` ends the first row."""
    cols = len(slices)
    for k in range(len(slices) - 1):
        if slices[k + 1][0] - slices[k][1] > 2:
            cols = k + 1
            break
    rows = len(slices) // cols
    if rows * cols != len(slices):
        return 1, len(slices)
    return rows, cols


def _write_text(pos: np.ndarray, start: int, end: int, first: int) -> int:
    """1-D positions first, first + 1, ... over [start, end); returns the next position."""
    if end > start:
        pos[:, start:end] = np.arange(first, first + end - start)
        return first + end - start
    return first


def _pin(pos: np.ndarray, idx: int, h: int, w: int) -> None:
    pos[1, idx], pos[2, idx] = h, w


def _merged(grid: Sequence[int], merge: int) -> Span:
    return int(grid[0]) // merge, int(grid[1]) // merge


def place_frame(pos: np.ndarray, frame: _Frame, origin: int, grids: Iterator, merge: int) -> int:
    """Lay one frame's tokens [open_idx, end) on its canvas at `origin`; returns max(H, W)."""
    end = frame.end
    thumb = _merged(_next_grid(grids), merge)
    canvas = thumb
    rows, cols, tile = 0, 0, (0, 0)
    first_slice = None
    if frame.slices:
        rows, cols = slice_layout(frame.slices)
        first_slice = _merged(_next_grid(grids), merge)
        tile = first_slice
        canvas = (rows * tile[0], cols * tile[1])

    pos[:, frame.open_idx : end] = origin
    pos[1:, frame.open_idx] = max(origin - 1, 0)
    if frame.thumb[1] < end:
        _pin(pos, frame.thumb[1], origin + canvas[0], origin + canvas[1])
    pos[:, frame.thumb[0] : frame.thumb[1]] = _grid_positions(origin, thumb, canvas, (0, 0))

    for k, (start, stop) in enumerate(frame.slices):
        grid = first_slice if k == 0 else _merged(_next_grid(grids), merge)
        top, left = (k // cols) * tile[0], (k % cols) * tile[1]
        if start - 1 >= frame.open_idx:
            _pin(pos, start - 1, origin + top, origin + left)
        if stop < end:
            _pin(pos, stop, origin + top + grid[0] - 1, origin + left + grid[1] - 1)
        pos[:, start:stop] = _grid_positions(origin, grid, grid, (top, left))

    for k in range(len(frame.slices) - 1):
        gap_start, gap_end = frame.slices[k][1], frame.slices[k + 1][0]
        if gap_end - gap_start > 2:  # tokens besides `</slice><slice>`: the row's newline(s)
            bottom = (k // cols + 1) * tile[0] - 1
            for idx in range(gap_start + 1, gap_end - 1):
                _pin(pos, idx, origin + bottom, origin + cols * tile[1])
    return max(canvas)


def _next_grid(grids: Iterator) -> Sequence[int]:
    try:
        return next(grids)
    except StopIteration:
        raise InputError("the prompt has more visual crops than patch grids were given") from None


def canvas_positions(
    input_ids: Sequence[int] | np.ndarray,
    tokens: CanvasTokens,
    image_grids: Sequence[Sequence[int]] = (),
    video_grids: Sequence[Sequence[int]] = (),
    merge: int = 4,
) -> CanvasLayout:
    """Canvas M-RoPE positions of one prompt (upstream `get_rope_index` for batch 1, no padding).

    Args:
        input_ids: the prompt's token ids, placeholders expanded (as the processor emits them).
        tokens: placeholder and marker ids from the checkpoint config (`CanvasTokens.from_config`).
        image_grids: patch grid (h, w) of every image crop in prompt order: per image the thumbnail
            (source) first, then its slices row-major (upstream `target_sizes`; our
            `SlicePlan.patch_grids`, concatenated over the prompt's images).
        video_grids: the same for video frame crops (upstream `target_sizes_videos`).
        merge: patches per LLM token per side: 4 for "16x", 2 for "4x" (upstream's merge_factor).
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise InputError("an empty prompt has no positions")
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    pos = np.zeros((3, ids.size), dtype=np.int64)
    cursor, next_pos = 0, 0
    for frame in find_frames(ids, token_modalities(ids, tokens), tokens):
        next_pos = _write_text(pos, cursor, frame.open_idx, next_pos)
        next_pos += place_frame(pos, frame, next_pos, grids[frame.modality], merge) + 1
        cursor = frame.end
    _write_text(pos, cursor, ids.size, next_pos)
    for modality, name in ((IMAGE, "image"), (VIDEO, "video")):
        if next(grids[modality], None) is not None:
            raise InputError(f"more {name} patch grids were given than the prompt has {name} crops")
    return CanvasLayout(pos, int(pos.max()) + 1 - ids.size)
