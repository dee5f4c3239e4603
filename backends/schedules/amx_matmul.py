"""``int8_matmul``'s kernel on AMX tiles (x86 with AMX-INT8), for 16 rows and more.

The same contract as ``int8_matmul.qmatmul_func`` (uint8 ``[m, k]`` activations x a constant int8
weight -> int32 sums with the zero points folded in, then the epilogue ``value``), on ``tdpbusd``:
a 16x64 uint8 tile of 16 rows x 64 of K times a 16x64 int8 tile (16 rows of 4 of K x 16 columns)
into 16x16 int32 sums, exact. Per work item, 32 rows x 32 columns: two row tiles x two weight
tiles, four accumulators over K; then the epilogue, 16 columns (a tile row) a vector. Items are
(column pair, row pair), column pairs outer, split evenly between threads: a thread's weight
tiles stay in cache over its rows.

The weight is packed by ``amx_int8.pack_weight`` (a 1x1 conv's): ``[Np/16, 1, Kp/64, 16, 16, 4]``;
rows are padded to 32 and K to 64 (zeros) by a copy where needed.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from . import amx_int8
from .amx_kernel import _drop_param, _load, _store, _zero, tile_config

MIN_ROWS = 16  # below this a tile of 16 rows is mostly padding: the VNNI kernel serves


def pack(w: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` -> ``[Np/16, 1, Kp/64, 16, 16, 4]``."""
    return amx_int8.pack_weight(np.ascontiguousarray(w.T)[:, :, None, None])


def columns(n: int) -> int:
    """The padded column count the per-column constants are given for."""
    return amx_int8.padded_channels(64, n)[1]


def qmatmul_func(m: int, k: int, n: int, *, rows: bool, scales: int, threads: int, value, lead: tuple = (),
                 index=None, wscales: int = 0) -> tirx.PrimFunc:
    """The PrimFunc ``(x, zx, wp, colsum[, shift][, scale[, wscale]], out)`` (``int8_matmul.qmatmul_func``'s
    arguments, ``out`` ``[*lead, n]``); ``value(acc, zx, colsum, shift, rsum, scale, wscale, row, col)``:
    the output element; ``index(row, col)``: its index in ``out`` (default: ``out`` is ``[m, n]``)."""
    index = index or (lambda r, c: (r, c))
    out_shape = (*(lead or (m,)), n)
    kp, cols = amx_int8.padded_channels(k, n)
    mp, kc_n, ob_pairs, row_pairs = math.ceil(m / 32) * 32, kp // 64, cols // 32, math.ceil(m / 32)
    copy = mp != m or kp != k
    work = ob_pairs * row_pairs
    chunk = math.ceil(work / threads)
    nthreads = math.ceil(work / chunk)
    out_dtype = "float32" if scales else "int32"
    ns, nw = max(scales, 1), max(wscales, 1)

    @T.prim_func(private=True, s_tir=True)
    def qmm(x: T.Buffer((m, k), "uint8"), zx: T.Buffer((1,), "uint8"), wp: T.Buffer((cols // 16, 1, kc_n, 16, 16, 4), "int8"),
            colsum: T.Buffer((cols,), "int32"), shift: T.Buffer((cols,), "int32"), scale: T.Buffer((ns,), "float32"),
            wscale: T.Buffer((nw,), "float32"),
            out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "graphopt.flops": 2 * m * k * n})
        with T.sblock("root"):
            rsum = T.sblock_alloc_buffer((mp if rows else 1,), "int32")
            if copy:
                xs = T.sblock_alloc_buffer((mp, kp), "uint8")
                for r in range(mp):
                    for c in T.vectorized(kp):
                        xs[r, c] = T.if_then_else(r < m and c < k, x[T.min(r, m - 1), T.min(c, k - 1)], T.uint8(0))
            else:
                xs = x
            if rows:
                for r in range(mp):
                    rsum[r] = 0
                    for c in range(kp):
                        rsum[r] = rsum[r] + T.Cast("int32", xs[r, c])
            for th in T.parallel(nthreads):
                cfg = T.decl_buffer((64,), "uint8", scope="local")
                acc = T.decl_buffer((4, 16, 16), "int32", scope="local")
                tile_config(cfg)
                for item in range(th * chunk, T.min(work, th * chunk + chunk)):
                    T.evaluate(_zero(0))
                    T.evaluate(_zero(1))
                    T.evaluate(_zero(2))
                    T.evaluate(_zero(3))
                    for kc in range(kc_n):
                        T.evaluate(_load(4, T.address_of(xs[item % row_pairs * 32, kc * 64]), kp))
                        T.evaluate(_load(5, T.address_of(xs[item % row_pairs * 32 + 16, kc * 64]), kp))
                        T.evaluate(_load(6, T.address_of(wp[item // row_pairs * 2, 0, kc, 0, 0, 0]), 64))
                        T.evaluate(_load(7, T.address_of(wp[item // row_pairs * 2 + 1, 0, kc, 0, 0, 0]), 64))
                        T.evaluate(amx_int8._dot(0))
                        T.evaluate(amx_int8._dot(1))
                        T.evaluate(amx_int8._dot(2))
                        T.evaluate(amx_int8._dot(3))
                    T.evaluate(_store(0, T.address_of(acc[0, 0, 0]), 64))
                    T.evaluate(_store(1, T.address_of(acc[1, 0, 0]), 64))
                    T.evaluate(_store(2, T.address_of(acc[2, 0, 0]), 64))
                    T.evaluate(_store(3, T.address_of(acc[3, 0, 0]), 64))
                    for i, rr, jn in T.grid(2, 16, 2):
                        if item % row_pairs * 32 + i * 16 + rr < m:
                            if (item // row_pairs * 2 + jn) * 16 + 16 <= n:
                                for c in T.vectorized(16):
                                    out[index(item % row_pairs * 32 + i * 16 + rr, (item // row_pairs * 2 + jn) * 16 + c)] = value(
                                        acc[i * 2 + jn, rr, c], zx, colsum, shift, rsum, scale, wscale,
                                        item % row_pairs * 32 + i * 16 + rr, (item // row_pairs * 2 + jn) * 16 + c)
                            else:
                                for c in range(16):
                                    if (item // row_pairs * 2 + jn) * 16 + c < n:
                                        out[index(item % row_pairs * 32 + i * 16 + rr, (item // row_pairs * 2 + jn) * 16 + c)] = value(
                                            acc[i * 2 + jn, rr, c], zx, colsum, shift, rsum, scale, wscale,
                                            item % row_pairs * 32 + i * 16 + rr, (item // row_pairs * 2 + jn) * 16 + c)
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))

    func = qmm
    for name, used in (("shift", rows), ("scale", scales), ("wscale", wscales)):
        func = func if used else _drop_param(func, name)
    return func
