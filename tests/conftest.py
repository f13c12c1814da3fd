"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest

from edge_runtime.init_checkpoint import init_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny MiniCPM-V 4.6 checkpoint, written once per run. Read-only: copy it to modify it."""
    return init_checkpoint("minicpm-v-4.6", "tiny", tmp_path_factory.mktemp("shared") / "tiny", seed=1)
