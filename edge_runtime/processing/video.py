"""Video as a sequence of images, as transformers' MiniCPM-V 4.6 video processor builds it.

Main frames are taken at 1 fps (or spread over a 0.1 s grid for videos longer than `max_num_frames`
seconds). With `stack_frames=N>1` the N-1 extra frames of each second are pasted into one canvas
that follows that second's main frame. Every resulting unit is then sliced like an image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from edge_runtime.errors import InputError
from edge_runtime.paths import link_problem
from edge_runtime.processing.image import DEFAULT_MAX_PIXELS, check_pixel_limit, to_rgb
from edge_runtime.processing.slicing import PreparedImage, SliceConfig, slice_image

DEFAULT_MAX_NUM_FRAMES = 128
SEPARATOR_PX = 6


@dataclass(frozen=True)
class FrameSelection:
    """Which decoded frames to use: `main` (one per unit) and `sub` (stacked, with their timestamps)."""

    main: list[int]
    sub: list[int]
    sub_timestamps: list[float]
    duration: float

    @property
    def indices(self) -> list[int]:
        """Reference order: all main frames, then all sub frames (may repeat indices)."""
        return self.main + self.sub


def _linspace_pick(items: list, count: int) -> list:
    """Keep `count` evenly spread items, with numpy's truncating `linspace(..., dtype=int)` like the reference."""
    picks = np.linspace(0, len(items) - 1, count, dtype=int)
    return [items[int(i)] for i in picks]


def sub_frame_timestamps(duration: float, stack_frames: int, max_num_frames: int) -> list[float]:
    """Timestamps (s) of the stacked sub-frames: sec + j/stack_frames for j in 1..N-1, below `duration`."""
    if stack_frames <= 1:
        return []
    stamps = [
        sec + j / stack_frames
        for sec in range(math.ceil(duration))
        for j in range(1, stack_frames)
        if sec + j / stack_frames < duration
    ]
    cap = max_num_frames * (stack_frames - 1)
    return _linspace_pick(stamps, cap) if len(stamps) > cap else stamps


def select_frames(
    num_frames: int,
    fps: float,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    stack_frames: int = 1,
    duration: float | None = None,
) -> FrameSelection:
    """Frame indices to decode, from the video's frame count and fps (duration defaults to n/fps)."""
    if num_frames < 1:
        raise InputError("video has no frames")
    if not fps or fps <= 0 or not math.isfinite(fps):
        raise InputError(f"video fps must be a positive number, got {fps!r}")
    if max_num_frames < 1 or stack_frames < 1:
        raise InputError("max_num_frames and stack_frames must be at least 1")
    duration = num_frames / fps if duration is None else duration
    last = num_frames - 1
    if duration > max_num_frames:
        stamps = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        main = [min(int(t * fps), last) for t in stamps]
        if len(main) > max_num_frames:
            main = _linspace_pick(main, max_num_frames)
    else:
        # The reference does not clamp here; with duration = n/fps the index is always < n anyway.
        main = [min(int(i * fps), last) for i in range(math.ceil(duration))]
    sub_stamps = sub_frame_timestamps(duration, stack_frames, max_num_frames)
    sub = [min(int(t * fps), last) for t in sub_stamps]
    return FrameSelection(main, sub, sub_stamps, duration)


def canvas_layout(num_frames: int, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) for stacking: 4 -> 2x2; 3 and 2 -> whichever canvas is closest to square; else 1xN."""

    def off_square(rows: int, cols: int) -> float:
        cw = cols * width + (cols - 1) * SEPARATOR_PX
        ch = rows * height + (rows - 1) * SEPARATOR_PX
        return abs(cw / max(1, ch) - 1.0)

    if num_frames == 4:
        return 2, 2
    if num_frames == 3:
        return (1, 3) if off_square(1, 3) <= off_square(3, 1) else (3, 1)
    if num_frames == 2:
        wide, tall = off_square(1, 2), off_square(2, 1)
        if wide == tall:
            return (1, 2) if width / height >= 1.0 else (2, 1)
        return (1, 2) if wide < tall else (2, 1)
    return 1, num_frames


def stack_canvas(frames: Sequence[Image.Image]) -> Image.Image:
    """Paste same-sized RGB frames row-major onto a black canvas with 6-px black separators."""
    if not frames:
        raise InputError("cannot stack an empty list of frames")
    width, height = frames[0].size
    if any(f.size != (width, height) for f in frames):
        raise InputError("all video frames must have the same size")
    rows, cols = canvas_layout(len(frames), height, width)
    canvas = Image.new(
        "RGB", (cols * width + (cols - 1) * SEPARATOR_PX, rows * height + (rows - 1) * SEPARATOR_PX)
    )
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        canvas.paste(frame, (c * (width + SEPARATOR_PX), r * (height + SEPARATOR_PX)))
    return canvas


def build_visual_units(
    main_frames: Sequence[Image.Image],
    sub_frames: Sequence[Image.Image],
    sub_timestamps: Sequence[float],
    duration: float,
) -> list[Image.Image]:
    """Interleave: main frame i, then the canvas of second i's sub-frames (if that second has any).

    As in the reference, canvas i is paired with main frame i by position, even for long videos
    whose main frames are not one per second.
    """
    if len(sub_frames) != len(sub_timestamps):
        raise InputError("sub_frames and sub_timestamps differ in length")
    canvases: list[Image.Image | None] = []
    cursor = 0
    for sec in range(math.ceil(duration)):
        start = cursor
        while cursor < len(sub_timestamps) and sub_timestamps[cursor] < sec + 1:
            cursor += 1
        canvases.append(stack_canvas(sub_frames[start:cursor]) if cursor > start else None)
    units: list[Image.Image] = []
    for i, frame in enumerate(main_frames):
        units.append(frame)
        canvas = canvases[i] if i < len(canvases) else None
        if canvas is not None:
            units.append(canvas)
    return units


def units_from_frames(
    frames: Sequence[Image.Image],
    fps: float,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    stack_frames: int = 1,
) -> list[Image.Image]:
    """All decoded frames of a video + its fps -> the ordered RGB visual units."""
    sel = select_frames(len(frames), fps, max_num_frames, stack_frames)
    rgb: dict[int, Image.Image] = {i: to_rgb(frames[i]) for i in sorted(set(sel.indices))}
    return build_visual_units(
        [rgb[i] for i in sel.main], [rgb[i] for i in sel.sub], sel.sub_timestamps, sel.duration
    )


def prepare_units(units: Sequence[Image.Image], config: SliceConfig) -> list[PreparedImage]:
    """Slice every visual unit like an image (the README recommends max_slice_nums=1 for video).
    Frames always upscale small units ("always"): MiniCPM-OCR's video processor ignores the image
    processor's `small_image_upsize`, so a "never"/"adaptive" checkpoint's frames match upstream's."""
    frames = replace(config, small_image_upsize="always")
    return [slice_image(unit, frames) for unit in units]


def _decode_pyav(
    path: Path, max_num_frames: int, stack_frames: int, max_pixels: int | None
) -> list[Image.Image]:
    import av  # optional dependency

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"no video stream in {path}")
        stream = container.streams.video[0]
        check_pixel_limit(stream.width, stream.height, max_pixels, what=f"video frame of {path.name}")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        num_frames = stream.frames or sum(1 for pkt in container.demux(stream) if pkt.size)
        sel = select_frames(num_frames, fps, max_num_frames, stack_frames)
        wanted = set(sel.indices)
        container.seek(0)
        decoded: dict[int, Image.Image] = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                decoded[i] = frame.to_image()
            if len(decoded) == len(wanted):
                break
    return _units_from_decoded(decoded, sel, path)


def _decode_decord(
    path: Path, max_num_frames: int, stack_frames: int, max_pixels: int | None
) -> list[Image.Image]:
    import decord  # optional dependency

    reader = decord.VideoReader(str(path))
    height, width = reader[0].shape[:2]
    check_pixel_limit(width, height, max_pixels, what=f"video frame of {path.name}")
    sel = select_frames(len(reader), float(reader.get_avg_fps()), max_num_frames, stack_frames)
    wanted = sorted(set(sel.indices))
    batch = reader.get_batch(wanted).asnumpy()
    return _units_from_decoded({i: Image.fromarray(a) for i, a in zip(wanted, batch, strict=True)}, sel, path)


def _units_from_decoded(
    decoded: dict[int, Image.Image], sel: FrameSelection, path: Path
) -> list[Image.Image]:
    missing = sorted(set(sel.indices) - decoded.keys())
    if missing:
        raise InputError(f"video {path} ended before frame {missing[0]} (its header frame count is wrong)")
    rgb = {i: to_rgb(img) for i, img in decoded.items()}
    return build_visual_units(
        [rgb[i] for i in sel.main], [rgb[i] for i in sel.sub], sel.sub_timestamps, sel.duration
    )


def load_video(
    path: str | os.PathLike[str],
    *,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    stack_frames: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """Decode only the selected frames of a video file into visual units (needs PyAV or decord)."""
    p = Path(path)
    if not p.is_file():
        problem = link_problem(p)
        raise InputError(f"video {p} is {problem}" if problem else f"video not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"video file is empty (0 bytes): {p}")
    try:
        import av  # noqa: F401

        decode = _decode_pyav
    except ImportError:
        try:
            import decord  # noqa: F401

            decode = _decode_decord
        except ImportError:
            raise InputError("reading video files needs PyAV: pip install av (or decord)") from None
    try:
        return decode(p, max_num_frames, stack_frames, max_pixels)
    except InputError:
        raise
    except Exception as exc:  # decoder libraries raise many unrelated types for bad files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"cannot decode video {p}: {reason}") from None
