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
