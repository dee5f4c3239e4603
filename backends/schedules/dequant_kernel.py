"""The TIR kernel of ``dequant_matmul.py`` (a matmul reading block-quantized int8/uint8/4-bit weights)
and the numpy packing of its weights into column panels.

Two forms of the weight: packed ``[ceil(N/T), K, T]`` panels (a tile of ``T = 4 x lanes`` columns
streams one contiguous panel, accumulators in registers; 4-bit codes two a byte), or ``[K, N]`` as
stored (a task streams each weight row over ``WIDE_COLUMNS`` columns, accumulators in L1).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

PANEL_ROWS = 4  # packed, more than one row: rows a register tile accumulates over a dequantized block
WIDE_COLUMNS = 1024  # a weight read as stored: columns a task streams per row (accumulators in L1)
STREAMS = 2  # one row: independent accumulator sets (alternate rows of a block; 8 FMA chains with AVX-512)
PREFETCH_BYTES = 2048  # one row: how far ahead in its panel a task prefetches the codes
PREFETCH_GROUP = 512  # one row: bytes of codes prefetched at a time (then computed on)


@functools.lru_cache(maxsize=64)  # one per weight shape: parsing a kernel takes 0.3 s, GPT-2 has 73 matmuls
def dequant_matmul_func(k: int, n: int, block: int, qdtype: str, sdtype: str, has_zp: bool, packed: bool,
                        tile: int, rows: int, nibble_offset: int | None = None) -> tirx.PrimFunc:
    """``Y [m, n] = X [m, k] @ dequantize(Q)`` for any row count ``m``.

    ``packed``: ``Q [ceil(n/tile), k, tile]``, scales and zero points ``[ceil(n/tile), k/block, tile]``
    (zero-padded columns); else ``Q [k, n]``, scales and zero points ``[k/block, n]``.
    ``nibble_offset`` (packed only): ``Q`` holds 4-bit codes eight a word, ``[ceil(n/tile), k/8, tile]``
    int32 (``pack_nibbles``), each stored plus this offset (8 for int4, 0 for uint4)."""
    f32, i32 = "float32", "int32"
    TL, R, B = tile, rows, block
    RM = PANEL_ROWS
    KB, NT, NF = k // block, -(-n // tile), n // tile
    # unpacked: tiles of WIDE columns, then one of W2 (whole vectors) + W3 (the last partial vector)
    WIDE = max(TL, min(WIDE_COLUMNS, n // TL * TL))
    WF = n // WIDE
    W2 = (n - WF * WIDE) // TL * TL
    W3 = n - WF * WIDE - W2
    WR = int(W2 + W3 > 0)
    nibbles = nibble_offset is not None
    OFF = nibble_offset or 0
    shifted = has_zp or OFF != 0  # codes to shift by a per-block offset
    qshape = ((NT, k // 8, TL) if nibbles else (NT, k, TL)) if packed else (k, n)
    qstore = "int32" if nibbles else qdtype
    sshape = (NT, KB, TL) if packed else (KB, n)

    # one row: STREAMS sets of accumulators (alternate rows of a block); the codes prefetched PREFETCH_BYTES
    # ahead, a group of PG rows (PREFETCH_GROUP bytes) at a time between loops (a call inside the loop
    # over a group's rows would keep blk in memory; a whole block's prefetches at once ran slower);
    # 4-bit codes on AVX-512 (16 float lanes: x86, features.llvm_vector_bits) looked up in a table (vpermps)
    RB = TL * 4 if nibbles else TL  # bytes a panel row holds (4-bit codes: a row of 32-bit words)
    BR = B // 8 if nibbles else B  # panel rows a block spans
    SS = STREAMS if BR % STREAMS == 0 else 1
    PG = max(g for g in range(SS, BR + 1, SS) if BR % g == 0 and (g == SS or g * RB <= PREFETCH_GROUP))
    KR = k // 8 if nibbles else k  # rows of a panel
    PF = max(1, PREFETCH_BYTES // RB)
    LINES, PER_LINE = max(1, RB // 64), 64 // (4 if nibbles else 1)
    STEP = math.gcd(PG, max(1, 64 // RB))  # rows a prefetched line holds (rows under 64 bytes)
    lut = nibbles and TL == 64
    LUT = tirx.Cast("float32x16", tirx.Ramp(tirx.const(-OFF, i32), tirx.const(1, i32), 16))

    @T.macro
    def prefetch_group(Q, nt, row):  # rows row..row+PG-1, PF ahead (none past the panel's end)
        if row + PF + PG <= KR:
            for r in T.unroll(PG // STEP):
                for ln in T.unroll(LINES):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        Q[nt, row + r * STEP + PF, ln * PER_LINE]), 0, 3, 1))

    @T.macro
    def tile_rows(nt, i0, tail, X, Q, S, Z, Y, acc, blk, xs):
        # packed, one row (a decode step's GEMV): one panel of TL columns, accumulators in registers. Offsets (zero point, the
        # 4-bit codes' +8 where no table takes it off) are taken off once a block: sum x * (c - o) = sum x * c - o * sum x
        for j in T.vectorized(TL):
            acc[j] = T.float32(0)
        for kb in range(KB):
            for h, j in T.grid(SS, TL):
                blk[h, j] = T.float32(0)
            if has_zp or (shifted and not lut):
                xs[0] = T.float32(0)
                for kk in range(B):
                    xs[0] = xs[0] + X[i0, kb * B + kk]
            for g in range(BR // PG):
                prefetch_group(Q, nt, kb * BR + g * PG)
                for kk in range(PG // SS):
                    for h in T.unroll(SS):
                        if lut:  # eight 4-bit codes a 32-bit word, k = 8i + t in bits 4t..4t+3; vpermps reads bits 0..3
                            for v in T.unroll(TL // 16):
                                for t in T.unroll(8):
                                    blk[h, T.ramp(v * 16, 1, 16)] = blk[h, T.ramp(v * 16, 1, 16)] + T.Broadcast(
                                        X[i0, 8 * (kb * BR + g * PG + kk * SS + h) + t], 16) * T.call_llvm_pure_intrin(
                                        "float32x16", "llvm.x86.avx512.permvar.sf.512", LUT, T.shift_right(
                                            Q[nt, kb * BR + g * PG + kk * SS + h, T.ramp(v * 16, 1, 16)],
                                            T.Broadcast(T.int32(4 * t), 16)))
                        elif nibbles:
                            for t in T.unroll(8):
                                for j in T.vectorized(TL):
                                    blk[h, j] = blk[h, j] + X[i0, 8 * (kb * BR + g * PG + kk * SS + h) + t] * T.Cast(
                                        f32, T.bitwise_and(T.shift_right(Q[nt, kb * BR + g * PG + kk * SS + h, j], 4 * t), 15))
                        else:
                            for j in T.vectorized(TL):
                                blk[h, j] = blk[h, j] + X[i0, kb * BR + g * PG + kk * SS + h] * T.Cast(
                                    f32, Q[nt, kb * BR + g * PG + kk * SS + h, j])
            for h in T.unroll(1, SS):
                for j in T.vectorized(TL):
                    blk[0, j] = blk[0, j] + blk[h, j]
            for j in T.vectorized(TL):
                if has_zp:
                    acc[j] = acc[j] + (blk[0, j] - (T.Cast(f32, Z[nt, kb, j]) + T.float32(0 if lut else OFF)) * xs[0]) * T.Cast(
                        f32, S[nt, kb, j])
                elif shifted and not lut:
                    acc[j] = acc[j] + (blk[0, j] - T.float32(OFF) * xs[0]) * T.Cast(f32, S[nt, kb, j])
                else:
                    acc[j] = acc[j] + blk[0, j] * T.Cast(f32, S[nt, kb, j])
        if tail:
            for j in range(TL):
                if nt * TL + j < n:
                    Y[i0, nt * TL + j] = acc[j]
        else:
            for j in T.vectorized(TL):
                Y[i0, nt * TL + j] = acc[j]

    @T.macro
    def wide_tile(n0, nv, vw, clamp, i0, m, X, Q, S, Z, Y, acc, blk):
        # Q [k, n] as stored: ``nv`` vectors of ``vw`` columns from ``n0`` (clamped: the last, partial
        # vector), accumulators in L1; each weight row is read as one contiguous run of nv * vw bytes
        for r, c in T.grid(R, nv * vw):
            acc[r, c] = T.float32(0)
        for kb in range(KB):
            for r, c in T.grid(R, nv * vw):
                blk[r, c] = T.float32(0)
            for kk in range(B):
                for r in T.unroll(R):
                    for jj in range(nv):
                        for j in T.vectorized(vw):
                            if clamp:
                                if has_zp:
                                    blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                        f32, T.Cast(i32, Q[kb * B + kk, T.min(n0 + j, n - 1)])
                                        - T.Cast(i32, Z[kb, T.min(n0 + j, n - 1)]))
                                else:
                                    blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                        f32, Q[kb * B + kk, T.min(n0 + j, n - 1)])
                            elif has_zp:
                                blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, T.Cast(i32, Q[kb * B + kk, n0 + jj * vw + j]) - T.Cast(i32, Z[kb, n0 + jj * vw + j]))
                            else:
                                blk[r, jj * vw + j] = blk[r, jj * vw + j] + X[T.min(i0 + r, m - 1), kb * B + kk] * T.Cast(
                                    f32, Q[kb * B + kk, n0 + jj * vw + j])
            for r in T.unroll(R):
                for jj in range(nv):
                    for j in T.vectorized(vw):
                        if clamp:
                            acc[r, j] = acc[r, j] + blk[r, j] * T.Cast(f32, S[kb, T.min(n0 + j, n - 1)])
                        else:
                            acc[r, jj * vw + j] = acc[r, jj * vw + j] + blk[r, jj * vw + j] * T.Cast(
                                f32, S[kb, n0 + jj * vw + j])
        for r in range(R):
            if i0 + r < m:
                if clamp:
                    for j in range(vw):
                        if n0 + j < n:
                            Y[i0 + r, n0 + j] = acc[r, j]
                else:
                    for jj in range(nv):
                        for j in T.vectorized(vw):
                            Y[i0 + r, n0 + jj * vw + j] = acc[r, jj * vw + j]

    @T.macro
    def panel_rows(nt, m, tail, X, Q, S, Z, Y, deq, acc):
        # several rows: each block of the panel dequantized once (scale folded in) into deq [B, TL] (L1),
        # then RM rows at a time accumulate over it, their sums kept in Y between blocks
        for kb in range(KB):
            if nibbles:
                for k8 in range(B // 8):
                    for t in T.unroll(8):
                        for j in T.vectorized(TL):
                            if has_zp:
                                deq[8 * k8 + t, j] = T.Cast(f32, T.bitwise_and(T.shift_right(
                                    Q[nt, kb * (B // 8) + k8, j], 4 * t), 15) - T.Cast(i32, Z[nt, kb, j]) - OFF) * T.Cast(
                                    f32, S[nt, kb, j])
                            else:
                                deq[8 * k8 + t, j] = T.Cast(f32, T.bitwise_and(T.shift_right(
                                    Q[nt, kb * (B // 8) + k8, j], 4 * t), 15) - OFF) * T.Cast(f32, S[nt, kb, j])
            else:
                for kk in range(B):
                    for j in T.vectorized(TL):
                        if has_zp:
                            deq[kk, j] = T.Cast(f32, T.Cast(i32, Q[nt, kb * B + kk, j]) - T.Cast(i32, Z[nt, kb, j])) * T.Cast(
                                f32, S[nt, kb, j])
                        else:
                            deq[kk, j] = T.Cast(f32, Q[nt, kb * B + kk, j]) * T.Cast(f32, S[nt, kb, j])
            for rb in range((m + RM - 1) // RM):
                if kb == 0:
                    for r, j in T.grid(RM, TL):
                        acc[r, j] = T.float32(0)
                else:
                    for r in T.unroll(RM):
                        for j in T.vectorized(TL):
                            acc[r, j] = Y[T.min(rb * RM + r, m - 1), T.min(nt * TL + j, n - 1)]
                for kk in range(B):
                    for r in T.unroll(RM):
                        for j in T.vectorized(TL):
                            acc[r, j] = acc[r, j] + X[T.min(rb * RM + r, m - 1), kb * B + kk] * deq[kk, j]
                for r in range(RM):
                    if rb * RM + r < m:
                        if tail:
                            for j in range(TL):
                                if nt * TL + j < n:
                                    Y[rb * RM + r, nt * TL + j] = acc[r, j]
                        else:
                            for j in T.vectorized(TL):
                                Y[rb * RM + r, nt * TL + j] = acc[r, j]

    @T.macro
    def body(X, Q, S, Z, Y, m):
        if packed:
            for nt in T.parallel(NT):
                if R > 1 and m > 1:
                    deq = T.decl_buffer((B, TL), f32, scope="local")
                    accm = T.decl_buffer((RM, TL), f32, scope="local")
                    if nt < NF:
                        panel_rows(nt, m, False, X, Q, S, Z, Y, deq, accm)
                    else:
                        panel_rows(nt, m, True, X, Q, S, Z, Y, deq, accm)
                else:
                    acc = T.decl_buffer((TL,), f32, scope="local")
                    blk = T.decl_buffer((SS, TL), f32, scope="local")
                    xs = T.decl_buffer((1,), f32, scope="local")
                    for i in range(m):
                        if nt < NF:
                            tile_rows(nt, i, False, X, Q, S, Z, Y, acc, blk, xs)
                        else:
                            tile_rows(nt, i, True, X, Q, S, Z, Y, acc, blk, xs)
        else:
            for t in T.parallel(WF + WR):
                acc = T.decl_buffer((R, WIDE), f32, scope="local")
                blk = T.decl_buffer((R, WIDE), f32, scope="local")
                for rb in range((m + R - 1) // R):
                    if t < WF:
                        wide_tile(t * WIDE, WIDE // TL, TL, False, rb * R, m, X, Q, S, Z, Y, acc, blk)
                    else:
                        if W2 > 0:
                            wide_tile(WF * WIDE, W2 // TL, TL, False, rb * R, m, X, Q, S, Z, Y, acc, blk)
                        if W3 > 0:
                            wide_tile(WF * WIDE + W2, 1, W3, True, rb * R, m, X, Q, S, Z, Y, acc, blk)

    if has_zp:
        @T.prim_func(private=True)
        def kernel(x: T.handle, q: T.handle, s: T.handle, z: T.handle, y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            m = T.int64()
            X = T.match_buffer(x, (m, k), f32)
            Q = T.match_buffer(q, qshape, qstore)
            S = T.match_buffer(s, sshape, sdtype)
            Z = T.match_buffer(z, sshape, qdtype)
            Y = T.match_buffer(y, (m, n), f32)
            body(X, Q, S, Z, Y, m)
    else:
        @T.prim_func(private=True)
        def kernel(x: T.handle, q: T.handle, s: T.handle, y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            m = T.int64()
            X = T.match_buffer(x, (m, k), f32)
            Q = T.match_buffer(q, qshape, qstore)
            S = T.match_buffer(s, sshape, sdtype)
            Y = T.match_buffer(y, (m, n), f32)
            body(X, Q, S, None, Y, m)

    return kernel


def nibble_offset(q: np.ndarray, block: int) -> int | None:
    """8 for int8 codes within int4's range, 0 for uint8 codes within uint4's (blocks of ``block`` rows of
    ``q [K, N]``, a multiple of 8: a 32-bit word holds 8 rows of one block), else None."""
    if q.size == 0 or q.shape[-2] % 8 or block % 8:
        return None
    lo, hi = int(q.min()), int(q.max())
    if q.dtype == np.int8 and lo >= -8 and hi <= 7:
        return 8
    if q.dtype == np.uint8 and hi <= 15:
        return 0
    return None


def pack_nibbles(panels: np.ndarray, offset: int) -> np.ndarray:
    """``[NT, K, T]`` 4-bit codes → ``[NT, K/8, T]`` int32: (code + offset) of row 8i + t in bits 4t..4t+3."""
    v = (panels.astype(np.int16) + offset).astype(np.uint32)
    words = np.zeros((v.shape[0], v.shape[1] // 8, v.shape[2]), np.uint32)
    for t in range(8):
        words |= v[:, t::8] << np.uint32(4 * t)
    return words.view(np.int32)


def pack_columns(a: np.ndarray, tile: int) -> np.ndarray:
    """``[R, N]`` → ``[ceil(N/tile), R, tile]``, the columns past ``N`` zero."""
    r, n = a.shape
    nt = -(-n // tile)
    padded = np.zeros((r, nt * tile), a.dtype)
    padded[:, :n] = a
    return np.ascontiguousarray(padded.reshape(r, nt, tile).transpose(1, 0, 2))
