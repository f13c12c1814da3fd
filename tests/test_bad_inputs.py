"""The bad-input promise, as a table: every command, given something wrong, exits 2 (1 where a check ran
and failed) with one `error:` line on stderr, and nothing on disk is written or deleted.

Each case builds its inputs in its own directory (copies of the shared tiny checkpoint and bundle,
never the originals), which is also the working directory; that directory and the shared fixtures are
snapshotted before and after the command. Progress lines (`[export] ...`) may precede the error line
when the failure is found after work started; nothing else may.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from edge_runtime.bundle import MANIFEST, read_manifest, write_manifest
from edge_runtime.checkpoint import read_config
from edge_runtime.cli import main
from edge_runtime.errors import BundleError, CheckpointError
from edge_runtime.parity import SAMPLES_DIR
from export.pipeline import ExportRequest, export_bundle

EXE = [sys.executable, "-m", "edge_runtime.cli"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    """One harmonyos fp32 bundle of the tiny checkpoint (read-only: cases copy it to damage it)."""
    out = tmp_path_factory.mktemp("bad-inputs") / "bundle"
    return export_bundle(ExportRequest(tiny_checkpoint, out, "harmonyos", max_context=256, chunk_size=32))


@dataclass
class Ctx:
    """What a case builds its argv from: its own directory and the shared (read-only) artifacts."""

    tmp: Path
    ckpt: Path
    bundle: Path

    def ckpt_copy(self, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(self.ckpt, self.tmp / name))

    def bundle_copy(self, name: str = "bundle") -> Path:
        return Path(shutil.copytree(self.bundle, self.tmp / name))

    def config(self, change: Callable[[dict], object]) -> Path:
        ckpt = self.ckpt_copy()
        raw = json.loads((ckpt / "config.json").read_text())
        change(raw)
        (ckpt / "config.json").write_text(json.dumps(raw))
        return ckpt

    def manifest(self, change: Callable[[dict], object], sign: bool = True) -> Path:
        """A bundle copy with its manifest changed; `sign` re-computes the manifest's own checksum,
        so the schema (not the checksum) must catch the change."""
        out = self.bundle_copy()
        raw = json.loads((out / MANIFEST).read_text())
        change(raw)
        if sign:
            write_manifest(out, raw)
        else:
            (out / MANIFEST).write_text(json.dumps(raw))
        return out

    def weights(self, damage: Callable[[Path], object]) -> Path:
        ckpt = self.ckpt_copy()
        damage(ckpt / "model.safetensors")
        return ckpt

    def file(self, name: str, data: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def loop(self, name: str = "loop") -> Path:
        (self.tmp / f"{name}-a").symlink_to(f"{name}-b")
        (self.tmp / f"{name}-b").symlink_to(f"{name}-a")
        return self.tmp / f"{name}-a"

    def foreign_dir(self, name: str = "mine") -> Path:
        path = self.tmp / name
        path.mkdir()
        (path / "notes.txt").write_text("my notes")
        return path


def _nan_weights(path: Path) -> None:
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def _header(header: object) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        blob = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 64)

    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _set(path: str, value: object) -> Callable[[dict], None]:
    """Set a dotted path (list indices as ints) in a JSON object; value DELETE removes the key."""

    def change(raw: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = raw
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


DELETE = object()
ONNX = ["--target", "harmonyos", "--quant", "fp32", "--max-context", "64", "--chunk-size", "16"]
IMG = str(SAMPLES_DIR / "square.png")

# (id, argv builder, exit code, a phrase the error line must contain)
Case = tuple[str, Callable[[Ctx], list[str]], int, str]
CASES: list[Case] = [
    # --- init-checkpoint ------------------------------------------------------------------------
    ("init-unknown-family", lambda c: ["init-checkpoint", "llava", "--out", "new"], 2, "unknown family"),
    ("init-out-dot", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", "."], 2, "current directory"),
    ("init-out-dotdot", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", ".."], 2, "current directory"),
    ("init-out-under-file", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", f"{c.file('f', 'x')}/sub"], 2, "is a file"),
    ("init-out-is-file", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", str(c.file("f", "x"))], 2, "refusing to replace"),
    ("init-out-foreign-dir", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", str(c.foreign_dir())], 2, "not a checkpoint of ours"),
    ("init-out-ckpt-plus-user-file", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", str(_with_extra(c.ckpt_copy()))], 2, "holds files a checkpoint does not"),
    ("init-out-symlink", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", str(_symlink(c.tmp / "link", c.ckpt_copy()))], 2, "symbolic link"),
    ("init-out-unwritable", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", "/proc/minicpmv-edge-test"], 2, "cannot write"),
    ("init-seed-negative", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", "new", "--seed", "-1"], 2, "--seed"),
    ("init-bad-preset", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", "new", "--preset", "huge"], 2, "--preset"),
    ("init-bad-dtype", lambda c: ["init-checkpoint", "minicpm-v-4.6", "--out", "new", "--dtype", "int3"], 2, "--dtype"),
    ("init-no-out", lambda c: ["init-checkpoint", "minicpm-v-4.6"], 2, "--out"),
    # --- export ---------------------------------------------------------------------------------
    ("export-out-dot", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", "."], 2, "current directory"),
    ("export-out-under-file", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", f"{c.file('f', 'x')}/b"], 2, "is a file"),
    ("export-out-is-file", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", str(c.file("f", "x"))], 2, "refusing to replace"),
    ("export-out-foreign-dir", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", str(c.foreign_dir())], 2, "not a bundle of ours"),
    ("export-out-empty-manifest", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", str(_fake_bundle(c))], 2, "not a bundle of ours"),
    ("export-out-bundle-plus-user-file", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", str(_with_extra(c.bundle_copy()))], 2, "does not list: notes.txt"),
    ("export-out-unwritable", lambda c: ["export", "--checkpoint", str(c.ckpt), *ONNX, "--out", "/proc/minicpmv-edge-test"], 2, "cannot write"),
    ("export-bad-target", lambda c: ["export", "--checkpoint", str(c.ckpt), "--target", "watch", "--out", "b"], 2, "--target"),
    ("export-bad-quant", lambda c: ["export", "--checkpoint", str(c.ckpt), "--target", "harmonyos", "--quant", "int3", "--out", "b"], 2, "--quant"),
    ("export-chunk-zero", lambda c: ["export", "--checkpoint", str(c.ckpt), "--target", "harmonyos", "--chunk-size", "0", "--out", "b"], 2, "--chunk-size"),
    ("export-context-tiny", lambda c: ["export", "--checkpoint", str(c.ckpt), "--target", "harmonyos", "--max-context", "8", "--out", "b"], 2, "--max-context"),
    ("export-unknown-format", lambda c: ["export", "--checkpoint", str(c.ckpt), "--target", "harmonyos", "--format", "tflite", "--out", "b"], 2, "not available"),
    ("export-ckpt-missing", lambda c: ["export", "--checkpoint", "nowhere", *ONNX, "--out", "b"], 2, "does not exist"),
    ("export-ckpt-symlink-loop", lambda c: ["export", "--checkpoint", str(c.loop()), *ONNX, "--out", "b"], 2, "symbolic link loop"),
    ("export-config-hidden-str", lambda c: ["export", "--checkpoint", str(c.config(_set("text_config.hidden_size", "64"))), *ONNX, "--out", "b"], 2, "'text_config.hidden_size' must be an integer"),
    ("export-config-hidden-null", lambda c: ["export", "--checkpoint", str(c.config(_set("text_config.hidden_size", None))), *ONNX, "--out", "b"], 2, "'text_config.hidden_size' must be an integer"),
    ("export-config-hidden-negative", lambda c: ["export", "--checkpoint", str(c.config(_set("text_config.hidden_size", -64))), *ONNX, "--out", "b"], 2, "text_config.hidden_size"),
    ("export-config-vision-layers-word", lambda c: ["export", "--checkpoint", str(c.config(_set("vision_config.num_hidden_layers", "four"))), *ONNX, "--out", "b"], 2, "vision_config.num_hidden_layers"),
    ("export-config-missing-key", lambda c: ["export", "--checkpoint", str(c.config(_set("text_config.intermediate_size", DELETE))), *ONNX, "--out", "b"], 2, "'text_config.intermediate_size' is missing"),
    ("export-config-bool-dim", lambda c: ["export", "--checkpoint", str(c.config(_set("text_config.num_hidden_layers", True))), *ONNX, "--out", "b"], 2, "text_config.num_hidden_layers"),
    ("export-config-not-json", lambda c: ["export", "--checkpoint", str(_write(c.ckpt_copy() / "config.json", "{nope")), *ONNX, "--out", "b"], 2, "not valid JSON"),
    ("export-config-a-list", lambda c: ["export", "--checkpoint", str(_write(c.ckpt_copy() / "config.json", "[1, 2]")), *ONNX, "--out", "b"], 2, "not a JSON object"),
    ("export-nan-weights", lambda c: ["export", "--checkpoint", str(c.weights(_nan_weights)), *ONNX, "--out", "b"], 2, "NaN or infinite"),
    ("export-header-a-list", lambda c: ["export", "--checkpoint", str(c.weights(_header([1, 2]))), *ONNX, "--out", "b"], 2, "header is not a JSON object"),
    ("export-header-no-offsets", lambda c: ["export", "--checkpoint", str(c.weights(_header({"w": {"dtype": "F32", "shape": [1]}}))), *ONNX, "--out", "b"], 2, "data_offsets"),
    ("export-truncated-weights", lambda c: ["export", "--checkpoint", str(c.weights(_truncate)), *ONNX, "--out", "b"], 2, "truncated"),
    ("export-no-tokenizer", lambda c: ["export", "--checkpoint", str(_without(c.ckpt_copy(), "tokenizer.json")), *ONNX, "--out", "b"], 2, "tokenizer.json"),
    # --- chat -----------------------------------------------------------------------------------
    ("chat-prompt-not-utf8", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "what \udcff is this"], 2, "not valid UTF-8"),
    ("chat-prompt-empty", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", ""], 2, "--prompt"),
    ("chat-prompt-blank", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", " \n\t"], 2, "--prompt"),
    ("chat-seed-negative", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--seed", "-1"], 2, "--seed"),
    ("chat-temperature-negative", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--temperature", "-1"], 2, "--temperature"),
    ("chat-zero-new-tokens", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("chat-both-sources", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--prompt", "hi"], 2, "exactly one"),
    ("chat-image-missing", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--image", "nope.png"], 2, "not found"),
    ("chat-image-symlink-loop", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--image", str(c.loop())], 2, "symbolic link loop"),
    ("chat-video-symlink-loop", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--video", str(c.loop())], 2, "symbolic link loop"),
    ("chat-image-empty", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--image", str(c.file("e.png"))], 2, "empty"),
    ("chat-image-text", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--image", str(c.file("t.png", "hello"))], 2, "not a readable image"),
    ("chat-image-too-large", lambda c: ["chat", "--checkpoint", str(c.ckpt), "--prompt", "hi", "--image", IMG, "--max-pixels", "100"], 2, "raise --max-pixels"),
    ("chat-nan-weights", lambda c: ["chat", "--checkpoint", str(c.weights(_nan_weights)), "--prompt", "hi"], 2, "NaN or infinite"),
    ("chat-header-a-list", lambda c: ["chat", "--checkpoint", str(c.weights(_header([1]))), "--prompt", "hi"], 2, "header is not a JSON object"),
    ("chat-config-null", lambda c: ["chat", "--checkpoint", str(c.config(_set("vision_config.hidden_size", None))), "--prompt", "hi"], 2, "vision_config.hidden_size"),
    ("chat-ckpt-missing", lambda c: ["chat", "--checkpoint", "nowhere", "--prompt", "hi"], 2, "does not exist"),
    ("chat-bundle-missing", lambda c: ["chat", "--bundle", "nowhere", "--prompt", "hi"], 2, "does not exist"),
    ("chat-bundle-symlink-loop", lambda c: ["chat", "--bundle", str(c.loop()), "--prompt", "hi"], 2, "symbolic link loop"),
    ("chat-manifest-graphs-empty", lambda c: ["chat", "--bundle", str(c.manifest(_set("graphs", {}))), "--prompt", "hi"], 2, "graphs.vision_encoder"),
    ("chat-manifest-model-empty", lambda c: ["chat", "--bundle", str(c.manifest(_set("model", {}))), "--prompt", "hi"], 2, "model.hidden_size"),
    ("chat-manifest-chunk-zero", lambda c: ["chat", "--bundle", str(c.manifest(_set("chunk_size", 0))), "--prompt", "hi"], 2, "chunk_size"),
    ("chat-manifest-state-no-shape", lambda c: ["chat", "--bundle", str(c.manifest(_set("state.0.shape", DELETE))), "--prompt", "hi"], 2, "state[0].shape"),
    ("chat-manifest-decoder-files", lambda c: ["chat", "--bundle", str(c.manifest(_set("graphs.text_decoder.files", {}))), "--prompt", "hi"], 2, "graphs.text_decoder.files.prefill"),
    ("chat-manifest-unlisted-graph", lambda c: ["chat", "--bundle", str(c.manifest(_set("graphs.token_embedding.file", "gone.onnx"))), "--prompt", "hi"], 2, "which files does not list"),
    ("chat-manifest-stop-ids-empty", lambda c: ["chat", "--bundle", str(c.manifest(_set("prompt.stop_ids", []))), "--prompt", "hi"], 2, "prompt.stop_ids"),
    ("chat-manifest-edited-unsigned", lambda c: ["chat", "--bundle", str(c.manifest(_set("max_context", 128), sign=False)), "--prompt", "hi"], 2, "manifest_sha256 mismatch"),
    ("chat-manifest-not-json", lambda c: ["chat", "--bundle", str(_write(c.bundle_copy() / MANIFEST, "{")), "--prompt", "hi"], 2, "not valid JSON"),
    ("chat-bundle-file-truncated", lambda c: ["chat", "--bundle", str(_truncate_in(c.bundle_copy(), "weights.bin")), "--prompt", "hi"], 2, "truncated"),
    ("chat-context-above-bundle", lambda c: ["chat", "--bundle", str(c.bundle), "--prompt", "hi", "--max-context", "100000"], 2, "--max-context"),
    # --- parity ---------------------------------------------------------------------------------
    ("parity-bundle-missing", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", "nowhere"], 2, "does not exist"),
    ("parity-ckpt-missing", lambda c: ["parity", "--checkpoint", "nowhere", "--bundle", str(c.bundle)], 2, "does not exist"),
    ("parity-unknown-quant", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--quant", "int3"], 2, "int3"),
    ("parity-cases-not-json", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--cases", str(c.file("c.json", "{"))], 2, "not valid JSON"),
    ("parity-report-under-file", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--report", f"{c.file('f', 'x')}/r.md"], 2, "is a file"),
    ("parity-report-foreign-file", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--report", str(c.file("notes.md", "# my notes"))], 2, "not a parity report of ours"),
    ("parity-steps-zero", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle), "--steps", "0"], 2, "--steps"),
    ("parity-damaged-manifest", lambda c: ["parity", "--checkpoint", str(c.ckpt), "--bundle", str(c.manifest(_set("model", {})))], 2, "model.hidden_size"),
    # --- bench ----------------------------------------------------------------------------------
    ("bench-bundle-missing", lambda c: ["bench", "--bundle", "nowhere"], 2, "nowhere"),
    ("bench-device-report-not-json", lambda c: ["bench", "--device-report", str(c.file("r.json", "{"))], 2, "not valid JSON"),
    ("bench-device-report-and-model", lambda c: ["bench", "--device-report", str(c.file("r.json", "{}")), "--bundle", str(c.bundle)], 2, "not both"),
    ("bench-repeats-zero", lambda c: ["bench", "--repeats", "0"], 2, "--repeats"),
    ("bench-device-report-missing", lambda c: ["bench", "--device-report", "nope.json"], 2, "does not exist"),
    ("bench-report-foreign-file", lambda c: ["bench", "--report", str(c.file("notes.md", "# my notes"))], 2, "not a benchmark report of ours"),
    ("bench-plot-foreign-file", lambda c: ["bench", "--plot", str(c.file("photo.png", "\x89PNG not ours"))], 2, "not a benchmark chart of ours"),
    ("bench-report-under-file", lambda c: ["bench", "--report", f"{c.file('f', 'x')}/r.md"], 2, "is a file"),
    ("bench-empty-prompt", lambda c: ["bench", "--prompt", "  "], 2, "prompt"),
    # --- eval -----------------------------------------------------------------------------------
    ("eval-limit-zero", lambda c: ["eval", "--checkpoint", str(c.ckpt), "--limit", "0"], 2, "--limit"),
    ("eval-seed-negative", lambda c: ["eval", "--checkpoint", str(c.ckpt), "--seed", "-1"], 2, "--seed"),
    ("eval-both-sources", lambda c: ["eval", "--checkpoint", str(c.ckpt), "--bundle", str(c.bundle)], 2, "exactly one"),
    ("eval-config-wrong-type", lambda c: ["eval", "--checkpoint", str(c.config(_set("image_token_id", "1980"))), "--limit", "1"], 2, "image_token_id"),
    ("eval-damaged-manifest", lambda c: ["eval", "--bundle", str(c.manifest(_set("graphs", {}))), "--limit", "1"], 2, "graphs.vision_encoder"),
    ("eval-bad-mode", lambda c: ["eval", "--checkpoint", str(c.ckpt), "--downsample-mode", "8x"], 2, "--downsample-mode"),
    # --- inspect --------------------------------------------------------------------------------
    ("inspect-missing", lambda c: ["inspect", "--bundle", "nowhere"], 2, "does not exist"),
    ("inspect-symlink-loop", lambda c: ["inspect", "--bundle", str(c.loop())], 2, "symbolic link loop"),
    ("inspect-not-a-bundle", lambda c: ["inspect", "--bundle", str(c.foreign_dir())], 2, "manifest.json is missing"),
    ("inspect-manifest-graphs-empty", lambda c: ["inspect", "--bundle", str(c.manifest(_set("graphs", {})))], 2, "graphs.vision_encoder"),
    ("inspect-manifest-model-empty", lambda c: ["inspect", "--bundle", str(c.manifest(_set("model", {})))], 2, "model.hidden_size"),
    ("inspect-manifest-chunk-zero", lambda c: ["inspect", "--bundle", str(c.manifest(_set("chunk_size", 0)))], 2, "chunk_size"),
    ("inspect-manifest-state-no-shape", lambda c: ["inspect", "--bundle", str(c.manifest(_set("state.1.shape", DELETE)))], 2, "state[1].shape"),
    ("inspect-manifest-edited-unsigned", lambda c: ["inspect", "--bundle", str(c.manifest(_set("chunk_size", 16), sign=False))], 2, "manifest_sha256 mismatch"),
    ("inspect-manifest-a-list", lambda c: ["inspect", "--bundle", str(_write(c.bundle_copy() / MANIFEST, "[]"))], 2, "not a JSON object"),
    ("inspect-manifest-not-json", lambda c: ["inspect", "--bundle", str(_write(c.bundle_copy() / MANIFEST, "{"))], 2, "not valid JSON"),
    ("inspect-schema-99", lambda c: ["inspect", "--bundle", str(c.manifest(_set("schema_version", 99)))], 2, "schema_version 99"),
    ("inspect-path-escape", lambda c: ["inspect", "--bundle", str(c.manifest(lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}})))], 2, "invalid path"),
    ("inspect-file-entry-bad-sha", lambda c: ["inspect", "--bundle", str(c.manifest(lambda m: m["files"]["weights.bin"].update(sha256="xyz")))], 2, "files.weights.bin.sha256"),
    ("inspect-damaged-file", lambda c: ["inspect", "--bundle", str(_flip_in(c.bundle_copy(), "decoder_decode.onnx"))], 1, "sha256 mismatch"),
]  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _without(root: Path, name: str) -> Path:
    (root / name).unlink()
    return root


def _with_extra(root: Path) -> Path:
    (root / "notes.txt").write_text("my notes")
    return root


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _fake_bundle(c: Ctx) -> Path:
    root = c.foreign_dir("fake")
    (root / MANIFEST).write_text("{}")
    return root


def _truncate_in(root: Path, name: str) -> Path:
    _truncate(root / name)
    return root


def _flip_in(root: Path, name: str) -> Path:
    data = bytearray((root / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / name).write_bytes(bytes(data))
    return root


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under the roots (hidden ones included), with size and mtime for files."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                out[str(path)] = (st.st_mode, st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def assert_one_error_line(err: str, phrase: str) -> str:
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err  # the error is last; only progress lines may come before it
    assert all(line.startswith("[") for line in lines[:-1]), err
    assert "Traceback" not in err, err
    assert phrase in errors[0], err
    return errors[0]


@pytest.mark.parametrize("name, build, code, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, code, phrase, tiny_checkpoint, bundle, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = build(Ctx(work, tiny_checkpoint, bundle))
    assert argv[0] == COMMANDS[name.split("-", 1)[0]]
    before = snapshot(work, tiny_checkpoint, bundle)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, err
    line = assert_one_error_line(err, phrase)
    if "manifest.json" in line:  # a manifest error names the manifest once, not its path twice
        assert line.count("manifest.json") == 1, line
    assert snapshot(work, tiny_checkpoint, bundle) == before, "something was written or deleted"


COMMANDS = {"init": "init-checkpoint", "export": "export", "chat": "chat", "parity": "parity",
            "bench": "bench", "eval": "eval", "inspect": "inspect"}  # fmt: skip


def test_the_table_covers_every_command():
    assert {name.split("-", 1)[0] for name, *_ in CASES} == set(COMMANDS)
    assert len(CASES) >= 60 and len({name for name, *_ in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------
# Outputs: replacing ours is said, stale temp siblings are cleaned, signals leave nothing


def test_export_replaces_its_own_bundle_and_says_so(tiny_checkpoint, bundle, tmp_path, capsys):
    out = Path(shutil.copytree(bundle, tmp_path / "b"))
    old = read_manifest(out).max_context
    rc = main(["export", "--checkpoint", str(tiny_checkpoint), *ONNX, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and "replaced the previous bundle" in err, err
    assert read_manifest(out).max_context == 64 != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_init_checkpoint_replaces_its_own_and_cleans_stale_temps(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init-checkpoint", "minicpm-v-4.6", "--out", str(out)]) == 0
    dead = _dead_pid()
    stale = tmp_path / f".ck.tmp-{dead}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".ck.tmp-{os.getpid()}-live"  # a run still going (this one): left alone
    alive.mkdir()
    unrelated = tmp_path / ".ck.tmp-notes"  # not our naming: left alone
    unrelated.mkdir()
    set_aside = tmp_path / f".ck.old-{dead}"  # a user's file an older version renamed: kept
    set_aside.write_text("my file")
    capsys.readouterr()
    assert main(["init-checkpoint", "minicpm-v-4.6", "--out", str(out), "--seed", "2"]) == 0
    assert "replaced the previous checkpoint" in capsys.readouterr().err
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert set_aside.read_text() == "my file"
    assert read_config(out)[0].text.hidden_size > 0


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _start_export(checkpoint, out) -> subprocess.Popen:
    """The CLI exporting `checkpoint` to `out` in a child process, to be signalled."""
    return subprocess.Popen(
        [*EXE, "export", "--checkpoint", str(checkpoint), *ONNX, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_during_export_leaves_nothing(tiny_checkpoint, tmp_path):
    proc = _start_export(tiny_checkpoint, tmp_path / "b")
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".b.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert_one_error_line(err, "terminated")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("after_s", [0.4, 1.2, 2.5])
def test_ctrl_c_at_any_point_of_an_export_is_one_line(tiny_checkpoint, tmp_path, after_s):
    """Early (importing onnxruntime and torch), or later (exporting): exit 130, one line, nothing left."""
    proc = _start_export(tiny_checkpoint, tmp_path / "b")
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # a fast machine finished first: then it must have written the bundle
        assert read_manifest(tmp_path / "b").target == "harmonyos"
        return
    # 130, or killed by SIGINT (-2; shells report that as 130 too): when the signal lands inside a
    # library's own PyRun_String (torch, onnxruntime imports) Python re-raises SIGINT at exit after
    # our handler has printed its line and returned 130
    assert proc.returncode in (130, -signal.SIGINT), err
    assert_one_error_line(err, "interrupted")
    assert list(tmp_path.iterdir()) == []


def test_non_utf8_prompt_bytes_from_a_shell(tiny_checkpoint):
    proc = subprocess.run(
        [*EXE, "chat", "--checkpoint", str(tiny_checkpoint), "--prompt", b"what \xff is this"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "not valid UTF-8 text (byte 0xff")


def test_internal_error_is_exit_3_with_the_traceback_in_a_file(monkeypatch, tmp_path, capsys):
    from edge_runtime.commands import inspect as inspect_cmd

    def bug(path, checksums=True):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inspect_cmd, "inspect_bundle", bug)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("MINICPMV_EDGE_DEBUG", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert main(["inspect", "--bundle", str(tmp_path)]) == 3
    line = assert_one_error_line(capsys.readouterr().err, "internal error (a bug in minicpmv-edge)")
    path = Path(line.rsplit("traceback in ", 1)[1])
    assert path.parent == tmp_path and "ZeroDivisionError: a bug" in path.read_text()
    monkeypatch.setenv("MINICPMV_EDGE_DEBUG", "1")
    assert main(["inspect", "--bundle", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: internal error")


# ---------------------------------------------------------------------------------------------------
# Property-based: whatever the manifest or config.json holds, the readers answer or raise one clean error


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
JSON = st.deferred(
    lambda: SCALARS | st.lists(JSON, max_size=3) | st.dictionaries(st.text(max_size=6), JSON, max_size=3)
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            out += _paths(value, (*prefix, i))
    return out


def _mutate(raw: dict, data: st.DataObject) -> dict:
    raw = json.loads(json.dumps(raw))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(raw)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    return raw


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_reader(bundle, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz-manifest")
    raw = _mutate(json.loads((bundle / MANIFEST).read_text()), data)
    if data.draw(st.booleans()):
        write_manifest(root, raw) if _json_safe(raw) else (root / MANIFEST).write_text(json.dumps(raw))
    else:
        (root / MANIFEST).write_text(json.dumps(raw))
    try:
        read_manifest(root)
    except BundleError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(blob=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_manifest_bytes(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("fuzz-bytes")
    (root / MANIFEST).write_bytes(blob)
    with pytest.raises(BundleError):
        read_manifest(root)


@FUZZ
@given(data=st.data())
def test_fuzz_config_reader(tiny_checkpoint, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz-config")
    raw = _mutate(json.loads((tiny_checkpoint / "config.json").read_text()), data)
    (root / "config.json").write_text(json.dumps(raw))
    try:
        cfg, _ = read_config(root)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    else:  # accepted: the values the model is built from have the declared types
        assert all(type(v) is int and v > 0 for v in (cfg.text.hidden_size, cfg.vision.num_hidden_layers))


def _json_safe(raw: dict) -> bool:
    try:
        json.dumps(raw, allow_nan=False)
    except ValueError:
        return False
    return True
