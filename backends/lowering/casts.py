"""Lowering rules: Cast, CastLike and BitCast (float8 casts coded on the bits)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
from tvm import relax, topi

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering.elementwise import _round_half_even, _s
from graphopt.backends.lowering.rules import OpRule

R = relax.op


# Small float formats, coded on the bits (TVM's own float8 casts mishandle zero, NaN and overflow).
# kind: "fn" (only S.1..1.1..1 is NaN, no inf), "ieee" (exponent all ones: inf/NaN), "fnuz" (no inf,
# no negative zero, 0x80 is the only NaN), "plain" (no inf, no NaN: float4e2m1).
_Fmt = collections.namedtuple("_Fmt", "nbits ebits mbits bias max_code overflow_code nan_code kind")
_FLOAT8 = {
    "float8_e4m3fn": _Fmt(8, 4, 3, 7, 0x7E, 0x7F, 0x7F, "fn"),  # no inf: overflow is NaN
    "float8_e5m2": _Fmt(8, 5, 2, 15, 0x7B, 0x7C, 0x7E, "ieee"),  # overflow is +-inf
    "float8_e4m3fnuz": _Fmt(8, 4, 3, 8, 0x7F, 0x80, 0x80, "fnuz"),
    "float8_e5m2fnuz": _Fmt(8, 5, 2, 16, 0x7F, 0x80, 0x80, "fnuz"),
}
# float4e2m1 is held in Relax as uint8 codes (one value per byte); NaN becomes -0 as in ml_dtypes.
_CODED = {ir.DataType.FLOAT4E2M1: _Fmt(4, 2, 1, 1, 0x7, 0x7, 0x8, "plain")}


def _bits(ctx, x, dtype: str):
    return ctx.bb.emit_te(topi.reinterpret, x, dtype)


def _decode(ctx, b, f):
    """float32 values of int32 codes ``b`` in format ``f``: sign, exponent, mantissa, subnormals, specials."""
    i32 = lambda v: H.scalar(v, "int32")  # noqa: E731
    f32 = lambda v: H.scalar(v, "float32")  # noqa: E731
    sign = R.right_shift(b, i32(f.nbits - 1))
    e = ctx.emit(R.bitwise_and(R.right_shift(b, i32(f.mbits)), i32((1 << f.ebits) - 1)))
    m = ctx.emit(R.astype(R.bitwise_and(b, i32((1 << f.mbits) - 1)), "float32"))
    scale = R.power(f32(2.0), R.subtract(R.astype(e, "float32"), f32(f.bias)))
    normal = R.multiply(R.add(f32(1.0), R.divide(m, f32(1 << f.mbits))), scale)
    sub = R.multiply(m, f32(2.0 ** (1 - f.bias - f.mbits)))
    mag = ctx.emit(R.where(R.equal(e, i32(0)), sub, normal))
    signed = R.where(R.equal(sign, i32(1)), R.negative(mag), mag)
    magmask = (1 << (f.nbits - 1)) - 1
    if f.kind == "fnuz":
        return R.where(R.equal(b, i32(f.nan_code)), f32(np.nan), signed)
    if f.kind == "fn":
        return R.where(R.equal(R.bitwise_and(b, i32(magmask)), i32(magmask)), f32(np.nan), signed)
    if f.kind == "ieee":
        special = R.where(R.equal(m, f32(0.0)), f32(np.inf), f32(np.nan))
        special = R.where(R.equal(sign, i32(1)), R.negative(special), special)
        return R.where(R.equal(e, i32((1 << f.ebits) - 1)), special, signed)
    return signed


def _encode(ctx, x, f, saturate: bool):
    """uint8 codes of float ``x`` in format ``f``: round to nearest even, ONNX's ``saturate`` rule."""
    xf = x if H.dtype_of(x) == "float32" else ctx.emit(R.astype(x, "float32"))
    u32 = lambda v: H.scalar(v, "uint32")  # noqa: E731
    bits = ctx.emit(_bits(ctx, xf, "uint32"))
    absbits = ctx.emit(R.bitwise_and(bits, u32(0x7FFFFFFF)))
    a = ctx.emit(R.abs(xf))
    shift = 23 - f.mbits
    lsb = R.bitwise_and(R.right_shift(absbits, u32(shift)), u32(1))
    rounded = R.right_shift(R.add(R.add(absbits, u32((1 << (shift - 1)) - 1)), lsb), u32(shift))
    # rebias the exponent; values below the smallest normal are coded as subnormals
    normal = ctx.emit(R.subtract(rounded, u32((127 - f.bias) << f.mbits)))
    scaled = ctx.emit(R.multiply(a, H.scalar(2.0 ** (f.bias - 1 + f.mbits), "float32")))
    sub = R.astype(_round_half_even(scaled), "uint32")
    code = ctx.emit(R.where(R.less(a, H.scalar(2.0 ** (1 - f.bias), "float32")), sub, normal))
    too_big = R.logical_or(R.greater(code, u32(f.max_code)), R.isinf(xf))
    code = ctx.emit(R.where(too_big, u32(f.max_code if saturate else f.overflow_code), code))
    sign = R.left_shift(R.right_shift(bits, u32(31)), u32(f.nbits - 1))
    if f.kind == "fnuz":  # no negative zero, and no sign on the NaN code
        sign = R.where(R.logical_or(R.equal(code, u32(0)), R.equal(code, u32(f.nan_code))), u32(0), sign)
    code = R.where(R.isnan(xf), u32(f.nan_code), R.bitwise_or(code, sign))
    return ctx.emit(R.astype(code, "uint8"))


def _float8_to_float32(ctx, x):
    return _decode(ctx, ctx.emit(R.astype(_bits(ctx, x, "uint8"), "int32")), _FLOAT8[H.dtype_of(x)])


def _cast_to_float8(ctx, x, to: str):
    return _bits(ctx, _encode(ctx, x, _FLOAT8[to], bool(ctx.attr("saturate", 1))), to)


def _e8m0_to_float32(ctx, codes):
    """float8e8m0 (held as uint8 codes): 2**(code - 127), 0xFF is NaN."""
    c = ctx.emit(R.astype(codes, "float32"))
    value = R.power(H.scalar(2.0, "float32"), R.subtract(c, H.scalar(127.0, "float32")))
    return R.where(R.equal(codes, H.scalar(0xFF, "uint8")), H.scalar(np.nan, "float32"), value)


def _float32_to_e8m0(ctx, x):
    """The exponent of x, rounded per ``round_mode`` (up/down/nearest) from the float32 bits."""
    xf = x if H.dtype_of(x) == "float32" else ctx.emit(R.astype(x, "float32"))
    u32 = lambda v: H.scalar(v, "uint32")  # noqa: E731
    bits = ctx.emit(_bits(ctx, xf, "uint32"))
    e = ctx.emit(R.bitwise_and(R.right_shift(bits, u32(23)), u32(0xFF)))
    m = ctx.emit(R.bitwise_and(bits, u32(0x7FFFFF)))
    mode = ctx.attr("round_mode", "up")
    if mode == "up":
        bump = R.not_equal(m, u32(0))
    elif mode == "nearest":
        bump = R.greater_equal(m, u32(0x400000))
    else:
        bump = R.less(m, u32(0))  # never
    up = ctx.emit(R.add(e, R.astype(R.logical_and(bump, R.less(e, u32(0xFF))), "uint32")))
    limit = u32(0xFE) if ctx.attr("saturate", 1) else u32(0xFF)
    code = R.where(R.greater(up, u32(0xFE)), limit, up)
    code = R.where(R.isnan(xf), u32(0xFF), R.where(R.isinf(xf), limit, code))
    return R.astype(ctx.emit(code), "uint8")


_CODED_NAMES = {ir.DataType.FLOAT4E2M1, ir.DataType.FLOAT8E8M0}


def _coded_to_float32(ctx, x, src):
    if src == ir.DataType.FLOAT8E8M0:
        return ctx.emit(_e8m0_to_float32(ctx, x))
    return ctx.emit(_decode(ctx, ctx.emit(R.astype(x, "int32")), _CODED[src]))


def _float_to_coded(ctx, x, to):
    if to == ir.DataType.FLOAT8E8M0:
        return _float32_to_e8m0(ctx, x)
    return _encode(ctx, x, _CODED[to], True)


def _wrap_narrow(ctx, x, onnx_to):
    """Cast to a 4/2-bit integer (held in 8 bits): truncate toward zero, keep the low bits, sign-extend."""
    storage, bits, signed = H.NARROW_INTS[onnx_to]
    src = H.dtype_of(x)
    v = ctx.emit(R.astype(R.trunc(x) if H.is_float(src) else x, "int32"))
    i32 = lambda n: H.scalar(n, "int32")  # noqa: E731
    if signed:
        half = 1 << (bits - 1)
        v = R.subtract(R.bitwise_and(R.add(v, i32(half)), i32((1 << bits) - 1)), i32(half))
    else:
        v = R.bitwise_and(v, i32((1 << bits) - 1))
    return R.astype(ctx.emit(v), storage)


def _cast(ctx, x, to: str, onnx_to=None, onnx_src=None):
    onnx_to = None if onnx_to is None else ir.DataType(onnx_to)
    if onnx_src is not None and ir.DataType(onnx_src) in _CODED_NAMES:
        x = _coded_to_float32(ctx, x, ir.DataType(onnx_src))
        if to == "float32" and onnx_to not in _CODED_NAMES:
            return x
    if onnx_to in _CODED_NAMES:
        return _float_to_coded(ctx, x if H.is_float(H.dtype_of(x)) else ctx.emit(R.astype(x, "float32")), onnx_to)
    if onnx_to in H.NARROW_INTS:
        return _wrap_narrow(ctx, x, onnx_to)
    if to is None:
        ctx.unsupported("casts to this dtype are not supported by Relax")
    src = H.dtype_of(x)
    if to == src:
        return x
    if src in _FLOAT8:
        x = ctx.emit(_float8_to_float32(ctx, x))
        if to == "float32":
            return x
    if to == "bool":
        return R.not_equal(x, _s(x, 0))
    if to in _FLOAT8:
        if not H.is_float(H.dtype_of(x)):
            x = ctx.emit(R.astype(x, "float32"))
        return _cast_to_float8(ctx, x, to)
    return R.astype(x, to)


def lower_cast(ctx, ins):
    return _cast(ctx, ins[0], H.relax_dtype(ctx.attr("to")), ctx.attr("to"), ctx.node.inputs[0].dtype)


def lower_castlike(ctx, ins):
    return _cast(ctx, ins[0], H.dtype_of(ins[1]), ctx.node.inputs[1].dtype, ctx.node.inputs[0].dtype)


def lower_bitcast(ctx, ins):
    to = H.relax_dtype(ctx.attr("to"))
    src = H.dtype_of(ins[0])
    if to is None:
        ctx.unsupported(f"BitCast to {ctx.attr('to')} is not supported")
    if to == src:
        return ins[0]
    if "bool" in (to, src):  # a bool is one byte holding 0 or 1
        if {to, src} - {"bool", "int8", "uint8"}:
            ctx.unsupported(f"BitCast from {src} to {to}: bool is 8 bits wide")
        return R.astype(ins[0], to) if src == "bool" else R.not_equal(ins[0], H.scalar(0, src))
    return ctx.bb.emit_te(topi.reinterpret, ins[0], to)


RULES = (
    OpRule("Cast", lower_cast),
    OpRule("CastLike", lower_castlike, since=15),
    OpRule("BitCast", lower_bitcast, since=26),
)
