"""MiniCPM-V 4.7 (Canvas M-RoPE) on the PyTorch reference path, against transformers only.

Ground truth: a tiny checkpoint that transformers' `MiniCPMV4_7ForConditionalGeneration` builds and
saves itself (weights scaled so that greedy tokens depend on the input, DeltaNet decays slow, an
M-RoPE split other than our preset's), run through transformers' `MiniCPMV4_7Processor` and greedy
`generate`; `chat --checkpoint --json` must give the same prompt ids and the same new tokens, and our
prefill / teacher-forced logits must equal transformers' forward. The processor is assembled from
parts as in hf_reference.py (no torchvision here): our tokenizer files and 4.6's PIL image processor,
which transformers maps minicpmv4_7 to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.checkpoint import read_config
from edge_runtime.cli import main
from edge_runtime.errors import InputError
from edge_runtime.generation import prefill, teacher_forced_logits
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.models.minicpm_v47 import MiniCPMV47Config
from edge_runtime.processing.prompt import load_chat_template
from edge_runtime.runtime import open_checkpoint_session
from export import pipeline
from export.pipeline import ExportRequest, export_bundle

transformers = pytest.importorskip("transformers")
from hf_reference import FakeVideoProcessor  # noqa: E402
from transformers.models.minicpmv4_7.processing_minicpmv4_7 import MiniCPMV4_7Processor  # noqa: E402

FAMILY = "minicpm-v-4.7"
HOST_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "generation_config.json")  # fmt: skip
NEW_TOKENS = 10
LOGITS_TOLERANCE = 1e-4
MARKERS = {"image_start_id": "<image>", "image_end_id": "</image>",
           "slice_start_id": "<slice>", "slice_end_id": "</slice>"}  # fmt: skip

# (name, image sizes (w, h), prompt, downsample mode)
CASES = [
    ("text-only", [], "Write one short sentence about the sea.", "16x"),
    ("small-unsliced-16x", [(120, 90)], "What is this?", "16x"),
    ("small-unsliced-4x", [(150, 200)], "What is this?", "4x"),
    ("square-unsliced-16x", [(448, 448)], "Describe the picture.", "16x"),
    ("sliced-2x3-16x", [(1344, 896)], "Describe it.", "16x"),
    ("sliced-2x3-4x", [(1344, 896)], "Describe it.", "4x"),
    ("sliced-tall-16x", [(500, 1500)], "Read the text.", "16x"),
    ("sliced-wide-4x", [(1500, 420)], "Read the text.", "4x"),
    ("two-images-16x", [(120, 90), (1000, 700)], "What differs between them?", "16x"),
    ("two-images-4x", [(900, 600), (64, 300)], "Compare the two.", "4x"),
    ("photo-640x480-4x", [(640, 480)], "How many shapes?", "4x"),
]


class Processor(MiniCPMV4_7Processor):
    """Without torchvision, transformers cannot resolve the video processor base class by name."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    return init_checkpoint(FAMILY, "tiny", tmp_path_factory.mktemp("v47") / "tiny", seed=3)


@pytest.fixture(scope="module")
def hf(preset_dir, tmp_path_factory):
    """(checkpoint dir written by transformers, its model, a processor per downsample mode)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(preset_dir))
    raw = json.loads((preset_dir / "config.json").read_text())
    markers = {key: tok.convert_tokens_to_ids(t) for key, t in MARKERS.items()}
    newline = tok.encode("\n")
    assert len(newline) == 1
    raw.update(markers, newline_id=newline[0])
    text = raw["text_config"]  # other sizes than the preset's: 16 rotary frequencies, [6, 5, 5]
    text.update(head_dim=64, layer_types=["linear_attention", "full_attention"] * 2)
    text["rope_parameters"].update(partial_rotary_factor=0.5, mrope_section=[6, 5, 5])
    config = transformers.MiniCPMV4_7Config.from_dict(raw)
    torch.manual_seed(0)
    model = transformers.MiniCPMV4_7ForConditionalGeneration(config).eval()
    model.generation_config = transformers.GenerationConfig.from_pretrained(preset_dir)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.endswith("A_log"):  # trained-like decay rates: log-uniform over [1e-3, 0.5]
                value.copy_(torch.empty_like(value).uniform_(math.log(1e-3), math.log(0.5)))
            elif "norm" in name or name.endswith("dt_bias"):
                value.add_(0.2 * torch.randn_like(value))
            else:  # larger than the init so greedy tokens depend on the input
                value.mul_(4.0)
    out = tmp_path_factory.mktemp("v47-hf") / "hf"
    model.save_pretrained(out)
    for name in HOST_FILES:
        shutil.copy(preset_dir / name, out / name)
    processors = {}
    for mode in ("16x", "4x"):
        image_processor = transformers.AutoImageProcessor.from_pretrained(
            str(out), backend="pil", downsample_mode=mode
        )
        processors[mode] = Processor(
            image_processor=image_processor,
            video_processor=FakeVideoProcessor(mode),
            tokenizer=tok,
            chat_template=load_chat_template(out),
        )
    return out, model, processors


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One picture per size: smooth colour fields plus noise, so slices differ."""
    base = tmp_path_factory.mktemp("v47-images")
    paths = {}
    for i, (w, h) in enumerate(sorted({s for _, sizes, _, _ in CASES for s in sizes})):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        pixels = pixels + rng.normal(0, 40, pixels.shape)
        paths[(w, h)] = base / f"{w}x{h}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[(w, h)])
    return paths


def _hf_inputs(processor, image_paths, prompt: str) -> dict:
    """Processor outputs of one user turn (thinking off), with the canvas inputs M-RoPE reads."""
    content = [{"type": "image", "image": Image.open(p)} for p in image_paths]
    content.append({"type": "text", "text": prompt})
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt", enable_thinking=False,
    )  # fmt: skip
    keep = ("input_ids", "attention_mask", "pixel_values", "target_sizes", "mm_token_type_ids")
    return {k: v for k, v in inputs.items() if k in keep}


def _hf_generate(model, inputs: dict, mode: str) -> list[int]:
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model.generate(**inputs, downsample_mode=mode, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = set(model.generation_config.eos_token_id)
    for i, token in enumerate(new):
        if token in stops:
            return new[:i]
    return new


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chat_matches_transformers_generate(hf, images, case, capsys):
    ckpt, model, processors = hf
    _, sizes, prompt, mode = case
    paths = [images[s] for s in sizes]
    args = ["chat", "--checkpoint", str(ckpt), "--prompt", prompt, "--json", "--downsample-mode", mode]
    for p in paths:
        args += ["--image", str(p)]
    assert main([*args, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    ours = json.loads(capsys.readouterr().out)

    inputs = _hf_inputs(processors[mode], paths, prompt)
    new = _hf_generate(model, inputs, mode)
    assert ours["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    if paths:  # transformers really ran Canvas M-RoPE: its positions outgrew the prompt
        assert model.model.rope_deltas is not None and int(model.model.rope_deltas) != 0
    assert ours["token_ids"] == new
    assert len(set(new)) > 1, "degenerate output proves little"


@pytest.mark.parametrize("case", [CASES[4], CASES[9]], ids=[CASES[4][0], CASES[9][0]])
def test_logits_match_transformers_forward(hf, images, case):
    """Prefill and teacher-forced decode logits = transformers' forward over prompt + tokens; the same
    run on cache-index positions is far off (the comparison sees the canvas)."""
    ckpt, model, processors = hf
    _, sizes, prompt, mode = case
    paths = [images[s] for s in sizes]
    session = open_checkpoint_session(ckpt, threads=1)
    prepared = session.prepare(prompt, paths, downsample_mode=mode)
    assert prepared.rope is not None and prepared.rope.rope_delta != 0
    forced = [5, 17, 230, 9]
    ours = np.stack(teacher_forced_logits(session.backend, prepared.embeds, forced, rope=prepared.rope))

    inputs = _hf_inputs(processors[mode], paths, prompt)
    n_prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([forced])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    model.model.rope_deltas = None
    with torch.no_grad():
        theirs = model(**inputs, downsample_mode=mode).logits[0, n_prompt - 1 :].numpy()
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_TOLERANCE, rtol=0)

    flat, _, _ = prefill(session.backend, prepared.embeds, session.backend.new_state())
    assert np.abs(flat - theirs[0]).max() > 100 * LOGITS_TOLERANCE


def test_explicit_cache_rows_equal_the_cache_index_bit_for_bit(hf):
    """RoPE rows that repeat the cache index give exactly the logits of the 1-D path."""
    session = open_checkpoint_session(hf[0], threads=1)
    prepared = session.prepare("Count to five.")
    t = len(prepared.prompt.ids)
    rows = np.broadcast_to(np.arange(t), (3, t))
    one_d, _, _ = prefill(session.backend, prepared.embeds, session.backend.new_state())
    three, _, _ = prefill(session.backend, prepared.embeds, session.backend.new_state(), positions=rows)
    np.testing.assert_array_equal(one_d, three)


def test_preset_loads_in_transformers(preset_dir):
    model, info = transformers.MiniCPMV4_7ForConditionalGeneration.from_pretrained(
        preset_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    raw = json.loads((preset_dir / "config.json").read_text())
    hf_dict = model.config.to_dict()
    for key in (
        "image_token_id",
        "video_token_id",
        "downsample_mode",
        "insert_layer_id",
        *MARKERS,
        "newline_id",
    ):
        assert hf_dict[key] == raw[key], key
    assert hf_dict["text_config"]["rope_parameters"]["mrope_section"] == [3, 3, 2]
    assert "drop_vision_last_layer" not in raw
    cfg, _ = read_config(preset_dir)
    assert cfg.to_hf() == {k: v for k, v in raw.items() if k != "torch_dtype"}
    # the marker ids are the tokenizer's
    tok = transformers.AutoTokenizer.from_pretrained(str(preset_dir))
    assert [raw[k] for k in MARKERS] == tok.convert_tokens_to_ids(list(MARKERS.values()))
    assert [raw["newline_id"]] == tok.encode("\n")


def test_config_defaults_and_transformers_dict_read_the_same(hf):
    """Our config read from transformers' own to_dict() equals our read of the saved file, and the
    defaults we inherit from 4.6 are transformers' 4.7 defaults."""
    ckpt, model, _ = hf
    ours, _ = read_config(ckpt)
    assert isinstance(ours, MiniCPMV47Config)
    assert MiniCPMV47Config.from_hf(model.config.to_dict()) == ours
    assert ours.text.mrope_section == [6, 5, 5] and ours.newline_id == model.config.newline_id
    defaults = transformers.MiniCPMV4_7Config()
    fields = {f.name: f.default for f in dataclasses.fields(MiniCPMV47Config)}
    for key in ("insert_layer_id", "image_size", "downsample_mode", "merger_times", "tie_word_embeddings",
                "image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id"):  # fmt: skip
        assert fields[key] == getattr(defaults, key), key
    assert list(fields["merge_kernel_size"]) == list(defaults.merge_kernel_size)


def test_missing_mrope_section_is_one_line(preset_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(preset_dir, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["text_config"]["rope_parameters"]["mrope_section"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    code = main(["chat", "--checkpoint", str(ckpt), "--prompt", "Hi", "--json"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "mrope_section" in err, err


def test_every_device_format_takes_position_rows():
    """4.7 exports to every device format (ONNX: test_minicpm_v47_onnx, ExecuTorch and Core ML:
    test_minicpm_v47_formats); the desktop `torch` bundle does not take the rows yet."""
    assert set(pipeline.POSITION_ROW_FORMATS) == {"onnx", "executorch", "coreml"}


def test_export_to_a_format_without_position_rows_is_refused_in_one_line(preset_dir, tmp_path, capsys):
    """The desktop torch bundle is refused before any work, in one line naming the formats that
    take the rows."""
    with pytest.raises(InputError, match="position rows"):
        export_bundle(ExportRequest(preset_dir, tmp_path / "b", "desktop", None, "fp32", 1536))
    assert not (tmp_path / "b").exists()
    code = main(
        ["export", "--checkpoint", str(preset_dir), "--target", "desktop", "--out", str(tmp_path / "c")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "format torch" in err and "onnx, executorch, coreml" in err, err
