"""Video frame selection, stacking canvases and per-unit slicing against transformers' video processor.

transformers resizes video with torchvision, which is not installable here, so the full-pipeline test
swaps in a PIL resize (our reference backend) and a plain normalise; everything else is upstream code.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.errors import InputError
from edge_runtime.processing.patches import row_major_patches
from edge_runtime.processing.slicing import SliceConfig, slice_image
from edge_runtime.processing.video import (
    canvas_layout,
    load_video,
    prepare_units,
    select_frames,
    stack_canvas,
    units_from_frames,
)

pytest.importorskip("transformers")
from hf_reference import split_reference  # noqa: E402
from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import (  # noqa: E402
    MiniCPMV4_6VideoProcessor,
)
from transformers.video_utils import VideoMetadata  # noqa: E402

P = 14


def _pil_resize(video: torch.Tensor, size, resample=None, **kwargs) -> torch.Tensor:
    lead, (c, h, w) = video.shape[:-3], video.shape[-3:]
    frames = video.reshape(-1, c, h, w).permute(0, 2, 3, 1).numpy()
    out = [
        np.asarray(Image.fromarray(f).resize((size.width, size.height), Image.Resampling.BICUBIC))
        for f in frames
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).reshape(*lead, c, size.height, size.width)


def _normalize(image: torch.Tensor, mean, std, inplace=False, **kwargs) -> torch.Tensor:
    return (image - torch.as_tensor(mean).view(-1, 1, 1)) / torch.as_tensor(std).view(-1, 1, 1)


@pytest.fixture(scope="module")
def ref() -> MiniCPMV4_6VideoProcessor:
    proc = MiniCPMV4_6VideoProcessor()
    proc.resize = _pil_resize
    proc.normalize = _normalize
    return proc


CASES = [
    (25, 10.0),
    (300, 30.0),
    (299, 29.97),
    (1, 30.0),
    (7, 2.5),
    (100, 1.0),
    (1290, 10.0),  # 129 s: just over 128
    (3000, 10.0),
    (10000, 23.976),
    (45, 0.7),
]


@pytest.mark.parametrize("num_frames,fps", CASES)
def test_select_frames_matches_reference(ref, num_frames, fps):
    for max_frames in (128, 8, 1):
        for stack in (1, 2, 3, 4, 6):
            meta = VideoMetadata(total_num_frames=num_frames, fps=fps, duration=num_frames / fps)
            want = ref.sample_frames(meta, max_num_frames=max_frames, stack_frames=stack)
            sel = select_frames(num_frames, fps, max_frames, stack)
            assert sel.indices == [int(i) for i in want], (max_frames, stack)
            assert all(0 <= i < num_frames for i in sel.indices)
            assert len(sel.main) <= max(max_frames, 1) or num_frames / fps <= max_frames


def test_select_frames_rejects_bad_metadata():
    for args in [(0, 10.0), (10, 0.0), (10, float("nan")), (10, -1.0)]:
        with pytest.raises(InputError):
            select_frames(*args)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("hw", [(30, 50), (50, 30), (40, 40), (20, 90), (30, 22), (7, 11)])
def test_canvas_matches_reference(ref, n, hw):
    rng = np.random.default_rng(n * 100 + hw[0])
    arr = rng.integers(0, 256, (n, *hw, 3), dtype=np.uint8)
    want = ref.concat_frames_as_image(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())[0]
    got = stack_canvas([Image.fromarray(a) for a in arr])
    np.testing.assert_array_equal(np.asarray(got).transpose(2, 0, 1), want.numpy())


def test_canvas_layout_tie_prefers_orientation():
    # 30x22 frames: 1x2 and 2x1 canvases are equally far from square -> portrait frames stack vertically
    assert canvas_layout(2, 30, 22) == (2, 1)
    assert canvas_layout(4, 10, 500) == (2, 2)
    assert canvas_layout(7, 10, 10) == (1, 7)
    with pytest.raises(InputError):
        stack_canvas([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


@pytest.mark.parametrize(
    "num_frames,fps,hw,stack,max_frames,slices",
    [
        (25, 10.0, (60, 90), 3, 128, 1),  # 2.5 s, last second has a 1-frame "canvas"
        (12, 4.0, (300, 800), 4, 128, 9),  # 4 sub-frames -> 2x2 canvas, sliced frames
        (40, 2.0, (50, 70), 2, 4, 1),  # long-video path (20 s > 4 frames)
        (9, 3.0, (100, 120), 1, 128, 9),  # no stacking
    ],
)
def test_units_match_reference_pipeline(ref, num_frames, fps, hw, stack, max_frames, slices):
    rng = np.random.default_rng(num_frames)
    video = rng.integers(0, 256, (num_frames, *hw, 3), dtype=np.uint8)
    meta = {"total_num_frames": num_frames, "fps": fps, "duration": num_frames / fps}
    want = ref(
        videos=[video],
        video_metadata=[meta],
        do_sample_frames=True,
        stack_frames=stack,
        max_num_frames=max_frames,
        max_slice_nums=slices,
        return_tensors="pt",
    )
    units = units_from_frames([Image.fromarray(f) for f in video], fps, max_frames, stack)
    assert want["num_frames_per_video"] == [len(units)]
    prepared = prepare_units(units, SliceConfig(max_slice_nums=slices))
    grids = [p.grid or (0, 0) for p in prepared]
    assert want["grids_videos"].tolist() == [list(g) for g in grids]
    sizes = [g for p in prepared for g in p.patch_grids]
    assert [tuple(t) for t in want["target_sizes_videos"].tolist()] == sizes
    ours = [s for p in prepared for s in p.slices]
    for got, exp in zip(
        ours, split_reference(want["pixel_values_videos"], want["target_sizes_videos"]), strict=True
    ):
        np.testing.assert_allclose(row_major_patches(got), exp, rtol=0, atol=1e-6)


def test_load_video_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "decord", None)
    with pytest.raises(InputError) as exc:
        load_video(tmp_path / "clip.mp4")
    assert "pip install av" in str(exc.value) and "\n" not in str(exc.value)


def test_load_video_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.avi"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("png", rate=5)  # lossless, so decoded frames equal the input
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(14)]
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    units = load_video(path, stack_frames=2)
    want = units_from_frames([Image.fromarray(f) for f in frames], 5.0, stack_frames=2)
    assert len(units) == len(want)
    for a, b in zip(units, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InputError, match="above the limit"):
        load_video(path, max_pixels=100)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match="cannot decode"):
        load_video(bad)


@pytest.mark.parametrize("upsize", ["never", "adaptive"])
def test_frames_always_upscale_whatever_the_image_setting(upsize):
    """MiniCPM-OCR's video processor (transformers' video_processing_minicpm_ocr.py) has no
    `small_image_upsize`: its frames always upscale, so frames ignore the image-side setting (the
    image itself keeps its native size under "never")."""
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    always = SliceConfig(max_slice_nums=1, small_image_upsize="always")
    other = SliceConfig(max_slice_nums=1, small_image_upsize=upsize)
    (got,) = prepare_units([frame], other)
    (want,) = prepare_units([frame], always)
    assert got.patch_grids == want.patch_grids and np.array_equal(got.slices[0], want.slices[0])
    if upsize == "never":
        assert slice_image(frame, other).patch_grids != want.patch_grids
