"""Integer depthwise convs (uint8 activations x int8 weights -> int32, requantized), 16 channels a vector.

PP-OCR's backbones alternate AMX pointwise convs with depthwise 3x3/5x5 convs; left to the generic
integer conv2d those ran NCHW and scalar, and forced the pointwise convs around them to NCHW (their
slow layout: a byte transpose in the gather and a scatter in the requantization). ``dwconv_func``
computes a batch-1 depthwise conv channels-innermost: per output position, each tap adds
``x[iy, ix, c:c+16] * w[tap, c:c+16]`` (int16 products, exact for u8 x s8) to int32 accumulators,
a tap's bounds test shared by all channels (the zero point ``zx`` where the window leaves the input,
so ``corr`` = bias - zx·Σw as for every QConv), then the same requantization as the AMX kernel. Input and output are NHWC or NCHW (NCHW reads strided bytes:
correct, slower); channels must be a multiple of 16 (``served``).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

LANES = 16


def served(c: int, k: int, strides) -> bool:
    return c % LANES == 0 and k % 2 == 1 and all(s in (1, 2) for s in strides)


def pack_weight(w: np.ndarray) -> np.ndarray:
    """``[C, 1, k, k]`` int8 → ``[k·k, C]`` int16 (a tap's 16 channels one vector load)."""
    c, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(c, kh * kw).T.astype(np.int16))


def dwconv_func(c: int, h: int, w: int, k: int, stride, pad: int, *, zx: int, zy: int, qmin: int,
                qmax: int, out_dtype: str, threads: int, in_layout: str = "NHWC", out_layout: str = "NHWC"):
    """The PrimFunc ``(x, wp [k·k, C] int16, corr [C] int32, mult [C] float32, out)``; ``stride`` an
    int or (vertical, horizontal) (PP-OCR rec halves its height only: (2, 1))."""
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    oh, ow = (h + 2 * pad - k) // sy + 1, (w + 2 * pad - k) // sx + 1
    taps, blocks = k * k, c // LANES
    chunk = math.ceil(oh / threads)
    x_shape = (1, c, h, w) if in_layout == "NCHW" else (1, h, w, c)
    out_shape = (1, c, oh, ow) if out_layout == "NCHW" else (1, oh, ow, c)

    def index(layout, ch, y, x_):
        return (0, ch, y, x_) if layout == "NCHW" else (0, y, x_, ch)

    def inside(oy, ox, tap):
        y, x_ = oy * sy + tap // k - pad, ox * sx + tap % k - pad
        return tirx.all(0 <= y, y < h, 0 <= x_, x_ < w)

    def pixel(x, oy, ox, tap, ch):
        y, x_ = oy * sy + tap // k - pad, ox * sx + tap % k - pad
        v = x[index(in_layout, ch, T.max(T.min(y, h - 1), 0), T.max(T.min(x_, w - 1), 0))]
        return T.Cast("int16", T.Select(inside(oy, ox, tap), v, T.uint8(zx)))

    def requant(s, corr, mult, ch):
        v = T.round(T.Cast("float32", s + corr[ch]) * mult[ch]) + T.float32(zy)
        return T.Cast(out_dtype, T.max(T.min(v, T.float32(qmax)), T.float32(qmin)))

    @T.prim_func(private=True)
    def dwconv(x: T.Buffer(x_shape, "uint8"), wp: T.Buffer((taps, c), "int16"), corr: T.Buffer((c,), "int32"),
               mult: T.Buffer((c,), "float32"), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.flops": 2 * c * taps * oh * ow,
                     "graphopt.layouts": f"{in_layout}-{out_layout}"})
        for th in T.parallel(threads):
            acc = T.alloc_buffer((c,), "int32", scope="local")
            for oy in range(th * chunk, T.min(oh, th * chunk + chunk)):
                for ox in range(ow):
                    for cb in range(blocks):
                        for l in T.vectorized(LANES):
                            acc[cb * LANES + l] = 0
                    for tap, cb in T.grid(taps, blocks):  # a tap's bounds test once for every channel
                        for l in T.vectorized(LANES):  # u8 x s8 fits int16 (|255 x -128| < 2^15)
                            acc[cb * LANES + l] = acc[cb * LANES + l] + T.Cast(
                                "int32", pixel(x, oy, ox, tap, cb * LANES + l) * wp[tap, cb * LANES + l])
                    for cb in range(blocks):
                        for l in T.vectorized(LANES):
                            out[*index(out_layout, cb * LANES + l, oy, ox)] = requant(
                                acc[cb * LANES + l], corr, mult, cb * LANES + l)

    return dwconv
