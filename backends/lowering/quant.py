"""Lowering rules: quantized ops (QuantizeLinear, DequantizeLinear, integer conv/matmul, QLinear*).

Integer products accumulate in int32 exactly as the specification says; requantization rounds half to
even (Relax ``round``) and saturates to the output type's range.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import casts, helpers, nn
from graphopt.backends.lowering.helpers import scalar
from graphopt.backends.lowering.rules import OpRule

op = relax.op

_QUANT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32")
# ONNX TensorProto codes of the integer types QuantizeLinear can produce here (``output_dtype``).
_ONNX_CODES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 12: "uint32"}


_FLOAT8_MAX = {"float8_e4m3fn": 448.0, "float8_e4m3fnuz": 240.0, "float8_e5m2": 57344.0, "float8_e5m2fnuz": 57344.0}


def _small_float(ctx, i: int):
    """The small float format of input/output i ('in'/'out' prefixed index) held as codes, or None."""
    value = ctx.node.inputs[i[1]] if i[0] == "in" else ctx.node.outputs[i[1]]
    return casts._CODED.get(value.dtype) if value is not None else None


def _to_float32(ctx, x, coded) -> relax.Expr:
    """float32 values of a float8 tensor, or of small-float codes held as uint8 (TVM's float8 casts
    mishandle zero, so both go through the bit-level decoder of casts.py)."""
    if coded is not None:
        return ctx.emit(casts._decode(ctx, ctx.emit(op.astype(x, "int32")), coded))
    if helpers.dtype_of(x) in _FLOAT8_MAX:
        return ctx.emit(casts._float8_to_float32(ctx, x))
    return op.astype(x, "float32")


def _int_range(dtype: str, onnx_type=None) -> tuple[int, int]:
    """The value range of a quantized integer type (4- and 2-bit types are held in 8-bit storage)."""
    if onnx_type is not None and onnx_type in helpers.NARROW_INTS:
        _, bits, signed = helpers.NARROW_INTS[onnx_type]
        return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def _saturate(x: relax.Expr, dtype: str, onnx_type=None) -> relax.Expr:
    """Round half to even, clip to the type's range, cast."""
    lo, hi = _int_range(dtype, onnx_type)
    return op.astype(op.clip(op.round(x), float(lo), float(hi)), dtype)


def _along(ctx, param: relax.Expr, x_rank: int, x_shape, axis: int, block: int) -> relax.Expr:
    """A scale or zero point shaped to broadcast against x: scalar, per-axis (1-D) or blocked (same rank)."""
    prank = helpers.rank_of(param)
    if prank == 0 or prank is None:
        return param
    if prank == 1 and x_rank != 1 or prank == 1 and block == 0:
        return op.reshape(param, [-1 if i == axis else 1 for i in range(x_rank)]) if x_rank > 1 else param
    ctx.check(block > 0, "a scale of the input's rank needs block_size")
    pshape = helpers.static_shape(param)
    rep = op.repeat(param, block, axis=axis)
    if pshape[axis] * block != x_shape[axis]:
        rep = op.strided_slice(rep, axes=[axis], begin=[0], end=[x_shape[axis]])
    return rep


def _axis(ctx, rank: int) -> int:
    """The quantization axis (attribute ``axis``, default 1), non-negative; only used when a scale is 1-D."""
    axis = int(ctx.attr("axis", 1))
    return axis + rank if axis < 0 else axis


def _quantize_dtype(ctx, zero_point) -> str:
    if zero_point is not None:
        dtype = helpers.dtype_of(zero_point)
    else:
        code = int(ctx.attr("output_dtype", 0))
        dtype = _ONNX_CODES.get(code, "uint8") if code else "uint8"
        if code and code not in _ONNX_CODES:
            ctx.unsupported(f"output_dtype {code} (integer types int8..uint32 are supported)")
    ctx.check(dtype in _QUANT_DTYPES or dtype in _FLOAT8_MAX, lambda: f"quantized type {dtype} is not supported")
    return dtype


def _quantize_linear(ctx, inputs):
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    dtype = _quantize_dtype(ctx, zp)
    shape = helpers.static_shape(x)
    rank = len(shape)
    axis = _axis(ctx, rank)
    block = int(ctx.attr("block_size", 0))
    xf = x if helpers.dtype_of(x) == "float32" else op.astype(x, "float32")
    s = _along(ctx, scale, rank, shape, axis, block)
    if helpers.dtype_of(scale) != "float32":
        s = op.astype(s, "float32")
    coded = _small_float(ctx, ("out", 0))
    if dtype in _FLOAT8_MAX or coded is not None:  # float targets: encode with round-half-even on the bits
        y = op.divide(xf, s)
        if zp is not None:
            zf = _to_float32(ctx, zp, _small_float(ctx, ("in", 2)))
            y = op.add(y, _along(ctx, zf, rank, shape, axis, block))
        y = ctx.emit(y)
        if coded is not None:
            return casts._encode(ctx, y, coded, bool(ctx.attr("saturate", 1)))
        return casts._cast_to_float8(ctx, y, dtype)
    y = op.round(op.divide(xf, s))
    if zp is not None:
        y = op.add(y, op.astype(_along(ctx, zp, rank, shape, axis, block), "float32"))
    return _saturate(y, dtype, ctx.node.outputs[0].dtype)


def _dequantize_linear(ctx, inputs):
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    shape = helpers.static_shape(x)
    rank = len(shape)
    axis = _axis(ctx, rank)
    block = int(ctx.attr("block_size", 0))
    in_dtype = helpers.dtype_of(x)
    ctx.check(in_dtype in _QUANT_DTYPES or in_dtype in _FLOAT8_MAX, lambda: f"quantized type {in_dtype} is not supported")
    out_dtype = ctx.out_dtype(0) or helpers.dtype_of(scale)
    coded = _small_float(ctx, ("in", 0))
    if in_dtype in _FLOAT8_MAX or coded is not None:
        xf = _to_float32(ctx, x, coded)
        if zp is not None:
            zf = _to_float32(ctx, zp, _small_float(ctx, ("in", 2)))
            xf = op.subtract(xf, _along(ctx, zf, rank, shape, axis, block))
        y = op.multiply(xf, op.astype(_along(ctx, scale, rank, shape, axis, block), "float32"))
        return y if out_dtype == "float32" else op.astype(y, out_dtype)
    xi = op.astype(x, "int32") if in_dtype != "int32" else x
    if zp is not None:
        xi = op.subtract(xi, op.astype(_along(ctx, zp, rank, shape, axis, block), "int32"))
    s = _along(ctx, scale, rank, shape, axis, block)
    y = op.multiply(op.astype(xi, "float32"), op.astype(s, "float32"))
    return y if out_dtype == "float32" else op.astype(y, out_dtype)


def _dynamic_quantize_linear(ctx, inputs):
    """uint8 over [min(x, 0), max(x, 0)] as ONNX Runtime computes it: scale = range / 255, or 1 when the
    range is empty (x all zeros: a scale of 0 would make every value and the zero point NaN);
    zero point = saturate(round_half_even(0 - min / scale)); y = saturate(round_half_even(x / scale) + zp)."""
    x = inputs[0]
    zero = scalar(0.0, "float32")
    hi = ctx.emit(op.maximum(op.max(x), zero))
    lo = ctx.emit(op.minimum(op.min(x), zero))
    span = op.divide(op.subtract(hi, lo), scalar(255.0, "float32"))
    scale = ctx.emit(op.where(op.equal(hi, lo), scalar(1.0, "float32"), span))
    zp = ctx.emit(_saturate(op.subtract(zero, op.divide(lo, scale)), "uint8"))
    y = _saturate(op.add(op.round(op.divide(x, scale)), op.astype(zp, "float32")), "uint8")
    return [y, scale, zp]


def _minus_zero_point(x: relax.Expr, zp, per_row_axis: int | None = None, rank: int | None = None,
                      dtype: str = "int32") -> relax.Expr:
    """x - zp in ``dtype`` (int32, or float32: exact for 8-bit values); a 1-D zp of more than one value
    applies along ``per_row_axis``."""
    xi = op.astype(x, dtype)
    if zp is None:
        return xi
    z = op.astype(zp, dtype)
    zshape = helpers.static_shape(zp)
    if per_row_axis is not None and zshape and helpers.numel(zshape) > 1:
        z = op.reshape(z, [helpers.numel(zshape) if i == per_row_axis else 1 for i in range(rank)])
    return op.subtract(xi, z)


def _int_conv(ctx, x, x_zp, w, w_zp) -> relax.Expr:
    w_rank = helpers.rank_of(w)
    xi = ctx.emit(_minus_zero_point(x, x_zp))
    wi = ctx.emit(_minus_zero_point(w, w_zp, per_row_axis=0, rank=w_rank))
    return nn.conv(ctx, xi, wi, out_dtype="int32")


# float32 holds every integer of magnitude up to 2**24 exactly
_FLOAT32_EXACT = 1 << 24


def _centered_weight(ctx, b_index: int, b_zp_index: int) -> np.ndarray | None:
    """``b - b_zp`` (int64) when ``b`` and its zero point (scalar or one per column) are constants, else None."""
    b = ctx.const(b_index)
    zp = ctx.const(b_zp_index) if ctx.has_input(b_zp_index) else np.zeros((), np.int64)
    if b is None or zp is None or b.ndim < 2 or zp.size not in (1, b.shape[-1]) or b.dtype.kind not in "iu":
        return None
    return b.astype(np.int64) - zp.astype(np.int64).reshape(-1 if zp.size > 1 else ())


def _exact_in_float32(a, centered: np.ndarray | None) -> bool:
    """Whether a float32 matmul gives the int32 product exactly: the weight is constant (``centered``,
    ``b - b_zp``) and every partial sum stays an integer below 2**24 in magnitude, in any summation
    order. With 8-bit ``a``, |a - a_zp| <= 255, so the bound is 255 times the largest column sum of
    |b - b_zp|."""
    if helpers.dtype_of(a) not in ("uint8", "int8") or centered is None:
        return False
    return 255 * int(np.abs(centered).sum(axis=-2).max(initial=0)) < _FLOAT32_EXACT


def _int_matmul(ctx, a, a_zp, b, b_zp, exact_float: bool = False, centered: np.ndarray | None = None) -> relax.Expr:
    """The int32 product of (a - a_zp) and (b - b_zp); ``centered``: ``b - b_zp`` computed at compile time
    (a constant operand, as the VNNI rewrite ``schedules/int8_matmul.py`` reads it). With ``exact_float``
    (see ``_exact_in_float32``) it is computed as a float32 matmul, which the float matmul schedules
    serve, and converted back: the same integers."""
    a_rank, b_rank = helpers.rank_of(a), helpers.rank_of(b)
    dtype = "float32" if exact_float else "int32"
    ai = _minus_zero_point(a, a_zp, per_row_axis=a_rank - 2 if a_rank >= 2 else None, rank=a_rank, dtype=dtype)
    if centered is not None:
        bi = relax.const(centered.astype(dtype))
    else:
        bi = ctx.emit(_minus_zero_point(b, b_zp, per_row_axis=b_rank - 1, rank=b_rank, dtype=dtype))
    if exact_float:
        return op.astype(op.matmul(ctx.emit(ai), bi, out_dtype="float32"), "int32")
    return op.matmul(ctx.emit(ai), bi, out_dtype="int32")


def _optional(inputs, i):
    return inputs[i] if len(inputs) > i else None


def _conv_integer(ctx, inputs):
    return _int_conv(ctx, inputs[0], _optional(inputs, 2), inputs[1], _optional(inputs, 3))


def _matmul_integer(ctx, inputs):
    centered = _centered_weight(ctx, 1, 3)
    return _int_matmul(ctx, inputs[0], _optional(inputs, 2), inputs[1], _optional(inputs, 3),
                       exact_float=_exact_in_float32(inputs[0], centered), centered=centered)


def _requantize(ctx, acc, multiplier, y_zp, out_dtype):
    y = op.multiply(op.astype(acc, "float32"), multiplier)
    if y_zp is not None:
        y = op.add(y, op.astype(y_zp, "float32"))
    return _saturate(y, out_dtype)


def _f32(e):
    return e if helpers.dtype_of(e) == "float32" else op.astype(e, "float32")


def _qlinear_matmul(ctx, inputs):
    a, a_s, a_zp, b, b_s, b_zp, y_s = inputs[:7]
    y_zp = _optional(inputs, 7)
    acc = ctx.emit(_int_matmul(ctx, a, a_zp, b, b_zp))
    b_rank = helpers.rank_of(b)
    bs = _f32(b_s)
    if helpers.rank_of(b_s) == 1 and helpers.numel(helpers.static_shape(b_s)) > 1:
        bs = op.reshape(bs, [1] * (b_rank - 1) + [helpers.numel(helpers.static_shape(b_s))])
    mult = op.divide(op.multiply(_f32(a_s), bs), _f32(y_s))
    out_dtype = helpers.dtype_of(y_zp) if y_zp is not None else helpers.dtype_of(a)
    return _requantize(ctx, acc, mult, y_zp, out_dtype)


def _qlinear_conv(ctx, inputs):
    x, x_s, x_zp, w, w_s, w_zp, y_s = inputs[:7]
    y_zp = _optional(inputs, 7)
    bias = _optional(inputs, 8)
    acc = _int_conv(ctx, x, x_zp, w, w_zp)
    rank = helpers.rank_of(x)
    if bias is not None:
        acc = op.add(acc, op.expand_dims(op.astype(bias, "int32"), [0] + list(range(2, rank))))
    acc = ctx.emit(acc)
    ws = _f32(w_s)
    if helpers.rank_of(w_s) == 1 and helpers.numel(helpers.static_shape(w_s)) > 1:
        ws = op.expand_dims(ws, [0] + list(range(2, rank)))
    mult = op.divide(op.multiply(_f32(x_s), ws), _f32(y_s))
    out_dtype = helpers.dtype_of(y_zp) if y_zp is not None else helpers.dtype_of(x)
    return _requantize(ctx, acc, mult, y_zp, out_dtype)


RULES = (
    OpRule("QuantizeLinear", _quantize_linear, since=10, kind="decomposed"),
    OpRule("DequantizeLinear", _dequantize_linear, since=10, kind="decomposed"),
    OpRule("DynamicQuantizeLinear", _dynamic_quantize_linear, since=11, kind="decomposed"),
    OpRule("ConvInteger", _conv_integer, since=10, kind="decomposed"),
    OpRule("MatMulInteger", _matmul_integer, since=10, kind="decomposed"),
    OpRule("QLinearMatMul", _qlinear_matmul, since=10, kind="decomposed"),
    OpRule("QLinearConv", _qlinear_conv, since=10, kind="decomposed"),
)
