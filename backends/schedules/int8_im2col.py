"""Integer convs with few input channels (a network's first conv) on the AMX-INT8 kernel, via im2col.

The AMX kernel reads input channels 64 at a time and takes a kxk conv as k² shifted products: a
3-channel 7x7 stem (ResNet-50) would pad each of its 49 taps from 3 to 64 channels, 21x the work,
and the generic integer conv ran it at 10.8 ms of a 50 ms ResNet-50 int8 run. Here the conv's
window becomes the channel axis instead: ``im2col_func`` writes ``[1, OH, OW, k·k·C]`` uint8 (taps
in (ky, kx, c) order, the zero point where the window leaves the padded input), a 1x1 stride-1
conv of ``k·k·C`` channels that the kernel reads NHWC; ``im2col_weight`` orders the weight to match.
"""

from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

MIN_WINDOW = 16  # k·k·C below this: not worth a 64-channel tile (channels padded to 64)


def im2col_weight(w: np.ndarray) -> np.ndarray:
    """OIHW ``[O, C, kh, kw]`` → ``[O, kh·kw·C, 1, 1]`` in the (ky, kx, c) order of ``im2col_func``."""
    o = w.shape[0]
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(o, -1, 1, 1))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def output_size(h: int, w: int, k, stride, pad) -> tuple[int, int]:
    """(OH, OW); ``k``, ``stride`` and ``pad`` each an int or a (vertical, horizontal) pair."""
    (kh, kw), (sy, sx), (ph, pw) = _pair(k), _pair(stride), _pair(pad)
    return (h + 2 * ph - kh) // sy + 1, (w + 2 * pw - kw) // sx + 1


def im2col_func(c: int, h: int, w: int, k, stride, pad, *, threads: int, in_layout: str = "NCHW",
                width: int | None = None):
    """The PrimFunc ``(x [1, C, H, W] (or NHWC) uint8, zero point [1] uint8, cols [1, OH, OW, kh·kw·C]
    uint8)``; ``k``, ``stride``, ``pad`` ints or (vertical, horizontal) pairs (the zero point a tensor:
    Relax's reshape-pattern check fails on a one-input function without a root block). ``width``:
    the row length when larger than kh·kw·C, the rest zeros (a multiple of 64: the AMX kernel then
    copies whole 64-byte rows, its weights for those columns being 0)."""
    (kh, kw), (sy, sx), (ph, pw) = _pair(k), _pair(stride), _pair(pad)
    oh, ow = output_size(h, w, k, stride, pad)
    window = kh * kw * c
    kk = width or window
    chunk = math.ceil(oh / threads)
    x_shape = (1, c, h, w) if in_layout == "NCHW" else (1, h, w, c)

    def at(ci, y, x_):
        return (0, ci, y, x_) if in_layout == "NCHW" else (0, y, x_, ci)

    @T.prim_func(private=True)
    def im2col(x: T.Buffer(x_shape, "uint8"), zp: T.Buffer((1,), "uint8"), cols: T.Buffer((1, oh, ow, kk), "uint8")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for th in T.parallel(threads):
            for oy in range(th * chunk, T.min(oh, th * chunk + chunk)):
                for ky, ox, kx, ci in T.grid(kh, ow, kw, c):
                    if (0 <= oy * sy + ky - ph and oy * sy + ky - ph < h
                            and 0 <= ox * sx + kx - pw and ox * sx + kx - pw < w):
                        cols[0, oy, ox, (ky * kw + kx) * c + ci] = x[*at(ci, oy * sy + ky - ph, ox * sx + kx - pw)]
                    else:
                        cols[0, oy, ox, (ky * kw + kx) * c + ci] = zp[0]
                for ox, j in T.grid(ow, kk - window):
                    cols[0, oy, ox, window + j] = T.uint8(0)

    return im2col
