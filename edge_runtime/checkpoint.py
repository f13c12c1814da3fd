"""Read and write Hugging Face-format MiniCPM-V checkpoints.

One loader for every source: a checkpoint transformers wrote, one this project wrote, or a real
downloaded one. Tensors are matched by name (current and legacy prefixes), checked for missing,
unexpected and mis-shaped entries, and reported in one readable error. Writing is streamed
tensor by tensor through our own safetensors writer, so the 1.3 B `full` preset is never held
twice in memory, and the output directory appears atomically.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .errors import CheckpointError
from .families import Family, family_for_config, family_of
from .jsonfile import read_json_file
from .outputs import atomic_output_dir
from .paths import missing_reason
from .safetensors_header import read_header

WEIGHTS_FILE = "model.safetensors"
FINITE_CHECK_CHUNK = 64 << 20  # bytes read at a time when a mapped weight is checked for NaN / inf
INDEX_FILE = "model.safetensors.index.json"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


@dataclass(frozen=True)
class FileSlice:
    """Where a memory-mapped weight's bytes lie in its safetensors file (little-endian fp32)."""

    file: Path
    offset: int
    length: int


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, parsed config, raw config.json and the reference model."""

    path: Path
    config: Any  # the family's config class
    raw_config: dict[str, Any]
    model: torch.nn.Module  # the family's model class
    # data_ptr -> file range of every weight that is a view of the memory-mapped file (mapped=True)
    mapped: dict[int, FileSlice] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        return family_of(self.config)


def read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_file(path, what, CheckpointError)


def read_config(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Parse `config.json` of a checkpoint directory into its family's config class."""
    path = Path(path)
    if not path.is_dir():
        reason = missing_reason(path) if not path.exists() else "is not a directory"
        raise CheckpointError(f"checkpoint directory {path} {reason}")
    raw = read_json(path / "config.json", "config file")
    where = str(path / "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    try:
        family = family_for_config(raw)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    family.validate_config(raw, where, CheckpointError)
    try:
        return family.config_class.from_hf(raw), raw
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards a sharded index names."""
    if (path / INDEX_FILE).exists():
        index = read_json(path / INDEX_FILE, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and v not in (".", "..") for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{path / INDEX_FILE}: weight_map must map tensor names to shard file names"
            )
        names = sorted(set(weight_map.values()))
        if not names:
            raise CheckpointError(f"{path / INDEX_FILE}: weight_map is empty")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [path / n for n in names]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) from every weight file, memory-mapped."""
    for name, tensor, _ in _iter_tensors(path, mapped=False):
        yield name, tensor


def _iter_tensors(path: Path, mapped: bool) -> Iterator[tuple[str, torch.Tensor, FileSlice | None]]:
    """(name, tensor, its file range or None). `mapped`: fp32 tensors are zero-copy views of the
    file (copy-on-write pages, read only where something touches them); others are read."""
    for file in weight_files(path):
        _check_safetensors_size(file)
        header_len, header = read_header(file, CheckpointError)
        views = {k: e for k, e in header.items() if mapped and k != "__metadata__" and _mappable(e)}
        for key, entry in views.items():
            start, end = entry["data_offsets"]
            offset = 8 + header_len + start
            array = np.memmap(file, dtype=np.float32, mode="c", offset=offset, shape=tuple(entry["shape"]))
            yield key, torch.from_numpy(array), FileSlice(file, offset, end - start)
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name not in views:
                        yield name, handle.get_tensor(name), None
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None


def _mappable(entry: Any) -> bool:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    return (
        entry.get("dtype") == "F32"
        and isinstance(shape, list)
        and len(shape) >= 1
        and all(type(d) is int and d > 0 for d in shape)
    )


def _all_finite(tensor: torch.Tensor, where: FileSlice | None) -> bool:
    if where is not None:
        return _finite_on_disk(where)
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _finite_on_disk(where: FileSlice) -> bool:
    """NaN / inf check of a mapped weight that reads the file in chunks instead of touching the
    mapping, so the check leaves no weight pages resident in this process."""
    with where.file.open("rb") as fh:
        fh.seek(where.offset)
        left = where.length
        while left > 0:
            chunk = fh.read(min(left, FINITE_CHECK_CHUNK))
            if not chunk or not np.isfinite(np.frombuffer(chunk, dtype=np.float32)).all():
                return False
            left -= len(chunk)
    return True


def _check_safetensors_size(file: Path) -> None:
    """Catch a truncated file up front: the header says how many bytes the data must have."""
    size = file.stat().st_size
    header_len, header = read_header(file, CheckpointError)
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(
                f"{file}: not a safetensors file (header entry {key!r:.60} has no valid data_offsets)"
            )
        ends.append(offsets[1])
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        raise CheckpointError(f"{file}: truncated ({size} bytes, header promises {need})")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, mapped: bool = False) -> Checkpoint:
    """Load a checkpoint directory into the reference model (eval mode, `dtype` weights).

    `mapped` (fp32 only): the fp32 weights stay views of the memory-mapped files, so loading a
    16 GB checkpoint costs no memory until a weight is read; the streaming exporter reads them one
    at a time (export/onnx/mapped.py). `Checkpoint.mapped` says where each one lies."""
    if mapped and dtype != torch.float32:
        raise ValueError("mapped loading gives fp32 weights only")
    path = Path(path)
    cfg, raw = read_config(path)
    family = family_of(cfg)
    checkpoint_key_to_module = family.checkpoint_key_to_module
    with torch.device("meta"):
        model = family.new_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    misshaped: list[str] = []
    nonfinite: list[str] = []
    slices: dict[str, FileSlice] = {}
    for name, tensor, where in _iter_tensors(path, mapped):
        key = checkpoint_key_to_module(name)
        if key is None or (tied and key == "lm_head.weight"):
            continue
        if key not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != expected[key]:
            misshaped.append(f"{name} {list(tensor.shape)} != {list(expected[key])}")
        elif not _all_finite(tensor, where):
            nonfinite.append(name)
        else:
            loaded[key] = tensor.to(dtype)
            if where is not None:
                slices[key] = where
    if nonfinite:  # a weight file damaged, or a training run that diverged
        raise CheckpointError(
            f"{path}: NaN or infinite weights in {len(nonfinite)} tensor(s): {_short_list(nonfinite)}"
        )
    seen = {checkpoint_key_to_module(m.split(" ", 1)[0]) for m in misshaped}
    missing = [family.module_key_to_checkpoint(k) for k in expected if k not in loaded and k not in seen]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {_short_list(misshaped)}")
    if problems:
        raise CheckpointError(f"{path}: tensors do not match the config: " + "; ".join(problems))

    model.load_state_dict(loaded, strict=False, assign=True)
    family.materialize_buffers(model)
    model.tie_weights()
    by_pointer = {loaded[k].data_ptr(): where for k, where in slices.items()}
    return Checkpoint(path=path, config=cfg, raw_config=raw, model=model.eval(), mapped=by_pointer)


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], produce
) -> None:
    """Stream tensors into a safetensors file: header first, then each tensor as `produce(name)` makes it.

    Only one tensor is alive at a time, which is what lets the full preset be written on a
    small machine.
    """
    specs = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype in specs:
            tensor = produce(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tuple(tensor.shape)}, declared {shape}")
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def checkpoint_tensor_specs(cfg: Any, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(checkpoint name, shape, dtype) of every tensor a checkpoint of this config stores."""
    family = family_of(cfg)
    with torch.device("meta"):
        model = family.new_model(cfg)
    specs = []
    for key, value in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        specs.append((family.module_key_to_checkpoint(key), tuple(value.shape), dtype))
    return specs


# Files a checkpoint of ours holds; a directory with anything else is not replaced.
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        WEIGHTS_FILE,
        INDEX_FILE,
        "generation_config.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
    }
)


def not_a_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete checkpoint (config.json valid against its schema, weight files
    with readable headers, nothing else but the side files a checkpoint has); else why not."""
    try:
        read_config(path)
        files = weight_files(path)
        for file in files:
            _check_safetensors_size(file)
    except CheckpointError as exc:
        return str(exc)
    shards = {f.name for f in files}
    other = sorted(p.name for p in path.iterdir() if p.name not in CHECKPOINT_FILES and p.name not in shards)
    if other:
        return f"it holds files a checkpoint does not: {_short_list(other, 3)}"
    return None


@contextmanager
def atomic_directory(out: Path, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it replaces `out` in one rename, on error it vanishes.
    An existing `out` is replaced only when it is a complete checkpoint (edge_runtime/outputs.py)."""
    with atomic_output_dir(Path(out), "checkpoint", not_a_checkpoint, say=say) as tmp:
        yield tmp


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` as config.json + model.safetensors (+ whatever `extra_files` adds, e.g. tokenizer)."""
    cfg = model.cfg
    state = model.state_dict()
    to_checkpoint = family_of(cfg).module_key_to_checkpoint
    lookup = {to_checkpoint(k): v for k, v in state.items()}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_safetensors(
            tmp / WEIGHTS_FILE, checkpoint_tensor_specs(cfg, dtype), lambda n: lookup[n].detach()
        )
        write_config_files(tmp, cfg)
        if extra_files is not None:
            extra_files(tmp)
    return out_dir


def write_config_files(out: Path, cfg: Any) -> None:
    config = cfg.to_hf()
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def tensor_generator(name: str, seed: int) -> torch.Generator:
    """The random stream of one tensor of a `seed`: independent of the order tensors are made in."""
    return torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(name)) % (2**63))


def random_init(name: str, shape: tuple[int, ...], seed: int, family: Family | None = None) -> torch.Tensor:
    """Deterministic per-tensor random init, independent of the order tensors are made in.

    Norm weights get small noise around their neutral value so the 1 + w convention matters.
    DeltaNet decay rates A = exp(A_log) are log-uniform over [1e-3, 16]: about half the heads decay
    slower than 0.1 per token, as trained DeltaNet heads keep for long memory, the regime where an
    unstable chunked form loses its precision (issue 26); upstream's uniform(0.01, 16) init leaves
    almost every head fast. `family` (default: the default family) supplies the neutral norm value
    and, where it has one, its own rule (`Family.random_init(name, shape, noise)`, None: these).
    """
    family = family or family_for_config({})
    gen = tensor_generator(name, seed)
    noise = torch.randn(shape, generator=gen)
    own = family.random_init(name, tuple(shape), noise) if family.random_init is not None else None
    if own is not None:
        return own
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(math.log(1e-3), math.log(16.0), generator=gen)
    if name.endswith("dt_bias"):
        return 1.0 + 0.1 * noise
    if "norm" in name:
        return family.neutral_norm_value(name) + 0.05 * noise
    if name.endswith(".bias"):
        return 0.01 * noise
    return 0.02 * noise


def _stable_hash(text: str) -> int:
    value = 1469598103934665603
    for byte in text.encode("utf-8"):
        value = ((value ^ byte) * 1099511628211) % (2**64)
    return value


def write_random_checkpoint(cfg: Any, out: Path, seed: int, dtype: torch.dtype) -> None:
    """Random weights for `cfg`, streamed straight to disk (no model is ever materialised)."""
    specs = checkpoint_tensor_specs(cfg, dtype)
    shapes = {name: shape for name, shape, _ in specs}
    family = family_of(cfg)
    write_safetensors(
        out / WEIGHTS_FILE,
        specs,
        lambda n: random_init(n, shapes[n], seed, family),
    )
    write_config_files(out, cfg)
