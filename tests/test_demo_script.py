"""tools/demo.py: its bundle cache is tied to the checkpoint the bundle was exported from; a failing
bundle says which gate failed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import demo  # noqa: E402

from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402


def test_bundle_cache_is_reused_only_for_its_own_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(demo, "BUILD", tmp_path / "build")
    first = init_checkpoint("minicpm-v-4.6", "tiny", tmp_path / "a", seed=0)
    second = init_checkpoint("minicpm-v-4.6", "tiny", tmp_path / "b", seed=1)

    def export(checkpoint: Path) -> bool:
        demo.bundle_for(checkpoint, "harmonyos", "onnx", "fp32")
        return "exporting harmonyos" in capsys.readouterr().out

    assert export(first)
    assert not export(first)  # same checkpoint: the cache is used
    assert export(second)  # other weights: exported again, never the stale bundle
    assert not export(second)
    bundle = demo.BUILD / "bundles" / "harmonyos-fp32"
    damaged = bundle / next(iter(json.loads((bundle / "manifest.json").read_text())["files"]))
    damaged.write_bytes(damaged.read_bytes() + b"x")  # fails its checksum: exported again
    assert export(second)
    copy = shutil.copytree(second, tmp_path / "c")
    assert demo.checkpoint_digest(copy) == demo.checkpoint_digest(second)
    assert demo.checkpoint_digest(first) != demo.checkpoint_digest(second)


def test_a_failing_bundle_column_prints_its_gate_message(capsys: pytest.CaptureFixture) -> None:
    columns = [demo.Column("reference"), demo.Column("harmonyos/int4", verdict="FAIL prefill")]
    columns[1].failure = "prefill top-1 agreement 66.7% of 3 positions < 90%; mismatches in q0"
    columns.append(demo.Column("ios/int4", verdict="pass"))
    demo.print_failures(columns)
    assert capsys.readouterr().out.splitlines() == [
        "harmonyos/int4 parity: prefill top-1 agreement 66.7% of 3 positions < 90%; mismatches in q0"
    ]
