"""numpy semantics of the MIL operations our Core ML programs use (coremltools' ops/defs/iOS15..18).

Each op takes its inputs by MIL parameter name (numpy arrays or Python scalars) and returns its
outputs. Dtype rule, as the program states it: an op computes in float32 (matmuls accumulate in
float32, as the Core ML backends do) and its result is rounded to the output dtype the program
declares for it (`executor.py` does the rounding), so an fp16 program rounds after every op like
fp16 hardware does, and an fp32 island stays fp32. Ops not listed in OPS are not supported: the
executor raises naming them, never passing data through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .package import STRING_TO_DTYPE

Op = Callable[..., Any]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def register(func: Op) -> Op:
        for name in names or (func.__name__.rstrip("_"),):
            OPS[name] = func
        return func

    return register


def _f(x: np.ndarray) -> np.ndarray:
    """Float inputs compute in float32 (fp16 rounding is applied to the result)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


# --- elementwise binary (numpy broadcasting = MIL broadcasting) -----------------------------------
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}  # fmt: skip
for _name, _fn in _BINARY.items():
    OPS[_name] = lambda x, y, _fn=_fn, **_: _fn(_f(x), _f(y))


# --- elementwise unary ------------------------------------------------------------------------------
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "abs": np.abs, "cos": np.cos, "sin": np.sin,
    "tanh": np.tanh, "floor": np.floor, "ceil": np.ceil, "sign": np.sign, "square": np.square,
    "relu": lambda x: np.maximum(x, 0), "sigmoid": _sigmoid, "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(0, x), "logical_not": np.logical_not,
}  # fmt: skip
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda x, _fn=_fn, **_: _fn(_f(x))


@op()
def rsqrt(x, epsilon=1e-12, **_):
    return 1.0 / np.sqrt(_f(x) + np.float32(epsilon))


@op()
def inverse(x, epsilon=1e-4, **_):
    return 1.0 / (_f(x) + np.float32(epsilon))


@op()
def gelu(x, mode="EXACT", **_):
    x = _f(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf, otypes=[np.float32])(x / np.sqrt(2)))


@op()
def clip(x, alpha, beta, **_):
    return np.clip(_f(x), alpha, beta)


@op()
def cast(x, dtype, **_):
    return np.asarray(x).astype(STRING_TO_DTYPE[dtype])


@op()
def select(cond, a, b, **_):
    return np.where(np.asarray(cond, bool), _f(a), _f(b))


# --- shape ops --------------------------------------------------------------------------------------
@op()
def reshape(x, shape, **_):
    return np.reshape(x, [int(s) for s in np.asarray(shape).ravel()])


@op()
def transpose(x, perm, **_):
    return np.transpose(x, [int(p) for p in np.asarray(perm)])


@op()
def expand_dims(x, axes, **_):
    out = np.asarray(x)
    rank = out.ndim + len(np.atleast_1d(axes))
    for a in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        out = np.expand_dims(out, a)
    return out


@op()
def squeeze(x, axes=None, **_):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(int(a) % x.ndim for a in np.atleast_1d(axes)))


@op()
def concat(values, axis, interleave=False, **_):
    if interleave:
        raise NotImplementedError("concat(interleave=True) is not supported by the executor")
    return np.concatenate(values, axis=int(axis))


@op()
def split(x, axis, num_splits=None, split_sizes=None, **_):
    axis = int(axis)
    if split_sizes is None:
        return np.split(x, int(num_splits), axis=axis)
    return np.split(x, np.cumsum(np.asarray(split_sizes))[:-1], axis=axis)


@op()
def tile(x, reps, **_):
    return np.tile(x, [int(r) for r in np.asarray(reps)])


@op()
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None, **_):
    x = np.asarray(x)
    rank = x.ndim
    stride = np.ones(rank, int) if stride is None else np.asarray(stride)
    begin_mask = np.zeros(rank, bool) if begin_mask is None else np.asarray(begin_mask)
    end_mask = np.zeros(rank, bool) if end_mask is None else np.asarray(end_mask)
    index = []
    for i in range(rank):
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    out = x[tuple(index)]
    if squeeze_mask is not None and np.any(squeeze_mask):
        out = np.squeeze(out, tuple(i for i in range(rank) if squeeze_mask[i]))
    return out


@op()
def slice_by_size(x, begin, size, **_):
    index = tuple(
        slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size, strict=True)
    )
    return np.asarray(x)[index]


@op()
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False, **_):
    if int(batch_dims) != 0:
        raise NotImplementedError("gather(batch_dims != 0) is not supported by the executor")
    x = np.asarray(x)
    axis = int(axis) % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if np.any(idx < 0) or np.any(idx >= x.shape[axis]):
        raise IndexError(f"gather: index out of range for axis {axis} of size {x.shape[axis]}")
    return np.take(x, idx, axis=axis)


@op()
def gather_along_axis(x, indices, axis=0, validate_indices=False, **_):
    return np.take_along_axis(np.asarray(x), np.asarray(indices).astype(np.int64), axis=int(axis))


@op()
def scatter(data, indices, updates, axis=0, mode="update", validate_indices=False, **_):
    out = np.array(data, copy=True)
    axis = int(axis) % out.ndim
    idx = np.asarray(indices).astype(np.int64)
    if np.any(idx < 0) or np.any(idx >= out.shape[axis]):
        raise IndexError(f"scatter: index out of range for axis {axis} of size {out.shape[axis]}")
    moved = np.moveaxis(out, axis, 0)
    upd = np.moveaxis(np.asarray(updates), axis, 0)
    funcs = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
             "max": np.maximum, "min": np.minimum}  # fmt: skip
    for i, j in enumerate(idx):  # sequential: a repeated index applies in order, like the op spec
        moved[j] = upd[i] if mode == "update" else funcs[mode](moved[j], upd[i])
    return out


@op()
def band_part(x, lower=-1, upper=-1, **_):
    x = np.asarray(x)
    rows, cols = x.shape[-2], x.shape[-1]
    i = np.arange(rows)[:, None]
    j = np.arange(cols)[None, :]
    keep = np.ones((rows, cols), bool)
    if int(lower) >= 0:
        keep &= (i - j) <= int(lower)
    if int(upper) >= 0:
        keep &= (j - i) <= int(upper)
    return np.where(keep, x, np.zeros((), x.dtype))


@op()
def range_1d(start, end, step, **_):
    return np.arange(start, end, step)


@op()
def fill(shape, value=0.0, **_):
    return np.full([int(s) for s in np.asarray(shape)], value)


@op()
def shape(x, **_):
    return np.asarray(np.shape(x), np.int32)


# --- reductions and normalisation -------------------------------------------------------------------
def _axes(axes, rank):
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
                   "reduce_min": np.min, "reduce_prod": np.prod}.items():  # fmt: skip
    OPS[_name] = lambda x, axes=None, keep_dims=False, _fn=_fn, **_: _fn(
        _f(x), axis=_axes(axes, np.ndim(x)), keepdims=bool(keep_dims)
    )


@op()
def reduce_argmax(x, axis=-1, keep_dims=False, **_):
    return np.argmax(_f(x), axis=int(axis), keepdims=bool(keep_dims)).astype(np.int32)


@op()
def cumsum(x, axis=0, exclusive=False, reverse=False, **_):
    x = _f(x)
    axis = int(axis)
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out


@op()
def softmax(x, axis=-1, **_):
    x = _f(x)
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=int(axis), keepdims=True)


@op()
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5, **_):
    x = _f(x)
    ax = _axes(axes, x.ndim)
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        out = out * _f(gamma)
    if beta is not None:
        out = out + _f(beta)
    return out


# --- linear algebra ---------------------------------------------------------------------------------
@op()
def matmul(x, y, transpose_x=False, transpose_y=False, **_):
    x, y = _f(x), _f(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op()
def linear(x, weight, bias=None, **_):
    out = np.matmul(_f(x), _f(weight).T)
    return out if bias is None else out + _f(bias)


@op()
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1, **_):
    """1-D convolution [N, C, W] (the only rank our graphs use), with groups."""
    x, w = _f(x), _f(weight)
    if x.ndim != 3:
        raise NotImplementedError(f"conv of rank {x.ndim} is not supported by the executor (only 1-D)")
    stride = 1 if strides is None else int(np.asarray(strides)[0])
    dil = 1 if dilations is None else int(np.asarray(dilations)[0])
    k = w.shape[-1]
    if pad_type == "custom":
        left, right = (int(p) for p in np.asarray(pad)[:2])
    elif pad_type == "valid":
        left = right = 0
    elif pad_type == "same":
        total = max((int(np.ceil(x.shape[-1] / stride)) - 1) * stride + (k - 1) * dil + 1 - x.shape[-1], 0)
        left, right = total // 2, total - total // 2
    else:
        raise NotImplementedError(f"conv pad_type {pad_type!r} is not supported by the executor")
    x = np.pad(x, ((0, 0), (0, 0), (left, right)))
    groups = int(groups)
    n, c_in, width = x.shape
    c_out = w.shape[0]
    out_w = (width - (k - 1) * dil - 1) // stride + 1
    taps = np.stack([x[:, :, i * dil : i * dil + (out_w - 1) * stride + 1 : stride] for i in range(k)], -1)
    taps = taps.reshape(n, groups, c_in // groups, out_w, k)
    wg = w.reshape(groups, c_out // groups, c_in // groups, k)
    out = np.einsum("ngcwk,gock->ngow", taps, wg).reshape(n, c_out, out_w)
    return out if bias is None else out + _f(bias)[None, :, None]


# --- compile-time dequantization (constexpr_*) ------------------------------------------------------
@op()
def constexpr_blockwise_shift_scale(data, scale, offset=None, **_):
    """iOS18: output = scale * (data - offset), scale/offset repeated over blocks of data."""
    data = np.asarray(data).astype(np.float32)
    scale = _f(scale)
    offset = None if offset is None else np.asarray(offset).astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape, strict=True)):
        if d % s:
            raise ValueError(f"constexpr_blockwise_shift_scale: scale dim {s} does not divide {d}")
        if d // s > 1:
            scale = np.repeat(scale, d // s, axis)
            offset = None if offset is None else np.repeat(offset, d // s, axis)
    return scale * (data if offset is None else data - offset)


@op()
def constexpr_lut_to_dense(indices, lut, vector_axis=None, **_):
    """iOS18: per-group lookup tables lut [G0.., Gk, 2^n, V] over indices [D0.., Dk]."""
    idx = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    if lut.shape[-1] != 1:
        raise NotImplementedError("constexpr_lut_to_dense with vector palettization is not supported")
    table = lut[..., 0]  # [G0.., Gk, 2^n]
    for axis, (d, g) in enumerate(zip(idx.shape, table.shape[:-1], strict=True)):
        if d // g > 1:
            table = np.repeat(table, d // g, axis)
    return np.take_along_axis(table, idx[..., None], axis=-1)[..., 0]


@op()
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis, **_):
    """iOS16: (q - zero_point) * scale, per channel along `axis` (or per tensor)."""
    q = np.asarray(quantized_data).astype(np.float32)
    shape = [1] * q.ndim
    shape[int(axis)] = -1
    zp = np.asarray(zero_point).astype(np.float32)
    sc = _f(scale)
    if zp.ndim:
        zp = zp.reshape(shape)
    if sc.ndim:
        sc = sc.reshape(shape)
    return (q - zp) * sc
