"""MiniCPM-OCR 1.0 (issue 34): 4.6's model under transformers' `minicpm_ocr` config.

Evidence from outside our code:
* the model: tests/test_model_vs_transformers.py runs every 4.6 block test on
  `MiniCPMOcrForConditionalGeneration` too (checkpoint written by transformers);
* the slicing geometry: MiniCPMOcrImageProcessor's own grid / resize / refine methods;
* `small_image_upsize` ("always", "never", "adaptive"): transformers' `adaptive_upsize_resolution`
  on synthetic text pages and their cells, and MiniCPMOcrImageProcessor's own `_preprocess` (and
  `_resolve_tile_size`) run through `_UpstreamOcrImageProcessor`. That processor is registered
  torchvision-only (no CPU build here), so the stand-in lends it PIL bicubic for torchvision's
  resize and the 4.6 PIL processor's normalisation; every decision (grid, source resolution,
  per-cell size, crop boxes) is upstream's code. Slice sizes, token counts and pixels match ours;
* a whole chat turn, 12 image/prompt cases over the three settings: transformers'
  `MiniCPMOcrProcessor` (with that stand-in) + `generate` against our `chat --json`: prompt ids
  and greedy tokens;
* an ONNX bundle of an "adaptive" checkpoint through `parity` and `chat --bundle`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from edge_runtime.bundle import open_bundle_session
from edge_runtime.checkpoint import read_config
from edge_runtime.cli import main
from edge_runtime.errors import InputError
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import SAMPLES_DIR, compare, default_cases, load_cases
from edge_runtime.processing.prompt import load_chat_template
from edge_runtime.processing.slicing import SliceConfig, plan_slices, slice_image
from edge_runtime.processing.small_image_upsize import CHOICES, adaptive_resolution, cell_box
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

transformers = pytest.importorskip("transformers")
from hf_reference import FakeVideoProcessor, hf_chat_turn  # noqa: E402
from transformers.image_utils import make_flat_list_of_images  # noqa: E402
from transformers.models.minicpm_ocr.image_processing_minicpm_ocr import (  # noqa: E402
    MiniCPMOcrImageProcessor,
    adaptive_upsize_resolution,
)
from transformers.models.minicpm_ocr.processing_minicpm_ocr import MiniCPMOcrProcessor  # noqa: E402
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (  # noqa: E402
    MiniCPMV4_6ImageProcessorPil,
)

FAMILY = "minicpm-ocr-1.0"
HOST_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "generation_config.json")  # fmt: skip
NEW_TOKENS = 10
SIZES = [(300, 500), (448, 448), (900, 1400), (1400, 300), (100, 2000), (50, 60), (2000, 2100), (640, 480)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return init_checkpoint(FAMILY, "tiny", tmp_path_factory.mktemp("ocr") / "ckpt", seed=5)


def test_config_is_transformers_ocr_config(ckpt_dir):
    raw = json.loads((ckpt_dir / "config.json").read_text())
    assert raw["model_type"] == "minicpm_ocr" and raw["downsample_mode"] == "4x"
    assert raw["tie_word_embeddings"] is True
    assert "image_size" not in raw and "drop_vision_last_layer" not in raw
    hf = transformers.MiniCPMOcrConfig.from_dict(raw)
    assert hf.downsample_mode == "4x" and hf.tie_word_embeddings
    cfg, _ = read_config(ckpt_dir)
    assert cfg.to_hf() == {k: v for k, v in raw.items() if k != "torch_dtype"}


@pytest.mark.parametrize("mode", ["4x", "16x"])
def test_slice_geometry_is_the_ocr_processors(mode):
    """Grid, source size and refine size of our plan = MiniCPMOcrImageProcessor's methods with
    small_image_upsize "always" (its default)."""
    theirs = MiniCPMOcrImageProcessor.__new__(MiniCPMOcrImageProcessor)
    config = SliceConfig(downsample_mode=mode)
    for size in SIZES:
        plan = plan_slices(*size, config)
        grid = theirs.get_sliced_grid(size, 9, 448)
        source = theirs.find_best_resize(size, 448, 14, mode, allow_upscale=grid is None)
        assert plan.grid == (None if grid is None else tuple(grid)), size
        assert plan.source_size == tuple(source), size
        if grid is not None:
            refine = theirs.get_refine_size(size, grid, 448, 14, mode, allow_upscale=True)
            assert plan.refine_size == tuple(refine), size


TEXT = "Invoice 2026-12-07: 3 x widgets @ 4.20 = 12.60; ref QX-81/b. "


def text_page(height: int, width: int, font_px: int | None, dark: bool = False) -> Image.Image:
    """Lines of text in a `font_px` FreeType font (None: a blank page); `dark`: light text on a dark page."""
    paper, ink = (20, 230) if dark else (250, 15)
    image = Image.new("RGB", (width, height), (paper,) * 3)
    if font_px:
        draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=font_px)
        for i, y in enumerate(range(2, height - font_px, int(font_px * 1.5))):
            draw.text((2 - 7 * (i % 3), y), TEXT * 4, fill=(ink,) * 3, font=font)
    return image


def quadrants(height: int, width: int, fonts: list[int | None]) -> Image.Image:
    """Four text pages (row-major) side by side: a 2x2-sliced image whose cells differ."""
    image = Image.new("RGB", (width, height))
    for k, font_px in enumerate(fonts):
        row, col = divmod(k, 2)
        image.paste(text_page(height // 2, width // 2, font_px), (col * (width // 2), row * (height // 2)))
    return image


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * height + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMAGES = {
    "noise": lambda: noise(600, 1000),
    "small_text": lambda: text_page(300, 400, 10),
    "dark_text": lambda: text_page(300, 400, 10, dark=True),
    "large_text": lambda: text_page(200, 300, 30),
    "tiny": lambda: text_page(40, 60, 30),
    "tiny_blank": lambda: text_page(40, 60, None),
    "tiny_small_text": lambda: text_page(50, 60, 10),
    "quads_800": lambda: quadrants(800, 800, [10, 30, None, 10]),
    "quads_784": lambda: quadrants(784, 784, [30, None, 10, 10]),
    "quads_880": lambda: quadrants(880, 880, [30, None, 10, 10]),  # native cells no cheaper than tiles
    "page_700x1000": lambda: text_page(700, 1000, 9),
    "large_2000": lambda: text_page(1000, 2000, 40),
}


def _chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image).transpose(2, 0, 1)


def test_adaptive_resolution_is_transformers():
    """Our glyph classifier = transformers' `adaptive_upsize_resolution`, on whole images and on
    every cell of a 2x2 and a 3x3 grid; all three outcomes occur."""
    seen = set()
    for name, make in IMAGES.items():
        image = make()
        crops = [image]
        for grid in ((2, 2), (3, 3)):
            for r in range(grid[0]):
                for c in range(grid[1]):
                    top, left, bottom, right = cell_box((image.height, image.width), grid, r, c)
                    crops.append(image.crop((left, top, right, bottom)))
        for crop in crops:
            ours = adaptive_resolution(crop, 448)
            assert ours == adaptive_upsize_resolution(_chw(crop), 448), (name, crop.size)
            seen.add(ours)
    assert seen == {448, 84, None}


class _UpstreamOcrImageProcessor(MiniCPMV4_6ImageProcessorPil):
    """MiniCPMOcrImageProcessor's own slicing code (`_preprocess`, `_resolve_tile_size`, grid and
    resize methods) on a PIL-backend processor: its base class needs torchvision, so `resize` is PIL
    bicubic on the uint8 [C, H, W] tensors (as the 4.6 PIL processor resizes) and
    `rescale_and_normalize` the 4.6 PIL processor's float arithmetic."""

    find_best_resize = MiniCPMOcrImageProcessor.find_best_resize
    get_refine_size = MiniCPMOcrImageProcessor.get_refine_size
    get_sliced_grid = MiniCPMOcrImageProcessor.get_sliced_grid
    reshape_by_patch = MiniCPMOcrImageProcessor.reshape_by_patch
    _resolve_tile_size = MiniCPMOcrImageProcessor._resolve_tile_size
    _ocr_preprocess = MiniCPMOcrImageProcessor._preprocess

    def __init__(self, small_image_upsize: str = "always", **kwargs):
        super().__init__(**kwargs)
        self.small_image_upsize = small_image_upsize

    def resize(self, image, size, resample, **kwargs):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        out = pil.resize((size.width, size.height), resample=resample)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)

    def rescale_and_normalize(self, images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        x = (images.double().numpy() * rescale_factor).astype(np.float32)
        mean = np.asarray(image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(image_std, dtype=np.float32).reshape(1, 3, 1, 1)
        return torch.from_numpy((x - mean) / std)

    def preprocess(self, images, **kwargs):
        images = make_flat_list_of_images(images)
        tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images]
        return self._ocr_preprocess(
            tensors, do_resize=True, resample=self.resample, do_rescale=True,
            rescale_factor=self.rescale_factor, do_normalize=True, image_mean=self.image_mean,
            image_std=self.image_std, max_slice_nums=self.max_slice_nums,
            scale_resolution=self.scale_resolution, patch_size=self.patch_size,
            slice_mode=self.slice_mode, small_image_upsize=self.small_image_upsize,
            return_tensors=kwargs.get("return_tensors"), disable_grouping=True,
            downsample_mode=kwargs.get("downsample_mode", self.downsample_mode),
        )  # fmt: skip


@pytest.mark.parametrize("mode", ["4x", "16x"])
@pytest.mark.parametrize("upsize", CHOICES)
def test_slices_are_the_ocr_processors(upsize, mode):
    """Per image: grid, every slice's size (target_sizes, so token counts) and its normalised
    pixels = MiniCPMOcrImageProcessor._preprocess with the same small_image_upsize."""
    theirs = _UpstreamOcrImageProcessor(upsize, downsample_mode=mode)
    config = SliceConfig(downsample_mode=mode, small_image_upsize=upsize)
    for name, make in IMAGES.items():
        image = make()
        ours = slice_image(image, config)
        ref = theirs(image, return_tensors="pt")
        assert [list(g) for g in ref["target_sizes"].tolist()] == [list(g) for g in ours.patch_grids], name
        assert ref["grids"][0] == (list(ours.grid) if ours.grid else [0, 0]), name
        ours_pixels = torch.cat(
            [theirs.reshape_by_patch(torch.from_numpy(s), 14) for s in ours.slices], dim=-1
        )
        assert torch.equal(ref["pixel_values"][0], ours_pixels), name


def test_small_image_upsize_decisions():
    """What each setting does to the synthetic images in 4x (so the comparisons above cover every branch)."""

    def sizes(name, upsize):
        image = IMAGES[name]()
        return plan_slices(
            image.height, image.width, SliceConfig(small_image_upsize=upsize, downsample_mode="4x"), image
        ).slice_sizes

    assert sizes("small_text", "always") == sizes("small_text", "adaptive") == [(392, 504)]
    assert sizes("small_text", "never") == [(308, 392)]  # native, snapped to 28
    assert sizes("large_text", "adaptive") == sizes("large_text", "never") == [(196, 308)]
    assert sizes("tiny", "adaptive") == [(56, 112)] and sizes("tiny", "never") == [(28, 56)]  # towards 84^2
    # the cells of a 2x2 image: small dense text keeps the upscaled 448 tile, the others their size
    assert sizes("quads_800", "adaptive") == [(448, 448)] * 2 + [(392, 392)] * 2 + [(448, 448)]
    assert sizes("quads_784", "adaptive") == [(448, 448)] + [(392, 392)] * 2 + [(448, 448)] * 2
    # 440x440 cells snap to 448x448: no fewer pixels than the regular tile, which they keep
    assert sizes("quads_880", "adaptive") == [(448, 448)] * 5
    # a sliced image's source and tiles: "never" is "always"
    assert sizes("quads_800", "never") == sizes("quads_800", "always") == [(448, 448)] * 5
    image = IMAGES["quads_784"]()
    plan = plan_slices(784, 784, SliceConfig(small_image_upsize="adaptive", downsample_mode="4x"), image)
    assert [c and c.box for c in plan.cell_tiles] == [(0, 0, 392, 392), (0, 392, 392, 784), None, None]
    with pytest.raises(InputError, match="pass the image"):
        plan_slices(784, 784, SliceConfig(small_image_upsize="adaptive"))


def _with_upsize(src, dst, value):
    """A copy of checkpoint (or bundle) directory `src` whose preprocessor config sets small_image_upsize."""
    shutil.copytree(src, dst)
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    pre["small_image_upsize"] = value
    (dst / "preprocessor_config.json").write_text(json.dumps(pre))
    return dst


def _chat_json(capsys, source_flag, source, images, prompt, new_tokens=NEW_TOKENS):
    args = [
        "chat",
        source_flag,
        str(source),
        "--prompt",
        prompt,
        "--json",
        "--max-new-tokens",
        str(new_tokens),
    ]
    for path in images:
        args += ["--image", str(path)]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def test_unknown_small_image_upsize_is_one_line(ckpt_dir, tmp_path, capsys):
    ckpt = _with_upsize(ckpt_dir, tmp_path / "ckpt", "sometimes")
    image = SAMPLES_DIR / "square.png"
    code = main(["chat", "--checkpoint", str(ckpt), "--image", str(image), "--prompt", "Read.", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "small_image_upsize must be one of 'always', 'never', 'adaptive', got 'sometimes'" in err


def test_adaptive_without_opencv_is_one_line(ckpt_dir, tmp_path, capsys, monkeypatch):
    """Without OpenCV, "adaptive" fails at the first image with one line naming the `ocr` extra;
    "always" and "never" do not need it."""
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    image = IMAGES["small_text"]()
    assert slice_image(image, SliceConfig(small_image_upsize="never", downsample_mode="4x")).patch_grids == [
        (22, 28)
    ]
    with pytest.raises(InputError, match="OpenCV"):
        slice_image(image, SliceConfig(small_image_upsize="adaptive"))
    ckpt = _with_upsize(ckpt_dir, tmp_path / "ckpt", "adaptive")
    path = SAMPLES_DIR / "square.png"
    code = main(["chat", "--checkpoint", str(ckpt), "--image", str(path), "--prompt", "Read.", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "small_image_upsize 'adaptive' needs OpenCV" in err and "minicpmv-edge[ocr]" in err


class _OcrProcessor(MiniCPMOcrProcessor):
    """Without torchvision the OCR image and video processors cannot be built: accept stand-ins."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name in ("image_processor", "video_processor"):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    """Weights that transformers' MiniCPM-OCR wrote: trained-like (slow) DeltaNet decays, the rest
    scaled so greedy tokens depend on the input."""
    model = transformers.MiniCPMOcrForConditionalGeneration.from_pretrained(ckpt_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.endswith("A_log"):  # decay rates log-uniform over [1e-3, 0.5]
                value.copy_(torch.empty_like(value).uniform_(math.log(1e-3), math.log(0.5)))
            elif "norm" in name or name.endswith("dt_bias"):
                value.add_(0.2 * torch.randn_like(value))
            else:
                value.mul_(4.0)
    out = tmp_path_factory.mktemp("ocr-hf") / "hf"
    model.save_pretrained(out)
    for name in HOST_FILES:
        shutil.copy(ckpt_dir / name, out / name)
    return out, model.eval()


# (setting, images, prompt, whether its image tokens differ from "always")
CHAT_CASES = {
    "always_noise": ("always", ["noise"], "Transcribe the text.", False),
    "always_small_text": ("always", ["small_text"], "Read the invoice.", False),
    "never_small_text": ("never", ["small_text"], "Read the invoice.", True),
    "never_tiny": ("never", ["tiny_small_text"], "What does it say?", True),
    "never_sliced": ("never", ["quads_800"], "Transcribe the page.", False),
    "adaptive_small_text": ("adaptive", ["small_text"], "Read the invoice.", False),
    "adaptive_dark_text": ("adaptive", ["dark_text"], "Read it.", False),
    "adaptive_large_text": ("adaptive", ["large_text"], "What is written here?", True),
    "adaptive_tiny": ("adaptive", ["tiny"], "What is this?", True),
    "adaptive_cells_resized": ("adaptive", ["quads_800"], "Transcribe the page.", True),
    "adaptive_cells_cut": ("adaptive", ["quads_784"], "Transcribe every quadrant.", True),
    "adaptive_two_images": ("adaptive", ["large_text", "quads_784"], "Compare the two images.", True),
}


@pytest.fixture(scope="module")
def upsize_dirs(hf_dir, tmp_path_factory):
    """transformers-written checkpoints, one per small_image_upsize value."""
    root = tmp_path_factory.mktemp("ocr-upsize")
    return {value: _with_upsize(hf_dir[0], root / value, value) for value in CHOICES}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_turn_matches_transformers_generate(case, hf_dir, upsize_dirs, tmp_path, capsys):
    upsize, names, prompt, differs = CHAT_CASES[case]
    ckpt, model = upsize_dirs[upsize], hf_dir[1]
    paths = []
    for name in names:
        paths.append(tmp_path / f"{name}.png")
        IMAGES[name]().save(paths[-1])
    ours = _chat_json(capsys, "--checkpoint", ckpt, paths, prompt)

    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    image_kwargs = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}
    processor = _OcrProcessor(
        image_processor=_UpstreamOcrImageProcessor(**image_kwargs),
        video_processor=FakeVideoProcessor("4x"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(ckpt)),
        chat_template=load_chat_template(ckpt),
    )
    prompt_ids, new = hf_chat_turn(processor, model, paths, prompt, NEW_TOKENS)
    assert ours["prompt_token_ids"] == prompt_ids
    assert ours["token_ids"] == new
    assert len(set(new)) > 1, "degenerate output proves little"
    always = SliceConfig(small_image_upsize="always", downsample_mode="4x")
    n_always = sum(
        sum(plan_slices(im.height, im.width, always).token_counts) for im in map(Image.open, paths)
    )
    assert (ours["n_image_tokens"] != n_always) == differs


def test_adaptive_onnx_bundle_passes_parity_and_chat(ckpt_dir, tmp_path, capsys):
    """A bundle carries the checkpoint's preprocessor config: an "adaptive" bundle passes parity
    against its checkpoint and `chat --bundle` slices as `chat --checkpoint` does (cut cells,
    native small images), which is not what "always" gives."""
    ckpt = _with_upsize(ckpt_dir, tmp_path / "ckpt", "adaptive")
    paths = {name: tmp_path / f"{name}.png" for name in ("quads_784", "large_text")}
    for name, path in paths.items():
        IMAGES[name]().save(path)
    cases = [{"name": "wide", "images": [str(SAMPLES_DIR / "wide.png")], "prompt": "Read it."}]
    cases += [{"name": name, "images": [str(path)], "prompt": "Read it."} for name, path in paths.items()]
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps({"cases": cases}))
    out = export_bundle(ExportRequest(ckpt, tmp_path / "b", "harmonyos", None, "fp32", 1536))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == FAMILY and manifest["model"]["downsample_modes"] == ["16x", "4x"]
    assert manifest["preprocessing"]["small_image_upsize"] == "adaptive"
    reference = open_checkpoint_session(ckpt, max_context=1536, threads=1)
    report = compare(
        reference, open_bundle_session(out, threads=1), load_cases(cases_file), "fp32", n_steps=6
    )
    assert report.passed, "\n".join(report.summary_lines())
    assert report.stages["greedy"]["identical_cases"] == 1.0

    for name, path in paths.items():
        from_bundle = _chat_json(capsys, "--bundle", out, [path], "Read it.", 4)
        from_ckpt = _chat_json(capsys, "--checkpoint", ckpt, [path], "Read it.", 4)
        assert from_bundle["prompt_token_ids"] == from_ckpt["prompt_token_ids"], name
        assert from_bundle["token_ids"] == from_ckpt["token_ids"], name
        image = Image.open(path)
        plan = plan_slices(image.height, image.width, SliceConfig(downsample_mode="4x"))
        assert from_bundle["n_image_tokens"] != sum(plan.token_counts), name


@pytest.mark.parametrize(
    "target, quant",
    [
        ("harmonyos", "int8"),
        ("harmonyos", "int4"),
        ("ios", "int4"),
        pytest.param(
            "android",
            "8da4w",
            marks=pytest.mark.skipif(
                os.environ.get("MINICPMV_EDGE_SLOW") != "1", reason="minutes; make test-slow"
            ),
        ),
    ],
    ids=["onnx-int8", "onnx-int4", "coreml-int4", "executorch-8da4w"],
)
def test_quantized_bundles_pass_their_gates(tmp_path, target, quant):
    """OCR's quantized bundles against DESIGN.md's gates on the default parity cases (16x and 4x,
    sliced and not), 32 decode steps, as `minicpmv-edge parity` runs them."""
    ckpt = init_checkpoint(FAMILY, "tiny", tmp_path / "ckpt", seed=0)
    out = export_bundle(ExportRequest(ckpt, tmp_path / "b", target, None, quant, 1536))
    reference = open_checkpoint_session(ckpt, max_context=1536, threads=1)
    report = compare(reference, open_bundle_session(out, threads=1), default_cases(), quant, n_steps=32)
    assert report.passed, "\n".join(report.summary_lines())
