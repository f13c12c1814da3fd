"""Weight quantization of the lowered ONNX graphs: int8 and int4 variants of one fp32 export.

Graph surgery with onnx.helper, so the byte layout of every quantized tensor is ours and two
graphs that hold the same weight (prefill / decode decoder, tied head / token embedding) produce
the same bytes and share them in the weight file. Schemes, per weight role:

* fp16 is not a rewrite: lower.py traces a half-precision model (fp16 weights and activations,
  fp32 norms, DeltaNet decay and state), and this module only counts its fp16 weights.
* int8: every linear layer per-output-channel symmetric int8 (DequantizeLinear on an int8
  initializer, zero point 0); embedding tables per-row int8, gathered as int8 and scaled after the
  gather, so the table is never dequantized whole.
* int4: text linear layers block-wise 4-bit (`MatMulNBits`, block 32, symmetric, zero point 8,
  accuracy_level 4 = int8 activations by default, 0 = fp32 with `export --int4-compute fp32`). The token
  embedding uses `GatherBlockQuantized` with the same packing, so a tied head shares its bytes.
  K that is not a multiple of 32 is zero-padded to the next block (MatMulNBits reads K from its
  attribute and the packed blocks past it as padding). Vision graphs keep int8 linears by default
  (DESIGN.md: vision stays int8 unless parity allows int4); `export --vision-quant int4` gives them
  the same 4-bit blocks.

Untouched everywhere: 1-D tensors (norm weights, biases, A_log, dt_bias), DeltaNet state, and the
DeltaNet gate projections (in_proj_a / in_proj_b: output width < MIN_QUANT_N), which feed decay and
beta and are a rounding error of the weight bytes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .store import tensor_bytes

QUANTIZATIONS = ("fp32", "fp16", "int8", "int4")
BLOCK = 32
MIN_QUANT_N = 32  # narrower outputs (DeltaNet decay / beta projections) stay fp32
# MatMulNBits' accuracy_level per `export --int4-compute`: 0 computes in fp32 (the weights are
# dequantized to fp32), 4 quantizes the activations to int8 per block and uses integer dot products
# (faster on CPUs with int8 dot instructions). The default is int8: on the trained 4.6, 4.0 and 2.0
# models it passes and fails exactly the gates fp32 compute does, with the same eval scores
# (issue 33; docs/history.md, 2026-12-07).
INT4_COMPUTE_LEVELS = {"fp32": 0, "int8": 4}
DEFAULT_INT4_COMPUTE = "int8"
ACCURACY_LEVEL = INT4_COMPUTE_LEVELS[DEFAULT_INT4_COMPUTE]  # the default level
# The vision linears of an int4 export (`export --vision-quant`). int8 by default: see
# docs/history.md (2026-12-08, session 25) for what 4-bit vision weights measured.
VISION_QUANTS = ("int8", "int4")
DEFAULT_VISION_QUANT = "int8"
# 4-bit vision linears compute in fp32 whatever `--int4-compute` says: the vision tower is where
# 4-bit weights cost measurable accuracy (docs/history.md), so its activations stay exact; and at a
# slice's 1024 rows onnxruntime's fp32-compute kernel ran a full-size 16x slice in 0.88x the time of
# the int8-activation one on these AVX2 CPUs (session 25; CPUs with int8 dot-product instructions
# may rank them the other way, unmeasured).
VISION_INT4_ACCURACY_LEVEL = 0
MS_DOMAIN = "com.microsoft"
_LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class QuantStats:
    """How many weights took each scheme (for the manifest and the export log)."""

    counts: dict[str, int]

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if v) or "none"


# ---------------------------------------------------------------------------------------------------
# numpy quantizers (pure functions; tests compare them with onnxruntime's kernels)


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per index of `axis` (the output channel): q in [-127, 127]."""
    reduce = 1 - axis
    amax = np.abs(w).max(axis=reduce)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / np.expand_dims(scale, reduce)), -127, 127).astype(np.int8)
    return q, scale


# Candidate block scales, as fractions of amax / 7: the plain absmax scale first, then smaller ones
# that clip the block's largest weight to win resolution for the rest (the search of llama.cpp's
# and AWQ's quantizers, reduced to a grid). Each block keeps the one with the least squared error.
SCALE_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


ROWS_PER_PASS = 2048  # rows quantized at once: bounds the search's temporaries (a 151k-row head)


def int4_blocks(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of w [N, K] in blocks of 32 along K, symmetric: q = round(w / s) + 8 in [1, 15], two per
    byte, low nibble first; s per block from SCALE_GRID x amax / 7, least squared error.
    Returns packed uint8 [N, K/2] and scales [N, K/32] (fp32)."""
    n, k = w_nk.shape
    packed = np.empty((n, k // 2), dtype=np.uint8)
    scales = np.empty((n, k // BLOCK), dtype=np.float32)
    starts = range(0, n, ROWS_PER_PASS)
    # passes are independent and numpy releases the GIL in them: one thread per core
    with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
        results = pool.map(lambda r: _int4_rows(w_nk[r : r + ROWS_PER_PASS]), starts)
        for r, (rows_packed, rows_scales) in zip(starts, results, strict=True):
            packed[r : r + ROWS_PER_PASS], scales[r : r + ROWS_PER_PASS] = rows_packed, rows_scales
    return packed, scales


def _int4_rows(w_nk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k = w_nk.shape
    blocks = np.asarray(w_nk, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    base = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    best_scale, best_err = base, None
    for factor in SCALE_GRID:
        scale = (base * np.float32(factor)).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[..., None]), -7, 7)
        err = np.square(q * scale[..., None] - blocks).sum(axis=-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_err = np.where(better, err, best_err)
    q = (np.clip(np.rint(blocks / best_scale[..., None]), -7, 7) + 8).astype(np.uint8).reshape(n, k)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), best_scale


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Signed codes [N, K] in [-7, 7] (int8) of int4_blocks' packed bytes."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
    return q - 8


def dequant_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of int4_blocks (for tests and error reports)."""
    n = packed.shape[0]
    q = unpack_int4(packed).astype(np.float32)
    return (q.reshape(n, -1, BLOCK) * scale[..., None]).reshape(n, -1)


# ---------------------------------------------------------------------------------------------------
# graph surgery


class _Surgery:
    """A graph being rewritten: new nodes go before the old ones (their inputs are initializers)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.nodes = list(self.graph.node)  # one wrapper object per node, so id() is stable below
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # every tensor's readers
        for node in self.nodes:
            for i, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, i))
                if name in self.inits:
                    self.consumers.setdefault(name, []).append((node, i))
        self.prologue: list[onnx.NodeProto] = []
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> replacement nodes
        self.dropped: set[str] = set()
        self.counts: dict[str, int] = {}

    def array(self, name: str) -> np.ndarray:
        t = self.inits[name]
        return np.frombuffer(tensor_bytes(t), dtype=helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(
            tuple(t.dims)
        )

    def add(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def drop(self, name: str) -> None:
        self.dropped.add(name)

    def count(self, scheme: str) -> None:
        self.counts[scheme] = self.counts.get(scheme, 0) + 1

    def finish(self) -> None:
        kept = [t for t in self.graph.initializer if t.name not in self.dropped]
        self.graph.ClearField("initializer")
        self.graph.initializer.extend(kept)
        nodes = list(self.prologue)
        for node in self.nodes:
            nodes.extend(self.replaced.get(id(node), [node]))
        self.graph.ClearField("node")
        self.graph.node.extend(nodes)
        if any(n.domain == MS_DOMAIN for n in nodes) and not any(
            o.domain == MS_DOMAIN for o in self.model.opset_import
        ):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _is_float_matrix(t: onnx.TensorProto) -> bool:
    return t.data_type == TensorProto.FLOAT and len(t.dims) == 2


def _linear_layout(uses: list) -> tuple[int, int] | None:
    """(K axis, N axis) of an initializer used only as the weight input of MatMul / Gemm, else None."""
    layouts = set()
    for node, idx in uses:
        if node.op_type == "MatMul" and idx == 1:
            layouts.add((0, 1))
        elif node.op_type == "Gemm" and idx == 1:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                return None
            layouts.add((1, 0) if attrs.get("transB", 0) else (0, 1))
        else:
            return None
    return layouts.pop() if len(layouts) == 1 else None


def _transposed_matmuls(s: _Surgery, uses: list) -> list | None:
    """The MatMul uses of a weight [N, K] read through Transpose(perm=[1, 0]) nodes only (the
    streaming export leaves those unfolded, mapped.py), else None."""
    matmuls = []
    for node, idx in uses:
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
        if node.op_type != "Transpose" or idx != 0 or list(perm or ()) != [1, 0]:
            return None
        readers = s.readers.get(node.output[0], [])
        if not readers or any(r.op_type != "MatMul" or i != 1 for r, i in readers):
            return None
        matmuls.extend(readers)
    return matmuls


def _is_embedding(uses: list) -> bool:
    """Used only as Gather's table along axis 0."""
    for node, idx in uses:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or idx != 0 or axis != 0:
            return False
    return True


def _int8_linear(s: _Surgery, name: str, n_axis: int, transposed_readers: list) -> None:
    """Weight -> DequantizeLinear(int8, per-output-channel scale) under the original name.

    A MatMul reads it as [K, N], and onnxruntime fuses DequantizeLinear + MatMul into one 8-bit
    `MatMulNBits` reading the int8 bytes. W [N, K] read through Transpose nodes (the streaming
    export; `transposed_readers` are their MatMuls) is stored transposed and read directly, so it
    fuses too (onnxruntime runs DequantizeLinear -> Transpose -> MatMul as a whole-weight
    DequantizeLinear on every call plus an fp32 FusedMatMul; not timed at full size). A Gemm keeps
    W as it is: onnxruntime runs it as DequantizeLinear + fp32 Gemm, which measured faster than the
    fused form for the vision merger's Gemms (a 16x 448x448 slice took 6576 ms as is and 7197 ms
    with them rewritten to fused MatMuls, interleaved on the full preset; fp32 GEMM outruns 8-bit
    MatMulNBits at many rows on these CPUs: tools/bench_matmul_kernels.py, issue 33)."""
    w = s.array(name)
    if transposed_readers:
        w, n_axis = w.T, 1
    q, scale = int8_per_channel(np.ascontiguousarray(w), n_axis)
    s.add(name + ".q8", q)
    s.add(name + ".s8", scale)
    s.prologue.append(helper.make_node("DequantizeLinear", [name + ".q8", name + ".s8"], [name], axis=n_axis))
    for node, _ in transposed_readers:
        node.input[1] = name
    s.drop(name)
    s.count("int8")


def _int4_linear(s: _Surgery, name: str, k_axis: int, uses: list, accuracy_level: int) -> None:
    """MatMul / Gemm -> MatMulNBits (+ Add for a Gemm bias) reading the 4-bit blocks; K is
    zero-padded to whole blocks (a SigLIP MLP's 4304 to 4320)."""
    w = s.array(name)
    w_nk = w.T if k_axis == 0 else w
    n, k = w_nk.shape
    padded = -(-k // BLOCK) * BLOCK
    if padded != k:
        w_nk = np.concatenate([w_nk, np.zeros((n, padded - k), w_nk.dtype)], axis=1)
    packed, scale = int4_blocks(np.ascontiguousarray(w_nk))
    s.add(name + ".q4", packed.reshape(n, padded // BLOCK, BLOCK // 2))
    s.add(name + ".s4", scale)
    for node, _ in uses:
        out = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        mm_out = out + ".nobias" if has_bias else out
        new = [
            helper.make_node(
                "MatMulNBits",
                [node.input[0], name + ".q4", name + ".s4"],
                [mm_out],
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=4,
                block_size=BLOCK,
                accuracy_level=accuracy_level,
            )
        ]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [out]))
        s.replaced[id(node)] = new
    s.drop(name)
    s.count("int4")


def _int8_embedding(s: _Surgery, name: str, uses: list) -> None:
    """Gather(table) -> Gather(int8 table) * Gather(row scales): only the gathered rows are scaled."""
    q, scale = int8_per_channel(s.array(name), 0)
    s.add(name + ".q8", q)
    s.add(name + ".s8", scale.reshape(-1, 1))
    for node, _ in uses:
        ids, out = node.input[1], node.output[0]
        s.replaced[id(node)] = [
            helper.make_node("Gather", [name + ".q8", ids], [out + ".q"], axis=0),
            helper.make_node("Gather", [name + ".s8", ids], [out + ".s"], axis=0),
            helper.make_node("Cast", [out + ".q"], [out + ".f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [out + ".f", out + ".s"], [out]),
        ]
    s.drop(name)
    s.count("int8-embedding")


def _int4_embedding(s: _Surgery, name: str, uses: list) -> None:
    packed, scale = int4_blocks(np.ascontiguousarray(s.array(name)))
    n, half = packed.shape
    # same bytes as MatMulNBits' [N, K/32, 16] layout, so a tied head shares them
    s.add(name + ".q4", packed)
    s.add(name + ".s4", scale)
    for node, _ in uses:
        s.replaced[id(node)] = [
            helper.make_node(
                "GatherBlockQuantized",
                [name + ".q4", node.input[1], name + ".s4"],
                [node.output[0]],
                domain=MS_DOMAIN,
                gather_axis=0,
                quantize_axis=1,
                block_size=BLOCK,
                bits=4,
            )
        ]
    s.drop(name)
    s.count("int4-embedding")


def quantize_model(
    model: onnx.ModelProto,
    quant: str,
    vision: bool,
    accuracy_level: int = ACCURACY_LEVEL,
    vision_quant: str = DEFAULT_VISION_QUANT,
) -> QuantStats:
    """Rewrite one lowered graph in place for `quant` (fp32 leaves it as is); int4's MatMulNBits
    nodes get `accuracy_level` (INT4_COMPUTE_LEVELS). In an int4 export, a vision graph's linears
    take `vision_quant` (VISION_QUANTS), 4-bit ones at VISION_INT4_ACCURACY_LEVEL; its position
    table stays int8."""
    if quant not in QUANTIZATIONS:
        raise ValueError(f"unknown ONNX quantization {quant!r}")
    if vision_quant not in VISION_QUANTS:
        raise ValueError(f"unknown vision quantization {vision_quant!r}")
    if accuracy_level not in INT4_COMPUTE_LEVELS.values():
        raise ValueError(f"unsupported MatMulNBits accuracy_level {accuracy_level!r}")
    if quant == "fp32":
        return QuantStats({})
    if quant == "fp16":  # traced in half precision already (lower.py)
        stored = [t for t in model.graph.initializer if len(t.dims) >= 2]
        return QuantStats({"fp16": sum(t.data_type == TensorProto.FLOAT16 for t in stored)})
    s = _Surgery(model)
    for name, uses in list(s.consumers.items()):
        t = s.inits[name]
        if t.data_type != TensorProto.FLOAT or len(t.dims) < 2:
            continue
        layout = _linear_layout(uses) if _is_float_matrix(t) else None
        transposes: list = []
        matmuls = _transposed_matmuls(s, uses) if _is_float_matrix(t) and layout is None else None
        if matmuls is not None:  # W [N, K] -> Transpose -> MatMul: K is W's axis 1
            layout, transposes, uses = (1, 0), [node for node, _ in uses], matmuls
        n_dim = t.dims[layout[1]] if layout else 0
        if layout and n_dim < MIN_QUANT_N:
            continue  # DeltaNet decay / beta projections stay fp32
        if layout:
            if quant == "int4" and (not vision or vision_quant == "int4"):
                level = VISION_INT4_ACCURACY_LEVEL if vision else accuracy_level
                _int4_linear(s, name, layout[0], uses, level)
            else:
                _int8_linear(s, name, layout[1], uses if transposes else [])
            for node in transposes:  # both read W itself now: no transpose left
                s.replaced[id(node)] = []
        elif _is_float_matrix(t) and _is_embedding(uses):
            if quant == "int4" and not vision and t.dims[1] % BLOCK == 0:
                _int4_embedding(s, name, uses)
            else:
                _int8_embedding(s, name, uses)
    s.finish()
    return QuantStats(s.counts)
