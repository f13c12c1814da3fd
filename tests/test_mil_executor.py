"""Every op of the numpy MIL executor against a torch / numpy reference, dtype rules included,
plus the package reader (blob file, sub-byte packing) and the unsupported-op error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.backends.coreml import executor as ex
from edge_runtime.backends.coreml.ops import OPS
from edge_runtime.backends.coreml.package import BlobFile, unpack_bits

RNG = np.random.default_rng(0)


def r(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def t(a):
    return torch.from_numpy(np.asarray(a))


UNARY = {
    "exp": torch.exp, "log": lambda x: torch.log(x.abs() + 1), "sqrt": lambda x: torch.sqrt(x.abs()),
    "abs": torch.abs, "cos": torch.cos, "sin": torch.sin, "tanh": torch.tanh, "floor": torch.floor,
    "ceil": torch.ceil, "sign": torch.sign, "square": torch.square, "relu": torch.relu,
    "sigmoid": torch.sigmoid, "silu": F.silu, "softplus": F.softplus,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name):
    x = r(3, 5)
    if name in ("log", "sqrt"):
        x = np.abs(x) + (1 if name == "log" else 0)
        ref = {"log": torch.log, "sqrt": torch.sqrt}[name](t(x))
    else:
        ref = UNARY[name](t(x))
    np.testing.assert_allclose(OPS[name](x=x), ref.numpy(), rtol=1e-5, atol=1e-6)


BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.div, "maximum": torch.maximum,
    "minimum": torch.minimum, "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt,
    "less_equal": torch.le, "greater": torch.gt, "greater_equal": torch.ge,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcast(name):
    x, y = r(2, 1, 4), r(3, 1)
    np.testing.assert_allclose(OPS[name](x=x, y=y), BINARY[name](t(x), t(y)).numpy(), rtol=1e-6)


def test_integer_and_logical_binary():
    a, b = np.array([7, -7, 9], np.int32), np.array([2, 2, 4], np.int32)
    assert OPS["floor_div"](x=a, y=b).dtype.kind == "i"
    np.testing.assert_array_equal(OPS["floor_div"](x=a, y=b), torch.div(t(a), t(b), rounding_mode="floor"))
    np.testing.assert_array_equal(OPS["mod"](x=a, y=b), torch.remainder(t(a), t(b)))
    p, q = np.array([True, False, True]), np.array([True, True, False])
    for name, fn in (
        ("logical_and", np.logical_and),
        ("logical_or", np.logical_or),
        ("logical_xor", np.logical_xor),
    ):
        np.testing.assert_array_equal(OPS[name](x=p, y=q), fn(p, q))
    np.testing.assert_array_equal(OPS["logical_not"](x=p), ~p)


def test_pow_rsqrt_inverse_clip():
    x = np.abs(r(6)) + 0.1
    np.testing.assert_allclose(OPS["pow"](x=x, y=np.float32(3)), torch.pow(t(x), 3).numpy(), rtol=1e-5)
    np.testing.assert_allclose(OPS["rsqrt"](x=x, epsilon=1e-6), torch.rsqrt(t(x) + 1e-6).numpy(), rtol=1e-5)
    np.testing.assert_allclose(OPS["inverse"](x=x, epsilon=0.0), 1 / x, rtol=1e-6)
    y = r(6)
    np.testing.assert_array_equal(
        OPS["clip"](x=y, alpha=-0.5, beta=0.5), torch.clamp(t(y), -0.5, 0.5).numpy()
    )


@pytest.mark.parametrize("mode,approx", [("EXACT", "none"), ("TANH_APPROXIMATION", "tanh")])
def test_gelu(mode, approx):
    x = r(10)
    np.testing.assert_allclose(
        OPS["gelu"](x=x, mode=mode), F.gelu(t(x), approximate=approx).numpy(), atol=1e-6
    )


def test_cast_and_select():
    x = np.array([1.7, -2.2], np.float32)
    assert OPS["cast"](x=x, dtype="int32").tolist() == [1, -2]
    assert OPS["cast"](x=x, dtype="fp16").dtype == np.float16
    c = np.array([True, False])
    np.testing.assert_array_equal(OPS["select"](cond=c, a=x, b=-x), torch.where(t(c), t(x), -t(x)).numpy())


def test_shape_ops():
    x = r(2, 3, 4)
    np.testing.assert_array_equal(OPS["reshape"](x=x, shape=np.array([6, 4])), x.reshape(6, 4))
    np.testing.assert_array_equal(
        OPS["transpose"](x=x, perm=np.array([2, 0, 1])), t(x).permute(2, 0, 1).numpy()
    )
    assert OPS["expand_dims"](x=x, axes=np.array([0, -1])).shape == (1, 2, 3, 4, 1)
    assert OPS["squeeze"](x=x[:, :1], axes=np.array([1])).shape == (2, 4)
    np.testing.assert_array_equal(OPS["concat"](values=[x, x], axis=1), torch.cat([t(x), t(x)], 1).numpy())
    parts = OPS["split"](x=x, axis=2, split_sizes=np.array([1, 3]))
    for p, q in zip(parts, torch.split(t(x), [1, 3], 2), strict=True):
        np.testing.assert_array_equal(p, q.numpy())
    assert len(OPS["split"](x=x, axis=2, num_splits=2)) == 2
    np.testing.assert_array_equal(OPS["tile"](x=x, reps=np.array([1, 2, 1])), t(x).repeat(1, 2, 1).numpy())
    np.testing.assert_array_equal(OPS["shape"](x=x), [2, 3, 4])
    np.testing.assert_array_equal(OPS["range_1d"](start=1, end=7, step=2), torch.arange(1, 7, 2).numpy())
    np.testing.assert_array_equal(OPS["fill"](shape=np.array([2, 2]), value=3.0), np.full((2, 2), 3.0))


def test_slices():
    x = r(4, 6, 5)
    out = OPS["slice_by_index"](
        x=x, begin=np.array([1, 0, 2]), end=np.array([3, 0, 5]), stride=np.array([1, 2, 1]),
        begin_mask=np.array([False, True, False]), end_mask=np.array([False, True, False]),
        squeeze_mask=np.array([False, False, False]),
    )  # fmt: skip
    np.testing.assert_array_equal(out, t(x)[1:3, ::2, 2:5].numpy())
    sq = OPS["slice_by_index"](x=x, begin=np.array([2, 0, 0]), end=np.array([3, 6, 5]),
                               squeeze_mask=np.array([True, False, False]))  # fmt: skip
    np.testing.assert_array_equal(sq, x[2])
    np.testing.assert_array_equal(
        OPS["slice_by_size"](x=x, begin=[1, 2, 0], size=[2, -1, 3]), x[1:3, 2:, 0:3]
    )


def test_gather_scatter():
    x = r(5, 3)
    idx = np.array([4, 0, -1], np.int32)
    np.testing.assert_array_equal(OPS["gather"](x=x, indices=idx, axis=0), x[[4, 0, 4]])
    with pytest.raises(IndexError):
        OPS["gather"](x=x, indices=np.array([5], np.int32), axis=0)
    ind = RNG.integers(0, 3, (5, 2)).astype(np.int32)
    np.testing.assert_array_equal(
        OPS["gather_along_axis"](x=x, indices=ind, axis=1), torch.gather(t(x), 1, t(ind).long()).numpy()
    )
    data, upd = r(1, 2, 8, 4), r(1, 2, 3, 4)
    pos = np.array([5, 6, 7], np.int32)
    ref = t(data).index_copy(2, t(pos).long(), t(upd)).numpy()
    np.testing.assert_array_equal(
        OPS["scatter"](data=data, indices=pos, updates=upd, axis=2, mode="update"), ref
    )
    added = OPS["scatter"](data=data, indices=pos, updates=upd, axis=2, mode="add")
    np.testing.assert_allclose(added, t(data).index_add(2, t(pos).long(), t(upd)).numpy(), rtol=1e-6)


def test_band_part_cumsum_softmax_reduce():
    x = r(2, 5, 5)
    np.testing.assert_array_equal(OPS["band_part"](x=x, lower=-1, upper=0), torch.tril(t(x)).numpy())
    np.testing.assert_array_equal(OPS["band_part"](x=x, lower=0, upper=-1), torch.triu(t(x)).numpy())
    np.testing.assert_allclose(
        OPS["cumsum"](x=x, axis=-1), torch.cumsum(t(x), -1).numpy(), rtol=1e-5, atol=1e-6
    )
    rev = OPS["cumsum"](x=x, axis=1, exclusive=True, reverse=True)
    ref = torch.flip(torch.cumsum(torch.flip(t(x), [1]), 1), [1]) - t(x)
    np.testing.assert_allclose(rev, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        OPS["softmax"](x=x, axis=-1), torch.softmax(t(x), -1).numpy(), rtol=1e-5, atol=1e-7
    )
    for name, fn in (("reduce_mean", torch.mean), ("reduce_sum", torch.sum), ("reduce_max", torch.amax),
                     ("reduce_min", torch.amin), ("reduce_prod", torch.prod)):  # fmt: skip
        np.testing.assert_allclose(
            OPS[name](x=x, axes=np.array([-1]), keep_dims=True), fn(t(x), -1, keepdim=True).numpy(), rtol=1e-5
        )
    assert OPS["reduce_argmax"](x=x, axis=-1).tolist() == torch.argmax(t(x), -1).tolist()


def test_layer_norm_matmul_linear():
    x, g, b = r(3, 8), r(8), r(8)
    np.testing.assert_allclose(
        OPS["layer_norm"](x=x, axes=np.array([-1]), gamma=g, beta=b, epsilon=1e-6),
        F.layer_norm(t(x), (8,), t(g), t(b), 1e-6).numpy(), rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    a, w = r(2, 3, 4), r(2, 5, 4)
    np.testing.assert_allclose(
        OPS["matmul"](x=a, y=w, transpose_y=True), (t(a) @ t(w).transpose(-1, -2)).numpy(), rtol=1e-5
    )
    np.testing.assert_allclose(
        OPS["matmul"](x=a.swapaxes(-1, -2), y=a.swapaxes(-1, -2), transpose_x=True),
        (t(a) @ t(a).transpose(-1, -2)).numpy(), rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    wt, bias = r(6, 4), r(6)
    np.testing.assert_allclose(
        OPS["linear"](x=a, weight=wt, bias=bias), F.linear(t(a), t(wt), t(bias)).numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("groups,pad", [(1, "valid"), (6, "valid"), (3, "custom"), (6, "same")])
def test_conv1d(groups, pad):
    x, w = r(1, 6, 9), r(6, 6 // groups, 3)
    padding = {"valid": 0, "custom": (1, 2), "same": "same"}[pad]
    if pad == "custom":
        ref = F.conv1d(F.pad(t(x), (1, 2)), t(w), groups=groups)
    else:
        ref = F.conv1d(t(x), t(w), groups=groups, padding=padding)
    out = OPS["conv"](x=x, weight=w, pad_type=pad, pad=np.array([1, 2]), groups=groups,
                      strides=np.array([1]), dilations=np.array([1]))  # fmt: skip
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_constexpr_blockwise_matches_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    data = RNG.integers(-8, 8, (6, 64)).astype(np.int8)
    scale = np.abs(r(6, 2)).astype(np.float16)
    offset = RNG.integers(-2, 2, (6, 2)).astype(np.int8)
    ref = constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    out = OPS["constexpr_blockwise_shift_scale"](data=data, scale=scale, offset=offset)
    np.testing.assert_allclose(out.astype(np.float16), ref, rtol=1e-3)


def test_constexpr_lut_and_affine():
    from coremltools.optimize._utils import lut_to_dense

    idx = RNG.integers(0, 4, (6, 2)).astype(np.uint8)
    lut = r(2, 1, 4, 1).astype(np.float16)
    np.testing.assert_array_equal(
        OPS["constexpr_lut_to_dense"](indices=idx, lut=lut), lut_to_dense(idx, lut, None)
    )
    q = RNG.integers(-128, 127, (4, 3)).astype(np.int8)
    zp, sc = np.array([1, -2, 0, 3], np.int8), np.abs(r(4))
    np.testing.assert_allclose(
        OPS["constexpr_affine_dequantize"](quantized_data=q, zero_point=zp, scale=sc, axis=0),
        (q.astype(np.float32) - zp[:, None]) * sc[:, None], rtol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize(
    "nbits,signed", [(4, True), (4, False), (1, False), (2, False), (3, False), (6, False)]
)
def test_unpack_bits_matches_coremltools_packing(nbits, signed):
    from coremltools.optimize._utils import pack_elements_into_bits

    low, high = (-(1 << (nbits - 1)), 1 << (nbits - 1)) if signed else (0, 1 << nbits)
    values = RNG.integers(low, high, 37).astype(np.int8 if signed else np.uint8)
    packed = pack_elements_into_bits(values, nbits)
    np.testing.assert_array_equal(unpack_bits(packed, nbits, 37, signed), values)


def test_blob_file_matches_coremltools_writer(tmp_path):
    from coremltools.libmilstoragepython import _BlobStorageWriter
    from coremltools.proto import MIL_pb2

    path = tmp_path / "weight.bin"
    writer = _BlobStorageWriter(str(path))
    a16, a8 = r(3, 4).astype(np.float16), RNG.integers(-100, 100, 10).astype(np.int8)
    off16 = writer.write_fp16_data(a16.ravel().view(np.uint16))
    off8 = writer.write_int8_data(a8)
    del writer
    blob = BlobFile(path)
    np.testing.assert_array_equal(blob.read(off16, MIL_pb2.FLOAT16, (3, 4)), a16)
    np.testing.assert_array_equal(blob.read(off8, MIL_pb2.INT8, (10,)), a8)


def _tiny_program(tmp_path, build, inputs, precision):
    """Build a MIL program with the coremltools builder, save it, and load it in the executor."""
    import coremltools as ct

    model = ct.convert(build, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                       convert_to="mlprogram", skip_model_load=True)  # fmt: skip
    model.save(str(tmp_path / "m.mlpackage"))
    return ex.MILProgram(tmp_path / "m.mlpackage")


def test_fp16_program_rounds_every_op(tmp_path):
    """An fp16 program computes in fp16 (rounded per op); the same program at fp32 does not."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.add(x=mb.mul(x=x, y=np.float32(3.0)), y=np.float32(1e-4), name="out")

    x = np.array([1.0001, 2.0, 2049.0, 0.1], np.float32)
    fn16 = _tiny_program(tmp_path, prog, x, ct.precision.FLOAT16).function()
    out16 = fn16({"x": x}, {})
    ref16 = (torch.from_numpy(x).half() * 3 + torch.tensor(1e-4).half()).numpy()
    np.testing.assert_array_equal(np.asarray(list(out16.values())[0], np.float16), ref16)


def test_state_ops_and_unsupported_op(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(
        input_specs=[mb.StateTensorSpec((2,), dtype=types.fp16), mb.TensorSpec((2,), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(acc, x):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.mul(x=total, y=np.float16(2.0), name="out")

    program = _tiny_program(tmp_path, prog, None, ct.precision.FLOAT16)
    fn = program.function()
    states = program.new_states()
    assert list(states) == ["acc"] and states["acc"].dtype == np.float16
    for _step in range(3):
        out = fn({"x": np.array([1.0, 0.5], np.float16)}, states)
    np.testing.assert_array_equal(states["acc"], [3.0, 1.5])
    np.testing.assert_array_equal(list(out.values())[0], [6.0, 3.0])
    op = program.package.program.functions["main"].block_specializations["CoreML8"].operations
    target = next(o for o in op if o.type == "mul")
    target.type = "no_such_op"
    with pytest.raises(ex.UnsupportedOpError, match="no_such_op"):
        ex.MILFunction(program.package, "main", program.package.program.functions["main"])
