"""Read an `.mlpackage` without coremltools' runtime: the MIL program protobuf and its weight blobs.

Layout: `<pkg>/Data/com.apple.CoreML/model.mlmodel` (a `Model` protobuf whose `mlProgram` is the
MIL program) and `weights/weight.bin`, which the program's `blobFileValue`s point into by byte
offset. The blob file (MIL storage format v2) is a 64-byte header, then per blob a 64-byte
metadata record `{u32 sentinel=0xDEADBEEF, u32 dtype, u64 size_bytes, u64 data_offset, ...}`
followed by the data. Sub-byte types (int4, uint1..uint6) are packed LSB first.
Only the protobuf classes ship with coremltools on Linux, so this module parses the rest itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from coremltools.proto import MIL_pb2, Model_pb2

from ...errors import BundleError

MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
BLOB_SENTINEL = 0xDEADBEEF
BLOB_METADATA = struct.Struct("<IIQQQ")

# MIL dtype -> (numpy dtype, bits per element); sub-byte dtypes unpack into int8/uint8
DTYPES: dict[int, tuple[np.dtype, int]] = {
    MIL_pb2.BOOL: (np.dtype(np.bool_), 8),
    MIL_pb2.FLOAT16: (np.dtype(np.float16), 16),
    MIL_pb2.FLOAT32: (np.dtype(np.float32), 32),
    MIL_pb2.FLOAT64: (np.dtype(np.float64), 64),
    MIL_pb2.INT8: (np.dtype(np.int8), 8),
    MIL_pb2.INT16: (np.dtype(np.int16), 16),
    MIL_pb2.INT32: (np.dtype(np.int32), 32),
    MIL_pb2.INT64: (np.dtype(np.int64), 64),
    MIL_pb2.UINT8: (np.dtype(np.uint8), 8),
    MIL_pb2.UINT16: (np.dtype(np.uint16), 16),
    MIL_pb2.UINT32: (np.dtype(np.uint32), 32),
    MIL_pb2.INT4: (np.dtype(np.int8), 4),
    MIL_pb2.UINT4: (np.dtype(np.uint8), 4),
    MIL_pb2.UINT1: (np.dtype(np.uint8), 1),
    MIL_pb2.UINT2: (np.dtype(np.uint8), 2),
    MIL_pb2.UINT3: (np.dtype(np.uint8), 3),
    MIL_pb2.UINT6: (np.dtype(np.uint8), 6),
}
STRING_TO_DTYPE = {
    "fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_, "fp64": np.float64, "int64": np.int64,
}  # fmt: skip


def dtype_name(code: int) -> str:
    return MIL_pb2.DataType.Name(code).lower()


def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """LSB-first packed n-bit integers -> int8 (signed) or uint8 values."""
    bits = np.unpackbits(packed.view(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    weights = (1 << np.arange(nbits)).astype(np.int32)
    values = (bits.astype(np.int32) * weights).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
        return values.astype(np.int8)
    return values.astype(np.uint8)


def tensor_shape(ttype: MIL_pb2.TensorType) -> tuple[int | None, ...]:
    return tuple(
        d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in ttype.dimensions
    )


class BlobFile:
    """One weight.bin, memory-mapped; blobs are decoded on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")

    def read(self, offset: int, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
        sentinel, _blob_dtype, size, data_offset, _pad = BLOB_METADATA.unpack_from(self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise BundleError(f"{self.path}: no blob at offset {offset} (bad sentinel {sentinel:#x})")
        raw = np.asarray(self.data[data_offset : data_offset + size])
        np_dtype, bits = DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        if bits < 8:
            values = unpack_bits(raw, bits, count, signed=dtype == MIL_pb2.INT4)
        else:
            values = raw.view(np_dtype)[:count].copy()
        return values.reshape(shape)


def immediate_to_numpy(value: MIL_pb2.Value) -> np.ndarray | str | list:
    """An immediate (inline) value with its declared type -> numpy array (or str)."""
    vtype = value.type
    kind = vtype.WhichOneof("type")
    imm = value.immediateValue
    if kind == "tensorType":
        ttype = vtype.tensorType
        shape = tensor_shape(ttype)
        tv = imm.tensor
        which = tv.WhichOneof("value")
        if ttype.dataType == MIL_pb2.STRING:
            strings = list(tv.strings.values)
            return strings[0] if ttype.rank == 0 else strings
        np_dtype, bits = DTYPES[ttype.dataType]
        count = int(np.prod(shape, dtype=np.int64))
        if which == "bytes":
            raw = np.frombuffer(tv.bytes.values, dtype=np.uint8)
            if bits < 8:
                flat = unpack_bits(raw, bits, count, signed=ttype.dataType == MIL_pb2.INT4)
            else:
                flat = raw.view(np_dtype)[:count]
        else:
            flat = np.asarray(list(getattr(tv, which).values))
        return np.asarray(flat, dtype=np_dtype).reshape(shape)
    if kind == "listType" or kind == "tupleType":
        items = imm.list.values if kind == "listType" else imm.tuple.values
        return [immediate_to_numpy(v) for v in items]
    raise BundleError(f"unsupported immediate value type {kind}")


@dataclass
class MLPackage:
    """A parsed package: its Model spec (description: I/O and states) and its MIL program."""

    path: Path
    spec: Model_pb2.Model
    blobs: dict[str, BlobFile]

    @property
    def program(self) -> MIL_pb2.Program:
        return self.spec.mlProgram

    def value(self, value: MIL_pb2.Value) -> np.ndarray | str | list:
        """Any const value of the program, from the protobuf or the weight file."""
        if value.HasField("blobFileValue"):
            ref = value.blobFileValue
            ttype = value.type.tensorType
            return self._blob(ref.fileName).read(ref.offset, ttype.dataType, tensor_shape(ttype))
        return immediate_to_numpy(value)

    def _blob(self, name: str) -> BlobFile:
        if name not in self.blobs:
            rel = name.removeprefix("@model_path/")
            path = self.path / MODEL_FILE.parent / rel
            if not path.is_file():
                raise BundleError(f"{self.path.name}: weight file {rel} is missing")
            self.blobs[name] = BlobFile(path)
        return self.blobs[name]


def load_package(path: str | Path) -> MLPackage:
    root = Path(path)
    model_path = root / MODEL_FILE
    if not model_path.is_file():
        raise BundleError(f"{root.name}: not an mlpackage ({MODEL_FILE} is missing)")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError; keep one line
        raise BundleError(f"{root.name}: model.mlmodel is not a Core ML model ({exc})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise BundleError(f"{root.name}: not an ML program (model type {spec.WhichOneof('Type')})")
    return MLPackage(root, spec, {})
