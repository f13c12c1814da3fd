"""MiniCPM-V 4.7 (Canvas M-RoPE) as ExecuTorch (target android) and Core ML (target ios) bundles:
the stateful decoder's `position_ids` rows.

The tiny preset is exported through the real pipeline and run through `parity` against the PyTorch
reference on prompts whose canvas rows differ from the cache index (a sliced 16x image, an unsliced
4x image, two images) and on a text-only prompt (rows equal to the cache index): ExecuTorch fp32
must give identical greedy tokens, Core ML fp16 / int4 (run by the MIL executor, as on every
non-Apple host) must pass the gates of their quantization, as the other families' bundles do. The
ExecuTorch 8da4w bundle re-exports for minutes and runs with `make test-slow`.

Each format also shows that the rows reach RoPE (feeding the cache index instead of a sliced
prompt's canvas rows moves the prefill logits), that a canvas bundle whose decoder lists no
position_ids is refused on open in one line, and ExecuTorch that `forward` (token ids, the stock
TextLLMRunner's method) keeps its two-input signature and equals `text_decoder` on a text-only
prompt, so the stock TextLLMRunner answers text-only prompts as `chat` does.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from case_images import write_cases  # tests/ helper

from edge_runtime.bundle import open_bundle_session
from edge_runtime.errors import BundleError
from edge_runtime.generation import prefill
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import compare, load_cases
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

FAMILY = "minicpm-v-4.7"
MAX_CONTEXT = 384
CHUNK = 16
STEPS = 6
SLOW = os.environ.get("MINICPMV_EDGE_SLOW") == "1"
# (name, image sizes (w, h), prompt, downsample mode); prompts of at most ~300 tokens keep the
# MIL executor's runs short
CASES = [
    ("sliced-16x", [(900, 600)], "Describe it.", "16x"),
    ("small-4x", [(200, 150)], "Read the text.", "4x"),
    ("two-images-16x", [(120, 90), (640, 300)], "What differs between them?", "16x"),
    ("text-only", [], "Write one short sentence about the sea.", "16x"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(FAMILY, "tiny", tmp_path_factory.mktemp("v47fmt") / "tiny", seed=3)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Smooth colour fields plus noise (slices differ), and the cases naming them."""
    base = tmp_path_factory.mktemp("v47fmt-cases")
    return load_cases(write_cases(base, CASES))


@pytest.fixture(scope="module")
def reference(ckpt):
    return open_checkpoint_session(ckpt, max_context=MAX_CONTEXT, threads=1)


def _export(ckpt, out, target: str, quant: str):
    return export_bundle(ExportRequest(ckpt, out, target, None, quant, MAX_CONTEXT, CHUNK))


def _parity(reference, bundle, cases, quant, identical: bool) -> None:
    report = compare(reference, open_bundle_session(bundle, threads=1), cases, quant, n_steps=STEPS)
    print(json.dumps({quant: report.stages}, default=str))
    assert report.passed, "\n".join(report.summary_lines())
    if identical:
        assert report.stages["greedy"]["identical_cases"] == 1.0


def _rows_reach_rope(bundle, cases) -> None:
    """Prefill logits with the sliced case's canvas rows differ from those with the cache index."""
    session = open_bundle_session(bundle, threads=1)
    (case,) = [c for c in cases if c.name == "sliced-16x"]
    prepared = session.prepare(case.prompt, list(case.images), downsample_mode=case.downsample_mode)
    rows = prepared.rope.positions
    assert not np.array_equal(rows[0], np.arange(rows.shape[1]))  # canvas rows lag the cache index
    backend = session.backend
    canvas, _, _ = prefill(backend, prepared.embeds, backend.new_state(), positions=rows)
    cache, _, _ = prefill(backend, prepared.embeds, backend.new_state())
    assert np.abs(canvas - cache).max() > 1e-3


def _without_position_ids(bundle) -> dict:
    """The bundle's manifest as an exporter that fed no rows would have written it."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    decoder = manifest["graphs"]["text_decoder"]
    assert "position_ids" in [i["name"] for i in decoder["inputs"]]
    decoder["inputs"] = [i for i in decoder["inputs"] if i["name"] != "position_ids"]
    return manifest


# --- ExecuTorch (android) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executorch_fp32(ckpt, tmp_path_factory):
    pytest.importorskip("executorch")
    return _export(ckpt, tmp_path_factory.mktemp("v47-et") / "fp32", "android", "fp32")


def test_executorch_manifest_and_method_signatures(executorch_fp32):
    """text_decoder takes (embeds, start_pos, position_ids); forward keeps (tokens, start_pos)."""
    from edge_runtime.backends.executorch import _runtime

    manifest = json.loads((executorch_fp32 / "manifest.json").read_text())
    assert manifest["model"]["rope_positions"] == "canvas" and "canvas_tokens" in manifest["model"]
    inputs = manifest["graphs"]["text_decoder"]["inputs"]
    assert [i["name"] for i in inputs] == ["embeds", "start_pos", "position_ids"]
    assert inputs[2] == {"name": "position_ids", "shape": [3, "T"], "dtype": "int64"}
    program = _runtime(manifest["executorch"]["custom_ops"]).load_program(executorch_fp32 / "model.pte")
    n_inputs = {m: program.metadata(m).num_inputs() for m in ("text_decoder", "forward")}
    assert n_inputs == {"text_decoder": 3, "forward": 2}


def test_executorch_fp32_passes_parity(executorch_fp32, reference, cases):
    _parity(reference, executorch_fp32, cases, "fp32", identical=True)


def test_executorch_rows_reach_rope(executorch_fp32, cases):
    _rows_reach_rope(executorch_fp32, cases)


def test_executorch_forward_equals_text_decoder_on_text_only(executorch_fp32, cases):
    """The stock TextLLMRunner's `forward(tokens, start_pos)` rotates by the cache index, which a
    text-only prompt's canvas rows are: its logits equal text_decoder's with those rows."""
    import torch

    session = open_bundle_session(executorch_fp32, threads=1)
    (case,) = [c for c in cases if c.name == "text-only"]
    ids = np.asarray(session.plan(case.prompt, []).prompt.ids, dtype=np.int64)
    prepared = session.prepare(case.prompt, [])
    np.testing.assert_array_equal(
        prepared.rope.positions, np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    )
    backend = session.backend
    canvas, _, _ = prefill(backend, prepared.embeds, backend.new_state(), positions=prepared.rope.positions)
    backend.new_state()
    forward = backend.program.load_method("forward")
    out = forward.execute([torch.from_numpy(ids)[None], torch.tensor([0])])[0].numpy()[0]
    np.testing.assert_allclose(out, canvas, atol=1e-4, rtol=0)


def test_executorch_stock_runners_on_a_text_only_prompt(executorch_fp32, capsys):
    """ExecuTorch's own TextLLMRunner drives the bundle through `forward` (the stock signature) and
    gives `chat --bundle`'s greedy tokens on a text-only prompt; the MultimodalRunner, which calls
    `text_decoder` without the rows, is refused by the program instead of decoding wrong positions."""
    from test_executorch_stock_runner import (
        NEW_TOKENS,
        _chat_json,
        _check,
        _expected_pieces,
        _run,
        _run_text,
        _runner_module,
        _stop_texts,
    )

    bundle, prompt = executorch_fp32, "Write one short sentence about the sea."
    runner = _runner_module()
    chat = _chat_json(capsys, bundle, prompt, [], NEW_TOKENS)
    text = open_bundle_session(bundle, threads=1).prepare(prompt).prompt.text
    pte, tokenizer = str(bundle / "model.pte"), str(bundle / "tokenizer.json")
    _check(
        _run_text(runner.TextLLMRunner(pte, tokenizer), text),
        _expected_pieces(bundle, chat),
        _stop_texts(bundle),
    )
    with pytest.raises(RuntimeError, match="Generation failed"):  # "Input 2 has not been set"
        _run(runner.MultimodalRunner(pte, tokenizer), lambda: [runner.MultimodalInput(text)], NEW_TOKENS)


def test_executorch_bundle_without_position_ids_is_refused(executorch_fp32):
    from edge_runtime.backends.executorch import ExecuTorchBackend

    with pytest.raises(BundleError, match="takes no position_ids") as err:
        ExecuTorchBackend(executorch_fp32 / "model.pte", _without_position_ids(executorch_fp32))
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.skipif(not SLOW, reason="a quantized .pte export takes minutes; run make test-slow")
def test_executorch_8da4w_passes_parity(ckpt, reference, cases, tmp_path):
    pytest.importorskip("executorch")
    _parity(reference, _export(ckpt, tmp_path / "8da4w", "android", "8da4w"), cases, "8da4w", identical=False)


# --- Core ML (ios), run by the MIL executor ------------------------------------------------------


@pytest.fixture(scope="module")
def coreml(ckpt, tmp_path_factory):
    pytest.importorskip("coremltools")
    root = tmp_path_factory.mktemp("v47-coreml")
    return {q: _export(ckpt, root / q, "ios", q) for q in ("fp16", "int4")}


@pytest.fixture()
def mil_engine(monkeypatch):
    from edge_runtime.backends.coreml.backend import ENGINE_ENV

    monkeypatch.setenv(ENGINE_ENV, "mil")


def test_coreml_decoder_functions_take_int32_position_rows(coreml):
    from edge_runtime.backends.coreml.executor import MILProgram

    manifest = json.loads((coreml["fp16"] / "manifest.json").read_text())
    inputs = manifest["graphs"]["text_decoder"]["inputs"]
    assert [i["name"] for i in inputs] == ["embeds", "start_pos", "n_valid", "position_ids"]
    assert inputs[3] == {"name": "position_ids", "shape": [3, "C (prefill) or 1 (decode)"], "dtype": "int32"}
    program = MILProgram(coreml["fp16"] / "text_decoder.mlpackage")
    for function, rows in (("prefill", CHUNK), ("decode", 1)):
        specs = {spec.name: spec for spec in program.function(function).inputs}
        assert tuple(specs["position_ids"].shape) == (3, rows), function
        assert specs["position_ids"].dtype == np.int32, function


@pytest.mark.parametrize("quant", ["fp16", "int4"])
def test_coreml_passes_parity_through_the_mil_executor(coreml, reference, cases, quant, mil_engine):
    _parity(reference, coreml[quant], cases, quant, identical=False)


def test_coreml_rows_reach_rope(coreml, cases, mil_engine):
    _rows_reach_rope(coreml["fp16"], cases)


def test_coreml_bundle_without_position_ids_is_refused(coreml):
    from edge_runtime.backends.coreml.backend import CoreMLBackend

    with pytest.raises(BundleError, match="takes no position_ids") as err:
        CoreMLBackend(coreml["fp16"], _without_position_ids(coreml["fp16"]), engine="mil")
    assert len(str(err.value).splitlines()) == 1
