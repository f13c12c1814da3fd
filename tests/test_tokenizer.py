"""Our built tokenizer loads in transformers with identical ids; our wrapper and stream decoder are exact."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from edge_runtime.errors import CheckpointError
from edge_runtime.processing.tokenizer import StreamDecoder, Tokenizer
from edge_runtime.tokenizer_build import ADDED_TOKENS, QWEN_PRETOKENIZE_REGEX, build_tokenizer_files

TEXTS = [
    "What colour is the circle?",
    "How many squares are there? There are 3 squares.",
    "Is the red triangle left of the blue square? Yes.",
    'What word is written? The word is "apple".',
    "圆是什么颜色？红色。有几个正方形？",
    "红色三角形在蓝色正方形的左边吗？不是。",
    "emoji 👨‍👩‍👧 👋🏽 🇨🇳 ❤️ 🔴🟢🔵 😀🎉",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|endoftext|>",
    "<image_id>0</image_id><image><|image_pad|><|image_pad|></image><slice><|image_pad|></slice>\n<slice></slice>",
    "<|vision_start|><|video_pad|><|vision_end|><tool_call>{}</tool_call>",
    "tabs\tand   spaces   \n\n\n  trailing  ",
    "\r\nwindows\r\nline ends\r\n",
    "digits 1234567890 3.14159 2024-05-17 +1 (555) 010-2233 1,000,000",
    "Cafe\u0301 naïve — “quotes” … Übergröße",
    "rare: 龘 𝄞 𐍈 ஸ்ரீ こんにちは 안녕하세요 Привет",
    "mixed中文English混合123数字!!",
    "I'm sure it's fine, they'll see. DON'T SHOUT, WE'RE here",
    "<|im_end <|im_start <image <think>inline</think>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok")
    return out, build_tokenizer_files(out)


@pytest.fixture(scope="module")
def tok(built) -> Tokenizer:
    return Tokenizer(built[0])


@pytest.fixture(scope="module")
def hf_tok(built):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(built[0]))


def test_build_layout(built, tok):
    out, info = built
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert info["vocab_size"] == tok.vocab_size == 2000
    # Added tokens sit right after the BPE vocab, in Qwen3.5 order, as in the real tokenizer.
    first = info["token_ids"]["<|endoftext|>"]
    assert [info["token_ids"][c] for c, _ in ADDED_TOKENS] == list(range(first, first + len(ADDED_TOKENS)))
    assert info["token_ids"]["<|video_pad|>"] - info["token_ids"]["<|endoftext|>"] == 248057 - 248044
    assert tok.is_special(tok.im_end_id) and tok.is_special(tok.image_pad_id)
    assert not tok.is_special(tok.token_to_id("<think>")) and not tok.is_special(tok.token_to_id("</think>"))
    data = json.loads((out / "tokenizer.json").read_text())
    assert data["normalizer"]["type"] == "NFC"
    assert [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert data["pre_tokenizer"]["pretokenizers"][1]["use_regex"] is False
    qwen = pytest.importorskip("transformers.models.qwen3_5.tokenization_qwen3_5")
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == qwen.PRETOKENIZE_REGEX
    assert QWEN_PRETOKENIZE_REGEX == qwen.PRETOKENIZE_REGEX
    assert data["decoder"]["type"] == "ByteLevel"
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["extra_special_tokens"]["image_token"] == "<|image_pad|>"


def test_special_ids(built, tok):
    ids = built[1]["token_ids"]
    assert tok.im_start_id == ids["<|im_start|>"]
    assert tok.im_end_id == ids["<|im_end|>"]
    assert tok.endoftext_id == ids["<|endoftext|>"]
    assert tok.image_pad_id == ids["<|image_pad|>"]
    assert tok.video_pad_id == ids["<|video_pad|>"]
    got = [tok.image_start_id, tok.image_end_id, tok.slice_start_id, tok.slice_end_id]
    assert got == [ids["<image>"], ids["</image>"], ids["<slice>"], ids["</slice>"]]
    assert [tok.image_id_start_id, tok.image_id_end_id] == [ids["<image_id>"], ids["</image_id>"]]
    # No generation_config.json: tokenizer_config eos plus the ChatML enders.
    assert set(tok.stop_ids) == {ids["<|im_end|>"], ids["<|endoftext|>"]}


def test_deterministic(built, tmp_path):
    out, _ = built
    build_tokenizer_files(tmp_path / "again")
    # A fresh process too: Rust hash maps are seeded per process.
    subprocess.run(
        [sys.executable, "-m", "edge_runtime.tokenizer_build", "--out", str(tmp_path / "proc")],
        check=True,
        capture_output=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        ref = (out / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == ref
        assert (tmp_path / "proc" / name).read_bytes() == ref


def test_same_ids_and_text_as_transformers(tok, hf_tok):
    assert hf_tok.image_token_id == tok.image_pad_id and hf_tok.video_token_id == tok.video_pad_id
    assert hf_tok.eos_token_id == tok.im_end_id and hf_tok.bos_token is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def _stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_byte_identical(tok, hf_tok):
    split_chars = 0
    for text in TEXTS:
        ids = tok.encode(text)
        for i in ids:
            try:
                tok.token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                split_chars += 1
        for skip in (False, True):
            pieces = _stream(tok, ids, skip)
            assert not any("\ufffd" in p for p in pieces), text  # never a broken character
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            assert "".join(pieces) == hf_tok.decode(ids, skip_special_tokens=skip), text
    assert split_chars > 10  # the test set really splits characters across tokens


def test_stream_decoder_holds_partial_characters(tok, hf_tok):
    ids = tok.encode("𝄞x")
    assert len(ids) == 5  # four byte tokens for U+1D11E, then "x"
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["", "", "", "𝄞", "x"]
    # Truncated or invalid byte runs: flush and decode agree with transformers (U+FFFD rules).
    for bad in (ids[:3], ids[1:], ids[:1] + ids[4:], ids[:2] + ids[:1] + ids[4:]):
        pieces = _stream(tok, bad, True)
        assert "".join(pieces) == tok.decode(bad) == hf_tok.decode(bad, skip_special_tokens=True)


def test_stop_ids_from_generation_config(built, tmp_path):
    out, info = built
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, 7]}))
    assert Tokenizer(tmp_path).stop_ids == (7, 9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": info["eos_token_id"]}))
    assert Tokenizer(tmp_path).stop_ids == (info["eos_token_id"],)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(CheckpointError):
        Tokenizer(tmp_path)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_errors(built, tmp_path):
    out, _ = built
    with pytest.raises(CheckpointError) as exc:
        Tokenizer(tmp_path)
    assert "tokenizer.json not found" in _one_line(exc)

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError) as exc:
        Tokenizer(tmp_path)
    assert "cannot load tokenizer" in _one_line(exc)

    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError) as exc:
        Tokenizer(tmp_path)
    _one_line(exc)

    (tmp_path / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as exc:
        Tokenizer(tmp_path)
    assert "tokenizer_config.json" in _one_line(exc)

    # A tokenizer without the MiniCPM-V placeholder tokens is the wrong checkpoint.
    data = json.loads((out / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<slice>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        Tokenizer(tmp_path)
    assert "<slice>" in _one_line(exc)


def test_shipped_corpus_is_reproducible():
    from edge_runtime.tokenizer_build import CORPUS_PATH, generate_corpus

    text = CORPUS_PATH.read_text(encoding="utf-8")
    assert text == generate_corpus()
    assert 100_000 < len(text.encode("utf-8")) < 400_000
    assert "圆是什么颜色？" in text and "What colour is the circle?" in text
    assert not any(
        content in text for content, _ in ADDED_TOKENS
    )  # no special-token strings in training text
