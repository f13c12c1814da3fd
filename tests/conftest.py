"""Fixtures shared across test modules."""

from __future__ import annotations

import json

import pytest

from edge_runtime.init_checkpoint import init_checkpoint
from edge_runtime.parity import SAMPLES_DIR, load_cases


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny MiniCPM-V 4.6 checkpoint, written once per run. Read-only: copy it to modify it."""
    return init_checkpoint("minicpm-v-4.6", "tiny", tmp_path_factory.mktemp("shared") / "tiny", seed=1)


@pytest.fixture(scope="session")
def two_mode_cases(tmp_path_factory):
    """Two small parity cases for exporter tests: one image in 16x, a tiny one in 4x."""
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    square = {"name": "square-16x", "images": [str(SAMPLES_DIR / "square.png")], "prompt": "What colour?"}
    tiny = {
        "name": "tiny-4x",
        "images": [str(SAMPLES_DIR / "tiny.png")],
        "prompt": "What is in this small image?",
        "downsample_mode": "4x",
    }
    path.write_text(json.dumps({"cases": [square, tiny]}))
    return load_cases(path)


# The tiny fp32 ExecuTorch bundle (~2.5 min to lower here) is exported once per run, for
# test_executorch_export.py and test_executorch_stock_runner.py.
EXECUTORCH_TINY_CONTEXT = 128
EXECUTORCH_TINY_CHUNK = 16


@pytest.fixture(scope="session")
def executorch_tiny_fp32(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("executorch")
    from edge_runtime.backends.executorch import open_executorch_bundle
    from edge_runtime.bundle import register_backend
    from export.pipeline import ExportRequest, export_bundle, register_exporter

    register_exporter("executorch", "export.executorch")
    register_backend("executorch", open_executorch_bundle)
    out = tmp_path_factory.mktemp("executorch") / "tiny-fp32"
    request = ExportRequest(
        tiny_checkpoint, out, "android", None, "fp32", EXECUTORCH_TINY_CONTEXT, EXECUTORCH_TINY_CHUNK
    )
    return export_bundle(request)
