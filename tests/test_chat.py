"""`chat` end to end against transformers: same prompt ids and greedy tokens, clean errors, streaming."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.backends.base import Backend, DecoderState, ModelInfo
from edge_runtime.cli import main
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.runtime import open_session
from edge_runtime.session import Session

transformers = pytest.importorskip("transformers")
from hf_reference import build_processor, hf_chat_turn  # noqa: E402

HOST_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "preprocessor_config.json", "generation_config.json")  # fmt: skip
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny checkpoint whose weights transformers itself wrote (our host files beside them)."""
    base = tmp_path_factory.mktemp("chat")
    init_checkpoint("minicpm-v-4.6", "tiny", base / "ours", seed=3)
    model = transformers.MiniCPMV4_6ForConditionalGeneration.from_pretrained(base / "ours")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, value in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                value.add_(0.2 * torch.randn_like(value))
            else:  # larger weights than the init so greedy tokens depend on the input
                value.mul_(4.0)
    out = base / "hf"
    model.save_pretrained(out)
    for name in HOST_FILES:
        shutil.copy(base / "ours" / name, out / name)
    images = []
    for i, (w, h) in enumerate([(640, 480), (1000, 600), (300, 800)]):
        rng = np.random.default_rng(i)
        path = base / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return out, model.eval(), images


def _ours(capsys, ckpt, images, prompt, mode):
    args = [
        "chat",
        "--checkpoint",
        str(ckpt),
        "--prompt",
        prompt,
        "--json",
        "--max-new-tokens",
        str(NEW_TOKENS),
    ]
    for image in images:
        args += ["--image", str(image)]
    if mode:
        args += ["--downsample-mode", mode]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _theirs(ckpt, model, images, prompt, mode):
    processor = build_processor(ckpt, mode or "16x")
    return hf_chat_turn(processor, model, images, prompt, NEW_TOKENS, downsample_mode=mode or "16x")


@pytest.mark.parametrize(
    ("images", "mode"),
    [([0], None), ([1, 2], None), ([1], "4x"), ([], None)],
    ids=["single-image", "multi-image", "4x", "text-only"],
)
def test_chat_matches_transformers_generate(hf_dir, capsys, images, mode):
    ckpt, model, paths = hf_dir
    chosen = [paths[i] for i in images]
    prompt = "What colour is the circle?"
    ours = _ours(capsys, ckpt, chosen, prompt, mode)
    prompt_ids, tokens = _theirs(ckpt, model, chosen, prompt, mode)
    assert ours["prompt_token_ids"] == prompt_ids
    assert ours["token_ids"] == tokens
    assert len(set(ours["token_ids"])) > 1, "degenerate output proves little"
    for key in ("text", "n_slices", "n_image_tokens", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms",
                "decode_tok_s"):  # fmt: skip
        assert key in ours


def _bad_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    return {
        "missing": (tmp_path / "nope.png", "not found"),
        "zero-byte": (tmp_path / "empty.png", "empty"),
        "non-image": (tmp_path / "text.png", "not a readable image"),
        "corrupt": (tmp_path / "truncated.png", "corrupt"),
        "too-big": (tmp_path / "big.png", "pixel"),
    }


@pytest.mark.parametrize("case", ["missing", "zero-byte", "non-image", "corrupt", "too-big"])
def test_bad_images_are_one_line_errors(hf_dir, tmp_path, capsys, case):
    ckpt = hf_dir[0]
    path, needle = _bad_images(tmp_path)[case]
    code = main(
        ["chat", "--checkpoint", str(ckpt), "--image", str(path), "--prompt", "hi", "--max-pixels", "100000"]
    )
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and needle in lines[0].lower(), lines[0]
    assert captured.out == ""


def test_prompt_past_context_is_one_line_error(hf_dir, capsys):
    code = main(["chat", "--checkpoint", str(hf_dir[0]), "--prompt", "word " * 200, "--max-context", "64"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "context" in lines[0], lines


class ScriptedBackend(Backend):
    """Emits a fixed token sequence (one-hot logits): for streaming tests independent of weights."""

    name = "scripted"

    def __init__(self, script: list[int], vocab: int):
        self.script = script
        self.info = ModelInfo("test", 8, vocab, 4096, 16, 14, 0, 1)

    def vision_encoder(self, patches, position_ids, mode):
        raise AssertionError("no images in this test")

    def token_embedding(self, ids):
        return np.zeros((len(ids), 8), np.float32)

    def new_state(self):
        return DecoderState({"step": np.zeros(1, np.int64)})

    def _logits(self, step: int) -> np.ndarray:
        logits = np.zeros(self.info.vocab_size, np.float32)
        logits[self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits

    def prefill_chunk(self, embeds, n_valid, start_pos, state):
        return self._logits(0), state

    def decode_step(self, embed, pos, state):
        step = int(state.tensors["step"][0]) + 1
        return self._logits(step), DecoderState({"step": np.array([step])})


def test_streaming_multibyte_is_byte_identical(hf_dir):
    ckpt = hf_dir[0]
    reference = open_session(ckpt)
    tok = reference.assets.tokenizer
    text = "红色的圆 🌍🚀 café — 三个正方形 ✔"
    script = tok.encode(text) + [tok.im_end_id]
    split = [i for i in script if not tok.token_bytes(i).decode("utf-8", errors="ignore")]
    assert split, "the text must contain characters split across tokens"
    session = Session(ScriptedBackend(script, tok.vocab_size), reference.assets)
    prepared = session.prepare("hi")
    pieces: list[str] = []
    streamed = session.generate(prepared, session.sampling(max_new_tokens=len(script)), on_text=pieces.append)
    assert "".join(pieces).encode() == streamed.text.encode() == text.encode()
    assert all("\ufffd" not in p for p in pieces)
    plain = session.generate(prepared, session.sampling(max_new_tokens=len(script)))
    assert plain.text.encode() == text.encode()


def test_video_frames_fill_video_placeholders(hf_dir):
    """Frames become visual units; their features land exactly on the <|video_pad|> positions."""
    from edge_runtime.processing.video import prepare_units, units_from_frames

    ckpt, _, paths = hf_dir
    session = open_session(ckpt)
    frames = [Image.open(paths[0]).resize((320, 240)) for _ in range(3)]
    units = prepare_units(units_from_frames(frames, fps=1.0), session.slice_config(max_slice_nums=1))
    prepared = session.prepare("What happens?", [paths[1]], videos=[units])
    ids = np.array(prepared.prompt.ids)
    video_rows = prepared.embeds[ids == session.backend.info.video_token_id]
    n_image_rows = int((ids == session.backend.info.image_token_id).sum())
    image_rows = sum(e.shape[0] for e in prepared.slice_embeds[: len(prepared.images[0].slices)])
    assert n_image_rows == image_rows
    assert len(units) == 3 and video_rows.shape[0] == sum(u.num_tokens for u in units)
    np.testing.assert_array_equal(video_rows, np.concatenate(prepared.slice_embeds[-3:]))
    result = session.generate(prepared, session.sampling(max_new_tokens=4))
    assert len(result.generation.token_ids) <= 4


def test_video_file_without_decoder_is_one_line_error(hf_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # as if neither optional decoder were installed
    monkeypatch.setitem(sys.modules, "decord", None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    code = main(["chat", "--checkpoint", str(hf_dir[0]), "--video", str(clip), "--prompt", "hi"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install av" in lines[0], lines


def test_chat_on_a_video_file(hf_dir, tmp_path, capsys):
    """A real encoded clip (3 s at 2 fps) -> 1 fps units -> <|video_pad|> rows, through the CLI."""
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 112, 112, "yuv420p"
        for i in range(6):
            frame = np.full((112, 112, 3), (40 * i, 100, 200 - 30 * i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    args = ["chat", "--checkpoint", str(hf_dir[0]), "--video", str(clip), "--prompt", "What happens?"]
    assert main([*args, "--json", "--max-new-tokens", "3", "--max-slice-nums", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    video_id = open_session(hf_dir[0]).backend.info.video_token_id
    assert out["n_slices"] == 3  # one unit per second, one slice each
    assert out["prompt_token_ids"].count(video_id) == out["n_image_tokens"] == 3 * 64
