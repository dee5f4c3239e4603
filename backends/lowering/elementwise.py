"""Lowering rules: elementwise ops (unary math, activations, broadcasting binary ops, casts, constants)."""

from __future__ import annotations

import math

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers as H
from graphopt.backends.lowering import nan_minmax as NM
from graphopt.backends.lowering.rules import OpRule

R = relax.op


def _s(x, value):
    """A scalar constant of x's dtype."""
    return H.scalar(value, H.dtype_of(x))


# ------------------------------------------------------------------ unary ops


def _round_half_even(x):
    f = R.floor(x)
    d = R.subtract(x, f)
    half = _s(x, 0.5)
    f_even = R.equal(R.floor_mod(f, _s(x, 2.0)), _s(x, 0.0))
    tie = R.where(f_even, f, R.add(f, _s(x, 1.0)))
    return R.where(R.greater(d, half), R.add(f, _s(x, 1.0)), R.where(R.less(d, half), f, tie))


def _sign(x):
    if H.is_unsigned(H.dtype_of(x)):
        return R.astype(R.greater(x, _s(x, 0)), H.dtype_of(x))
    return R.sign(x)


def _abs(x):
    return x if H.is_unsigned(H.dtype_of(x)) else R.abs(x)


def _softplus(x):
    return R.log(R.add(R.exp(x), _s(x, 1.0)))


_UNARY = {
    "Abs": _abs,
    "Neg": R.negative,
    "Exp": R.exp,
    "Log": R.log,
    "Sqrt": R.sqrt,
    "Reciprocal": lambda x: R.divide(_s(x, 1.0), x),
    "Sin": R.sin, "Cos": R.cos, "Tan": R.tan,
    "Asin": R.asin, "Acos": R.acos, "Atan": R.atan,
    "Sinh": R.sinh, "Cosh": R.cosh, "Tanh": R.tanh,
    "Asinh": R.asinh, "Acosh": R.acosh, "Atanh": R.atanh,
    "Erf": R.erf,
    "Sign": _sign,
    "Floor": R.floor,
    "Ceil": R.ceil,
    "Round": _round_half_even,
    "IsNaN": R.isnan,
    "Not": R.logical_not,
    "BitwiseNot": R.bitwise_not,
    "Relu": NM.relu,
    "Sigmoid": R.sigmoid,
    "Softplus": _softplus,
    "Softsign": lambda x: R.divide(x, R.add(R.abs(x), _s(x, 1.0))),
    "Mish": lambda x: R.multiply(x, R.tanh(_softplus(x))),
    "Identity": lambda x: x,
}


def _f32_for_bf16(lower):
    """Compute a bfloat16 op in float32 and round once at the end (as ONNX Runtime does)."""

    def wrapped(ctx, ins):
        if not ins or ins[0] is None or H.dtype_of(ins[0]) != "bfloat16":
            return lower(ctx, ins)
        up = [ctx.emit(R.astype(x, "float32")) if x is not None and H.dtype_of(x) == "bfloat16" else x for x in ins]
        out = ctx.emit(lower(ctx, up))
        return R.astype(out, "bfloat16") if H.dtype_of(out) == "float32" else out

    return wrapped


def _unary(fn):
    return _f32_for_bf16(lambda ctx, ins: fn(ins[0]))


def lower_leaky_relu(ctx, ins):
    x = ins[0]
    return R.where(R.less(x, _s(x, 0)), R.multiply(x, _s(x, ctx.attr("alpha", 0.01))), x)


def lower_elu(ctx, ins):
    x = ins[0]
    alpha = ctx.attr("alpha", 1.0)
    neg = R.multiply(_s(x, alpha), R.subtract(R.exp(x), _s(x, 1.0)))
    return R.where(R.less(x, _s(x, 0)), neg, x)


def lower_selu(ctx, ins):
    x = ins[0]
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    neg = R.multiply(_s(x, alpha), R.subtract(R.exp(x), _s(x, 1.0)))
    return R.multiply(_s(x, gamma), R.where(R.greater(x, _s(x, 0)), x, neg))


def lower_celu(ctx, ins):
    x = ins[0]
    alpha = ctx.attr("alpha", 1.0)
    neg = R.multiply(_s(x, alpha), R.subtract(R.exp(R.divide(x, _s(x, alpha))), _s(x, 1.0)))
    return R.add(NM.relu(x), R.minimum(_s(x, 0), neg))


def hard_sigmoid(x, alpha, beta):
    """max(0, min(1, alpha·x + beta)), NaN kept."""
    y = R.add(R.multiply(x, _s(x, alpha)), _s(x, beta))
    return NM.clip(y, _s(x, 0.0), _s(x, 1.0))


def lower_hard_sigmoid(ctx, ins):
    return hard_sigmoid(ins[0], ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5))


def lower_hard_swish(ctx, ins):
    return R.multiply(ins[0], hard_sigmoid(ins[0], 1.0 / 6.0, 0.5))


def lower_thresholded_relu(ctx, ins):
    x = ins[0]
    return R.where(R.greater(x, _s(x, ctx.attr("alpha", 1.0))), x, _s(x, 0))


def lower_prelu(ctx, ins):
    x, slope = ins
    return R.where(R.less(x, _s(x, 0)), R.multiply(x, slope), x)


def lower_gelu(ctx, ins):
    x = ins[0]
    if ctx.attr("approximate", "none") == "tanh":
        inner = R.multiply(
            _s(x, math.sqrt(2.0 / math.pi)), R.add(x, R.multiply(_s(x, 0.044715), R.multiply(x, R.multiply(x, x))))
        )
        return R.multiply(R.multiply(_s(x, 0.5), x), R.add(_s(x, 1.0), R.tanh(inner)))
    return R.multiply(R.multiply(_s(x, 0.5), x), R.add(_s(x, 1.0), R.erf(R.multiply(x, _s(x, 1 / math.sqrt(2))))))


def _swish(x, alpha):
    return R.multiply(x, R.sigmoid(R.multiply(x, _s(x, alpha))))


def lower_swish(ctx, ins):
    return _swish(ins[0], ctx.attr("alpha", 1.0))


def lower_swiglu(ctx, ins):
    return R.multiply(_swish(ins[0], ctx.attr("alpha", 1.0)), ins[1])


def lower_shrink(ctx, ins):
    x = ins[0]
    lambd, bias = ctx.attr("lambd", 0.5), ctx.attr("bias", 0.0)
    return R.where(
        R.less(x, _s(x, -lambd)),
        R.add(x, _s(x, bias)),
        R.where(R.greater(x, _s(x, lambd)), R.subtract(x, _s(x, bias)), _s(x, 0)),
    )


def lower_isinf(ctx, ins):
    x = ins[0]
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    if pos and neg:
        return R.isinf(x)
    if pos:
        return R.equal(x, _s(x, np.inf))
    if neg:
        return R.equal(x, _s(x, -np.inf))
    return H.full(H.dims_of(x), False, "bool")


def lower_clip_6(ctx, ins):
    x = ins[0]
    lo = ctx.attr("min", float(np.finfo(np.float32).min))
    hi = ctx.attr("max", float(np.finfo(np.float32).max))
    return NM.clip(x, _s(x, lo), _s(x, hi))


def _type_bound(x, high: bool):
    """The bound of an omitted Clip input: the dtype's largest / lowest finite value (ONNX's default,
    and ORT clamps ±inf to it), or nothing to do for an integer input."""
    dtype = H.dtype_of(x)
    if not H.is_float(dtype):
        return None
    import ml_dtypes

    info = ml_dtypes.finfo(H.numpy_dtype(dtype))
    return _s(x, float(info.max if high else info.min))


def lower_clip_11(ctx, ins):
    """NaN is kept and a NaN bound ignored (ORT: ``x < lo ? lo : x``); an omitted bound is the
    dtype's finite limit, so ±inf become ±FLT_MAX as in ORT."""
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else _type_bound(x, high=False)
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else _type_bound(x, high=True)
    out = x if lo is None else NM.clip_low(x, lo)
    return out if hi is None else NM.clip_high(out, hi)


# ------------------------------------------------------------------ binary ops


def _div(a, b):
    dtype = H.dtype_of(a)
    if H.is_int(dtype):  # ONNX integer division truncates toward zero; Relax divide floors
        q = R.floor_divide(a, b)
        if H.is_unsigned(dtype):
            return q
        r = R.subtract(a, R.multiply(q, b))
        fix = R.logical_and(R.not_equal(r, _s(a, 0)), R.logical_xor(R.less(a, _s(a, 0)), R.less(b, _s(b, 0))))
        return R.add(q, R.astype(fix, dtype))
    return R.divide(a, b)


def lower_pow(ctx, ins):
    base, exp = ins
    bt, et = H.dtype_of(base), H.dtype_of(exp)
    if H.is_float(bt):
        return R.power(base, exp if et == bt else R.astype(exp, bt))
    # integer base: compute in float64, round back
    res = R.power(R.astype(base, "float64"), R.astype(exp, "float64"))
    return R.astype(R.round(res), bt)


def lower_mod(ctx, ins):
    a, b = ins
    dtype = H.dtype_of(a)
    if H.is_float(dtype):
        r = ctx.emit(R.mod(a, b))  # C fmod: the sign of the dividend
        if ctx.attr("fmod", 0) == 1:
            return r
        # Python mod: the sign of the divisor (also right for infinite divisors)
        wrong = R.logical_and(R.not_equal(r, _s(r, 0)), R.logical_xor(R.less(r, _s(r, 0)), R.less(b, _s(b, 0))))
        return R.where(wrong, R.add(r, b), r)
    if ctx.attr("fmod", 0) == 1:
        return R.subtract(a, R.multiply(_div(a, b), b))
    return R.floor_mod(a, b)


def lower_bitshift(ctx, ins):
    a, b = ins
    dtype = H.dtype_of(a)
    width = int("".join(c for c in dtype if c.isdigit()))
    out = R.left_shift(a, b) if ctx.attr("direction") == "LEFT" else R.right_shift(a, b)
    # a shift count outside [0, width) shifts every bit out (a negative count reads as a huge unsigned one)
    big = R.greater_equal(b, _s(b, width))
    if not H.is_unsigned(dtype):
        big = R.logical_or(big, R.less(b, _s(b, 0)))
    fill = _s(a, 0)
    if ctx.attr("direction") != "LEFT" and not H.is_unsigned(dtype):
        fill = R.where(R.less(a, _s(a, 0)), _s(a, -1), _s(a, 0))
    return R.where(big, fill, out)


_BINARY = {
    "Add": R.add,
    "Sub": R.subtract,
    "Mul": R.multiply,
    "Div": _div,
    "Equal": R.equal,
    "Less": R.less,
    "Greater": R.greater,
    "LessOrEqual": R.less_equal,
    "GreaterOrEqual": R.greater_equal,
    "And": R.logical_and,
    "Or": R.logical_or,
    "Xor": R.logical_xor,
    "BitwiseAnd": R.bitwise_and,
    "BitwiseOr": R.bitwise_or,
    "BitwiseXor": R.bitwise_xor,
}


def _binary(fn):
    return lambda ctx, ins: fn(ins[0], ins[1])


def _variadic(fn):
    def lower(ctx, ins):
        out = ins[0]
        for x in ins[1:]:
            out = fn(ctx.emit(out) if out is not ins[0] else out, x)
        return out

    return lower


def lower_mean(ctx, ins):
    total = _variadic(R.add)(ctx, ins)
    return R.divide(total, _s(ins[0], len(ins)))


def lower_where(ctx, ins):
    return R.where(ins[0], ins[1], ins[2])


# ------------------------------------------------------------------ constants


def lower_dropout(ctx, ins):
    """Inference Dropout: the identity (and an all-true mask). Training mode draws random numbers."""
    if ctx.has_input(2):
        training = ctx.require_const(2, "training_mode")
        ratio = ctx.require_const(1, "ratio") if ctx.has_input(1) else np.array(0.5)
        if bool(np.asarray(training).reshape(-1)[0]) and float(np.asarray(ratio).reshape(-1)[0]) != 0.0:
            ctx.unsupported("training-mode Dropout (random masks) is not supported; graphopt compiles inference")
    x = ins[0]
    out = [x]
    if ctx.num_outputs > 1:
        out.append(H.full(H.dims_of(x), True, "bool"))
    return out


def constant_value(ctx) -> np.ndarray:
    """The numpy value of a Constant node's value_* attribute."""
    for name, conv in (
        ("value", np.asarray),
        ("value_float", lambda v: np.array(v, np.float32)),
        ("value_floats", lambda v: np.array(v, np.float32)),
        ("value_int", lambda v: np.array(v, np.int64)),
        ("value_ints", lambda v: np.array(v, np.int64)),
    ):
        v = ctx.attr(name)
        if v is not None:
            return conv(v)
    ctx.unsupported("only value, value_float(s) and value_int(s) constants are supported")


def lower_constant(ctx, ins):
    arr = constant_value(ctx)
    if arr.dtype.kind in "OSU":
        ctx.unsupported("string constants are not supported by Relax")
    return H.const(arr, H.numpy_dtype(str(arr.dtype)).name if arr.dtype != np.bool_ else "bool")


def lower_constant_of_shape(ctx, ins):
    shape = [int(v) for v in ctx.require_const(0, "shape").reshape(-1)]
    value = ctx.attr("value")
    arr = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dtype = "bool" if arr.dtype == np.bool_ else str(arr.dtype)
    return H.full(shape, arr.reshape(()), dtype)


def lower_range(ctx, ins):
    start, limit, delta = (ctx.require_const(i, name) for i, name in enumerate(("start", "limit", "delta")))
    arr = np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)
    return H.const(arr, str(start.dtype))


def _ops(table, wrap, since=1):
    return tuple(OpRule(op, wrap(fn), since=since) for op, fn in table.items())


RULES = (
    *_ops(_UNARY, _unary),
    *_ops(_BINARY, _binary),
    OpRule("Pow", lower_pow),
    OpRule("Mod", lower_mod, since=10),
    OpRule("BitShift", lower_bitshift, since=11),
    OpRule("Max", _variadic(NM.maximum)),
    OpRule("Min", _variadic(NM.minimum)),
    OpRule("Sum", _variadic(R.add)),
    OpRule("Mean", lower_mean, kind="decomposed"),
    OpRule("Where", lower_where, since=9),
    OpRule("IsInf", lower_isinf, since=10),
    OpRule("LeakyRelu", _f32_for_bf16(lower_leaky_relu)),
    OpRule("Elu", _f32_for_bf16(lower_elu), kind="decomposed"),
    OpRule("Selu", _f32_for_bf16(lower_selu), kind="decomposed"),
    OpRule("Celu", _f32_for_bf16(lower_celu), since=12, kind="decomposed"),
    OpRule("HardSigmoid", _f32_for_bf16(lower_hard_sigmoid), kind="decomposed"),
    OpRule("HardSwish", _f32_for_bf16(lower_hard_swish), since=14, kind="decomposed"),
    OpRule("ThresholdedRelu", _f32_for_bf16(lower_thresholded_relu), since=10),
    OpRule("PRelu", _f32_for_bf16(lower_prelu)),
    OpRule("Gelu", _f32_for_bf16(lower_gelu), since=20, kind="decomposed"),
    OpRule("Swish", _f32_for_bf16(lower_swish), since=24, kind="decomposed"),
    OpRule("SwiGLU", _f32_for_bf16(lower_swiglu), since=28, kind="decomposed"),
    OpRule("Shrink", _f32_for_bf16(lower_shrink), since=9, kind="decomposed"),
    OpRule("Clip", lower_clip_6, until=10),
    OpRule("Clip", lower_clip_11, since=11),
    OpRule("Dropout", lower_dropout),
    OpRule("Constant", lower_constant),
    OpRule("ConstantOfShape", lower_constant_of_shape, since=9),
    OpRule("Range", lower_range, since=11),
)
