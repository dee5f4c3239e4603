"""Lowering rules: graphopt's integer ops ``QConv`` and ``QGemm`` (written by ``qdq_fuse``).

Each becomes an integer product (uint8 activations x int8 weights, int32 sums: ``conv2d`` or
``matmul`` with ``out_dtype="int32"``) followed by its epilogue, elementwise ops that FuseOps puts in
the product's loop nest:

    y_q = clip(round_half_even(float32(acc + c[o]) * multiplier[o]) + zy, qmin, qmax)

where ``c[o] = bias[o] - zx·Σ w[o, ...]`` is the zero-point correction folded into the bias at compile
time (so the product reads the raw uint8 data), and the input is padded with ``zx`` (the quantized
zero) before a Conv. int8 activations are moved to uint8 (``x + 128``, ``zx + 128``: the same
differences), the form the VNNI/AMX instructions (``vpdpbusd``, ``tdpbusd``: u8 x s8) take.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from graphopt.backends.lowering import helpers, nn
from graphopt.backends.lowering.rules import OpRule

op = relax.op
DOMAIN = "graphopt"


def _unsigned(ctx, x) -> tuple[relax.Expr, int]:
    """(x as uint8, its zero point): int8 data is shifted by 128."""
    zx = int(ctx.attr("x_zero_point", 0))
    if helpers.dtype_of(x) == "uint8":
        return x, zx
    ctx.check(helpers.dtype_of(x) == "int8", lambda: f"quantized input type {helpers.dtype_of(x)} (uint8 or int8 expected)")
    shifted = op.add(op.astype(x, "int32"), helpers.scalar(128, "int32"))
    return ctx.emit(op.astype(shifted, "uint8")), zx + 128


def requantize(ctx, acc: relax.Expr, correction: np.ndarray, multiplier: np.ndarray, channel_shape) -> relax.Expr:
    """The epilogue: int32 sums plus the per-channel correction, scaled, rounded, shifted, clamped."""
    c = helpers.const(correction.astype(np.int32).reshape(channel_shape))
    m = helpers.const(multiplier.astype(np.float32).reshape(channel_shape))
    y = op.round(op.multiply(op.astype(op.add(acc, c), "float32"), m))
    y = op.add(y, helpers.scalar(float(ctx.attr("y_zero_point", 0)), "float32"))
    y = op.clip(y, float(ctx.attr("qmin")), float(ctx.attr("qmax")))
    return op.astype(y, ctx.out_dtype(0) or "uint8")


def _constants(ctx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = ctx.require_const(1, "int8 weight")
    bias = ctx.require_const(2, "int32 bias").astype(np.int64)
    multiplier = ctx.require_const(3, "requantization multiplier")
    return w, bias, multiplier


def _qconv(ctx, inputs):
    x, zx = _unsigned(ctx, inputs[0])
    w, bias, multiplier = _constants(ctx)
    ctx.check(w.ndim == 4 and helpers.rank_of(x) == 4, "QConv is 2-D")
    strides, dilations, pads = nn._window(ctx, list(ctx.attr("kernel_shape") or w.shape[2:]))
    if any(pads):
        x = ctx.emit(op.nn.pad(x, [0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]], pad_value=float(zx)))
    acc = op.nn.conv2d(x, inputs[1], strides=strides, padding=0, dilation=dilations,
                       groups=int(ctx.attr("group", 1)), out_dtype="int32")
    correction = bias - zx * w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
    return requantize(ctx, ctx.emit(acc), correction, multiplier, (1, -1, 1, 1))


def _qgemm(ctx, inputs):
    x, zx = _unsigned(ctx, inputs[0])
    w, bias, multiplier = _constants(ctx)
    ctx.check(w.ndim == 2, "QGemm's weight is 2-D")
    acc = op.matmul(x, inputs[1], out_dtype="int32")
    correction = bias - zx * w.astype(np.int64).sum(axis=0)
    return requantize(ctx, ctx.emit(acc), correction, multiplier, (-1,))


RULES = (
    OpRule("QConv", _qconv, domain=DOMAIN, kind="decomposed"),
    OpRule("QGemm", _qgemm, domain=DOMAIN, kind="decomposed"),
)
