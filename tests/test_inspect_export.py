"""`export` and `inspect` on the command line: progress on stderr, --json on stdout, one-line refusals."""

from __future__ import annotations

import json

import pytest

from edge_runtime.cli import main


@pytest.fixture(scope="module")
def ckpt_dir(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def bundle_dir(ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-bundle") / "b"
    assert main(["export", "--checkpoint", str(ckpt_dir), "--target", "desktop", "--out", str(out)]) == 0
    return out


def test_export_json_and_progress(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "b16"
    args = [
        "export",
        "--checkpoint",
        str(ckpt_dir),
        "--target",
        "desktop",
        "--quant",
        "fp16",
        "--out",
        str(out),
    ]
    assert main([*args, "--json", "--max-context", "128", "--chunk-size", "16"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["format"] == "torch" and data["quantization"] == "fp16" and data["schema_version"] == 1
    assert data["files"]["model.safetensors"] > 0 and data["size_bytes"] > data["files"]["model.safetensors"]
    assert "[export] hashing files and writing the manifest" in captured.err


@pytest.mark.parametrize("target, fmt", [("ios", "coreml"), ("android", "executorch"), ("harmonyos", "onnx")])
def test_export_to_a_target_without_exporter_is_one_line(
    ckpt_dir, tmp_path, capsys, monkeypatch, target, fmt
):
    from export import pipeline

    monkeypatch.setitem(pipeline.EXPORTERS, fmt, f"export.absent_{fmt}_exporter")
    code = main(["export", "--checkpoint", str(ckpt_dir), "--target", target, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith(f"error: the {target} exporter (format {fmt}) is not available in this version; ")
    assert "torch (target desktop)" in err
    assert not (tmp_path / "x").exists()


def test_export_bad_checkpoint_is_one_line(tmp_path, capsys):
    code = main(
        [
            "export",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--target",
            "desktop",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[export]")]
    assert code == 2 and len(errors) == 1 and "does not exist" in errors[0]


def test_inspect_json(bundle_dir, capsys):
    assert main(["inspect", "--bundle", str(bundle_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["quantization"], info["schema_version"]) == ("torch", "fp32", 1)
    decoder = info["entry_points"]["text_decoder"]
    assert decoder["state"] == "in_out" and decoder["outputs"][0]["dtype"] == "float32"
    assert {s["name"] for s in info["state"]} >= {"layers.3.k_cache", "layers.0.recurrent_state"}
    assert info["state_bytes"] == sum(s["bytes"] for s in info["state"]) > 0
    weights = info["weights_by_dtype"]["float32"]
    assert weights["tensors"] > 100 and weights["bytes"] == 4 * weights["params"]
    assert info["files_ok"] and {f["status"] for f in info["files"]} == {"ok"}
    assert info["unlisted_files"] == []


def test_inspect_text_and_bad_checksum(bundle_dir, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    assert main(["inspect", "--bundle", str(copy)]) == 0
    text = capsys.readouterr().out
    for needle in (
        "entry points:",
        "vision_encoder",
        "in  patches [L, 588] float32",
        "state:",
        "weights by dtype:",
    ):
        assert needle in text
    data = bytearray((copy / "tokenizer.json").read_bytes())
    data[100] ^= 0x20
    (copy / "tokenizer.json").write_bytes(bytes(data))
    (copy / "stray.bin").write_bytes(b"x")
    assert main(["inspect", "--bundle", str(copy)]) == 1
    captured = capsys.readouterr()
    assert "BAD tokenizer.json: sha256 mismatch" in captured.out
    assert "unlisted (ignored by runtimes): stray.bin" in captured.out
    assert captured.err.strip().startswith("error: bundle") and "tokenizer.json" in captured.err


def test_inspect_unknown_schema_is_exit_2(bundle_dir, tmp_path, capsys):
    import shutil

    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", "--bundle", str(copy)]) == 2
    assert "unknown schema_version 2" in capsys.readouterr().err
