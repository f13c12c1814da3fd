"""A numpy executor for the MIL program inside an `.mlpackage`: Core ML parity without a Mac.

It walks one function's block in program order. Consts are decoded once (weights from the blob
file) and cached; `constexpr_*` dequantization ops are evaluated once too, like Core ML does at
load time. Every other op runs with the semantics of `ops.py` and its result is cast to the dtype
the program declares for that output, which is what makes fp16 programs compute in fp16.
States (`MLState`) are named arrays the caller owns: `read_state` reads them, `write_state` /
`coreml_update_state` replace them, so a call mutates the `states` dict it was given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from coremltools.proto import MIL_pb2

from ...errors import BundleError
from .ops import OPS
from .package import DTYPES, MLPackage, load_package, tensor_shape

_CONST_FOLDED = ("const",)


class UnsupportedOpError(BundleError):
    """The program uses an operation the executor does not implement."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


def _value_spec(nvt: MIL_pb2.NamedValueType) -> TensorSpec:
    vtype = nvt.type
    if vtype.WhichOneof("type") == "stateType":
        vtype = vtype.stateType.wrappedType
    ttype = vtype.tensorType
    return TensorSpec(nvt.name, tensor_shape(ttype), DTYPES[ttype.dataType][0])


class MILFunction:
    """One function of the program, ready to run."""

    def __init__(self, package: MLPackage, name: str, function: MIL_pb2.Function):
        self.package = package
        self.name = name
        self.block = function.block_specializations[function.opset]
        self.opset = function.opset
        self.inputs: list[TensorSpec] = []
        self.states: list[TensorSpec] = []
        for nvt in function.inputs:
            kind = self.states if nvt.type.WhichOneof("type") == "stateType" else self.inputs
            kind.append(_value_spec(nvt))
        self.outputs = list(self.block.outputs)
        self._consts: dict[str, Any] | None = None
        missing = sorted({op.type for op in self.block.operations} - set(OPS) - _SPECIAL - set(_CONST_FOLDED))
        if missing:
            raise UnsupportedOpError(
                f"{package.path.name} function {name}: operation(s) not implemented by the MIL executor: "
                + ", ".join(missing)
            )

    def op_histogram(self) -> Counter:
        return Counter(op.type for op in self.block.operations)

    def _load_consts(self) -> dict[str, Any]:
        """const values, and constexpr ops evaluated once (their inputs are all consts)."""
        if self._consts is None:
            env: dict[str, Any] = {}
            for op in self.block.operations:
                if op.type == "const":
                    env[op.outputs[0].name] = self.package.value(op.attributes["val"])
                elif op.type.startswith("constexpr_"):
                    _run_op(op, env, self.package.value)
            self._consts = env
        return self._consts

    def __call__(self, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(self._load_consts())
        for spec in self.inputs:
            if spec.name not in inputs:
                raise BundleError(f"{self.name}: input {spec.name!r} missing")
            env[spec.name] = np.asarray(inputs[spec.name]).astype(spec.dtype, copy=False)
        for spec in self.states:
            env[spec.name] = spec.name  # a state input is a handle: its name
        for op in self.block.operations:
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            if op.type == "read_state":
                env[op.outputs[0].name] = states[env[_arg(op, "input")]].copy()
            elif op.type in ("write_state", "coreml_update_state"):
                key = "state" if op.type == "coreml_update_state" else "input"
                handle = env[_arg(op, key)]
                value = env[_arg(op, "value" if op.type == "coreml_update_state" else "data")]
                states[handle] = value.astype(states[handle].dtype, copy=True)
                if op.outputs:
                    env[op.outputs[0].name] = states[handle].copy()
            else:
                _run_op(op, env)
        return {name: env[name] for name in self.outputs}


_SPECIAL = {"read_state", "write_state", "coreml_update_state"}


def _arg(op: MIL_pb2.Operation, key: str) -> str:
    return op.inputs[key].arguments[0].name


def _run_op(op: MIL_pb2.Operation, env: dict[str, Any], read_value: Callable[..., Any] | None = None) -> None:
    """Run one op on `env`; `read_value` resolves values bound inline to inputs (the package's
    reader, which also follows weight-file references; immediates only when None)."""
    func = OPS.get(op.type)
    if func is None:
        raise UnsupportedOpError(f"operation {op.type!r} ({op.outputs[0].name}) is not implemented")
    kwargs: dict[str, Any] = {}
    for key, arg in op.inputs.items():
        values = [
            env[b.name] if b.name else (_plain(read_value(b.value)) if read_value else _binding_value(b))
            for b in arg.arguments
        ]
        kwargs[key] = values if key == "values" else values[0]
    result = func(**kwargs)
    results = result if isinstance(result, list | tuple) else [result]
    if len(results) != len(op.outputs):
        raise BundleError(f"{op.type}: produced {len(results)} outputs, program declares {len(op.outputs)}")
    for out, value in zip(op.outputs, results, strict=True):
        spec = _value_spec(out)
        arr = np.asarray(value)
        if spec.dtype.kind == "b" or arr.dtype.kind == "b":
            arr = arr.astype(spec.dtype)
        else:
            arr = arr.astype(spec.dtype, copy=False)  # the program's dtype: fp16 ops round here
        env[out.name] = _scalarize(arr, spec)


def _binding_value(binding: MIL_pb2.Argument.Binding) -> Any:
    from .package import immediate_to_numpy

    return _plain(immediate_to_numpy(binding.value))


def _stored_bytes(val: MIL_pb2.Value) -> int:
    """Bytes a weight-file value occupies (sub-byte types packed)."""
    ttype = val.type.tensorType
    count = int(np.prod(tensor_shape(ttype), dtype=np.int64))
    return (count * DTYPES[ttype.dataType][1] + 7) // 8


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    return value


def _scalarize(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return arr.reshape(()) if len(spec.shape) == 0 and arr.size == 1 else arr


class MILProgram:
    """All functions of one package, plus what `inspect` reports about it."""

    def __init__(self, path: str | Path):
        self.package = load_package(path)
        self.functions = {
            name: MILFunction(self.package, name, fn) for name, fn in self.package.program.functions.items()
        }

    def function(self, name: str | None = None) -> MILFunction:
        if name is None:
            name = self.package.spec.description.defaultFunctionName or next(iter(self.functions))
        if name not in self.functions:
            raise BundleError(f"{self.package.path.name}: no function {name!r} ({', '.join(self.functions)})")
        return self.functions[name]

    def new_states(self, function: str | None = None) -> dict[str, np.ndarray]:
        return {s.name: np.zeros(s.shape, s.dtype) for s in self.function(function).states}

    def weight_bytes_by_dtype(self) -> dict[str, int]:
        """Bytes of every const in the package, by stored dtype (sub-byte types counted packed)."""
        return {dtype: entry["bytes"] for dtype, entry in self.weight_stats_by_dtype().items()}

    def weight_stats_by_dtype(self) -> dict[str, dict[str, int]]:
        """`{dtype: {bytes, tensors, params}}` over the package's blob-file consts (each stored
        tensor once, even when several functions share it)."""
        totals: dict[str, dict[str, int]] = {}
        blobs = {key: val for fn in self.functions for key, val in self._blobs(fn).items()}
        for val in blobs.values():
            ttype = val.type.tensorType
            count = int(np.prod(tensor_shape(ttype), dtype=np.int64))
            entry = totals.setdefault(
                MIL_pb2.DataType.Name(ttype.dataType).lower(), {"bytes": 0, "tensors": 0, "params": 0}
            )
            entry["bytes"] += _stored_bytes(val)
            entry["tensors"] += 1
            entry["params"] += count
        return totals

    def weight_bytes_by_function(self) -> dict[str, dict[str, int]]:
        """`{function: {bytes, shared_bytes}}`: the weight-file bytes each function reads, and how
        many of them another function of the package reads too (multifunction packages store
        shared weights once, so the package is smaller than the sum of its functions)."""
        blobs = {fn: self._blobs(fn) for fn in self.functions}
        out = {}
        for fn, mine in blobs.items():
            others = set().union(*(keys for name, keys in blobs.items() if name != fn))
            out[fn] = {
                "bytes": sum(_stored_bytes(v) for v in mine.values()),
                "shared_bytes": sum(_stored_bytes(v) for k, v in mine.items() if k in others),
            }
        return out

    def _blobs(self, function: str) -> dict[tuple[str, int], MIL_pb2.Value]:
        """The weight-file values one function reads, keyed by (file, offset): const ops' values
        and the values bound inline to op inputs (how coremltools stores the quantized data and
        scales of constexpr ops)."""
        fn = self.package.program.functions[function]
        return {(val.blobFileValue.fileName, val.blobFileValue.offset): val for val in self._blob_values(fn)}

    @staticmethod
    def _blob_values(fn: MIL_pb2.Function):
        for op in fn.block_specializations[fn.opset].operations:
            if op.type == "const" and op.attributes["val"].HasField("blobFileValue"):
                yield op.attributes["val"]
            for arg in op.inputs.values():
                for binding in arg.arguments:
                    if binding.WhichOneof("binding") == "value" and binding.value.HasField("blobFileValue"):
                        yield binding.value
