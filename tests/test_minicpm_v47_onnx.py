"""MiniCPM-V 4.7 (Canvas M-RoPE) as ONNX bundles (target harmonyos): the decoder's position_ids rows.

The tiny preset is exported to fp32 / int8 / int4 and run through `parity` against the PyTorch
reference on prompts whose canvas rows differ from the cache index (sliced images in 16x and 4x,
two images) and on a text-only prompt (rows equal to the cache index). fp32 must give identical
greedy tokens (edge_runtime/parity.py gates). One check also shows the rows reach RoPE: feeding
the cache index instead of a sliced prompt's canvas rows moves the bundle's prefill logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from case_images import write_cases  # tests/ helper

from edge_runtime.backends.onnxruntime import OnnxRuntimeBackend
from edge_runtime.bundle import open_bundle_session
from edge_runtime.generation import prefill
from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import compare, load_cases
from edge_runtime.runtime import open_checkpoint_session
from export.pipeline import ExportRequest, export_bundle

FAMILY = "minicpm-v-4.7"
MAX_CONTEXT = 1536
STEPS = 6
# (name, image sizes (w, h), prompt, downsample mode)
CASES = [
    ("sliced-16x", [(1344, 896)], "Describe it.", "16x"),
    ("sliced-4x", [(500, 1500)], "Read the text.", "4x"),
    ("two-images-16x", [(120, 90), (1000, 700)], "What differs between them?", "16x"),
    ("text-only", [], "Write one short sentence about the sea.", "16x"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(FAMILY, "tiny", tmp_path_factory.mktemp("v47onnx") / "tiny", seed=3)


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    """Smooth colour fields plus noise (slices differ), and the cases file naming them."""
    base = tmp_path_factory.mktemp("v47onnx-cases")
    return write_cases(base, CASES)


@pytest.fixture(scope="module")
def reference(ckpt):
    return open_checkpoint_session(ckpt, max_context=MAX_CONTEXT, threads=1)


@pytest.fixture(scope="module")
def bundles(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("v47onnx-bundles")
    return {
        q: export_bundle(ExportRequest(ckpt, out / q, "harmonyos", None, q, MAX_CONTEXT))
        for q in ("fp32", "int8", "int4")
    }


def test_manifest_declares_position_rows_and_canvas_markers(bundles, ckpt):
    manifest = json.loads((bundles["fp32"] / "manifest.json").read_text())
    inputs = {i["name"]: i for i in manifest["graphs"]["text_decoder"]["inputs"]}
    assert inputs["position_ids"] == {
        "name": "position_ids",
        "shape": [3, "C (prefill) or 1 (decode)"],
        "dtype": "int64",
    }
    assert manifest["family"] == FAMILY and manifest["model"]["rope_positions"] == "canvas"
    config = json.loads((ckpt / "config.json").read_text())
    assert manifest["model"]["canvas_tokens"]["image_start_id"] == config["image_start_id"]


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_onnx_bundle_passes_parity(bundles, reference, cases_file, quant):
    report = compare(
        reference,
        open_bundle_session(bundles[quant], threads=1),
        load_cases(cases_file),
        quant,
        n_steps=STEPS,
    )
    print(json.dumps({quant: {k: v for k, v in report.stages.items()}}, default=str))
    assert report.passed, "\n".join(report.summary_lines())
    if quant == "fp32":
        assert report.stages["greedy"]["identical_cases"] == 1.0


def test_rows_not_the_cache_index_reach_rope(bundles, cases_file):
    session = open_bundle_session(bundles["fp32"], threads=1)
    (case,) = [c for c in load_cases(cases_file) if c.name == "sliced-16x"]
    prepared = session.prepare(case.prompt, list(case.images), downsample_mode=case.downsample_mode)
    rows = prepared.rope.positions
    assert not np.array_equal(rows[0], np.arange(rows.shape[1]))  # canvas rows lag the cache index
    backend = session.backend
    assert isinstance(backend, OnnxRuntimeBackend)
    canvas, _, _ = prefill(backend, prepared.embeds, backend.new_state(), positions=rows)
    cache, _, _ = prefill(backend, prepared.embeds, backend.new_state())
    assert np.abs(canvas - cache).max() > 1e-3
