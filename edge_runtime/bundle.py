"""The bundle contract: manifest schema, verification on open, and the format -> backend registry.

A bundle is a directory with `manifest.json` and the files it lists. Apps read only the manifest and
the files it names, so everything a runtime needs is in the manifest (docs/bundle.md documents it
field by field). Opening a bundle checks the schema version, then that every listed file exists with
the recorded size and sha256, and only then hands the directory to the backend registered for the
bundle's format. Any problem is one `BundleError` line naming the bad file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import Backend
from .errors import BundleError, InputError
from .paths import missing_reason
from .safetensors_header import read_header
from .schema import MANIFEST_CHECKSUM_FIELD, check_manifest_checksum, manifest_checksum, validate_manifest

SCHEMA_VERSION = 1  # bump on any change an older reader would misread; readers accept exactly their own
MANIFEST = "manifest.json"
# Host files carried as-is from the checkpoint, so HostAssets.from_dir works on a bundle directory.
HOST_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)
REQUIRED_HOST_FILES = ("tokenizer.json",)
TARGET_FORMATS = {"ios": "coreml", "android": "executorch", "harmonyos": "onnx", "desktop": "torch"}
TARGETS = tuple(TARGET_FORMATS)
HASH_BLOCK = 1 << 20  # streamed in 1 MiB blocks: a multi-GB graph is never held in memory

_FIELDS = (
    "schema_version", "family", "target", "format", "quantization", "model", "graphs", "state",
    "preprocessing", "prompt", "max_context", "chunk_size", "files", "toolkit_version", "created_by",
)  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest.json (the dict is kept whole in `raw` for exporters' extra keys)."""

    schema_version: int
    family: str
    target: str
    format: str
    quantization: str
    model: dict[str, Any]
    graphs: dict[str, Any]
    state: list[dict[str, Any]]
    preprocessing: dict[str, Any]
    prompt: dict[str, Any]
    max_context: int
    chunk_size: int
    files: dict[str, dict[str, Any]]
    toolkit_version: str
    created_by: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST) -> Manifest:
        """Validate against the declared schema (edge_runtime/schema.py), nested fields included; the
        schema version is checked first so a newer manifest fails on its version, not on a field it
        renamed."""
        validate_manifest(raw, where, BundleError)
        return cls(**{name: raw[name] for name in _FIELDS}, raw=raw)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw) if self.raw else {name: getattr(self, name) for name in _FIELDS}


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> None:
    """Write (or rewrite, after changing a file on purpose) a bundle's manifest: sorted keys, with its
    own checksum (`manifest_sha256`)."""
    signed = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_FIELD}
    signed[MANIFEST_CHECKSUM_FIELD] = manifest_checksum(signed)
    text = json.dumps(signed, indent=2, sort_keys=True, allow_nan=False) + "\n"
    (Path(root) / MANIFEST).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Hashing and verification


def sha256_file(path: Path) -> str:
    """Streamed sha256 of one file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def iter_bundle_files(root: Path) -> Iterator[str]:
    """Every regular file under root except the manifest, as sorted posix relative paths."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            yield rel


@dataclass(frozen=True)
class FileCheck:
    """The verification result of one listed file: status is ok | missing | size | sha256."""

    path: str
    status: str
    expected_bytes: int
    actual_bytes: int | None = None
    expected_sha256: str = ""
    actual_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def message(self) -> str:
        if self.status == "missing":
            return f"{self.path}: listed in {MANIFEST} but missing"
        if self.status == "size":
            return (
                f"{self.path}: {self.actual_bytes} bytes, {MANIFEST} records {self.expected_bytes} "
                "(truncated or replaced)"
            )
        if self.status == "sha256":
            return (
                f"{self.path}: sha256 mismatch (expected {self.expected_sha256[:12]}..., got "
                f"{(self.actual_sha256 or '')[:12]}...); the file was changed or corrupted"
            )
        return f"{self.path}: ok"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status, "bytes": self.expected_bytes}


def check_file(root: Path, rel: str, entry: dict[str, Any]) -> FileCheck:
    """Existence and size first (cheap, catches truncation), then the streamed hash."""
    path = root / rel
    expected = int(entry["bytes"])
    if not path.is_file():
        return FileCheck(rel, "missing", expected, expected_sha256=entry["sha256"])
    size = path.stat().st_size
    if size != expected:
        return FileCheck(rel, "size", expected, size, entry["sha256"])
    actual = sha256_file(path)
    return FileCheck(
        rel, "ok" if actual == entry["sha256"] else "sha256", expected, size, entry["sha256"], actual
    )


def verify_files(root: Path, manifest: Manifest) -> list[FileCheck]:
    """Check every listed file (all of them, for reports such as `inspect`)."""
    return [check_file(root, rel, entry) for rel, entry in sorted(manifest.files.items())]


# ---------------------------------------------------------------------------------------------------
# Weights: sizes read from safetensors headers, never from the tensors themselves

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_ST_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy-style name: float32, float16, bfloat16, int8, ...
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def safetensors_tensors(path: Path) -> list[TensorInfo]:
    """The tensors a safetensors file holds, from its JSON header alone (a few KB read)."""
    _, header = read_header(path, BundleError)
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            dtype = _ST_DTYPE_NAMES.get(meta["dtype"], meta["dtype"].lower())
            nbytes = int(end) - int(begin)
        except (TypeError, KeyError, ValueError, AttributeError):
            raise BundleError(
                f"{path}: not a safetensors file (header entry {name!r:.60} lacks dtype, shape or data_offsets)"
            ) from None
        out.append(TensorInfo(name, dtype, shape, nbytes))
    return out


def decode_weight_numel(tensors: list[TensorInfo], family: Any) -> int:
    """Elements read from weights per decoded token: decoder layers + final norm + the head (not the
    embedding table: one row a token). With tied embeddings (no head stored) the head is the
    embedding table, counted once. `family`: the checkpoint's (families.Family), for its names."""
    model_class = family.model_class
    prefix = family.module_key_to_checkpoint(model_class.TEXT_MODULE + ".")
    head = family.module_key_to_checkpoint(model_class.HEAD_MODULE + ".weight")
    embed = prefix + "embed_tokens.weight"
    numel = sum(t.numel for t in tensors if (t.name.startswith(prefix) and t.name != embed) or t.name == head)
    if not any(t.name == head for t in tensors):
        numel += sum(t.numel for t in tensors if t.name == embed)
    return numel


# ---------------------------------------------------------------------------------------------------
# Reading and opening


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest has been read (and, by `load_bundle`, its files verified)."""

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise BundleError(f"bundle {self.path}: {rel} is not listed in {MANIFEST}")
        return self.path / rel

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the manifest plus every listed file."""
        return (self.path / MANIFEST).stat().st_size + sum(
            int(e["bytes"]) for e in self.manifest.files.values()
        )


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate `manifest.json` of a bundle directory, and its own checksum (files are not
    checked here)."""
    root = Path(path)
    if not root.is_dir():
        reason = missing_reason(root) if not root.exists() else "is not a directory"
        raise BundleError(f"bundle directory {root} {reason}")
    manifest_path = root / MANIFEST
    where = f"bundle {root}: {MANIFEST}"
    if not manifest_path.is_file():
        raise BundleError(f"bundle {root}: {MANIFEST} is missing (not a bundle, or an interrupted export)")
    try:
        raw = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{where}: not valid JSON ({reason})") from None
    manifest = Manifest.from_dict(raw, where=where)
    check_manifest_checksum(raw, where, BundleError)
    return manifest


def not_a_bundle(path: Path) -> str | None:
    """None when `path` is a complete bundle of ours (manifest valid against its schema and its own
    checksum, no file it does not list); else why not. Listed files are not hashed: a bundle with a
    damaged file is still ours to replace."""
    try:
        manifest = read_manifest(path)
    except BundleError as exc:
        return str(exc).removeprefix(f"bundle {path}: ")
    unlisted = [rel for rel in iter_bundle_files(path) if rel not in manifest.files]
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (f", ... (+{len(unlisted) - 3} more)" if len(unlisted) > 3 else "")
        return f"it holds files its manifest does not list: {shown}"
    return None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read the manifest and verify every listed file; fails on the first bad file, naming it."""
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        for rel, entry in sorted(manifest.files.items()):
            check = check_file(root, rel, entry)
            if not check.ok:
                raise BundleError(f"bundle {root}: {check.message()}")
    return Bundle(root, manifest)


# An opener turns a verified bundle into a running backend: opener(bundle, max_context, threads).
BackendOpener = Callable[[Bundle, int | None, int | None], Backend]
_OPENERS: dict[str, BackendOpener] = {}
# Backends that live in their own modules register lazily: format -> "module:function". A backend
# module adds one line here so opening a bundle never imports runtimes it does not need.
_LAZY_OPENERS: dict[str, str] = {
    "onnx": "edge_runtime.backends.onnxruntime:open_onnx_bundle",
    "executorch": "edge_runtime.backends.executorch:open_executorch_bundle",
    "coreml": "edge_runtime.backends.coreml:open_coreml_bundle",
}


def register_backend(format_name: str, opener: BackendOpener) -> None:
    """Make bundles of `format_name` openable; a later registration replaces an earlier one."""
    _OPENERS[format_name] = opener


def available_formats() -> list[str]:
    lazy = {
        f for f, target in _LAZY_OPENERS.items() if importlib.util.find_spec(target.split(":")[0]) is not None
    }
    return sorted(set(_OPENERS) | lazy)


def backend_opener(format_name: str) -> BackendOpener:
    if format_name not in _OPENERS and format_name in available_formats():
        module_name, func = _LAZY_OPENERS[format_name].split(":")
        try:
            _OPENERS[format_name] = getattr(importlib.import_module(module_name), func)
        except ImportError as exc:  # e.g. the format's runtime package is not installed
            raise BundleError(
                f"bundle format {format_name!r}: its backend cannot be loaded ({exc})"
            ) from None
    if format_name not in _OPENERS:
        raise BundleError(
            f"bundle format {format_name!r} has no backend in this version "
            f"(available: {', '.join(available_formats())})"
        )
    return _OPENERS[format_name]


def open_bundle(
    path: str | Path, max_context: int | None = None, threads: int | None = None, verify: bool = True
) -> tuple[Bundle, Backend]:
    """Verify a bundle, then open it with its format's backend."""
    bundle = load_bundle(path, verify=verify)
    opener = backend_opener(bundle.manifest.format)
    if max_context is not None and max_context > bundle.manifest.max_context:
        raise InputError(
            f"--max-context {max_context} exceeds the bundle's max context {bundle.manifest.max_context} "
            "(fixed at export time)"
        )
    return bundle, opener(bundle, max_context, threads)


def num_patches_per_side(manifest: Manifest) -> int:
    """The vision position table side, recorded in the manifest's model dims."""
    value = manifest.model.get("num_patches_per_side")
    if type(value) is not int or value < 1:
        raise BundleError(f"{MANIFEST}: model.num_patches_per_side missing or invalid ({value!r})")
    return value


def open_bundle_session(
    bundle: str | Path, max_context: int | None = None, threads: int | None = None, **slice_overrides: Any
):
    """A Session on a bundle: its backend plus host assets read from the bundle's copies."""
    from .families import family_by_name
    from .session import HostAssets, Session

    opened, backend = open_bundle(bundle, max_context=max_context, threads=threads)
    default_mode = opened.manifest.model.get("default_downsample_mode")
    try:
        family = family_by_name(opened.manifest.family)
    except KeyError:  # a bundle of a family this runtime does not know reads as the default one
        family = None
    side = num_patches_per_side(opened.manifest)
    canvas = opened.manifest.model.get("canvas_tokens")  # canvas families: the marker ids
    assets = HostAssets.from_dir(opened.path, side, default_mode, family, canvas, **slice_overrides)
    return Session(backend, assets)


# ---------------------------------------------------------------------------------------------------
# Format `torch` (target desktop): the checkpoint's config.json + safetensors run by TorchBackend.


def _open_torch_bundle(bundle: Bundle, max_context: int | None, threads: int | None) -> Backend:
    """A torch bundle is a checkpoint directory plus a manifest, so the checkpoint loader reads it."""
    from .backends.torch_ref import TorchBackend
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(bundle.path)
    backend = TorchBackend(
        ckpt,
        max_context=max_context or bundle.manifest.max_context,
        chunk_size=bundle.manifest.chunk_size,
        threads=threads,
    )
    backend.name = f"torch-bundle:{bundle.manifest.quantization}"
    return backend


register_backend("torch", _open_torch_bundle)
