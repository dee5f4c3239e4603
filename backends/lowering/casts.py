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


# float8 formats (TVM's own float8 casts mishandle zero, NaN and overflow, so graphopt codes the bits).
# "fnuz" formats have no infinities and no negative zero; their only NaN is 0x80.
_F8 = collections.namedtuple("_F8", "ebits mbits bias max_code overflow_code nan_code fnuz")
_FLOAT8 = {
    "float8_e4m3fn": _F8(4, 3, 7, 0x7E, 0x7F, 0x7F, False),  # no inf: overflow is NaN
    "float8_e5m2": _F8(5, 2, 15, 0x7B, 0x7C, 0x7E, False),  # overflow is +-inf
    "float8_e4m3fnuz": _F8(4, 3, 8, 0x7F, 0x80, 0x80, True),
    "float8_e5m2fnuz": _F8(5, 2, 16, 0x7F, 0x80, 0x80, True),
}


def _bits(ctx, x, dtype: str):
    return ctx.bb.emit_te(topi.reinterpret, x, dtype)


def _float8_to_float32(ctx, x):
    """Decode float8 bits: sign, exponent, mantissa, with subnormals, inf and NaN."""
    f8 = _FLOAT8[H.dtype_of(x)]
    b = ctx.emit(R.astype(_bits(ctx, x, "uint8"), "int32"))
    i32 = lambda v: H.scalar(v, "int32")  # noqa: E731
    f32 = lambda v: H.scalar(v, "float32")  # noqa: E731
    sign = R.right_shift(b, i32(7))
    e = ctx.emit(R.bitwise_and(R.right_shift(b, i32(f8.mbits)), i32((1 << f8.ebits) - 1)))
    m = ctx.emit(R.astype(R.bitwise_and(b, i32((1 << f8.mbits) - 1)), "float32"))
    ef = R.astype(e, "float32")
    scale = R.power(f32(2.0), R.subtract(ef, f32(f8.bias)))
    normal = R.multiply(R.add(f32(1.0), R.divide(m, f32(1 << f8.mbits))), scale)
    sub = R.multiply(m, f32(2.0 ** (1 - f8.bias - f8.mbits)))
    mag = ctx.emit(R.where(R.equal(e, i32(0)), sub, normal))
    if f8.fnuz:  # 0x80 is the NaN
        return R.where(R.equal(b, i32(0x80)), f32(np.nan), R.where(R.equal(sign, i32(1)), R.negative(mag), mag))
    if f8.ebits == 4:  # e4m3fn: only S.1111.111 is NaN
        mag = R.where(R.equal(R.bitwise_and(b, i32(0x7F)), i32(0x7F)), f32(np.nan), mag)
    else:  # e5m2: exponent all ones is inf (mantissa 0) or NaN
        special = R.where(R.equal(m, f32(0.0)), f32(np.inf), f32(np.nan))
        mag = R.where(R.equal(e, i32((1 << f8.ebits) - 1)), special, mag)
    return R.where(R.equal(sign, i32(1)), R.negative(mag), mag)


def _cast_to_float8(ctx, x, to: str):
    """Round-to-nearest-even float32 -> float8 on the bits, with ONNX's ``saturate`` rule."""
    f8 = _FLOAT8[to]
    xf = x if H.dtype_of(x) == "float32" else ctx.emit(R.astype(x, "float32"))
    u32 = lambda v: H.scalar(v, "uint32")  # noqa: E731
    bits = ctx.emit(_bits(ctx, xf, "uint32"))
    absbits = ctx.emit(R.bitwise_and(bits, u32(0x7FFFFFFF)))
    a = ctx.emit(R.abs(xf))
    shift = 23 - f8.mbits
    lsb = R.bitwise_and(R.right_shift(absbits, u32(shift)), u32(1))
    rounded = R.right_shift(R.add(R.add(absbits, u32((1 << (shift - 1)) - 1)), lsb), u32(shift))
    # rebias the exponent; values below the smallest normal are coded as subnormals
    normal = ctx.emit(R.subtract(rounded, u32((127 - f8.bias) << f8.mbits)))
    scaled = ctx.emit(R.multiply(a, H.scalar(2.0 ** (f8.bias - 1 + f8.mbits), "float32")))
    sub = R.astype(_round_half_even(scaled), "uint32")
    code = ctx.emit(R.where(R.less(a, H.scalar(2.0 ** (1 - f8.bias), "float32")), sub, normal))
    too_big = R.logical_or(R.greater(code, u32(f8.max_code)), R.isinf(xf))
    code = R.where(too_big, u32(f8.max_code if ctx.attr("saturate", 1) else f8.overflow_code), code)
    code = ctx.emit(code)
    sign = R.left_shift(R.right_shift(bits, u32(31)), u32(7))
    if f8.fnuz:  # no negative zero, and no sign on the NaN code
        sign = R.where(R.logical_or(R.equal(code, u32(0)), R.equal(code, u32(0x80))), u32(0), sign)
    code = R.where(R.isnan(xf), u32(f8.nan_code), R.bitwise_or(code, sign))
    out = ctx.emit(R.astype(code, "uint8"))
    return _bits(ctx, out, to)


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


def _cast(ctx, x, to: str, onnx_to=None):
    if onnx_to is not None and ir.DataType(onnx_to) in H.NARROW_INTS:
        return _wrap_narrow(ctx, x, ir.DataType(onnx_to))
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
    return _cast(ctx, ins[0], H.relax_dtype(ctx.attr("to")), ctx.attr("to"))


def lower_castlike(ctx, ins):
    return _cast(ctx, ins[0], H.dtype_of(ins[1]), ctx.node.inputs[1].dtype)


def lower_bitcast(ctx, ins):
    to = H.relax_dtype(ctx.attr("to"))
    src = H.dtype_of(ins[0])
    if to is None or "bool" in (to, src):
        ctx.unsupported(f"BitCast from {src} to {to or ctx.attr('to')} is not supported")
    if to == src:
        return ins[0]
    return ctx.bb.emit_te(topi.reinterpret, ins[0], to)


RULES = (
    OpRule("Cast", lower_cast),
    OpRule("CastLike", lower_castlike, since=15),
    OpRule("BitCast", lower_bitcast, since=26),
)
