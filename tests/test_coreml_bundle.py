"""Core ML bundles (target ios) end to end on the tiny random checkpoint: every quantization is
exported through the real pipeline, opened through the bundle registry, run by the MIL executor
and gated by `parity`; `inspect` reads the packages' programs; and flipping one layer's weights
inside a saved package makes `parity` fail at that layer's stage."""

from __future__ import annotations

import json
import platform
import shutil

import numpy as np
import pytest

pytest.importorskip("coremltools")

from edge_runtime.backends.coreml.backend import ENGINE_ENV  # noqa: E402
from edge_runtime.backends.coreml.executor import MILProgram  # noqa: E402
from edge_runtime.bundle import MANIFEST, file_entry, open_bundle_session, write_manifest  # noqa: E402
from edge_runtime.cli import main  # noqa: E402
from edge_runtime.errors import BundleError  # noqa: E402
from edge_runtime.init_checkpoint import init_checkpoint  # noqa: E402
from edge_runtime.parity import SAMPLES_DIR, compare  # noqa: E402
from edge_runtime.runtime import open_checkpoint_session  # noqa: E402
from export.coreml.quantize import QUANTIZATIONS  # noqa: E402
from export.pipeline import ExportRequest, export_bundle  # noqa: E402

MAX_CONTEXT = 320
CHUNK = 16
STEPS = 8
WEIGHT_BLOB = "Data/com.apple.CoreML/weights/weight.bin"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return init_checkpoint("minicpm-v-4.6", "tiny", tmp_path_factory.mktemp("coreml") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def bundles(ckpt_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml-bundles")
    return {
        quant: export_bundle(ExportRequest(ckpt_dir, root / quant, "ios", None, quant, MAX_CONTEXT, CHUNK))
        for quant in QUANTIZATIONS
    }


@pytest.fixture(scope="module")
def reference(ckpt_dir):
    return open_checkpoint_session(ckpt_dir, max_context=MAX_CONTEXT, threads=1)


def _gated_parity(engine, quant, bundles, reference, cases, monkeypatch) -> None:
    """Parity of the `quant` bundle run by `engine` against the torch reference, all gates."""
    monkeypatch.setenv(ENGINE_ENV, engine)
    candidate = open_bundle_session(bundles[quant], threads=1)
    assert candidate.backend.name == f"coreml-{engine}:{quant}"
    report = compare(reference, candidate, cases, quant, n_steps=STEPS)
    assert report.passed, "\n".join(report.summary_lines())


@pytest.mark.parametrize("quant", QUANTIZATIONS)
def test_parity_through_the_mil_executor(quant, bundles, reference, two_mode_cases, monkeypatch):
    _gated_parity("mil", quant, bundles, reference, two_mode_cases, monkeypatch)


@pytest.mark.skipif(
    platform.system() != "Darwin",
    reason="Core ML itself runs only on Apple OSes; elsewhere the MIL executor is the engine (test above)",
)
@pytest.mark.parametrize("quant", QUANTIZATIONS)
def test_parity_through_core_ml_on_macos(quant, bundles, reference, two_mode_cases, monkeypatch):
    _gated_parity("coremltools", quant, bundles, reference, two_mode_cases, monkeypatch)


def test_unknown_engine_is_one_line(bundles, monkeypatch):
    monkeypatch.setenv(ENGINE_ENV, "metal")
    with pytest.raises(BundleError, match="unknown Core ML engine 'metal'"):
        open_bundle_session(bundles["fp16"], threads=1)


def test_inspect_reads_functions_states_ops_and_weight_dtypes(bundles, capsys):
    assert main(["inspect", "--bundle", str(bundles["int4"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    packages = info["coreml_packages"]
    assert set(packages) == {
        "vision_encoder.mlpackage",
        "token_embedding.mlpackage",
        "text_decoder.mlpackage",
    }
    decoder = packages["text_decoder.mlpackage"]["functions"]
    assert set(decoder) == {"prefill", "decode"}
    assert [s["name"] for s in decoder["decode"]["states"]] == [s["coreml_name"] for s in info["state"]]
    assert decoder["decode"]["outputs"] and decoder["decode"]["ops"]["constexpr_blockwise_shift_scale"] > 0
    assert {i["name"] for i in decoder["prefill"]["inputs"]} == {"embeds", "start_pos", "n_valid"}
    assert set(packages["vision_encoder.mlpackage"]["functions"]) == {"vision_16x", "vision_4x"}
    assert info["weights_by_dtype"]["int4"]["bytes"] > 0 and info["weights_by_dtype"]["int4"]["params"] > 0
    assert not any(k.startswith("opaque") for k in info["weights_by_dtype"])
    # prefill and decode read the same linear weights, stored once: the package holds about one
    # function's bytes, not the sum of both (prefill alone keeps a few KB of constants: the chunked
    # DeltaNet's block masks)
    for fn in decoder.values():
        assert 0 <= fn["weight_bytes"] - fn["shared_weight_bytes"] < 0.01 * fn["weight_bytes"] + 8192
    stored = sum(e["bytes"] for e in packages["text_decoder.mlpackage"]["weight_bytes_by_dtype"].values())
    assert (
        max(fn["weight_bytes"] for fn in decoder.values()) <= stored < 1.1 * decoder["decode"]["weight_bytes"]
    )
    embedding = packages["token_embedding.mlpackage"]["functions"]["main"]
    assert embedding["shared_weight_bytes"] == 0 < embedding["weight_bytes"]

    assert main(["inspect", "--bundle", str(bundles["fp16"])]) == 0
    text = capsys.readouterr().out
    assert "text_decoder.mlpackage:" in text and "  function decode" in text and "    state " in text
    assert "MB shared with other functions)" in text
    assert "constexpr_blockwise_shift_scale" not in text  # fp16: no dequantization ops


def _flip_weight(bundle, package: str, name_part: str) -> None:
    """Negate every fp16 value of the first const whose name contains `name_part`, in place,
    then re-hash the changed blob in the manifest so only the numbers are wrong, not the checksum."""
    blob_rel = f"{package}/{WEIGHT_BLOB}"
    program = MILProgram(bundle / package)
    target = next(
        op
        for fn in program.functions.values()
        for op in fn.block.operations
        if op.type == "const"
        and name_part in op.outputs[0].name
        and op.attributes["val"].HasField("blobFileValue")
    )
    offset = target.attributes["val"].blobFileValue.offset
    raw = bytearray((bundle / blob_rel).read_bytes())
    size = int.from_bytes(raw[offset + 8 : offset + 16], "little")
    start = int.from_bytes(raw[offset + 16 : offset + 24], "little")
    view = np.frombuffer(raw, dtype=np.uint16, count=size // 2, offset=start).copy()
    raw[start : start + size] = (view ^ np.uint16(0x8000)).tobytes()
    (bundle / blob_rel).write_bytes(bytes(raw))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][blob_rel] = file_entry(bundle / blob_rel)
    write_manifest(bundle, manifest)


@pytest.mark.parametrize(
    "package, weight, stage",
    [
        ("vision_encoder.mlpackage", "layers_1_mlp_fc2_weight", "vision"),
        ("text_decoder.mlpackage", "lm_head_weight", "prefill"),
    ],
)
def test_flipped_layer_in_a_saved_package_fails_parity_at_its_stage(
    bundles, ckpt_dir, tmp_path, capsys, package, weight, stage
):
    bad = tmp_path / "bad"
    shutil.copytree(bundles["fp16"], bad)
    _flip_weight(bad, package, weight)
    cases = tmp_path / "cases.json"
    cases.write_text(
        json.dumps(
            {"cases": [{"name": "square", "images": [str(SAMPLES_DIR / "square.png")], "prompt": "Hi"}]}
        )
    )
    args = ["parity", "--bundle", str(bad), "--checkpoint", str(ckpt_dir), "--cases", str(cases)]
    code = main([*args, "--steps", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["passed"] is False
    assert report["first_failed_stage"] == stage, report["failures"][:2]
