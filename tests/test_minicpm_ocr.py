"""MiniCPM-OCR 1.0 (issue 34): 4.6's model under transformers' `minicpm_ocr` config.

Evidence from outside our code:
* the model: tests/test_model_vs_transformers.py runs every 4.6 block test on
  `MiniCPMOcrForConditionalGeneration` too (checkpoint written by transformers);
* the slicing geometry: MiniCPMOcrImageProcessor's own grid / resize / refine methods (its pixel
  path needs torchvision, which has no CPU build here);
* a whole chat turn: transformers' `MiniCPMOcrProcessor` + `generate` against our `chat`, both
  fed by the 4.6 PIL image processor in 4x mode (the OCR processor's geometry, checked above);
* an ONNX bundle through `parity`.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.bundle import open_bundle_session
from edge_runtime.checkpoint import read_config
from edge_runtime.cli import main
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import SAMPLES_DIR, compare, load_cases
from edge_runtime.processing.prompt import load_chat_template
from edge_runtime.processing.slicing import SliceConfig, plan_slices
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

transformers = pytest.importorskip("transformers")
from hf_reference import FakeVideoProcessor, hf_chat_turn  # noqa: E402
from transformers.models.minicpm_ocr.image_processing_minicpm_ocr import (  # noqa: E402
    MiniCPMOcrImageProcessor,
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


def test_unsupported_small_image_upsize_is_one_line(ckpt_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, ckpt)
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre["small_image_upsize"] = "adaptive"
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    image = SAMPLES_DIR / "square.png"
    code = main(["chat", "--checkpoint", str(ckpt), "--image", str(image), "--prompt", "Read.", "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "small_image_upsize 'adaptive' is not supported" in err


class _OcrProcessor(MiniCPMOcrProcessor):
    """Without torchvision the OCR image and video processors cannot be built: accept stand-ins."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name in ("image_processor", "video_processor"):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_dir(ckpt_dir, tmp_path_factory):
    """Weights that transformers' MiniCPM-OCR wrote (scaled so greedy tokens depend on the input)."""
    model = transformers.MiniCPMOcrForConditionalGeneration.from_pretrained(ckpt_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                value.add_(0.2 * torch.randn_like(value))
            else:
                value.mul_(4.0)
    out = tmp_path_factory.mktemp("ocr-hf") / "hf"
    model.save_pretrained(out)
    for name in HOST_FILES:
        shutil.copy(ckpt_dir / name, out / name)
    return out, model.eval()


def test_chat_turn_matches_transformers_generate(hf_dir, tmp_path, capsys):
    ckpt, model = hf_dir
    path = tmp_path / "page.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (600, 1000, 3), dtype=np.uint8)).save(path)
    prompt = "Transcribe the text."
    args = ["chat", "--checkpoint", str(ckpt), "--image", str(path), "--prompt", prompt, "--json"]
    assert main([*args, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    ours = json.loads(capsys.readouterr().out)

    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    image_kwargs = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}
    image_kwargs.pop("small_image_upsize")
    processor = _OcrProcessor(
        image_processor=MiniCPMV4_6ImageProcessorPil(**image_kwargs),
        video_processor=FakeVideoProcessor("4x"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(ckpt)),
        chat_template=load_chat_template(ckpt),
    )
    prompt_ids, new = hf_chat_turn(processor, model, [path], prompt, NEW_TOKENS)
    assert ours["prompt_token_ids"] == prompt_ids
    assert ours["n_image_tokens"] > 0 and ours["n_slices"] == 3
    assert ours["token_ids"] == new
    assert len(set(new)) > 1, "degenerate output proves little"


def test_onnx_bundle_passes_parity(ckpt_dir, tmp_path):
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(
        json.dumps(
            {"cases": [{"name": "wide", "images": [str(SAMPLES_DIR / "wide.png")], "prompt": "Read it."}]}
        )
    )
    out = export_bundle(ExportRequest(ckpt_dir, tmp_path / "b", "harmonyos", None, "fp32", 1536))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == FAMILY and manifest["model"]["downsample_modes"] == ["16x", "4x"]
    reference = open_checkpoint_session(ckpt_dir, max_context=1536, threads=1)
    report = compare(
        reference, open_bundle_session(out, threads=1), load_cases(cases_file), "fp32", n_steps=6
    )
    assert report.passed, "\n".join(report.summary_lines())
    assert report.stages["greedy"]["identical_cases"] == 1.0
