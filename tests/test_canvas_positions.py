"""Canvas M-RoPE of MiniCPM-V 4.7 against transformers: position rows, rope_delta and the M-RoPE tables.

Ground truth is transformers only: `MiniCPMV4_7Model.get_rope_index` of a tiny (random) 4.7 model
on ids made by `MiniCPMV4_7Processor`, and the Qwen3.5 / Qwen2-VL rotary embedding classes.

The processor is assembled from parts as in hf_reference.py: the tiny 4.6 checkpoint's tokenizer
(it already holds every 4.7 marker token: <image>, </image>, <slice>, </slice>, <image_id>), the
PIL image processor (4.7 maps to 4.6's image processor) and a video processor stand-in, because the
real video processor needs torchvision, which is not installable here. Video ids are therefore made
by the real processor's `replace_video_token` from frame geometry the stand-in returns, not from
decoded frames.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.models.blocks import apply_partial_rope, rope_cos_sin
from edge_runtime.models.mrope import decode_rows, mrope_cos_sin, mrope_row_index, mrope_rows, rope_inv_freq
from edge_runtime.processing.canvas_positions import CanvasTokens, canvas_positions, stretch, token_modalities
from edge_runtime.processing.prompt import load_chat_template
from edge_runtime.processing.slicing import SliceConfig, merge_factor, plan_slices

transformers = pytest.importorskip("transformers")
from hf_reference import FakeVideoProcessor  # noqa: E402
from transformers.models.minicpmv4_7.processing_minicpmv4_7 import MiniCPMV4_7Processor  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import (  # noqa: E402
    Qwen3_5TextRotaryEmbedding,
    apply_rotary_pos_emb,
)


class Processor(MiniCPMV4_7Processor):
    """Without torchvision, transformers cannot resolve the video processor base class by name."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    """Tiny 4.7 model (only get_rope_index is used), its config dict and one processor per mode."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    newline = tok.encode("\n")
    assert len(newline) == 1  # the 4.7 conversion script stores this id as newline_id
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg.pop("drop_vision_last_layer", None)  # 4.6 only
    cfg["model_type"] = "minicpmv4_7"
    cfg["vision_config"]["model_type"] = "minicpmv4_7_vision"
    markers = {"image_start_id": "<image>", "image_end_id": "</image>",
               "slice_start_id": "<slice>", "slice_end_id": "</slice>"}  # fmt: skip
    cfg.update({key: tok.convert_tokens_to_ids(t) for key, t in markers.items()}, newline_id=newline[0])
    config = transformers.MiniCPMV4_7Config.from_dict(cfg)
    model = transformers.MiniCPMV4_7Model(config).eval()
    processors = {}
    for mode in ("16x", "4x"):
        image_processor = transformers.AutoImageProcessor.from_pretrained(
            str(tiny_checkpoint), backend="pil", downsample_mode=mode
        )
        processors[mode] = Processor(
            image_processor=image_processor,
            video_processor=FakeVideoProcessor(mode),
            tokenizer=tok,
            chat_template=load_chat_template(tiny_checkpoint),
        )
    preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    return SimpleNamespace(
        model=model,
        config=config,
        tokens=CanvasTokens.from_config(config.to_dict()),
        processors=processors,
        preprocessor=preprocessor,
    )


def _reference(hf, inputs, mode: str) -> tuple[np.ndarray, int]:
    def get(key):
        return None if inputs.get(key) is None else torch.as_tensor(np.asarray(inputs[key]))

    with torch.no_grad():
        pos, delta = hf.model.get_rope_index(
            get("input_ids"),
            mm_token_type_ids=get("mm_token_type_ids"),
            target_sizes=get("target_sizes"),
            target_sizes_videos=get("target_sizes_videos"),
            downsample_mode=mode,
        )
    assert pos.shape[1] == 1 and delta.shape == (1, 1)
    return pos[:, 0].numpy(), int(delta)


def _check(hf, inputs, mode: str, image_grids=None, video_grids=None) -> np.ndarray:
    """Our layout (grids default to the processor's target sizes) equals get_rope_index's."""
    ids = np.asarray(inputs["input_ids"])[0]
    np.testing.assert_array_equal(
        token_modalities(ids, hf.tokens), np.asarray(inputs["mm_token_type_ids"])[0]
    )
    if image_grids is None and inputs.get("target_sizes") is not None:
        image_grids = np.asarray(inputs["target_sizes"]).tolist()
    if video_grids is None and inputs.get("target_sizes_videos") is not None:
        video_grids = np.asarray(inputs["target_sizes_videos"]).tolist()
    ours = canvas_positions(
        ids.tolist(), hf.tokens, image_grids or (), video_grids or (), merge=merge_factor(mode)
    )
    ref_pos, ref_delta = _reference(hf, inputs, mode)
    assert ours.positions.dtype == np.int64 and ours.positions.shape == (3, len(ids))
    np.testing.assert_array_equal(ours.positions, ref_pos)
    assert ours.rope_delta == ref_delta
    return ours.positions


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# (name, image sizes (w, h), text, mode, processor kwargs)
PROCESSOR_CASES = [
    ("text-only", [], "Hello there, how are you today?", "16x", {}),
    ("small-unsliced-16x", [(120, 90)], "<|image_pad|>What is this?", "16x", {}),
    ("small-unsliced-4x", [(150, 200)], "<|image_pad|>What is this?", "4x", {}),
    ("sliced-2x3-16x", [(1344, 896)], "Look: <|image_pad|>\nDescribe it.", "16x", {}),
    ("sliced-2x3-4x", [(1344, 896)], "Look: <|image_pad|>\nDescribe it.", "4x", {}),
    ("sliced-tall-16x", [(500, 1500)], "<|image_pad|>Read the text.", "16x", {}),
    ("sliced-wide-4x", [(1500, 420)], "<|image_pad|>Read the text.", "4x", {}),
    ("two-images-16x", [(120, 90), (1000, 700)], "<|image_pad|> versus <|image_pad|>: differences?", "16x", {}),
    ("two-images-4x", [(1000, 700), (64, 300)], "A <|image_pad|> B <|image_pad|> compare", "4x", {}),
    # no <image_id> between them: the two images are one group of frames
    ("adjacent-images-no-ids", [(900, 600), (120, 90)], "<|image_pad|><|image_pad|>Same?", "16x",
     {"use_image_id": False}),
]  # fmt: skip


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=[c[0] for c in PROCESSOR_CASES])
def test_positions_match_get_rope_index_on_processor_ids(hf, case):
    name, sizes, text, mode, kwargs = case
    processor = hf.processors[mode]
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)] or None
    inputs = processor(images=images, text=[text], return_tensors="np", **kwargs)
    if not sizes:
        assert inputs.get("target_sizes") is None
    # the grids our host side has: SlicePlan.patch_grids of every image, concatenated
    slice_config = SliceConfig.from_preprocessor_config(hf.preprocessor, downsample_mode=mode)
    grids = [list(g) for w, h in sizes for g in plan_slices(h, w, slice_config).patch_grids]
    if sizes:
        assert grids == np.asarray(inputs["target_sizes"]).tolist()
    pos = _check(hf, inputs, mode, image_grids=grids)
    if "sliced" in name:
        assert (pos[1] != pos[2]).any() and len(set(pos[0].tolist())) < pos.shape[1]
    if not sizes:
        np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(pos.shape[1]), pos.shape))


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_chat_template_prompt_with_text_after_the_image(hf, mode):
    processor = hf.processors[mode]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown? Answer."}]}]  # fmt: skip
    text = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    inputs = processor(images=[_image(1100, 800, 7)], text=[text], return_tensors="np")
    pos = _check(hf, inputs, mode)
    # the prompt ends in text, so the next decode position is one past the last prompt position
    delta = int(pos.max()) + 1 - pos.shape[1]
    assert pos[:, -1].tolist() == [pos.shape[1] - 1 + delta] * 3


def _video_inputs(
    processor, frames: list[list[list[int]]], grids: list[tuple[int, int]], text: str, images=None
):
    """Processor output for one video whose frame f has crops frames[f] (thumbnail first) on grids[f]."""
    processor.video_processor.output = {
        "target_sizes_videos": np.array([crop for frame in frames for crop in frame]),
        "num_frames_per_video": np.array([len(frames)]),
        "grids_videos": np.array(grids),
    }
    video = np.zeros((len(frames), 8, 8, 3), dtype=np.uint8)
    return processor(images=images, videos=[video], text=[text], return_tensors="np")


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_video_frames_share_a_group(hf, mode):
    processor = hf.processors[mode]
    frames = [[[16, 24], [16, 16], [16, 16], [16, 16], [16, 16]], [[16, 24], [16, 16], [16, 16], [16, 16], [16, 16]],
              [[12, 20]], [[8, 8], [8, 12], [8, 12]]]  # fmt: skip
    grids = [(2, 2), (2, 2), (0, 0), (1, 2)]
    inputs = _video_inputs(processor, frames, grids, "<|video_pad|>What happens?")
    _check(hf, inputs, mode)
    # an image and a video in one prompt use separate grid lists
    inputs = _video_inputs(
        processor, frames[:2], grids[:2], "<|image_pad|> then <|video_pad|>?", images=[_image(900, 500, 3)]
    )
    _check(hf, inputs, mode)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_random_slice_geometries(hf, mode):
    """Placeholders made by the processor's own replace_image_token for random grids, slice sizes
    (slices may differ in size) and thumbnails, including stretches with exact halves."""
    processor, m = hf.processors[mode], merge_factor(mode)
    divisor = m * m
    rng = np.random.default_rng(0 if mode == "16x" else 1)
    for trial in range(41):
        texts, grids = [], []
        for image_idx in range(int(rng.integers(1, 3))):
            rows, cols = (0, 0) if rng.random() < 0.2 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            thumb = [m * int(rng.integers(1, 9)), m * int(rng.integers(1, 9))]
            tile = [m * int(rng.integers(1, 6)), m * int(rng.integers(1, 6))]
            if trial == 0:  # stretching 27 rows over 8 and 23 columns over 14 rounds differently in
                rows, cols, thumb, tile = 2, 2, [27 * m, 23 * m], [4 * m, 7 * m]  # float32 than exactly
            sizes = [thumb] + [
                tile if rng.random() < 0.7 else [m * int(rng.integers(1, 6)), m * int(rng.integers(1, 6))]
                for _ in range(rows * cols)
            ]
            image_inputs = {"grids": np.array([[rows, cols]]), "num_patches_per_image": np.array([len(sizes)]),
                            "target_sizes": np.array(sizes)}  # fmt: skip
            placeholder = processor.replace_image_token(
                image_inputs, image_idx=0, image_token_divisor=divisor
            )
            texts.append(
                f"<image_id>{image_idx}</image_id>{placeholder}" if rng.random() < 0.5 else placeholder
            )
            grids += sizes
        text = "Q: " + " and ".join(texts) + ("\n" if rng.random() < 0.5 else "") + " why?"
        ids = processor.tokenizer(text)["input_ids"]
        inputs = {"input_ids": [ids], "mm_token_type_ids": processor.create_mm_token_type_ids([ids]),
                  "target_sizes": grids}  # fmt: skip
        _check(hf, inputs, mode)


def test_random_token_soups(hf):
    """Any mix of text, markers and image placeholders (not only what the processor writes)."""
    tokens, rng = hf.tokens, np.random.default_rng(2)
    vocab = [tokens.image_start_id, tokens.image_end_id, tokens.slice_start_id, tokens.slice_end_id,
             tokens.newline_id, tokens.image_token_id, 64, 65]  # fmt: skip
    weights = np.array([2, 2, 3, 3, 2, 12, 2, 1], dtype=float)
    compared = 0
    for _ in range(300):
        n = int(rng.integers(2, 60))
        ids = [64] + rng.choice(vocab, size=n, p=weights / weights.sum()).tolist()
        runs = [len(list(run)) for key, run in itertools.groupby(ids) if key == tokens.image_token_id]
        grids = []  # a random (h, w) patch grid per crop with h * w / 16 == the crop's token count
        for length in runs:
            rows = int(rng.choice([d for d in range(1, length + 1) if length % d == 0]))
            grids.append([4 * rows, 4 * (length // rows)])
        inputs = {"input_ids": [ids], "mm_token_type_ids": hf.processors["16x"].create_mm_token_type_ids([ids]),
                  "target_sizes": grids or None}  # fmt: skip
        _check(hf, inputs, "16x")
        compared += 1
    assert compared == 300


def test_stretch_equals_torch_linspace_round():
    """get_vision_position_ids rounds torch.linspace (float32); exact fractions would differ."""
    for extent in range(1, 97):
        for n in range(1, 97):
            ref = torch.linspace(0, extent - 1, n).round().long().numpy()
            np.testing.assert_array_equal(stretch(n, extent), ref, err_msg=f"n={n} extent={extent}")


def test_bad_inputs_are_one_line_errors(hf):
    with pytest.raises(CheckpointError, match="newline_id"):
        CanvasTokens.from_config({k: v for k, v in hf.config.to_dict().items() if k != "newline_id"})
    inputs = hf.processors["16x"](images=[_image(900, 600, 1)], text=["<|image_pad|>hi"], return_tensors="np")
    ids, grids = inputs["input_ids"][0].tolist(), inputs["target_sizes"].tolist()
    with pytest.raises(InputError, match="more visual crops"):
        canvas_positions(ids, hf.tokens, grids[:-1])
    with pytest.raises(InputError, match="more image patch grids"):
        canvas_positions(ids, hf.tokens, grids + [[16, 16]])
    with pytest.raises(InputError, match="opening marker"):
        canvas_positions([hf.config.image_token_id, 5], hf.tokens, [[4, 4]])


# ---- M-RoPE tables ----


def _text_config(base, head_dim: int, theta: float, section: list[int] | None, partial: float = 0.25):
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
    if section is not None:
        rope["mrope_section"] = section
    return base.__class__.from_dict({**base.to_dict(), "head_dim": head_dim, "rope_parameters": rope})


def _positions(hf) -> torch.Tensor:
    """Real canvas rows (a sliced image and text) plus large positions, [3, T]."""
    inputs = hf.processors["4x"](images=[_image(1344, 896, 2)], text=["<|image_pad|>hi"], return_tensors="np")
    layout = canvas_positions(inputs["input_ids"][0], hf.tokens, inputs["target_sizes"].tolist(), merge=2)
    far = np.stack([np.arange(200_000, 200_040), np.arange(100, 140), np.arange(7, 47)])
    return torch.from_numpy(np.concatenate([layout.positions, far], axis=1))


# (head_dim, rope_theta, mrope_section): the tiny preset's text config with upstream's default
# section, MiniCPMV4_7Config's default text config, and a realistic 10M theta with a partial section
MROPE_CONFIGS = [(None, None, None), (256, 10_000.0, [11, 11, 10]), (256, 10_000_000.0, [11, 11, 10]),
                 (128, 1_000_000.0, [6, 5, 5]), (256, 10_000_000.0, [16, 3, 4])]  # fmt: skip


@pytest.mark.parametrize("setup", MROPE_CONFIGS, ids=str)
def test_mrope_equals_qwen35_rotary_embedding(hf, setup):
    head_dim, theta, section = setup
    text_config = hf.config.text_config
    if head_dim is not None:
        text_config = _text_config(text_config, head_dim, theta, section)
    rotary = Qwen3_5TextRotaryEmbedding(text_config)
    rot = int(text_config.head_dim * text_config.rope_parameters["partial_rotary_factor"])
    inv_freq = rope_inv_freq(rot, text_config.rope_parameters["rope_theta"])
    assert torch.equal(inv_freq, rotary.inv_freq)
    row_index = mrope_row_index(rot // 2, rotary.mrope_section, interleaved=True)

    positions = _positions(hf)
    cos, sin = mrope_cos_sin(positions, inv_freq, row_index)
    x = torch.zeros(1, positions.shape[1], 8)
    ref_cos, ref_sin = rotary(x, positions[:, None, :])
    assert cos.shape == ref_cos[0].shape == (positions.shape[1], rot) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0], atol=1e-6, rtol=0)

    # drop-in for apply_partial_rope: q/k rotated as Qwen3.5's apply_rotary_pos_emb does
    q = torch.randn(
        1, 2, positions.shape[1], text_config.head_dim, generator=torch.Generator().manual_seed(0)
    )
    ref_q, _ = apply_rotary_pos_emb(q, q, ref_cos, ref_sin)
    torch.testing.assert_close(apply_partial_rope(q, cos, sin), ref_q, atol=1e-5, rtol=1e-5)

    # all rows equal (text, and every decode step): bit for bit our 1-D rope
    flat = torch.arange(0, 300_000, 997)
    ours_1d = mrope_cos_sin(decode_rows(flat), inv_freq, row_index)
    for a, b in zip(ours_1d, rope_cos_sin(flat, inv_freq), strict=True):
        assert torch.equal(a, b)


def test_mrope_rows_follow_recomposition():
    # Qwen3.5: frequency i -> h if i % 3 == 1 and i < 3 * s_h, w if i % 3 == 2 and i < 3 * s_w, else t
    assert mrope_rows(16, [2, 3, 2]) == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert mrope_rows(4, [11, 11, 10]) == [0, 1, 2, 0]
    assert mrope_rows(6, [1, 2, 3], interleaved=False) == [0, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="sum to"):
        mrope_rows(8, [1, 2, 3], interleaved=False)


def test_non_interleaved_mrope_equals_qwen2vl_rotary_embedding(hf):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    section = [16, 8, 8]
    config = transformers.Qwen2VLTextConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
    )  # fmt: skip
    rotary = Qwen2VLRotaryEmbedding(config)
    positions = _positions(hf)
    inv_freq = rope_inv_freq(64, 1_000_000.0)
    assert torch.equal(inv_freq, rotary.inv_freq)
    cos, sin = mrope_cos_sin(positions, inv_freq, mrope_row_index(32, section, interleaved=False))
    ref_cos, ref_sin = rotary(torch.zeros(1, 1, 8), positions[:, None, :])
    torch.testing.assert_close(cos, ref_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0], atol=1e-6, rtol=0)


def test_mrope_exports_without_value_branching(hf):
    class Table(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", rope_inv_freq(64, 10_000_000.0), persistent=False)
            self.register_buffer("rows", mrope_row_index(32, [11, 11, 10]), persistent=False)

        def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mrope_cos_sin(positions, self.inv_freq, self.rows)

    positions = _positions(hf)
    t = torch.export.Dim("t", min=2, max=8192)
    exported = torch.export.export(Table(), (positions,), dynamic_shapes=({1: t},))
    for n in (5, positions.shape[1]):
        got = exported.module()(positions[:, :n])
        for a, b in zip(got, Table()(positions[:, :n]), strict=True):
            assert torch.equal(a, b)


def test_canvas_positions_imports_numpy_only():
    code = (
        "import sys, edge_runtime.processing.canvas_positions\n"
        "assert not {'torch', 'transformers', 'PIL'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
