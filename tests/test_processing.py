"""Image loading, slicing and the patch contract against transformers' MiniCPM-V 4.6 PIL processor."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.processing.image import load_image, normalize
from edge_runtime.processing.patches import (
    position_ids,
    row_major_patches,
    slice_to_patches,
    window_order,
)
from edge_runtime.processing.slicing import (
    SliceConfig,
    plan_slices,
    prepare_image,
    slice_image,
)

transformers = pytest.importorskip("transformers")
from hf_reference import split_reference  # noqa: E402
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (  # noqa: E402
    MiniCPMV4_6ImageProcessorPil,
)
from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor  # noqa: E402
from transformers.vision_utils import get_vision_nearest_position_ids  # noqa: E402

P = 14

# (height, width). Covers tiny, thin, wide, exact multiples of 28/56 and their off-by-one neighbours.
SMALL_SIZES = [
    (1, 1),
    (1, 2000),
    (2000, 1),
    (448, 448),
    (447, 448),
    (448, 447),
    (449, 449),
    (56, 56),
    (55, 57),
    (57, 55),
    (28, 28),
    (27, 29),
    (600, 1000),
    (1000, 600),
    (112, 168),
    (560, 560),
    (559, 561),
    (896, 896),
    (895, 897),
    (448, 1344),
    (1344, 448),
    (84, 140),
    (10, 3000),
    (3000, 10),
    (5, 500),
    (500, 5),
    (333, 777),
    (720, 1280),
    (1280, 720),
    (1343, 1345),
    (64, 4096),
]
LARGE_SIZES = [(3000, 4000), (1080, 1920)]
MODES = ["16x", "4x"]
SLICE_NUMS = [1, 9, 36]


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Random noise, so any resize or crop difference shows up in the pixels."""
    rng = np.random.default_rng(seed + 7919 * height + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ref() -> MiniCPMV4_6ImageProcessorPil:
    return MiniCPMV4_6ImageProcessorPil()


def compare_with_reference(ref, image: Image.Image, config: SliceConfig, **ref_kwargs) -> None:
    upstream = ref(image, return_tensors="np", **ref_kwargs)
    ours = slice_image(image, config)
    ts = upstream["target_sizes"]
    assert [tuple(t) for t in ts.tolist()] == ours.patch_grids
    ref_grid = tuple(upstream["grids"][0])
    assert (None if ref_grid == (0, 0) else ref_grid) == ours.grid
    assert ours.token_counts == [h * w // config.token_divisor for h, w in ours.patch_grids]
    assert upstream["num_patches_per_image"] == [len(ours.slices)]
    for sl, (h, w) in zip(ours.slices, ours.patch_grids, strict=True):
        assert sl.dtype == np.float32 and sl.shape == (3, h * P, w * P)
    for got, want in zip(ours.slices, split_reference(upstream["pixel_values"], ts), strict=True):
        np.testing.assert_allclose(row_major_patches(got), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", SMALL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_slices_match_reference_small(ref, size):
    image = noise_image(*size)
    for mode in MODES:
        for n in SLICE_NUMS:
            cfg = SliceConfig(max_slice_nums=n, downsample_mode=mode)
            compare_with_reference(ref, image, cfg, max_slice_nums=n, downsample_mode=mode)


@pytest.mark.parametrize(
    "size,mode,n", [(s, m, n) for s in LARGE_SIZES for m, n in (("16x", 9), ("4x", 36), ("16x", 1))]
)
def test_slices_match_reference_large(ref, size, mode, n):
    cfg = SliceConfig(max_slice_nums=n, downsample_mode=mode)
    compare_with_reference(ref, noise_image(*size), cfg, max_slice_nums=n, downsample_mode=mode)


def test_geometry_matches_reference_many_sizes(ref):
    """Pure geometry on a dense sweep (no pixels): grid and all slice sizes."""
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, size=(300, 2))]
    for h, w in sizes:
        for mode in MODES:
            for n in SLICE_NUMS:
                plan = plan_slices(h, w, SliceConfig(max_slice_nums=n, downsample_mode=mode))
                grid = ref.get_sliced_grid((h, w), n, 448)
                assert plan.grid == (None if grid is None else tuple(grid))
                src = ref.find_best_resize((h, w), 448, P, mode, allow_upscale=grid is None)
                assert plan.source_size == tuple(src)
                if grid is not None:
                    refine = ref.get_refine_size((h, w), grid, 448, P, mode, allow_upscale=True)
                    assert plan.refine_size == tuple(refine)


def test_slice_mode_off_and_custom_normalisation(ref):
    image = noise_image(900, 1300)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = SliceConfig(slice_mode=False, image_mean=mean, image_std=std, scale_resolution=336)
    compare_with_reference(
        ref, image, cfg, slice_mode=False, image_mean=list(mean), image_std=list(std), scale_resolution=336
    )


def test_config_from_serialised_reference(ref, tmp_path):
    custom = MiniCPMV4_6ImageProcessorPil(
        max_slice_nums=36, downsample_mode="4x", image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    )
    cfg = SliceConfig.from_preprocessor_config(custom.to_dict())
    assert (cfg.max_slice_nums, cfg.downsample_mode, cfg.scale_resolution, cfg.patch_size) == (
        36,
        "4x",
        448,
        14,
    )
    assert cfg.image_mean == (0.4, 0.5, 0.6) and cfg.image_std == (0.2, 0.3, 0.25)
    assert cfg.use_image_id is True and cfg.slice_mode is True and cfg.resample == 3
    compare_with_reference(custom, noise_image(700, 2100), cfg)
    # defaults, nesting, legacy key names, overrides
    assert SliceConfig.from_preprocessor_config({}) == SliceConfig()
    nested = SliceConfig.from_preprocessor_config({"image_processor": {"max_slice_nums": 4}})
    assert nested.max_slice_nums == 4
    legacy = SliceConfig.from_preprocessor_config({"norm_mean": [0.1, 0.2, 0.3], "norm_std": 0.5})
    assert legacy.image_mean == (0.1, 0.2, 0.3) and legacy.image_std == (0.5, 0.5, 0.5)
    assert SliceConfig.from_preprocessor_config({}, max_slice_nums=1).max_slice_nums == 1
    with pytest.raises(CheckpointError):
        SliceConfig.from_preprocessor_config({"downsample_mode": "9x"})


def test_token_counts_match_reference_placeholder(ref):
    """The counts the prompt builder needs equal the <|image_pad|> runs the HF processor writes."""
    fake = types.SimpleNamespace(
        image_start_token="<image>",
        image_end_token="</image>",
        slice_start_token="<slice>",
        slice_end_token="</slice>",
        image_token="#",
        slice_mode=True,
    )
    for h, w in [(600, 1000), (3000, 4000), (100, 100), (1, 2000), (2000, 900)]:
        for mode, div in (("16x", 16), ("4x", 4)):
            upstream = ref(noise_image(h, w), return_tensors="np", downsample_mode=mode, max_slice_nums=36)
            text = MiniCPMV4_6Processor.replace_image_token(
                fake, upstream, image_idx=0, image_token_divisor=div
            )
            plan = plan_slices(h, w, SliceConfig(max_slice_nums=36, downsample_mode=mode))
            counts = [text.split("</image>")[0].count("#")]
            counts += [seg.count("#") for seg in text.split("</image>")[1].split("</slice>")[:-1]]
            assert counts == plan.token_counts, (h, w, mode)
            rows = text.split("</image>")[1].count("\n") + 1 if plan.grid else 0
            assert rows == (plan.grid[0] if plan.grid else 0)


# ---------------------------------------------------------------- patches / window order


def test_window_order_layout():
    # 8x8 patches, 16x: first 4x4 block = four 2x2 windows, each row-major
    order = window_order(8, 8, "16x")
    assert order[:16].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 16, 17, 24, 25, 18, 19, 26, 27]
    assert order[16:20].tolist() == [4, 5, 12, 13]  # next block to the right
    assert window_order(4, 6, "4x")[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9]
    for h, w in [(4, 4), (8, 12), (36, 28), (4, 1428), (1432, 4)]:
        for mode in MODES:
            o = window_order(h, w, mode)
            assert o.dtype == np.int64 and sorted(o.tolist()) == list(range(h * w))


def test_window_order_keeps_merged_tokens_row_major():
    """After fusing each window (and in 16x each block of windows), tokens are in row-major order."""
    h, w = 12, 20
    order = window_order(h, w, "16x")
    rows, cols = np.divmod(order, w)
    blocks = (rows // 4) * (w // 4) + cols // 4
    assert (blocks.reshape(-1, 16) == blocks.reshape(-1, 16)[:, :1]).all()
    assert blocks[::16].tolist() == list(range(h * w // 16))
    windows = (rows // 2) * (w // 2) + cols // 2
    assert (windows.reshape(-1, 4) == windows.reshape(-1, 4)[:, :1]).all()


@pytest.mark.parametrize("h,w", [(3, 4), (4, 6), (0, 4)])
def test_window_order_rejects_bad_grid_16x(h, w):
    with pytest.raises(InputError, match="multiple of 4"):
        window_order(h, w, "16x")


def test_window_order_rejects_bad_grid_4x():
    with pytest.raises(InputError, match="multiple of 2"):
        window_order(3, 4, "4x")
    with pytest.raises(InputError):
        window_order(4, 4, "8x")


def test_slice_to_patches_is_reference_permuted(ref):
    for size, mode in [((600, 1000), "16x"), ((1000, 600), "4x"), ((2000, 1), "16x")]:
        upstream = ref(noise_image(*size), return_tensors="np", downsample_mode=mode)
        ts = upstream["target_sizes"]
        ours = slice_image(noise_image(*size), SliceConfig(downsample_mode=mode))
        ref_pos = get_vision_nearest_position_ids(torch.from_numpy(ts), 70).numpy()
        start = 0
        for sl, want, (h, w) in zip(
            ours.slices, split_reference(upstream["pixel_values"], ts), ts.tolist(), strict=True
        ):
            patches, pos = slice_to_patches(sl, mode)
            order = window_order(h, w, mode)
            assert patches.dtype == np.float32 and patches.shape == (h * w, 3 * P * P)
            assert pos.dtype == np.int64 and pos.shape == (h * w,)
            np.testing.assert_allclose(patches, want[order], rtol=0, atol=1e-6)
            np.testing.assert_array_equal(pos, ref_pos[start : start + h * w][order])
            # row i is exactly the (c, y, x)-flattened 14x14 crop
            y0, x0 = divmod(int(order[5]), w)
            np.testing.assert_array_equal(
                patches[5], sl[:, y0 * P : y0 * P + P, x0 * P : x0 * P + P].reshape(-1)
            )
            start += h * w


def test_position_ids_match_reference_all_small_grids():
    sizes = [(h, w) for h in range(1, 121) for w in (1, 2, 3, 7, 13, 32, 69, 70, 71, 97, 120, 200)]
    for side in (70, 32):
        want = get_vision_nearest_position_ids(torch.tensor(sizes), side).numpy()
        got = np.concatenate([position_ids(h, w, side) for h, w in sizes])
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64 and got.max() < side * side


# ---------------------------------------------------------------- loading / bad inputs


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "nope.png")
    assert "not found" in assert_one_line(exc)


def test_directory_path(tmp_path):
    with pytest.raises(InputError) as exc:
        load_image(tmp_path)
    assert "not a file" in assert_one_line(exc)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "empty.png")
    assert "empty" in assert_one_line(exc)


def test_text_file_named_png(tmp_path):
    (tmp_path / "fake.png").write_text("hello, I am not an image\n" * 10)
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "fake.png")
    assert "not a readable image" in assert_one_line(exc)


def test_truncated_png(tmp_path):
    path = save(noise_image(200, 300), tmp_path / "full.png")
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_image(tmp_path / "cut.png")
    assert "truncated" in assert_one_line(exc)


def test_above_max_pixels_and_pil_guard(tmp_path, monkeypatch):
    path = save(noise_image(40, 50), tmp_path / "big.png")
    with pytest.raises(InputError) as exc:
        load_image(path, max_pixels=1999)
    assert "2,000 pixels" in assert_one_line(exc)
    with pytest.raises(InputError):
        prepare_image(path, SliceConfig(max_pixels=1000))
    # PIL's own bomb guard must never fire first (neither its warning nor its error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=2000).size == (50, 40)
        assert load_image(path, max_pixels=None).size == (50, 40)
        with pytest.raises(InputError):
            load_image(path, max_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "1"])
def test_mode_conversion_matches_reference(ref, tmp_path, mode):
    """File -> RGB like the reference given the opened file: alpha over white, else convert("RGB")."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (90, 130, 4), dtype=np.uint8)
    rgba[:30, :, 3] = 0  # a fully transparent band
    base = Image.fromarray(rgba, "RGBA")
    if mode == "P":  # palette with a transparent index (tRNS chunk)
        path = save(base.convert("RGB").quantize(64), tmp_path / "p.png", transparency=5)
    elif mode == "CMYK":
        path = save(base.convert("CMYK"), tmp_path / "c.tiff")
    else:
        path = save(base.convert(mode), tmp_path / "img.png")
    got = prepare_image(path, SliceConfig())
    with Image.open(path) as opened:
        assert opened.mode == mode
        want = ref(opened, return_tensors="np")
    for a, b in zip(got.slices, split_reference(want["pixel_values"], want["target_sizes"]), strict=True):
        np.testing.assert_allclose(row_major_patches(a), b, rtol=0, atol=1e-6)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """I;16 PNGs: 65535 is white, 32768 mid grey, 0 black (PIL's convert("RGB") clips all > 255 to white)."""
    arr = np.array([[0, 255, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = save(Image.fromarray(arr), tmp_path / "i16.png")
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    got = np.asarray(load_image(path))
    assert got.shape == (4, 4, 3) and (got == got[..., :1]).all()
    assert got[0, :, 0].tolist() == [0, 1, 128, 255]


def test_rgba_transparent_becomes_white(tmp_path):
    arr = np.zeros((10, 10, 4), dtype=np.uint8)
    path = save(Image.fromarray(arr, "RGBA"), tmp_path / "clear.png")
    assert np.asarray(load_image(path)).min() == 255


def test_exif_orientation_like_transformers_load_image(ref, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    img = noise_image(60, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (60, 100)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))
    assert load_image(path, exif_transpose=False).size == (100, 60)


def test_normalize_bit_exact_and_validation():
    arr = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    got = normalize(arr, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
    chw = arr.transpose(2, 0, 1)
    want = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)
    want = (want - np.array([0.4, 0.5, 0.6], np.float32)[:, None, None]) / np.array(
        [0.2, 0.3, 0.25], np.float32
    )[:, None, None]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InputError):
        normalize(np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError):
        slice_image(Image.new("L", (4, 4)), SliceConfig())
    with pytest.raises(InputError):
        SliceConfig(max_slice_nums=0)
