"""The bundle contract: what the shared writer produces, and that a changed byte, a missing file or an
unknown schema version is refused on open with one line naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_runtime.bundle import (
    HOST_FILES,
    MANIFEST,
    SCHEMA_VERSION,
    available_formats,
    load_bundle,
    open_bundle,
    open_bundle_session,
    read_manifest,
    sha256_file,
    write_manifest,
)
from edge_runtime.cli import main
from edge_runtime.errors import BundleError, InputError
from edge_runtime.parity import SAMPLES_DIR
from edge_runtime.runtime import open_checkpoint_session
from edge_runtime.schema import manifest_checksum
from edge_runtime.session import HostAssets
from export import pipeline, torch_bundle
from export.pipeline import ExportRequest, export_bundle


@pytest.fixture(scope="module")
def ckpt_dir(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def bundle_dir(ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "desktop"
    return export_bundle(ExportRequest(ckpt_dir, out, "desktop", max_context=256, chunk_size=32))


@pytest.fixture
def copy(bundle_dir, tmp_path):
    """A private copy of the bundle to damage."""
    return shutil.copytree(bundle_dir, tmp_path / "copy")


def test_manifest_fields_and_checksums(bundle_dir, ckpt_dir):
    m = read_manifest(bundle_dir)
    assert m.schema_version == SCHEMA_VERSION == 1
    assert (m.family, m.target, m.format, m.quantization) == ("minicpm-v-4.6", "desktop", "torch", "fp32")
    assert (m.max_context, m.chunk_size) == (256, 32)
    assert set(m.graphs) == {"vision_encoder", "token_embedding", "text_decoder"}
    assert m.graphs["vision_encoder"]["inputs"][0] == {
        "name": "patches",
        "shape": ["L", 588],
        "dtype": "float32",
    }
    assert m.state[-1]["name"].endswith("v_cache") and m.state[-1]["shape"][2] == 256 + 32
    assert m.prompt["chat_template"] == "chat_template.jinja" and m.prompt["stop_ids"]
    assert m.prompt["special_token_ids"]["image"] == m.model["image_token_id"]
    assert m.preprocessing == json.loads((ckpt_dir / "preprocessor_config.json").read_text())
    assert m.model["decode_weight_bytes"] > 0
    assert set(m.files) == {*HOST_FILES, "config.json", "model.safetensors"}
    for rel, entry in m.files.items():
        assert entry == {"sha256": sha256_file(bundle_dir / rel), "bytes": (bundle_dir / rel).stat().st_size}
    for name in HOST_FILES:  # host files travel unchanged
        assert (bundle_dir / name).read_bytes() == (ckpt_dir / name).read_bytes()


def test_host_assets_read_a_bundle_like_a_checkpoint(bundle_dir, ckpt_dir):
    a = HostAssets.from_dir(bundle_dir, 70)
    b = HostAssets.from_dir(ckpt_dir, 70)
    assert a.stop_ids == b.stop_ids and a.slice_config == b.slice_config
    assert a.prompts.chat("hi", []).ids == b.prompts.chat("hi", []).ids


def test_bundle_session_matches_the_checkpoint(bundle_dir, ckpt_dir):
    image = [SAMPLES_DIR / "square.png"]
    results = []
    for session in (
        open_bundle_session(bundle_dir, threads=1),
        open_checkpoint_session(ckpt_dir, max_context=256, threads=1),
    ):
        prepared = session.prepare("What is it?", image)
        results.append(session.generate(prepared, session.sampling(max_new_tokens=4)).generation.token_ids)
    assert results[0] == results[1]
    assert "torch" in available_formats()


def _one_line_refusal(path, *names: str) -> str:
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


def test_changed_byte_in_graph_file_is_refused(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "sha256 mismatch" in _one_line_refusal(copy, "model.safetensors")


def test_missing_file_is_refused(copy):
    (copy / "tokenizer.json").unlink()
    assert "missing" in _one_line_refusal(copy, "tokenizer.json")


def test_truncated_file_is_refused_before_hashing(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "truncated" in _one_line_refusal(copy, "model.safetensors")


def test_unknown_schema_version_is_refused(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = 99
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert "schema_version 99" in _one_line_refusal(copy, MANIFEST)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("graphs"), "'graphs' is missing"),
        (lambda m: m.update(max_context="big"), "'max_context' must be an integer"),
        (lambda m: m.update(target="watch"), "target 'watch'"),
        (lambda m: m["files"].update({"../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "invalid path"),
        (lambda m: m.update(format="tflite"), "no backend"),
    ],
)
def test_bad_manifest_is_refused(copy, change, message):
    manifest = json.loads((copy / MANIFEST).read_text())
    change(manifest)
    write_manifest(copy, manifest)  # signed: the schema itself must refuse it
    with pytest.raises(BundleError, match=message):
        open_bundle(copy)


def test_manifest_has_a_checksum_of_its_own(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["manifest_sha256"] == manifest_checksum(manifest)
    manifest["max_context"] = 128  # schema-valid, but not what the exporter wrote
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest_sha256 mismatch"):
        open_bundle(copy)
    del manifest["manifest_sha256"]  # a bundle made before the checksum existed still opens
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert read_manifest(copy).max_context == 128


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def test_cli_refuses_damaged_bundle_in_one_line(copy, capsys):
    (copy / "config.json").write_text("{}")
    code = main(["chat", "--bundle", str(copy), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "config.json" in err and err.startswith("error: bundle")


def test_unavailable_exporter_fails_before_any_work(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.EXPORTERS, "coreml", "export.no_such_exporter_module")
    with pytest.raises(
        InputError, match="the ios exporter \\(format coreml\\) is not available in this version"
    ):
        export_bundle(ExportRequest(ckpt_dir, tmp_path / "ios", "ios"))
    assert not (tmp_path / "ios").exists()


def test_export_refuses_unsupported_quant_and_foreign_dirs(ckpt_dir, tmp_path):
    with pytest.raises(InputError, match="does not support --quant int8"):
        export_bundle(ExportRequest(ckpt_dir, tmp_path / "q", "desktop", quantization="int8"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bundle"):
        export_bundle(ExportRequest(ckpt_dir, tmp_path / "docs", "desktop"))
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(ckpt_dir, tmp_path, monkeypatch):
    def broken(ctx):
        (ctx.out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("lowering crashed")

    monkeypatch.setattr(torch_bundle, "export_graphs", broken)
    with pytest.raises(RuntimeError):
        export_bundle(ExportRequest(ckpt_dir, tmp_path / "out", "desktop"))
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a temp dir


def test_fp16_bundle_stores_half_weights(ckpt_dir, tmp_path):
    from edge_runtime.bundle import safetensors_tensors

    out = export_bundle(ExportRequest(ckpt_dir, tmp_path / "fp16", "desktop", quantization="fp16"))
    assert read_manifest(out).quantization == "fp16"
    assert {t.dtype for t in safetensors_tensors(out / "model.safetensors")} == {"float16"}
    _, backend = open_bundle(out, threads=1)
    assert backend.name == "torch-bundle:fp16"
