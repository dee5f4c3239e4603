"""An integer convolution on AMX tiles (x86 with AMX-INT8): uint8 activations x int8 weights -> int32.

One ``tdpbusd`` multiplies a 16x64 uint8 tile (16 grid positions x 64 input channels) by a 16x64
int8 tile (16 rows of 4 input channels x 16 output channels) into 16x16 int32 sums, exactly: no
splitting as in the bfloat16 kernel (``amx_kernel.py``), a quarter of its tile products.

``qconv_func`` returns one PrimFunc ``(x, wp, corr, mult, out)``, written out rather than scheduled:

* the gather: the NCHW or NHWC uint8 input, padded with its zero point ``zx``, becomes ``[phases,
  C/64, rows, 64]``, a row per position of the padded grid (``amx_kernel.geometry``: a 3x3 tap is an
  offset of ``ky·GW + kx`` rows, a strided odd kernel reads ``stride²`` phase grids, a strided 1x1
  gathers its positions); input channels past C are 0 (their weights are 0 too). From NHWC a row is
  a 64-byte copy, from NCHW a byte transpose;
* the products: per 32 output channels x 32 grid positions, four accumulator tiles over every
  (tap, 64 input channels); then the requantization on the way out to NCHW or NHWC uint8/int8,
  16 output channels (a tile row) a vector:
  ``clamp(round(float(acc + corr[o]) · mult[o]) + zy, qmin, qmax)`` (``corr`` is the bias with the
  zero-point correction, as in ``lowering/qdq.py``); to NHWC the 16 results are one store, to NCHW
  16 byte stores;
* the work: (pair of output blocks, range of tile pairs) items, split evenly between threads.

The weight is packed once, at compile time (``pack_weight``): ``[O/16, taps, C/64, 16, 16, 4]``.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from .amx_kernel import _int8, _load, _store, _zero, geometry, tile_config

TILE = 16
K_TILE = 64  # input channels per tile row (64 bytes)
ITEMS_PER_THREAD = 4


def padded_channels(c: int, o: int) -> tuple[int, int]:
    return math.ceil(c / K_TILE) * K_TILE, math.ceil(o / 32) * 32


def pack_weight(w: np.ndarray) -> np.ndarray:
    """OIHW int8 ``[O, C, k, k]`` → ``[Op/16, k·k, Cp/64, 16, 16, 4]`` (zeros past O and C)."""
    o, c, kh, kw = w.shape
    cp, op_ = padded_channels(c, o)
    full = np.zeros((op_, cp, kh, kw), np.int8)
    full[:o, :c] = w
    t = full.reshape(op_ // TILE, TILE, cp // K_TILE, K_TILE // 4, 4, kh * kw)
    # axes: ob, n, kc, kr, j, tap -> ob, tap, kc, kr, n, j
    return np.ascontiguousarray(t.transpose(0, 5, 2, 3, 1, 4))


def _dot(acc):
    return tirx.call_llvm_intrin("void", "llvm.x86.tdpbusd", _int8(acc), _int8(4 + acc // 2), _int8(6 + acc % 2))


LAYOUTS = ("NCHW", "NHWC")


def qconv_func(c: int, h: int, w: int, o: int, k: int, stride: int, pad: int, *, zx: int, zy: int,
               qmin: int, qmax: int, out_dtype: str, threads: int, in_layout: str = "NCHW",
               out_layout: str = "NCHW"):
    """The PrimFunc ``(x, wp, corr, mult, out)`` of a batch-1 uint8 conv and its requantization;
    ``x`` and ``out`` are NCHW or NHWC (``in_layout``, ``out_layout``)."""
    assert in_layout in LAYOUTS and out_layout in LAYOUTS
    g = geometry(h, w, k, stride, pad)
    oh, ow, gw, qt, rows = g["oh"], g["ow"], g["gw"], g["qt"], g["rows"]
    grid_h, phases = g["gh"], g["phases"]
    ps = stride if k > 1 else 1
    cp, op_ = padded_channels(c, o)
    kc_n, ob_n, taps = cp // K_TILE, op_ // TILE, k * k
    grid_rows = grid_h * gw
    ob_pairs = ob_n // 2
    tq = qt // 2
    q_ranges = max(1, min(tq, math.ceil(ITEMS_PER_THREAD * threads / ob_pairs)))
    qpairs = math.ceil(tq / q_ranges)
    work = ob_pairs * q_ranges
    chunk = math.ceil(work / threads)
    nthreads = math.ceil(work / chunk)
    split_work = kc_n * grid_h * phases
    split_chunk = math.ceil(split_work / threads)
    flops = 2 * c * o * taps * oh * ow

    if k > 1:
        def padded(ph, gy, gx):
            return gy * ps + ph // ps - pad, gx * ps + ph % ps - pad

        def inside(ph, gy, gx):
            y, x_ = padded(ph, gy, gx)
            return tirx.all(y >= 0, y < h, x_ >= 0, x_ < w)

        def source(ph, gy, gx):
            y, x_ = padded(ph, gy, gx)
            return tirx.min(tirx.max(y, 0), h - 1), tirx.min(tirx.max(x_, 0), w - 1)
    else:
        inside = lambda ph, gy, gx: tirx.const(True, "bool")  # noqa: E731
        source = lambda ph, gy, gx: (gy * stride, gx * stride)  # noqa: E731

    def phase(tap):
        return tap // k % ps * ps + tap % k % ps

    def shift(tap):
        return tap // k // ps * gw + tap % k // ps

    x_shape = (1, c, h, w) if in_layout == "NCHW" else (1, h, w, c)
    out_shape = (1, o, oh, ow) if out_layout == "NCHW" else (1, oh, ow, o)

    def index(layout, ch, y, x_):
        return (0, ch, y, x_) if layout == "NCHW" else (0, y, x_, ch)

    def requant(s, corr, mult, ch):
        v = T.Cast("float32", s + corr[ch]) * mult[ch]
        v = T.round(v) + T.float32(zy)
        return T.Cast(out_dtype, T.max(T.min(v, T.float32(qmax)), T.float32(qmin)))

    @T.prim_func(private=True)
    def qconv(x: T.Buffer(x_shape, "uint8"),
              wp: T.Buffer((ob_n, taps, kc_n, 16, 16, 4), "int8"),
              corr: T.Buffer((op_,), "int32"),
              mult: T.Buffer((op_,), "float32"),
              out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.flops": flops,
                     "graphopt.layouts": f"{in_layout}-{out_layout}"})
        sp = T.alloc_buffer((phases, kc_n, rows, 64), "uint8")
        for ph, kc, r, j in T.grid(phases, kc_n, rows - grid_rows, 64):
            sp[ph, kc, grid_rows + r, j] = T.uint8(zx)
        for th in T.parallel(threads):
            for kcy in range(th * split_chunk, T.min(split_work, th * split_chunk + split_chunk)):
                if in_layout == "NHWC":  # channels innermost already: 64-byte copies
                    for gx in range(gw):
                        if inside(kcy // kc_n % phases, kcy // (kc_n * phases), gx) and kcy % kc_n * 64 + 64 <= c:
                            for j in T.vectorized(64):
                                sp[kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx, j] = x[*index(
                                    in_layout, kcy % kc_n * 64 + j, *source(kcy // kc_n % phases, kcy // (kc_n * phases), gx))]
                        else:
                            for j in range(64):
                                if kcy % kc_n * 64 + j < c and inside(kcy // kc_n % phases, kcy // (kc_n * phases), gx):
                                    sp[kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx, j] = x[*index(
                                        in_layout, kcy % kc_n * 64 + j, *source(kcy // kc_n % phases, kcy // (kc_n * phases), gx))]
                                else:
                                    sp[kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx, j] = T.Select(
                                        kcy % kc_n * 64 + j < c, T.uint8(zx), T.uint8(0))
                else:
                    for j, gx in T.grid(64, gw):
                        if kcy % kc_n * 64 + j < c and inside(kcy // kc_n % phases, kcy // (kc_n * phases), gx):
                            sp[kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx, j] = x[*index(
                                in_layout, kcy % kc_n * 64 + j, *source(kcy // kc_n % phases, kcy // (kc_n * phases), gx))]
                        else:
                            sp[kcy // kc_n % phases, kcy % kc_n, kcy // (kc_n * phases) * gw + gx, j] = T.Select(
                                kcy % kc_n * 64 + j < c, T.uint8(zx), T.uint8(0))
        for th in T.parallel(nthreads):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            acc = T.alloc_buffer((4, 16, 16), "int32", scope="local")
            tile_config(cfg)
            for item in range(th * chunk, T.min(work, th * chunk + chunk)):
                for qp in range(T.min(qpairs, tq - item // ob_pairs * qpairs)):
                    T.evaluate(_zero(0))
                    T.evaluate(_zero(1))
                    T.evaluate(_zero(2))
                    T.evaluate(_zero(3))
                    for kc, tap in T.grid(kc_n, taps):
                        T.evaluate(_load(4, T.address_of(sp[phase(tap), kc, (item // ob_pairs * qpairs + qp) * 32 + shift(tap), 0]), 64))
                        T.evaluate(_load(5, T.address_of(sp[phase(tap), kc, (item // ob_pairs * qpairs + qp) * 32 + shift(tap) + 16, 0]), 64))
                        T.evaluate(_load(6, T.address_of(wp[item % ob_pairs * 2, tap, kc, 0, 0, 0]), 64))
                        T.evaluate(_load(7, T.address_of(wp[item % ob_pairs * 2 + 1, tap, kc, 0, 0, 0]), 64))
                        T.evaluate(_dot(0))
                        T.evaluate(_dot(1))
                        T.evaluate(_dot(2))
                        T.evaluate(_dot(3))
                    T.evaluate(_store(0, T.address_of(acc[0, 0, 0]), 64))
                    T.evaluate(_store(1, T.address_of(acc[1, 0, 0]), 64))
                    T.evaluate(_store(2, T.address_of(acc[2, 0, 0]), 64))
                    T.evaluate(_store(3, T.address_of(acc[3, 0, 0]), 64))
                    # the requantization, 16 output channels a vector (a row of an accumulator tile)
                    for i, rr in T.grid(2, 16):
                        if ((item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) // gw < oh and (
                                (item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) % gw < ow:
                            for jn in range(2):
                                if (item % ob_pairs * 2 + jn) * 16 + 16 <= o:
                                    for l in T.vectorized(16):
                                        out[*index(out_layout, (item % ob_pairs * 2 + jn) * 16 + l,
                                                   ((item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) // gw,
                                                   ((item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) % gw)] = requant(
                                            acc[i * 2 + jn, rr, l], corr, mult, (item % ob_pairs * 2 + jn) * 16 + l)
                                else:
                                    for l in range(16):
                                        if (item % ob_pairs * 2 + jn) * 16 + l < o:
                                            out[*index(out_layout, (item % ob_pairs * 2 + jn) * 16 + l,
                                                       ((item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) // gw,
                                                       ((item // ob_pairs * qpairs + qp) * 32 + i * 16 + rr) % gw)] = requant(
                                                acc[i * 2 + jn, rr, l], corr, mult, (item % ob_pairs * 2 + jn) * 16 + l)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    return qconv
