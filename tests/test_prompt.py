"""Prompt ids equal transformers' MiniCPMV4_6Processor ids (single/multi image, multi-turn, video, 16x/4x).

Per-image token layouts come from the upstream image processor's own output (target_sizes, grids),
so these tests do not depend on our slicing module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import CheckpointError, InputError
from edge_runtime.processing.prompt import (
    ImageLayout,
    Message,
    PromptBuilder,
    VideoLayout,
    load_chat_template,
    render_chat,
)
from edge_runtime.processing.tokenizer import Tokenizer
from edge_runtime.tokenizer_build import build_tokenizer_files

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from hf_reference import FakeVideoProcessor as _FakeVideoProcessor  # noqa: E402
from hf_reference import Processor as _Processor  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import (  # noqa: E402
    MiniCPMV4_6ImageProcessorPil,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer_files(out)
    return out


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer(ckpt)


@pytest.fixture(scope="module")
def processors(ckpt) -> dict[str, _Processor]:
    hf_tok = AutoTokenizer.from_pretrained(str(ckpt))
    template = load_chat_template(ckpt)
    return {
        mode: _Processor(
            image_processor=MiniCPMV4_6ImageProcessorPil(downsample_mode=mode),
            video_processor=_FakeVideoProcessor(mode),
            tokenizer=hf_tok,
            chat_template=template,
        )
        for mode in ("16x", "4x")
    }


def _image(w: int, h: int, seed: int):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# (W, H): no slicing, 1x2 grid, tall grid, 2x2-ish grid.
IMAGES = [_image(200, 150, 0), _image(1000, 600, 1), _image(500, 1300, 2), _image(1100, 1000, 3)]


def _layouts(processor: _Processor, images: list) -> list[ImageLayout]:
    """ImageLayouts from the upstream image processor's own target_sizes and grids."""
    out = processor.image_processor(images)
    divisor = 4 if processor.image_processor.downsample_mode == "4x" else 16
    sizes = np.asarray(out["target_sizes"])
    layouts, start = [], 0
    for n, (rows, cols) in zip(out["num_patches_per_image"], out["grids"], strict=True):
        counts = [int(h * w) // divisor for h, w in sizes[start : start + n]]
        start += n
        grid = (int(rows), int(cols)) if rows > 0 else None
        layouts.append(ImageLayout(counts[0], grid, counts[1:]))
    return layouts


def _hf_ids(processor: _Processor, conversation: list[dict], use_image_id: bool) -> list[int]:
    out = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        enable_thinking=False,
        processor_kwargs={"use_image_id": use_image_id},
    )
    return np.asarray(out["input_ids"])[0].tolist()


def _hf_content(parts: list) -> list[dict]:
    return [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts
    ]


CASES = {
    "single_image": [("user", [IMAGES[1], "What colour is the circle?"])],
    "two_images": [("user", [IMAGES[0], IMAGES[3], "Is the red triangle left of the blue square?"])],
    "text_only": [("user", ["How many squares are there?"])],
    "chinese": [("user", [IMAGES[2], "圆是什么颜色？"])],
    "multi_turn": [
        ("system", ["Answer briefly."]),
        ("user", [IMAGES[1], "What colour is the circle?"]),
        ("assistant", ["Red."]),
        ("user", [IMAGES[2], IMAGES[0], "What word is written?"]),
        ("assistant", ["<think>\nhmm\n</think>\n\nCAT"]),
        ("user", ["How many squares are there?"]),
    ],
}


@pytest.mark.parametrize("mode", ["16x", "4x"])
@pytest.mark.parametrize("use_image_id", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_ids_match_transformers_processor(processors, tok, ckpt, mode, use_image_id, case):
    processor = processors[mode]
    turns = CASES[case]
    hf_conv = [{"role": role, "content": _hf_content(parts)} for role, parts in turns]
    images = [p for _, parts in turns for p in parts if not isinstance(p, str)]
    layouts = _layouts(processor, images) if images else []
    it = iter(layouts)
    ours = [Message(role, [p if isinstance(p, str) else next(it) for p in parts]) for role, parts in turns]

    builder = PromptBuilder(tok, load_chat_template(ckpt), use_image_id=use_image_id)
    prompt = builder.build(ours)
    assert prompt.ids == _hf_ids(processor, hf_conv, use_image_id)
    assert tok.decode(prompt.ids, skip_special_tokens=False) == prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt.ids.count(tok.image_pad_id) == sum(
        lay.source_tokens + sum(lay.tile_tokens) for lay in layouts
    )


def test_chat_helper_equals_build(processors, tok, ckpt):
    processor = processors["16x"]
    layouts = _layouts(processor, [IMAGES[1], IMAGES[0]])
    builder = PromptBuilder.from_dir(ckpt)
    history = [("user", "Hi"), ("assistant", "Hello!")]
    got = builder.chat("What colour is the circle?", layouts, history=history, system="Be brief.")
    want = builder.build(
        [("system", "Be brief."), *history, Message("user", [*layouts, "What colour is the circle?"])]
    )
    assert got == want
    hf_conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": _hf_content([IMAGES[1], IMAGES[0], "What colour is the circle?"])},
    ]
    assert got.ids == _hf_ids(processor, hf_conv, True)


@pytest.mark.parametrize("mode", ["16x", "4x"])
@pytest.mark.parametrize("use_image_id", [True, False])
def test_video_ids_match_transformers_processor(processors, tok, ckpt, mode, use_image_id):
    processor = processors[mode]
    d = 4 if mode == "4x" else 16
    # Video 0: a sliced 2x1 frame then an unsliced one; video 1: one unsliced frame.
    processor.video_processor.output = {
        "grids_videos": np.array([[2, 1], [0, 0], [0, 0]]),
        "target_sizes_videos": np.array([[16, 24], [16, 12], [16, 12], [24, 16], [8, 8]]),
        "num_frames_per_video": [2, 1],
    }
    videos = [
        VideoLayout([ImageLayout(16 * 24 // d, (2, 1), [16 * 12 // d] * 2), ImageLayout(24 * 16 // d)]),
        VideoLayout([ImageLayout(8 * 8 // d)]),
    ]
    image = _layouts(processor, [IMAGES[0]])[0]
    builder = PromptBuilder(tok, load_chat_template(ckpt), use_image_id=use_image_id)
    prompt = builder.build([Message("user", [videos[0], image, videos[1], "Describe the videos."])])

    conv = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": "a.mp4"},
                {"type": "image", "image": IMAGES[0]},
                {"type": "video", "video": "b.mp4"},
                {"type": "text", "text": "Describe the videos."},
            ],
        }
    ]
    text = processor.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    frames = [np.zeros((2, 28, 28, 3), np.uint8), np.zeros((1, 28, 28, 3), np.uint8)]
    out = processor(
        text=[text], images=[IMAGES[0]], videos=frames, use_image_id=use_image_id, return_tensors=None
    )
    assert prompt.ids == out["input_ids"][0]
    if use_image_id:  # images and videos are numbered separately
        assert prompt.text.count("<image_id>0</image_id>") == 2 and "<image_id>1</image_id>" in prompt.text


def test_render_matches_transformers_apply_chat_template(ckpt, tok):
    hf_tok = AutoTokenizer.from_pretrained(str(ckpt))
    template = load_chat_template(ckpt)
    conv = [
        {"role": "system", "content": "  You are helpful.  "},
        {"role": "user", "content": [{"type": "text", "text": "Hi 👋"}]},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello!"},
        {"role": "user", "content": "有几个正方形？"},
    ]
    ours = [Message(m["role"], m["content"] if isinstance(m["content"], str) else ["Hi 👋"]) for m in conv]
    for kwargs in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
        for gen in (True, False):
            want = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kwargs)
            got = render_chat(
                template, ours, special_tokens=tok.special_tokens_map, add_generation_prompt=gen, **kwargs
            )
            assert got == want
    assert want.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert "<|im_start|>assistant\nHello!<|im_end|>\n" in want  # past think blocks are dropped


def test_thinking_switch(tok, ckpt):
    on = PromptBuilder(tok, load_chat_template(ckpt), enable_thinking=True).chat("Hi")
    off = PromptBuilder(tok, load_chat_template(ckpt)).chat("Hi")
    assert on.text.endswith("<|im_start|>assistant\n<think>\n")
    assert off.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_input_errors(tok, ckpt):
    builder = PromptBuilder(tok, load_chat_template(ckpt))
    with pytest.raises(InputError):  # literal placeholder in user text: counts no longer match
        builder.chat("look <|image_pad|>", [ImageLayout(4)])
    with pytest.raises(InputError):
        builder.build([])
    with pytest.raises(InputError):
        builder.build([("user", "a"), ("system", "late system prompt")])
    with pytest.raises(InputError):
        ImageLayout(4, (1, 2), [4])
    with pytest.raises(InputError):
        ImageLayout(0)


def test_template_loading(tmp_path, ckpt):
    with pytest.raises(CheckpointError):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "X"}]}'
    )
    assert load_chat_template(tmp_path) == "X"
    with pytest.raises(CheckpointError):
        PromptBuilder(Tokenizer(ckpt), "{% for %}")
