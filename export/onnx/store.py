"""One weight file for every graph of a bundle: each distinct tensor is written once.

The dynamo exporter names folded constants per graph (`val_117` in the prefill decoder may be
`val_57` in the decode decoder), so sharing is by content, not by name: every initializer of at
least MIN_EXTERNAL_BYTES is hashed, and graphs whose tensors have the same bytes point at the same
(offset, length) of `weights.bin`. That also lets a tied vocabulary head and the token embedding
share one quantized table when both use the same block layout. Large tensors are aligned to 64 KiB
so onnxruntime can memory-map them on every platform.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"
MIN_EXTERNAL_BYTES = 1024
ALIGN_LARGE = 1 << 16  # tensors >= 1 MiB start on a 64 KiB boundary (mmap granularity on Windows)
ALIGN_SMALL = 64


@dataclass
class WeightStore:
    """Appends tensors to a weight file, deduplicated by sha256 of their bytes."""

    path: Path
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # sha256 -> (offset, length)
    size: int = 0
    shared_bytes: int = 0  # bytes that would have been written again without sharing

    def __post_init__(self) -> None:
        # a store unpickled in another process (see __getstate__) continues its file where it ended
        self._fh = self.path.open("r+b" if self.size else "wb")
        self._fh.seek(self.size)

    def put(self, data: bytes) -> tuple[int, int]:
        key = hashlib.sha256(data).hexdigest()
        if key in self.offsets:
            self.shared_bytes += len(data)
            return self.offsets[key]
        align = ALIGN_LARGE if len(data) >= (1 << 20) else ALIGN_SMALL
        offset = -(-self.size // align) * align
        self._fh.write(b"\0" * (offset - self.size))
        self._fh.write(data)
        self.size = offset + len(data)
        self.offsets[key] = (offset, len(data))
        return offset, len(data)

    def close(self) -> None:
        self._fh.close()

    def __getstate__(self) -> dict:
        """Pickled without the file handle: a store is handed to the process lowering the next
        graph (close it first) and back; unpickling reopens the file and appends after `size`."""
        return {k: v for k, v in self.__dict__.items() if k != "_fh"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()


def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """Raw little-endian bytes of an initializer, whichever field the exporter filled, or read from
    the file an external reference names (a weight of a memory-mapped checkpoint, mapped.py)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return _read_external(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _read_external(tensor: onnx.TensorProto) -> bytes:
    ext = {e.key: e.value for e in tensor.external_data}
    location = Path(ext["location"])
    if not location.is_absolute():
        raise ValueError(f"initializer {tensor.name}: external data {location} is not an absolute path")
    with location.open("rb") as fh:
        fh.seek(int(ext.get("offset", 0)))
        data = fh.read(int(ext["length"]))
    if len(data) != int(ext["length"]):
        raise ValueError(f"initializer {tensor.name}: {location} ends before its bytes do")
    return data


def externalize(model: onnx.ModelProto, store: WeightStore) -> None:
    """Move every large initializer of `model` into the store, those still referring to the
    checkpoint's file included; the proto keeps only references into the store's file."""
    for tensor in model.graph.initializer:
        if _in_store(tensor, store):
            continue
        data = tensor_bytes(tensor)
        if len(data) < MIN_EXTERNAL_BYTES:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:  # a small checkpoint weight: inline
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = data
            continue
        offset, length = store.put(data)
        for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(name)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", store.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _in_store(tensor: onnx.TensorProto, store: WeightStore) -> bool:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and e.value == store.path.name for e in tensor.external_data)


def write_graph(model: onnx.ModelProto, path: Path, store: WeightStore) -> None:
    """Write `model` to `path` with its large tensors moved into `store` (the proto keeps
    references only, so the caller's copy shrinks to the graph structure)."""
    externalize(model, store)
    onnx.save_model(model, str(path))
