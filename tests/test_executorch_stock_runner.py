"""ExecuTorch's own LLM runners drive our `.pte` unchanged and give the tokens of `chat --json`.

The installed `executorch.extension.llm.runner` (Python bindings over the C++ `TextLLMRunner` and
`MultimodalRunner`, the runner behind Android's `LlmModule`) loads the bundle's `model.pte` and
`tokenizer.json` (pytorch/tokenizers' HFTokenizer), reads the metadata methods and generates
greedily. Text only: the whole chat prompt as one text. Image + text: the host slices the image as
`chat` does and hands the runner the prompt text cut at every `<|image_pad|>` run, with each
slice's uint8 pixels [3, H, W] in the run's place (docs/executorch.md, "Driving the stock runners").

Each generated token reaches the token callback as one text piece (the stop token too, then the
runner stops), so the pieces are compared one by one with `chat --json`'s token ids decoded one
at a time. A second generation after `reset()` must give the same pieces: the program starts a new
sequence at start_pos 0 (the runner's position after reset), whatever state the first one left.

The tiny preset's fp32 bundle runs in `make test` (one export, shared with
test_executorch_export.py); the demo checkpoint's bundles (fp32 and 8da4w, minutes to lower each)
run with MINICPMV_EDGE_SLOW=1.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("executorch")

from edge_runtime.cli import main  # noqa: E402
from edge_runtime.processing.tokenizer import Tokenizer  # noqa: E402
from edge_runtime.runtime import open_session  # noqa: E402

SLOW = os.environ.get("MINICPMV_EDGE_SLOW") == "1"
needs_slow_export = pytest.mark.skipif(not SLOW, reason="demo .pte exports take minutes; make test-slow")
DATA = Path(__file__).resolve().parents[1] / "edge_runtime" / "data"
DEMO_CKPT = DATA / "demo-checkpoint"
NEW_TOKENS = 12


def _runner_module():
    import executorch.kernels.quantized  # noqa: F401 - quantized embedding kernels
    from executorch.extension.llm import runner
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - registers llama:: kernels

    return runner


def _chat_json(capsys, bundle: Path, prompt: str, images: list[Path], max_new: int) -> dict:
    args = ["chat", "--bundle", str(bundle), "--prompt", prompt, "--json", "--max-new-tokens", str(max_new)]
    for image in images:
        args += ["--image", str(image)]
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _expected_pieces(bundle: Path, chat: dict) -> list[str]:
    """What the runner's callback should see: each generated id decoded alone, plus the stop
    token when `chat` stopped on one (the runner emits it, then stops)."""
    tok = Tokenizer(bundle)
    ids = list(chat["token_ids"])
    if chat["stop_reason"] == "stop_token":
        ids.append(None)
    return [None if i is None else tok.decode([i], skip_special_tokens=False) for i in ids]


def _run(runner, make_inputs, max_new: int) -> list[str]:
    """Greedy generation through the stock runner; the text piece of every generated token."""
    pieces: list[str] = []
    config = _runner_module().GenerationConfig(echo=False, max_new_tokens=max_new, temperature=0.0)
    runner.generate(make_inputs(), config, pieces.append)
    return pieces


def _check(pieces: list[str], expected: list[str | None], stop_texts: set[str]) -> None:
    assert len(pieces) == len(expected), (pieces, expected)
    for got, want in zip(pieces, expected, strict=True):
        if want is None:
            assert got in stop_texts, got
        else:
            assert got == want, (pieces, expected)


def _stop_texts(bundle: Path) -> set[str]:
    tok = Tokenizer(bundle)
    return {tok.decode([i], skip_special_tokens=False) for i in tok.stop_ids}


def _layout(bundle: Path, prompt: str, image: Path) -> tuple[list, list[int]]:
    """The multimodal runner's inputs for one image question: texts and slice pixels in prompt
    order, with the prompt ids `chat` builds (to check the texts tokenize back to them)."""
    session = open_session(bundle=bundle)
    prepared = session.prepare(prompt, [image])
    image_id = session.backend.info.image_token_id
    pad = session.assets.tokenizer.decode([image_id], skip_special_tokens=False)
    texts = re.split(f"(?:{re.escape(pad)})+", prepared.prompt.text)
    slices = prepared.images[0].pixels
    assert len(texts) == len(slices) + 1
    parts: list = [texts[0]]
    for pixels, text in zip(slices, texts[1:], strict=True):
        parts += [pixels, text]
    return parts, prepared.prompt.ids


def _multimodal_inputs(parts: list):
    import torch

    runner = _runner_module()
    return [
        runner.MultimodalInput(p) if isinstance(p, str) else runner.make_image_input(torch.from_numpy(p))
        for p in parts
    ]


def _check_text_only(capsys, bundle: Path, prompt: str) -> None:
    runner = _runner_module()
    chat = _chat_json(capsys, bundle, prompt, [], NEW_TOKENS)
    session = open_session(bundle=bundle)
    text = session.prepare(prompt).prompt.text
    tok = Tokenizer(bundle)
    assert tok.encode(text) == chat["prompt_token_ids"]  # the runner tokenizes this text
    expected, stops = _expected_pieces(bundle, chat), _stop_texts(bundle)
    pte, tokenizer = str(bundle / "model.pte"), str(bundle / "tokenizer.json")

    text_runner = runner.TextLLMRunner(pte, tokenizer)
    first = _run_text(text_runner, text)
    _check(first, expected, stops)
    text_runner.reset()
    assert _run_text(text_runner, text) == first  # clean state after reset

    mm = runner.MultimodalRunner(pte, tokenizer)
    first = _run(mm, lambda: [runner.MultimodalInput(text)], NEW_TOKENS)
    _check(first, expected, stops)
    mm.reset()
    assert _run(mm, lambda: [runner.MultimodalInput(text)], NEW_TOKENS) == first


def _run_text(text_runner, text: str) -> list[str]:
    pieces: list[str] = []
    config = _runner_module().GenerationConfig(echo=False, max_new_tokens=NEW_TOKENS, temperature=0.0)
    text_runner.generate(text, config, pieces.append)
    return pieces


def _check_image(capsys, bundle: Path, prompt: str, image: Path) -> None:
    runner = _runner_module()
    chat = _chat_json(capsys, bundle, prompt, [image], NEW_TOKENS)
    parts, prompt_ids = _layout(bundle, prompt, image)
    assert prompt_ids == chat["prompt_token_ids"]
    tok = Tokenizer(bundle)
    image_id = open_session(bundle=bundle).backend.info.image_token_id
    # the texts between the slices tokenize to the prompt ids outside the <|image_pad|> runs
    outside = [i for i in prompt_ids if i != image_id]
    assert [i for p in parts if isinstance(p, str) for i in tok.encode(p)] == outside
    expected, stops = _expected_pieces(bundle, chat), _stop_texts(bundle)
    mm = runner.MultimodalRunner(str(bundle / "model.pte"), str(bundle / "tokenizer.json"))
    first = _run(mm, lambda: _multimodal_inputs(parts), NEW_TOKENS)
    _check(first, expected, stops)
    mm.reset()
    assert _run(mm, lambda: _multimodal_inputs(parts), NEW_TOKENS) == first


def _export(ckpt: Path, out: Path, quant: str) -> Path:
    from edge_runtime.backends.executorch import open_executorch_bundle
    from edge_runtime.bundle import register_backend
    from export.pipeline import ExportRequest, export_bundle, register_exporter

    register_exporter("executorch", "export.executorch")
    register_backend("executorch", open_executorch_bundle)
    return export_bundle(ExportRequest(ckpt, out, "android", None, quant, 512, 64))


def test_tokenizer_json_is_read_alike_by_the_runner_tokenizer(executorch_tiny_fp32):
    """pytorch/tokenizers' HFTokenizer (what the runners load) gives our ids on chat text: the
    Qwen pre-tokenizer, CJK, emoji and special tokens written in the text. (Not on accented Latin
    letters: it encodes "é" as "e", docs/executorch.md; none of the prompts here has one.)"""
    from pytorch_tokenizers import CppHFTokenizer

    bundle = executorch_tiny_fp32
    theirs = CppHFTokenizer()
    theirs.load(str(bundle / "tokenizer.json"))
    ours = Tokenizer(bundle)
    texts = [
        "<|im_start|>user\n<image_id>0</image_id><image></image><slice></slice>\nWhat's in it?<|im_end|>\n",
        "绿色三角形在红色正方形的左边还是右边？ 12345  spaces\t\ttabs\n\n",
        "It's they'll I'VE don't 😀 <|im_end|><|endoftext|>",
    ]
    for text in texts:
        assert theirs.encode(text, 0, 0) == ours.encode(text), text


def test_stock_runners_on_the_tiny_bundle(capsys, executorch_tiny_fp32):
    bundle = executorch_tiny_fp32
    _check_text_only(capsys, bundle, "Describe a red square.")
    _check_image(capsys, bundle, "What colour?", DATA / "samples" / "square.png")


@needs_slow_export
@pytest.mark.parametrize("quant", ["fp32", "8da4w"])
def test_stock_runners_on_the_demo_bundles(capsys, tmp_path, quant):
    bundle = _export(DEMO_CKPT, tmp_path / quant, quant)
    questions = json.loads((DATA / "samples-demo" / "questions.json").read_text())["questions"]
    _check_text_only(capsys, bundle, questions[0]["question"])
    for q in questions[:2] + [q for q in questions if q["image"] == "wide.png"][:1]:
        _check_image(capsys, bundle, q["question"], DATA / "samples-demo" / q["image"])
